"""Image decoding and the inference-time preprocessing, in NumPy and Pillow only (no PyTorch).

This is all a torch-free install needs to turn a PNG, JPEG, TIFF or DICOM file into the model input: the ONNX path
(:mod:`boneage.backends.onnx`) uses it directly and :mod:`boneage.dataset` builds its tensors on it. The resize is
Pillow's bilinear filter on float32 images, which is the same antialiased filter as
``torch.nn.functional.interpolate(..., mode="bilinear", antialias=True)`` (measured difference below 1e-6); a contract
with ``source_antialias: false`` goes to its source size by plain bilinear interpolation (:func:`resize_plain`, which
matches ``antialias=False`` to within 1e-4)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from boneage.errors import ImageReadError, ImageTooLargeError

# Age stages exactly as the seed: Infant/Toddler [0,60), Child [60,120), Pre-adolescent [120,180), Adolescent 180+.
STAGE_NAMES = ("Infant/Toddler", "Child", "Pre-adolescent", "Adolescent")
STAGE_EDGES_MONTHS = (60.0, 120.0, 180.0)
MAX_IMAGE_PIXELS = 50_000_000  # ~7000 x 7000; a larger image is refused, not decoded
STANDARDIZE_EPS = 1e-3  # floor on an image's SD when standardising: a flat image is not blown up to noise
HAND_SEARCH_SIZE = 96  # the hand is found on a copy this long on its long side: fast, and the same on every film size
HAND_THRESHOLD = 0.25  # foreground: brighter than the background by this fraction of (99th percentile - background)
BORDER_FRACTION = 0.05  # the background level is the median of this outer ring of the frame
_TRUE = {"true", "1", "m", "male", "yes", "t"}
_FALSE = {"false", "0", "f", "female", "no"}
# Headers read as the same field (any case), so the RSNA challenge's own files work as given: the training CSV
# (id, boneage, male), the validation CSV (Image ID, male, Bone Age (months)) and the test key (Case ID, Sex,
# Ground truth bone age (months)).
ID_HEADERS = ("id", "image_id", "image id", "case id")
AGE_HEADERS = ("boneage", "bone_age_months", "bone_age", "bone age (months)", "ground truth bone age (months)")
MALE_HEADERS = ("male", "is_male")  # true/false, 1/0, M/F
SEX_HEADERS = ("sex", "gender")  # M/F or male/female only: 1/0 would not say which is which


def parse_sex(value: Any) -> bool | None:
    """True for male, False for female, None when the value is missing or not understood."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return None


def parse_sex_letter(value: Any) -> bool | None:
    """A ``sex``/``gender`` column's value: M/F or male/female (True for male); None for anything else."""
    text = "" if value is None else str(value).strip().lower()
    return {"m": True, "male": True, "f": False, "female": False}.get(text)


def read_csv_text(path: str | Path) -> Any:
    """A CSV as a frame of strings (empty cells ""), comma-separated or, as spreadsheets in many locales save it,
    semicolon-separated (taken when the header has semicolons and no commas); UTF-8 (with or without a byte-order
    mark) or, failing that, Windows-1252 as older spreadsheets write."""
    import pandas as pd

    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        header = handle.readline()
    separator = ";" if ";" in header and "," not in header else ","
    try:
        _check_field_counts(path, separator, "utf-8-sig")
        return pd.read_csv(path, dtype=str, keep_default_na=False, sep=separator, index_col=False)
    except UnicodeDecodeError:
        _check_field_counts(path, separator, "cp1252")
        return pd.read_csv(path, dtype=str, keep_default_na=False, sep=separator, encoding="cp1252", index_col=False)


def _check_field_counts(path: str | Path, separator: str, encoding: str) -> None:
    """Refuse a row with more fields than the header: pandas would silently shift such a row's values into an index
    (``10000,true,extra`` under ``id,male`` read as id ``true``)."""
    import csv

    import pandas as pd

    with open(path, newline="", encoding=encoding) as handle:
        rows = csv.reader(handle, delimiter=separator)
        header = next(rows, [])
        for line, row in enumerate(rows, start=2):
            if len(row) > len(header):
                raise pd.errors.ParserError(
                    f"line {line} has {len(row)} fields but the header has {len(header)} ({separator.join(header)}); "
                    "a value that contains the separator needs quotes"
                )


def pick_column(columns: Sequence[str], aliases: Sequence[str]) -> str | None:
    """The first of ``columns`` whose name, stripped and lower-cased, is one of ``aliases`` (in their order)."""
    lowered = {str(c).strip().lower(): c for c in columns}
    return next((lowered[alias] for alias in aliases if alias in lowered), None)


def is_dicom(path: Path) -> bool:
    """Whether a file is DICOM Part 10 (the DICM magic after its 128-byte preamble)."""
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def read_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode a radiograph to a float32 (H, W) array in [0, 1].

    PNG/JPEG/TIFF/BMP/WebP in 8- or 16-bit grayscale, palette, RGB(A); DICOM detected by its ``DICM`` magic. 8-bit
    images are scaled by 1/255 (as the training data was); deeper images (16-bit PNG/TIFF, DICOM) are min-max scaled,
    after the modality and VOI LUTs for DICOM, and MONOCHROME1 is inverted so bone is bright.

    Raises:
        ImageReadError: naming the file, when it is missing, not an image, truncated, too large or blank.
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise ImageReadError(f"{path}: file not found")
        dicom = is_dicom(path)
    except OSError as err:  # e.g. no permission to read it
        raise ImageReadError(f"{path}: cannot be read ({err.strerror or err})") from None
    if dicom:
        return _read_dicom(path, max_pixels)
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is ours, and lower
            img = Image.open(path)
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"{path}: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}"
                )
            img.load()
            if img.mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            if img.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
                # ITU-R 601 luma; an RGBA radiograph's alpha carries no anatomy
                img = img.convert("L")
            array = np.asarray(img)
    except ImageReadError:
        raise
    except Image.DecompressionBombError:  # Pillow's own refusal, far above our limit: the header's size is absurd
        raise ImageTooLargeError(
            f"{path}: its declared size exceeds the limit of {max_pixels:,} pixels (and Pillow's own)"
        ) from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not a recognised image (expected PNG, JPEG, TIFF, BMP, WebP or DICOM)") from None
    except Exception as err:  # truncated or corrupt data: decoders raise many types; the file is named, not the type
        raise ImageReadError(f"{path}: cannot decode image ({err or 'corrupt data'})") from None
    if array.ndim != 2:
        raise ImageReadError(f"{path}: expected a single-channel image after conversion, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == bool:
        return array.astype(np.float32)
    return _min_max(array.astype(np.float32), path)


def _min_max(array: np.ndarray, path: Path) -> np.ndarray:
    low, high = float(array.min()), float(array.max())
    if not np.isfinite(low) or not np.isfinite(high):
        raise ImageReadError(f"{path}: pixel data contains non-finite values")
    if high <= low:
        raise ImageReadError(f"{path}: image is blank (every pixel is {low:g})")
    return (array - low) / (high - low)


def _read_dicom(path: Path, max_pixels: int) -> np.ndarray:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
    except ImportError as err:
        raise ImportError("Reading DICOM needs pydicom: pip install pydicom") from err
    try:
        dataset = pydicom.dcmread(path)
    except Exception as err:  # pydicom raises many types for corrupt files; the file is named, not the type
        raise ImageReadError(f"{path}: not a readable DICOM file ({err or 'corrupt header'})") from None
    missing = [keyword for keyword in ("Rows", "Columns", "PixelData") if keyword not in dataset]
    if missing:
        raise ImageReadError(f"{path}: a DICOM file without an image (no {', '.join(missing)}); expected a radiograph")
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        frames = int(dataset.get("NumberOfFrames") or 1)
        samples = int(dataset.get("SamplesPerPixel") or 1)
    except (TypeError, ValueError):
        raise ImageReadError(f"{path}: its Rows, Columns, NumberOfFrames or SamplesPerPixel is not a number") from None
    if rows * columns > max_pixels:
        raise ImageTooLargeError(
            f"{path}: {columns}x{rows} = {rows * columns:,} pixels exceeds the limit of {max_pixels:,}"
        )
    if frames * rows * columns * samples > max_pixels:  # checked before anything is decompressed
        raise ImageTooLargeError(
            f"{path}: {frames} frames of {columns}x{rows}x{samples} = {frames * rows * columns * samples:,} values: "
            f"exceeds the limit of {max_pixels:,}; send the one radiograph as a single-frame image"
        )
    try:
        # only the first frame is decoded: a hand radiograph is one image
        pixels = pixel_array(dataset, index=0) if frames > 1 else dataset.pixel_array
    except Exception as err:  # pydicom and its decoders raise many types for corrupt data
        raise ImageReadError(f"{path}: cannot decode DICOM pixel data ({err or 'corrupt data'})") from None
    if pixels.ndim == 3 and samples == 3:  # a colour radiograph (RGB after pydicom's YBR conversion): read as grey
        pixels = pixels[..., :3].astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
        return _min_max(pixels, path)
    if pixels.ndim != 2:
        raise ImageReadError(f"{path}: expected a single-frame grayscale DICOM, got pixel shape {pixels.shape}")
    values = apply_modality_lut(pixels, dataset)
    values = apply_voi_lut(values, dataset, index=0)
    image = _min_max(np.asarray(values, dtype=np.float32), path)
    if str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        image = 1.0 - image
    return image


def dicom_patient_info(path: str | Path) -> dict[str, Any]:
    """Sex and chronological age from a DICOM header (pixels not read): ``{"male": bool | None, "age_months":
    float | None, "age_source": str | None}``. Age from PatientAge (``010Y``, ``006M``, ``030W``, ``100D``), else
    StudyDate - PatientBirthDate, as read (plausible or not: :func:`boneage.inputs.header_age` decides). A file that
    is not DICOM, or cannot be read, gives all None (an unreadable file is reported when its pixels are read)."""
    path = Path(path)
    nothing = {"male": None, "age_months": None, "age_source": None}
    try:
        if not path.is_file() or not is_dicom(path):
            return nothing
        import pydicom

        header = pydicom.dcmread(path, stop_before_pixels=True)
    except ImportError:
        raise
    except Exception:  # unreadable (permission, corrupt header)
        return nothing
    return header_patient_info(header)


def header_patient_info(header: Any) -> dict[str, Any]:
    """:func:`dicom_patient_info` of a DICOM header already read (a pydicom Dataset)."""
    sex = str(header.get("PatientSex", "")).strip().upper()
    male = True if sex == "M" else False if sex == "F" else None
    age_months, age_source = None, None
    age_text = str(header.get("PatientAge", "")).strip().upper()
    units = {"Y": 12.0, "M": 1.0, "W": 12.0 / 52.1775, "D": 12.0 / 365.25}
    if len(age_text) == 4 and age_text[:3].isdigit() and age_text[3] in units:
        age_months, age_source = int(age_text[:3]) * units[age_text[3]], "PatientAge"
    else:
        import datetime as dt

        try:
            born = dt.datetime.strptime(str(header.PatientBirthDate), "%Y%m%d")
            studied = dt.datetime.strptime(str(header.StudyDate), "%Y%m%d")
            age_months, age_source = (studied - born).days / 365.25 * 12, "StudyDate - PatientBirthDate"
        except (AttributeError, ValueError):
            pass
    return {"male": male, "age_months": age_months, "age_source": age_source}


def resize_array(image: np.ndarray, size: int, mode: str = "squash", antialias: bool = True) -> np.ndarray:
    """Resize an (H, W) float32 image to (size, size): ``squash`` stretches, ``letterbox`` keeps the aspect ratio and
    pads the short side with 0 (the same geometry as :func:`boneage.dataset.resize`). ``antialias``: Pillow's
    antialiased bilinear filter; False: plain bilinear interpolation (:func:`resize_plain`)."""
    height, width = image.shape
    if mode == "squash":
        return _resize_to(image, size, size, antialias)
    if mode != "letterbox":
        raise ValueError(f"resize mode: expected 'squash' or 'letterbox', got {mode!r}")
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    scaled = _resize_to(image, new_h, new_w, antialias)
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = scaled
    return out


def _resize_to(image: np.ndarray, height: int, width: int, antialias: bool = True) -> np.ndarray:
    if not antialias:
        return resize_plain(image, height, width)
    from PIL import Image

    return np.asarray(Image.fromarray(image, mode="F").resize((width, height), Image.BILINEAR), dtype=np.float32)


def _plain_axis(length: int, new_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of plain bilinear resampling along one axis (pixel centres aligned, as
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False)``)."""
    scale = np.float32(length / new_length)  # in float32, as PyTorch computes it: the same sample positions
    position = np.maximum((np.arange(new_length, dtype=np.float32) + 0.5) * scale - 0.5, 0.0).astype(np.float32)
    low = np.minimum(np.floor(position).astype(np.int64), length - 1)
    high = np.minimum(low + 1, length - 1)
    return low, high, position - low.astype(np.float32)


def resize_plain(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Plain bilinear resize of an (H, W) image to (height, width), without antialiasing: each output pixel
    interpolates the four input pixels nearest its centre, whatever the scale, so a large film keeps its fine
    grain (at 100 px within the sharpness of the RSNA 100-px copies, where the antialiased filter makes it smoother
    than 98% of them). PyTorch's ``interpolate(..., antialias=False)`` to within 1e-4."""
    rows_low, rows_high, row_weight = _plain_axis(image.shape[0], height)
    cols_low, cols_high, col_weight = _plain_axis(image.shape[1], width)
    rows = image[rows_low] * (1.0 - row_weight[:, None]) + image[rows_high] * row_weight[:, None]
    out = rows[:, cols_low] * (1.0 - col_weight) + rows[:, cols_high] * col_weight
    return out.astype(np.float32)


def _view_axis(coords: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sample positions in [-1, 1] (pixel-centre convention, PyTorch's ``align_corners=False``) -> the two neighbouring
    pixel indices (clipped), the weight of the upper one, and whether each neighbour lies inside the image."""
    position = ((coords + 1.0) * size - 1.0) / 2.0
    low = np.floor(position)
    weight = (position - low).astype(np.float32)
    low_i, high_i = low.astype(np.int64), low.astype(np.int64) + 1
    inside_low, inside_high = (low_i >= 0) & (low_i < size), (high_i >= 0) & (high_i < size)
    return np.clip(low_i, 0, size - 1), np.clip(high_i, 0, size - 1), weight, inside_low, inside_high


def view_batch(images: np.ndarray, angle_degrees: float, zoom: float, standardize: bool) -> np.ndarray:
    """(B, C, S, S) model inputs -> the same images rotated by ``angle_degrees`` and zoomed by ``zoom`` about their
    centre (zoom > 1 enlarges, cropping the edges; < 1 shrinks), for test-time views.

    Bilinear, as the training augmentation resamples (PyTorch's ``affine_grid`` + ``grid_sample``, ``align_corners=
    False``, to within 1e-4), with each image's darkest value outside: the black a [0, 1] image is padded with in
    training, wherever the image reaches black. With a standardising contract each view is standardised again, as
    an image is standardised after its augmentation in training."""
    if angle_degrees == 0.0 and zoom == 1.0:
        return images
    size_y, size_x = images.shape[-2:]
    turn = np.deg2rad(angle_degrees)
    cos, sin = np.cos(turn) / zoom, np.sin(turn) / zoom
    out_x = (2.0 * np.arange(size_x) + 1.0) / size_x - 1.0
    out_y = (2.0 * np.arange(size_y) + 1.0) / size_y - 1.0
    grid_x, grid_y = np.meshgrid(out_x, out_y)
    x0, x1, wx, in_x0, in_x1 = _view_axis(cos * grid_x - sin * grid_y, size_x)
    y0, y1, wy, in_y0, in_y1 = _view_axis(sin * grid_x + cos * grid_y, size_y)
    fill = images.min(axis=(-2, -1), keepdims=True)
    shifted = images - fill
    out = np.zeros_like(images, dtype=np.float32)
    for ys, yw, y_in in ((y0, 1.0 - wy, in_y0), (y1, wy, in_y1)):
        for xs, xw, x_in in ((x0, 1.0 - wx, in_x0), (x1, wx, in_x1)):
            out += shifted[..., ys, xs] * (yw * xw * (y_in & x_in))
    out += fill
    if standardize:
        mean = out.mean(axis=(1, 2, 3), keepdims=True)
        std = np.maximum(out.std(axis=(1, 2, 3), keepdims=True), STANDARDIZE_EPS)
        out = (out - mean) / std
    return out.astype(np.float32)


def _fit_long_side(image: np.ndarray, size: int) -> np.ndarray:
    height, width = image.shape
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    return _resize_to(image, new_h, new_w)


def background_level(image: np.ndarray) -> float:
    """The film's background intensity: the median of its outer ring (:data:`BORDER_FRACTION` of each side)."""
    height, width = image.shape
    ring_h, ring_w = max(1, round(height * BORDER_FRACTION)), max(1, round(width * BORDER_FRACTION))
    ring = np.concatenate(
        [
            image[:ring_h].ravel(),
            image[-ring_h:].ravel(),
            image[ring_h:-ring_h, :ring_w].ravel(),
            image[ring_h:-ring_h, -ring_w:].ravel(),
        ]
    )
    return float(np.median(ring))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a small boolean mask (a breadth-first fill per component)."""
    from collections import deque

    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        component, queue = [start], deque([start])
        while queue:
            row, col = queue.popleft()
            for next_row, next_col in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)):
                if 0 <= next_row < height and 0 <= next_col < width:
                    if mask[next_row, next_col] and not seen[next_row, next_col]:
                        seen[next_row, next_col] = True
                        component.append((next_row, next_col))
                        queue.append((next_row, next_col))
        if len(component) > len(best):
            best = component
    out = np.zeros_like(mask, dtype=bool)
    if best:
        rows, cols = zip(*best)
        out[list(rows), list(cols)] = True
    return out


def hand_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """The box around the hand in an (H, W) image in [0, 1]: ``(top, bottom, left, right)`` in pixels, bottom and
    right exclusive; the whole frame when no hand stands out from the background.

    The hand is the largest connected region brighter than the background (the median of the frame's outer ring) by
    :data:`HAND_THRESHOLD` of the way to the image's 99th percentile, found on a copy :data:`HAND_SEARCH_SIZE` pixels
    long, so a 100-px training copy and a 2,000-px film are searched alike. Side markers and labels are separate,
    smaller regions and are left out.
    """
    height, width = image.shape
    small = _fit_long_side(image, HAND_SEARCH_SIZE)
    background = background_level(small)
    bright = float(np.percentile(small, 99))
    if bright - background < 0.02:  # a flat film: nothing to find
        return 0, height, 0, width
    hand = _largest_component(small > background + HAND_THRESHOLD * (bright - background))
    if hand.sum() < 0.01 * hand.size:
        return 0, height, 0, width
    rows, cols = np.nonzero(hand.any(axis=1))[0], np.nonzero(hand.any(axis=0))[0]
    scale_y, scale_x = height / small.shape[0], width / small.shape[1]
    top, bottom = int(np.floor(rows[0] * scale_y)), int(np.ceil((rows[-1] + 1) * scale_y))
    left, right = int(np.floor(cols[0] * scale_x)), int(np.ceil((cols[-1] + 1) * scale_x))
    return max(0, top), min(height, bottom), max(0, left), min(width, right)


def frame_hand(image: np.ndarray, hand_fill: Sequence[float], only_above: Sequence[float] | None = None) -> np.ndarray:
    """Re-frame a radiograph so that the box around its hand fills ``hand_fill`` = (fraction of the height, fraction
    of the width) of the frame, the hand in the middle: the film is cropped where it has more margin than that and
    padded with its own background level where it has less. How much of the frame the hand fills is then the same
    however tightly or loosely the film was cropped. With ``only_above`` = (height, width) fractions, a film whose hand
    box fills no more than those on both axes is returned as it is: only tight crops are re-framed."""
    fill_y, fill_x = float(hand_fill[0]), float(hand_fill[1])
    if not (0.2 <= fill_y <= 1 and 0.2 <= fill_x <= 1):  # a smaller fill would blow the frame up 25-fold and more
        raise ValueError(f"hand_fill: expected two fractions in [0.2, 1] (height, width), got {tuple(hand_fill)}")
    top, bottom, left, right = hand_box(image)
    height, width = image.shape
    if only_above is not None and (bottom - top) <= only_above[0] * height and (right - left) <= only_above[1] * width:
        return image
    out_h = max(1, round((bottom - top) / fill_y))
    out_w = max(1, round((right - left) / fill_x))
    # the frame's origin in the image's coordinates: the hand box centred in it
    origin_y = (top + bottom - out_h) // 2
    origin_x = (left + right - out_w) // 2
    out = np.full((out_h, out_w), background_level(image), dtype=np.float32)
    src_top, src_bottom = max(0, origin_y), min(height, origin_y + out_h)
    src_left, src_right = max(0, origin_x), min(width, origin_x + out_w)
    out[src_top - origin_y : src_bottom - origin_y, src_left - origin_x : src_right - origin_x] = image[
        src_top:src_bottom, src_left:src_right
    ]
    return out


def preprocess_array(path: str | Path, contract: Any) -> np.ndarray:
    """File -> model input (C, S, S) float32: decode, re-frame around the hand (when the contract has a
    ``hand_fill``), resize (through ``source_size`` when the contract has one),
    clip to [0, 1], normalise with the contract (:func:`boneage.dataset.preprocess` without PyTorch)."""
    image = read_image(path)
    if contract.hand_fill is not None:
        image = frame_hand(image, contract.hand_fill, contract.hand_fill_above)
    if contract.source_size is not None:
        source_size, antialias = int(contract.source_size), bool(contract.source_antialias)
        image = resize_array(image, source_size, contract.resize_mode, antialias).clip(0.0, 1.0)
    image = resize_array(image, int(contract.image_size), contract.resize_mode).clip(0.0, 1.0)
    if contract.standardize:
        standardized = (image - image.mean()) / max(float(image.std()), STANDARDIZE_EPS)
        return np.broadcast_to(standardized, (int(contract.in_chans), *image.shape)).astype(np.float32)
    mean = np.asarray(contract.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(contract.std, dtype=np.float32)[:, None, None]
    return (np.broadcast_to(image, (int(contract.in_chans), *image.shape)) - mean) / std


def stage_index(age_months: np.ndarray) -> np.ndarray:
    """Stage index (0..3) per age in months."""
    return np.searchsorted(np.asarray(STAGE_EDGES_MONTHS), np.asarray(age_months, dtype=float), side="right")
