from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from boneage.config import AugmentConfig, DataConfig
from boneage.dataset import (
    BoneAgeDataset,
    augment_batch,
    build_augment,
    load_resized,
    normalize,
    normalize_batch,
    preprocess,
    raw_batch_images,
    resize,
    stage_tensor,
)
from boneage.errors import DataValidationError, ImageReadError
from boneage.imageio import read_image
from boneage.labels import make_split, read_labels, read_split, stage_of
from tests.helpers import compress_dicom, synthetic_radiograph, write_dicom

# ------------------------------------------------------------------------------------------- labels validation


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_read_labels_valid_and_aliases(rsna_folder, tmp_path):
    labels_csv, images = rsna_folder
    table = read_labels(labels_csv, images)
    assert len(table) == 48
    assert set(table.columns) >= {"id", "boneage", "male", "path"}
    assert table["male"].dtype == bool and table["male"].sum() == 24
    assert all(Path(p).is_file() for p in table["path"])

    aliased = _write_csv(tmp_path / "alias.csv", "id,bone_age_months,is_male\n1000,12,M\n1001,200.5,female\n")
    table = read_labels(aliased)
    assert table["boneage"].tolist() == [12.0, 200.5]
    assert table["male"].tolist() == [True, False]


def test_read_labels_takes_the_rsna_challenge_files_as_given(tmp_path):
    validation = _write_csv(tmp_path / "val.csv", "Image ID,male,Bone Age (months)\n1386,FALSE,30\n1392,TRUE,162\n")
    table = read_labels(validation)
    assert table["id"].tolist() == ["1386", "1392"] and table["boneage"].tolist() == [30.0, 162.0]
    assert table["male"].tolist() == [False, True]
    test_key = _write_csv(
        tmp_path / "test.csv", "Case ID,Sex,Ground truth bone age (months)\n4360,M,168.9\n4361,F,169\n"
    )
    table = read_labels(test_key)
    assert table["id"].tolist() == ["4360", "4361"] and table["male"].tolist() == [True, False]
    semicolons = _write_csv(tmp_path / "semi.csv", "id;boneage;male\n1386;30;F\n1392;162,5;M\n")  # a spreadsheet's
    with pytest.raises(DataValidationError, match="boneage='162,5' is not a number"):  # decimal commas are named
        read_labels(semicolons)
    assert read_labels(_write_csv(tmp_path / "semi2.csv", "id;boneage;male\n1386;30;F\n"))["boneage"].tolist() == [30.0]
    windows = tmp_path / "windows.csv"  # an older spreadsheet's encoding: a name with an accent in a comment column
    windows.write_bytes("id,boneage,male,note\n1386,30,F,Müller\n".encode("cp1252"))
    assert read_labels(windows)["id"].tolist() == ["1386"]
    ambiguous = _write_csv(tmp_path / "ambiguous.csv", "Case ID,Sex,Ground truth bone age (months)\n4360,1,168.9\n")
    with pytest.raises(DataValidationError, match=r"Sex='1' is not a known sex \(expected M or F\)"):
        read_labels(ambiguous)  # a 1/0 sex column does not say which is male


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ("1000,abc,True", "boneage='abc' is not a number"),
        ("1000,250,True", "boneage=250 is outside 0-240 months"),
        ("1000,-1,True", "outside 0-240"),
        ("1000,100,", "male='' is not a known sex"),
        ("1000,100,maybe", "male='maybe' is not a known sex"),
        (",100,True", "empty id"),
    ],
)
def test_read_labels_reports_each_problem_with_row_and_id(tmp_path, row, expected):
    csv = _write_csv(tmp_path / "labels.csv", f"id,boneage,male\n1001,50,False\n{row}\n")
    with pytest.raises(DataValidationError) as info:
        read_labels(csv)
    message = str(info.value)
    assert expected in message
    assert "row 3" in message and str(csv) in message
    assert len(info.value.problems) == 1


def test_read_labels_duplicate_ids_and_missing_images(rsna_folder):
    labels_csv, images = rsna_folder
    frame = pd.read_csv(labels_csv, dtype=str)
    frame.loc[1, "id"] = frame.loc[0, "id"]
    (images / f"{frame.loc[5, 'id']}.png").unlink()
    frame.to_csv(labels_csv, index=False)
    with pytest.raises(DataValidationError) as info:
        read_labels(labels_csv, images)
    problems = info.value.problems
    assert sum("duplicate id" in p for p in problems) == 2
    assert any("no image file" in p and frame.loc[5, "id"] in p for p in problems)


def test_read_labels_missing_column_and_file(tmp_path):
    csv = _write_csv(tmp_path / "labels.csv", "id,age,male\n1,2,True\n")
    with pytest.raises(DataValidationError, match="missing column 'boneage'"):
        read_labels(csv)
    with pytest.raises(DataValidationError, match="file not found"):
        read_labels(tmp_path / "absent.csv")


def test_drop_invalid_keeps_valid_rows_and_lists_dropped(tmp_path, caplog):
    csv = _write_csv(tmp_path / "labels.csv", "id,boneage,male\n1,50,True\n2,999,False\n3,70,x\n4,80,F\n")
    table = read_labels(csv, drop_invalid=True)
    assert table["id"].tolist() == ["1", "4"]
    assert "row 3 (id='2')" in caplog.text and "row 4 (id='3')" in caplog.text


# ------------------------------------------------------------------------------------------- stages and splits


@pytest.mark.parametrize(
    ("age", "stage"), [(0, 0), (59.99, 0), (60, 1), (119.99, 1), (120, 2), (179.99, 2), (180, 3), (228, 3), (240, 3)]
)
def test_stage_bins_at_edges(age, stage):
    assert stage_of(age) == stage
    assert int(stage_tensor(torch.tensor([float(age)]))[0]) == stage
    assert int(stage_of(np.array([age]))[0]) == stage


def _population(n: int = 2000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {"id": [str(i) for i in range(n)], "boneage": rng.uniform(1, 228, n).round(), "male": rng.random(n) < 0.54}
    )


def test_split_is_stratified_and_reproducible():
    labels = _population()
    split = make_split(labels, seed=7)
    assert split["split"].value_counts().to_dict() == pytest.approx({"train": 1400, "val": 300, "test": 300}, abs=2)
    merged = labels.merge(split, on="id")
    merged["stratum"] = stage_of(merged["boneage"].to_numpy()) * 2 + merged["male"].astype(int)
    share = merged.groupby("stratum")["split"].apply(lambda s: (s == "train").mean())
    assert share.between(0.68, 0.72).all(), share
    assert make_split(labels, seed=7).equals(split)
    assert not make_split(labels, seed=8)["split"].equals(split["split"])


def test_read_split_checks_ids(tmp_path):
    labels = _population(20)
    good = _write_csv(
        tmp_path / "split.csv", "id,split\n" + "\n".join(f"{i},{'val' if i < 5 else 'train'}" for i in range(18))
    )
    assert read_split(good, labels)["split"].value_counts().to_dict() == {"train": 13, "val": 5}
    bad = _write_csv(tmp_path / "bad.csv", "id,split\n1,train\n1,val\n999,train\n2,holdout\n")
    with pytest.raises(DataValidationError) as info:
        read_split(bad, labels)
    text = str(info.value)
    assert "duplicate ids" in text and "not in the labels" in text and "split='holdout'" in text


# ------------------------------------------------------------------------------------------- image formats


@pytest.fixture
def gradient() -> np.ndarray:
    return np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))  # (48, 64), dark left, bright right


def test_read_8bit_grayscale_png_keeps_values(tmp_path, gradient):
    Image.fromarray(gradient).save(tmp_path / "g.png")
    image = read_image(tmp_path / "g.png")
    assert image.shape == (48, 64) and image.dtype == np.float32
    np.testing.assert_allclose(image, gradient / 255.0, atol=1e-6)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA"])
def test_read_color_and_palette_png(tmp_path, gradient, mode):
    Image.fromarray(gradient).convert(mode).save(tmp_path / "c.png")
    image = read_image(tmp_path / "c.png")
    np.testing.assert_allclose(image, gradient / 255.0, atol=2 / 255)


def test_read_16bit_png_and_jpeg(tmp_path, gradient):
    deep = gradient.astype(np.uint16) * 16 + 100  # a 12-bit image stored in 16 bits
    Image.fromarray(deep).save(tmp_path / "d.png")
    image = read_image(tmp_path / "d.png")
    assert image.min() == 0.0 and image.max() == 1.0
    np.testing.assert_allclose(image, (gradient / 255.0), atol=1e-3)
    Image.fromarray(gradient).save(tmp_path / "j.jpg", quality=95)
    np.testing.assert_allclose(read_image(tmp_path / "j.jpg"), gradient / 255.0, atol=6 / 255)


def test_read_dicom_monochrome2_and_monochrome1(tmp_path, gradient):
    pixels = gradient.astype(np.uint16) * 16
    mono2 = read_image(write_dicom(tmp_path / "a.dcm", pixels, "MONOCHROME2"))
    mono1 = read_image(write_dicom(tmp_path / "b", 4080 - pixels, "MONOCHROME1"))  # no extension: found by magic
    np.testing.assert_allclose(mono2, gradient / 255.0, atol=1e-3)
    np.testing.assert_allclose(mono1, mono2, atol=1e-6)  # inverted back: bone is bright in both


@pytest.mark.parametrize("syntax", ["jpeg-lossless", "jpeg-ls", "jpeg2000"])
def test_read_compressed_dicom(tmp_path, gradient, syntax):
    # what archives hold: CR/DX images are often stored with lossless JPEG; the pixels must come back unchanged
    plain = write_dicom(tmp_path / "plain.dcm", gradient.astype(np.uint16) * 16)
    packed = compress_dicom(plain, tmp_path / "packed.dcm", syntax)
    import pydicom

    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(read_image(packed), read_image(plain))


def test_read_dicom_applies_voi_window(tmp_path, gradient):
    pixels = gradient.astype(np.uint16) * 16
    path = write_dicom(tmp_path / "w.dcm", pixels, WindowCenter=2040, WindowWidth=1020)
    image = read_image(path)
    assert image[:, 0].max() == 0.0 and image[:, -1].min() == 1.0  # clipped outside the window
    assert 0.3 < image[0, 32] < 0.7


def test_unreadable_images_raise_with_file_name(tmp_path, gradient):
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageReadError, match=r"text\.png: not a recognised image"):
        read_image(tmp_path / "text.png")
    Image.fromarray(gradient).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.png: cannot decode"):
        read_image(tmp_path / "cut.png")
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "absent.png")
    blank = np.full((10, 10), 700, dtype=np.uint16)
    Image.fromarray(blank).save(tmp_path / "blank16.png")
    with pytest.raises(ImageReadError, match="blank"):
        read_image(tmp_path / "blank16.png")
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    with pytest.raises(ImageReadError, match=r"bad\.dcm: a DICOM file without an image"):
        read_image(tmp_path / "bad.dcm")


def test_pixel_limit_guards_against_decompression_bombs(tmp_path):
    Image.new("L", (400, 300)).save(tmp_path / "big.png")
    with pytest.raises(ImageReadError, match="120,000 pixels exceeds the limit of 100,000"):
        read_image(tmp_path / "big.png", max_pixels=100_000)
    write_dicom(tmp_path / "big.dcm", np.zeros((300, 400), dtype=np.uint16))
    with pytest.raises(ImageReadError, match="exceeds the limit"):
        read_image(tmp_path / "big.dcm", max_pixels=100_000)


# ------------------------------------------------------------------------------------------- preprocessing


def test_resize_squash_and_letterbox():
    image = torch.ones(1, 40, 80)
    squashed = resize(image, 32, "squash")
    assert squashed.shape == (1, 32, 32) and torch.allclose(squashed, torch.ones_like(squashed))
    boxed = resize(image, 32, "letterbox")
    assert boxed.shape == (1, 32, 32)
    assert boxed[0, 8:24].min() > 0.99 and boxed[0, :8].max() == 0 and boxed[0, 24:].max() == 0
    with pytest.raises(ValueError, match="resize mode"):
        resize(image, 32, "crop")


def test_normalize_three_and_one_channel():
    image = torch.full((1, 8, 8), 0.5)
    three = normalize(image, DataConfig())
    assert three.shape == (3, 8, 8)
    assert three[0, 0, 0].item() == pytest.approx((0.5 - 0.485) / 0.229)
    one = normalize(image, DataConfig(in_chans=1, mean=(0.5,), std=(0.25,)))
    assert one.shape == (1, 8, 8) and one.abs().max() == 0


def test_standardize_gives_each_image_zero_mean_unit_sd_whatever_its_contrast():
    contract = DataConfig(standardize=True)
    torch.manual_seed(0)
    image = torch.rand(1, 1, 16, 16) * 0.5 + 0.2
    out = normalize_batch(torch.cat([image, 0.3 * image + 0.1]), contract)  # the same film, dimmer and flatter
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(1, 2, 3), correction=0), torch.ones(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[0], out[1], atol=1e-4, rtol=0)
    assert not torch.allclose(normalize_batch(image, DataConfig())[0], out[0], atol=0.1)  # not the fixed mean/std
    flat = normalize_batch(torch.full((1, 1, 8, 8), 0.4), contract)
    assert torch.isfinite(flat).all() and flat.abs().max() < 1e-3


def test_source_size_resizes_through_the_training_copies_size(tmp_path):
    big = synthetic_radiograph(120, size=400)[:, :300]  # 400 x 300, full of detail
    Image.fromarray(big).save(tmp_path / "big.png")
    contract = DataConfig(image_size=64, source_size=20)
    direct = preprocess(tmp_path / "big.png", DataConfig(image_size=64))
    through = preprocess(tmp_path / "big.png", contract)
    image = torch.from_numpy(big.astype(np.float32) / 255.0)[None]
    expected = normalize(resize(resize(image, 20).clamp(0, 1), 64).clamp(0, 1), contract)
    torch.testing.assert_close(through, expected)
    assert (through - direct).abs().mean() > 0.05  # the 20-px step lost detail the direct resize keeps


def test_source_size_without_antialiasing_keeps_a_films_fine_grain(tmp_path):
    """A large film sent through the source size by plain bilinear interpolation keeps its fine grain (aliased),
    where the antialiased filter averages it away."""
    rng = np.random.default_rng(0)
    big = (96 + 64 * rng.random((400, 300))).astype(np.uint8)  # pixel-level grain on grey
    Image.fromarray(big).save(tmp_path / "grain.png")
    plain = DataConfig(image_size=20, source_size=20, source_antialias=False)
    smooth = load_resized(tmp_path / "grain.png", DataConfig(image_size=20, source_size=20))
    grainy = load_resized(tmp_path / "grain.png", plain)
    assert float(grainy.std()) > 3 * float(smooth.std())
    image = torch.from_numpy(big.astype(np.float32) / 255.0)[None]
    expected = torch.nn.functional.interpolate(image[None], size=(20, 20), mode="bilinear", antialias=False)[0]
    torch.testing.assert_close(grainy, resize(expected.clamp(0, 1), 20).clamp(0, 1), atol=1e-4, rtol=0)
    # an image already at the source size is the same either way (the training copies read as they always did)
    copy = tmp_path / "copy.png"
    Image.fromarray(big[:20, :20]).save(copy)
    torch.testing.assert_close(load_resized(copy, plain), load_resized(copy, DataConfig(image_size=20, source_size=20)))


def test_preprocess_full_path(tmp_path):
    Image.fromarray(synthetic_radiograph(100, size=90)).save(tmp_path / "x.png")
    tensor = preprocess(tmp_path / "x.png", DataConfig(image_size=64))
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32 and tensor.std() > 0.1


# ------------------------------------------------------------------------------------------- augmentation ranges

_OFF = {"rotation_degrees": 0.0, "zoom": (1.0, 1.0), "brightness": (1.0, 1.0), "contrast": (1.0, 1.0), "hflip_p": 0.0}


def _only(**kwargs: object):
    torch.manual_seed(0)
    return build_augment(AugmentConfig(**{**_OFF, **kwargs}))


def test_default_augmentations_are_the_seeds():
    cfg = AugmentConfig()
    assert (cfg.rotation_degrees, cfg.zoom, cfg.brightness, cfg.contrast, cfg.hflip_p) == (
        15.0,
        (0.9, 1.1),
        (0.85, 1.15),
        (0.85, 1.15),
        0.5,
    )


def test_brightness_acts_within_range():
    augment = _only(brightness=(0.85, 1.15))
    factors = [augment(torch.full((1, 16, 16), 0.5)).mean().item() / 0.5 for _ in range(200)]
    assert 0.85 - 1e-4 <= min(factors) < 0.9 and 1.1 < max(factors) <= 1.15 + 1e-4


def test_contrast_acts_within_range():
    augment = _only(contrast=(0.85, 1.15))
    image = torch.full((1, 16, 16), 0.3)
    image[:, :, 8:] = 0.7
    ratios = [augment(image.clone()).std().item() / image.std().item() for _ in range(200)]
    assert 0.85 - 1e-3 <= min(ratios) < 0.9 and 1.1 < max(ratios) <= 1.15 + 1e-3


def test_zoom_acts_within_range():
    augment = _only(zoom=(0.9, 1.1))
    image = torch.zeros(1, 101, 101)
    image[:, 30:71, 30:71] = 1.0
    area = (image > 0.5).sum().item()
    ratios = [(augment(image.clone()) > 0.5).sum().item() / area for _ in range(200)]
    assert 0.81 - 0.03 <= min(ratios) < 0.86 and 1.16 < max(ratios) <= 1.21 + 0.03


def _orientation_degrees(image: torch.Tensor) -> float:
    ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
    x, y = xs.float() - xs.float().mean(), ys.float() - ys.float().mean()
    return math.degrees(0.5 * math.atan2(2 * (x * y).mean().item(), ((x * x).mean() - (y * y).mean()).item()))


def test_rotation_acts_within_range():
    augment = _only(rotation_degrees=15.0)
    image = torch.zeros(1, 101, 101)
    image[:, 48:53, 10:91] = 1.0  # a horizontal bar
    angles = [_orientation_degrees(augment(image.clone())) for _ in range(200)]
    assert max(abs(a) for a in angles) <= 15.5
    assert min(angles) < -10 and max(angles) > 10


def test_horizontal_flip_half_the_time_and_never_vertical():
    image = torch.zeros(1, 32, 32)
    image[:, :16, :16] = 1.0  # bright top-left quadrant
    flip = _only(hflip_p=0.5)
    outputs = [flip(image.clone()) for _ in range(400)]
    flipped = sum(o[0, :16, 16:].mean().item() > 0.9 for o in outputs)
    assert 160 < flipped < 240
    assert all(o[0, :16].mean() > 0.45 and o[0, 16:].mean() < 0.05 for o in outputs)  # top stays on top
    torch.manual_seed(1)
    everything = build_augment(AugmentConfig())
    assert all(everything(image.clone())[0, :16].mean() > everything(image.clone())[0, 16:].mean() for _ in range(100))


def test_batch_augmentation_identity_flip_and_factors():
    torch.manual_seed(0)
    images = torch.rand(16, 1, 32, 32)
    assert torch.equal(augment_batch(images, AugmentConfig(**_OFF)), images)
    assert torch.equal(augment_batch(images, AugmentConfig(**{**_OFF, "hflip_p": 1.0})), images.flip(-1))
    brighter = augment_batch(images, AugmentConfig(**{**_OFF, "brightness": (2.0, 2.0)}))
    assert torch.equal(brighter, (images * 2).clamp(0, 1))
    flat = augment_batch(images, AugmentConfig(**{**_OFF, "contrast": (0.5, 0.5)}))
    assert torch.allclose(flat.std(dim=(1, 2, 3)), images.std(dim=(1, 2, 3)) * 0.5, atol=1e-5)
    # a zoom-out by 0.5 about the centre puts the whole image in the middle half, black around it
    small = augment_batch(torch.ones(2, 1, 32, 32), AugmentConfig(**{**_OFF, "zoom": (0.5, 0.5)}))
    assert small[:, :, :7].max() == 0 and small[:, :, 10:22, 10:22].min() > 0.99


def test_batch_augmentation_draws_per_image_within_the_ranges():
    torch.manual_seed(0)
    bar = torch.zeros(400, 1, 101, 101)
    bar[:, :, 48:53, 10:91] = 1.0  # a horizontal bar
    out = augment_batch(bar, AugmentConfig(**{**_OFF, "rotation_degrees": 15.0}))
    angles = [_orientation_degrees(o) for o in out]
    assert max(abs(a) for a in angles) <= 15.5 and min(angles) < -10 and max(angles) > 10
    quadrant = torch.zeros(400, 1, 32, 32)
    quadrant[:, :, :16, :16] = 1.0
    out = augment_batch(quadrant, AugmentConfig())  # every augmentation at the seed's ranges
    assert (out[:, 0, :16].mean(dim=(1, 2)) > out[:, 0, 16:].mean(dim=(1, 2))).all()  # never a vertical flip
    assert 160 < (out[:, 0, :16, 16:].mean(dim=(1, 2)) > out[:, 0, :16, :16].mean(dim=(1, 2))).sum() < 240
    assert out.min() >= 0 and out.max() <= 1


def _hand_on_dark_film(batch: int = 4, size: int = 64) -> torch.Tensor:
    """A bright 16 x 16 'hand' in the top-left quarter of a film whose background is 0.2."""
    images = torch.full((batch, 1, size, size), 0.2)
    images[:, :, 8:24, 8:24] = 0.9
    return images


def test_framing_centres_the_hand_at_the_drawn_fill_and_pads_with_the_background():
    images = _hand_on_dark_film()
    boxes = torch.tensor([[8 / 64, 24 / 64, 8 / 64, 24 / 64]]).expand(4, 4)
    framing = {**_OFF, "frame_p": 1.0, "frame_fill_height": (0.5, 0.5), "frame_fill_width": (0.25, 0.25)}
    out = augment_batch(images, AugmentConfig(**framing), boxes)
    hand = out[0, 0] > 0.55
    rows, cols = hand.any(dim=1).nonzero()[:, 0], hand.any(dim=0).nonzero()[:, 0]
    assert abs(int(rows[0]) - 16) <= 1 and abs(int(rows[-1]) - 47) <= 1  # half the height, in the middle
    assert abs(int(cols[0]) - 24) <= 1 and abs(int(cols[-1]) - 39) <= 1  # a quarter of the width
    # what lies outside the film is its own background level, not black
    assert torch.allclose(out[:, :, :, :2], torch.full_like(out[:, :, :, :2], 0.2), atol=1e-6)
    assert torch.equal(out[0], out[3])  # the same box and fills: the same image
    with pytest.raises(ValueError, match="hand box"):
        augment_batch(images, AugmentConfig(**framing))
    # through the contract's source size: a re-framed image keeps only the detail a film keeps at prediction time
    through = augment_batch(images, AugmentConfig(**framing), boxes, source_size=16)
    small = torch.nn.functional.interpolate(out, size=(16, 16), mode="bilinear", antialias=True)
    torch.testing.assert_close(through, torch.nn.functional.interpolate(small, size=(64, 64), mode="bilinear"))
    # down with the contract's filter: plain bilinear when it says source_antialias false
    plain = augment_batch(images, AugmentConfig(**framing), boxes, source_size=16, source_antialias=False)
    small = torch.nn.functional.interpolate(out, size=(16, 16), mode="bilinear", antialias=False)
    torch.testing.assert_close(plain, torch.nn.functional.interpolate(small, size=(64, 64), mode="bilinear"))
    # training's raw-batch step passes the contract's filter on
    batch = {"image": (images * 255).round().to(torch.uint8), "hand_box": boxes}
    contract = DataConfig(image_size=64, source_size=16, source_antialias=False, standardize=True)
    raw = raw_batch_images(batch, contract, AugmentConfig(**framing))
    expected = augment_batch(batch["image"].float() / 255.0, AugmentConfig(**framing), boxes, 16, False)
    torch.testing.assert_close(raw, normalize_batch(expected, contract))


def test_framing_is_drawn_with_frame_p_and_leaves_the_rest_as_the_plain_augmentation():
    torch.manual_seed(0)
    images = _hand_on_dark_film(batch=400)
    boxes = torch.tensor([[8 / 64, 24 / 64, 8 / 64, 24 / 64]]).expand(400, 4)
    out = augment_batch(images, AugmentConfig(**{**_OFF, "frame_p": 0.5, "frame_fill_height": (1.0, 1.0)}), boxes)
    filled = (out[:, 0] > 0.55).float().mean(dim=(1, 2))
    reframed = filled > 0.3  # the hand fills the frame's height (and 35-100% of its width)
    assert 150 < int(reframed.sum()) < 250
    torch.testing.assert_close(out[~reframed], images[~reframed], atol=1e-5, rtol=0)  # an identity resampling


def test_gamma_and_floor_are_what_they_say():
    torch.manual_seed(0)
    images = torch.rand(8, 1, 16, 16)
    squared = augment_batch(images, AugmentConfig(**{**_OFF, "gamma": (2.0, 2.0)}))
    torch.testing.assert_close(squared, images**2)
    floor = AugmentConfig(**{**_OFF, "floor": (0.3, 0.3), "floor_p": 1.0})
    floored = augment_batch(images, floor)
    low, high = torch.quantile(images.flatten(1), torch.tensor([0.01, 0.99]), dim=1)
    torch.testing.assert_close(floored, torch.maximum(images, (low + 0.3 * (high - low)).view(-1, 1, 1, 1)))
    dim = 0.25 * images  # a dim copy (its brightest 0.25): the floor is a share of its own range, not 0.3
    dim_floored = augment_batch(dim, floor)
    assert (dim_floored.flatten(1).max(dim=1).values > dim_floored.flatten(1).min(dim=1).values + 0.1).all()
    absolute = augment_batch(
        dim, AugmentConfig(**{**_OFF, "floor": (0.3, 0.3), "floor_p": 1.0, "floor_mode": "absolute"})
    )
    torch.testing.assert_close(absolute, torch.full_like(dim, 0.3))  # an older recipe's meaning: the hand is erased
    some = augment_batch(images, AugmentConfig(**{**_OFF, "floor": (0.3, 0.3), "floor_p": 0.5}))
    changed = (some != images).flatten(1).any(dim=1)
    torch.testing.assert_close(some[changed], floored[changed])
    assert 0 < int(changed.sum()) < len(images)  # each image draws whether it is floored
    drawn = augment_batch(images, AugmentConfig(**{**_OFF, "gamma": (0.5, 2.0)}))
    exponents = (drawn.log() / images.log()).flatten(1).median(dim=1).values
    assert (exponents >= 0.5 - 1e-3).all() and (exponents <= 2.0 + 1e-3).all() and exponents.std() > 0.1


def test_border_level_is_the_numpy_background_level():
    from boneage.dataset import border_level
    from boneage.imageio import background_level

    images = _hand_on_dark_film(batch=2)
    images[1] = torch.rand(1, 64, 64)
    levels = border_level(images)
    assert abs(float(levels[0]) - background_level(images[0, 0].numpy())) < 1e-6
    assert abs(float(levels[1]) - background_level(images[1, 0].numpy())) < 0.02


# ------------------------------------------------------------------------------------------- dataset


def test_dataset_samples_and_cache_match(rsna_folder):
    labels_csv, images = rsna_folder
    table = read_labels(labels_csv, images)
    contract = DataConfig(image_size=64)
    plain, cached = BoneAgeDataset(table, contract), BoneAgeDataset(table, contract, cache=True)
    threads = torch.get_num_threads()
    cached.fill_cache()
    assert torch.get_num_threads() == threads  # decoding runs single-threaded, then the setting is restored
    sample = plain[3]
    assert set(sample) == {"image", "age_months", "male", "stage", "id"}
    assert sample["image"].shape == (3, 64, 64)
    assert sample["id"] == table["id"][3] and sample["age_months"].item() == table["boneage"][3]
    assert int(sample["stage"]) == stage_of(table["boneage"][3])
    # uint8 cache: at most half a grey level away from the float path, after normalisation by std ~0.22
    assert (cached[3]["image"] - sample["image"]).abs().max() < 0.6 / 255 / 0.22
    raw = BoneAgeDataset(table, contract, cache=True, raw=True)
    raw._cache = cached._cache
    assert raw[3]["image"].dtype == torch.uint8 and raw[3]["image"].shape == (1, 64, 64)
    torch.testing.assert_close(normalize_batch(raw[3]["image"][None] / 255.0, contract)[0], cached[3]["image"])
    uncached = BoneAgeDataset(table, contract, raw=True)
    assert torch.equal(uncached[3]["image"], raw[3]["image"])
    boxed, uncached_boxed = (BoneAgeDataset(table, contract, raw=True, hand_boxes=True, cache=c) for c in (True, False))
    box = boxed[3]["hand_box"]
    assert box.shape == (4,) and 0 <= box[0] < box[1] <= 1 and 0 <= box[2] < box[3] <= 1
    assert torch.equal(uncached_boxed[3]["hand_box"], box)
    with pytest.raises(ValueError, match="augment=None"):
        BoneAgeDataset(table, contract, augment=build_augment(AugmentConfig()), raw=True)


@pytest.mark.parametrize(
    ("tags", "male", "age"),
    [
        ({"PatientSex": "M", "PatientAge": "010Y"}, True, 120.0),
        ({"PatientSex": "F", "PatientAge": "006M"}, False, 6.0),
        ({"PatientSex": "O", "PatientBirthDate": "20150301", "StudyDate": "20250301"}, None, 120.0),
        ({}, None, None),
    ],
)
def test_dicom_patient_info(tmp_path, tags, male, age):
    from boneage.imageio import dicom_patient_info

    path = write_dicom(tmp_path / "x.dcm", np.zeros((8, 8), dtype=np.uint16), **tags)
    info = dicom_patient_info(path)
    assert info["male"] is male
    assert info["age_months"] == (pytest.approx(age, abs=0.1) if age is not None else None)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "x.png")
    assert info["age_source"] == (
        None if age is None else "PatientAge" if "PatientAge" in tags else "StudyDate - PatientBirthDate"
    )
    assert dicom_patient_info(tmp_path / "x.png") == {"male": None, "age_months": None, "age_source": None}
