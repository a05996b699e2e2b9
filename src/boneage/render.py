"""The clinical report page, drawn with NumPy and Pillow: the radiograph beside the findings and the chart of bone age
against age (the normal range from the Greulich-Pyle reference), on a dark page (PACS viewers) or paper colours
(``boneage chart``). The PDF report to file is :mod:`boneage.report_pdf`."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from boneage import __version__
from boneage.clinical import SDS_LIMIT, reference_band
from boneage.imageio import read_image
from boneage.rows import READABLE


def findings(row: dict[str, Any]) -> list[str]:
    """The report's findings for one prediction row (no patient identifiers), a line each: the rendered report
    wraps the long ones, ImageComments joins them."""
    if row.get("status") == "not assessable":
        presented = re.search(r": looks ([^;(:]+)", str(row.get("message", "")))  # inverted or turned
        if presented:
            how = presented.group(1).strip()
            fix = "with bone bright" if how.startswith("inverted") else "upright, fingers up"
            reason = f"The image looks {how}; no bone age is given. Send it again {fix}."
            return ["NOT ASSESSABLE", reason]
        reason = f"The image does not look like the hand radiographs the model knows; no bone age is given: {READABLE}."
        return ["NOT ASSESSABLE", reason]
    if row.get("status") != "ok":
        return ["NO RESULT", str(row.get("message", ""))[:200]]
    lines = [f"Bone age {row['bone_age_months']:.1f} months ({row['bone_age']})"]
    if row.get("lower_months") is not None and row.get("upper_months") is not None:
        lines.append(f"90% interval {row['lower_months']:.0f}-{row['upper_months']:.0f} months")
    lines.append(f"Stage {row['stage']}")
    lines.append(f"Sex {'M' if row['male'] else 'F'}")
    if row.get("chronological_age_months") is not None:
        lines.append(f"Chronological age {row['chronological_age_months']:.1f} months")
        if row.get("ba_minus_ca_months") is not None:
            lines.append(f"BA - CA {row['ba_minus_ca_months']:+.1f} months")
        if row.get("sds") is not None:
            lines.append(f"SDS {row['sds']:+.2f} ({row['call']})")
            if row.get("sds_lower") is not None and row.get("sds_upper") is not None:
                lines.append(f"90% interval SDS {row['sds_lower']:+.2f} to {row['sds_upper']:+.2f}")
    if row.get("reader_bone_age_months") is not None and row.get("reader_minus_model_months") is not None:
        lines.append(f"Reader {row['reader_bone_age_months']:g} months ({row['reader_minus_model_months']:+.1f})")
    if row.get("message"):  # why there is no SDS, a check the SDS asks for, a reading outside the interval
        lines.append(str(row["message"]))
    return lines


CHART_MAX_MONTHS = 240.0  # both axes of the chart run from birth to 20 years
# the report's colours: dark for PACS viewers (the DICOM report), light for paper and screens (PDF, boneage chart)
DARK = {
    "background": (0, 0, 0),
    "text": (255, 255, 255),
    "heading": (255, 230, 120),
    "muted": (170, 170, 170),
    "band": (62, 66, 74),
    "diagonal": (140, 140, 140),
    "course": (200, 200, 200),
}
LIGHT = {
    "background": (255, 255, 255),
    "text": (20, 24, 31),
    "heading": (150, 90, 0),
    "muted": (90, 98, 110),
    "band": (223, 230, 239),
    "diagonal": (138, 148, 163),
    "course": (70, 100, 150),
}
CALL_COLOURS = {
    "normal": (102, 187, 106),
    "delayed": (255, 138, 101),
    "advanced": (255, 138, 101),
}  # no call (an age outside the reference): the palette's text colour


def render_age_chart(
    row: dict[str, Any] | list[dict[str, Any]], size: int = 420, palette: dict[str, Any] = DARK
) -> Any:
    """The chart of bone age against chronological age (a ``size`` x ``size`` PIL image): the normal range (the
    reference age -/+ 2 SD, :func:`boneage.clinical.reference_band`), the line bone age = age, and this child at
    (age, bone age) with the 90% interval as a bar, coloured by the call, and a reader's own bone age, when given, as
    an open circle. ``row`` may be a list of one child's visits (one sex): they are joined in order of age.
    ``palette``: :data:`DARK` (PACS viewers) or :data:`LIGHT` (paper). None without a bone age and an age."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [row] if isinstance(row, dict) else list(row)
    visits = [r for r in rows if r.get("status") == "ok" and r.get("chronological_age_months") is not None]
    if not visits:
        return None
    visits.sort(key=lambda r: float(r["chronological_age_months"]))
    male = bool(visits[0]["male"])
    left, top, side = round(size * 0.12), round(size * 0.08), round(size * 0.81)
    font = ImageFont.load_default(size=max(10, size // 32))

    def xy(age: float, bone_age: float) -> tuple[float, float]:
        clip = lambda m: min(max(float(m), 0.0), CHART_MAX_MONTHS)  # noqa: E731
        return left + side * clip(age) / CHART_MAX_MONTHS, top + side * (1 - clip(bone_age) / CHART_MAX_MONTHS)

    chart = Image.new("RGB", (size, size), palette["background"])
    draw = ImageDraw.Draw(chart)
    band = reference_band(male)
    outline = [xy(a, b) for a, b in zip(band["ages_months"], band["lower_months"])]
    outline += [xy(a, b) for a, b in reversed(list(zip(band["ages_months"], band["upper_months"])))]
    draw.polygon(outline, fill=palette["band"])
    for year in range(0, 21, 2):
        x, y = xy(12 * year, 12 * year)
        draw.line([(x, top + side), (x, top + side + 5)], fill=palette["muted"])
        draw.line([(left - 5, y), (left, y)], fill=palette["muted"])
        draw.text((x, top + side + 8), str(year), fill=palette["muted"], font=font, anchor="mt")
        draw.text((left - 8, y), str(year), fill=palette["muted"], font=font, anchor="rm")
    draw.rectangle([left, top, left + side, top + side], outline=palette["muted"])
    for start in range(0, int(CHART_MAX_MONTHS), 8):  # the line bone age = age, dashed
        draw.line([xy(start, start), xy(start + 4, start + 4)], fill=palette["diagonal"], width=1)
    sex = "boys" if male else "girls"
    draw.text((left, top - 8), f"bone age (y) against age (y), {sex}", fill=palette["text"], font=font, anchor="lb")
    draw.text(
        (left + side, top + side + 10 + font.size),
        f"shaded: +/-{SDS_LIMIT:g} SD (Greulich & Pyle)",
        fill=palette["muted"],
        font=font,
        anchor="rt",
    )
    if len(visits) > 1:  # one child's course
        draw.line([xy(r["chronological_age_months"], r["bone_age_months"]) for r in visits], fill=palette["course"])
    radius = max(4, size // 70)
    for visit in visits:
        colour = CALL_COLOURS.get(visit.get("call")) or palette["text"]
        age, bone_age = visit["chronological_age_months"], visit["bone_age_months"]
        if visit.get("lower_months") is not None and visit.get("upper_months") is not None:
            (x, low), (_, high) = xy(age, visit["lower_months"]), xy(age, visit["upper_months"])
            draw.line([(x, low), (x, high)], fill=colour, width=3)
            draw.line([(x - 6, low), (x + 6, low)], fill=colour, width=2)
            draw.line([(x - 6, high), (x + 6, high)], fill=colour, width=2)
        x, y = xy(age, bone_age)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
        if visit.get("reader_bone_age_months") is not None:  # the reader's own bone age: an open circle
            x, y = xy(age, visit["reader_bone_age_months"])
            box = [x - radius - 1, y - radius - 1, x + radius + 1, y + radius + 1]
            draw.ellipse(box, outline=palette["text"], width=2)
            if len(visits) == 1:
                draw.text((x + radius + 4, y), "reader", fill=palette["text"], font=font, anchor="lm")
    return chart


def render_report(
    image_path: str | Path, row: dict[str, Any], model_name: str, height: int = 512, palette: dict[str, Any] = DARK
) -> np.ndarray:
    """(H, W, 3) uint8: the radiograph (``height`` px tall) beside a panel with :func:`findings` and, given an age,
    the chart of bone age against age (:func:`render_age_chart`)."""
    from PIL import Image, ImageDraw, ImageFont

    gray = read_image(image_path)
    width = max(1, round(gray.shape[1] * height / gray.shape[0]))
    shown = np.asarray(Image.fromarray(gray, mode="F").resize((width, height), Image.BILINEAR)).clip(0, 1)
    panel_width = 420
    chart = render_age_chart(row, size=min(420, height), palette=palette)
    chart_width = chart.width + 16 if chart is not None else 0
    canvas = Image.new("RGB", (width + panel_width + chart_width, height), palette["background"])
    canvas.paste(Image.fromarray((shown * 255).round().astype(np.uint8)).convert("RGB"), (0, 0))
    if chart is not None:
        canvas.paste(chart, (width + panel_width, (height - chart.height) // 2))
    draw = ImageDraw.Draw(canvas)
    title, small = ImageFont.load_default(size=22), ImageFont.load_default(size=13)
    x, y = width + 16, 16
    draw.text((x, y), "Bone age (automated)", fill=palette["text"], font=title)
    y += 40
    footer = [
        f"boneage {__version__}, model {model_name}",
        "Research and decision support, not a medical",
        "device: a clinician reads the film.",
    ]
    room = height - 16 - 18 * len(footer) - 8 - y  # between the title and the footer
    # the largest type whose wrapped findings fit (a long note and a reading take more lines), else cut with "..."
    found = findings(row)

    def wrapped(columns: int) -> list[tuple[str, bool]]:
        return [(line, finding.isupper()) for finding in found for line in textwrap.wrap(finding, columns)[:6]]

    types = [(19, 28, 38), (16, 23, 45), (14, 20, 52)]  # font size, line spacing, characters per line
    size, spacing, columns = next((t for t in types if len(wrapped(t[2])) * t[1] <= room), types[-1])
    lines, body, fits = wrapped(columns), ImageFont.load_default(size=size), room // spacing
    if len(lines) > fits:
        lines = lines[: fits - 1] + [("...", False)]
    for line, heading in lines:
        draw.text((x, y), line, fill=palette["heading"] if heading else palette["text"], font=body)
        y += spacing
    for k, line in enumerate(footer):
        draw.text((x, height - 16 - 18 * (len(footer) - k)), line, fill=palette["muted"], font=small)
    return np.asarray(canvas)
