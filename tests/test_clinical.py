from __future__ import annotations

import pytest
from PIL import Image

from boneage.clinical import (
    REFERENCE_SD,
    compare_ages,
    compare_reading,
    parse_chronological_age,
    reference_band,
    reference_sd,
)
from boneage.inputs import resolve_ages
from boneage.predict import predict_paths
from tests.helpers import make_tiny_model, synthetic_radiograph, write_dicom


@pytest.mark.parametrize(
    ("age", "male", "expected"),
    [(3, True, 0.69), (120, True, 9.79), (204, True, 13.05), (3, False, 0.72), (60, False, 11.65), (192, False, 7.31)],
)
def test_reference_sd_at_table_points(age, male, expected):
    assert reference_sd(age, male) == pytest.approx(expected)


def test_reference_sd_interpolates_linearly_between_points():
    assert reference_sd(66, True) == pytest.approx((8.79 + 9.17) / 2)  # halfway from 60 to 72 months
    assert reference_sd(15, False) == pytest.approx(1.77 + (3.49 - 1.77) / 2)
    assert reference_sd(123, True) == pytest.approx(9.79 + 0.25 * (10.09 - 9.79))


def test_reference_sd_is_none_outside_the_table():
    assert reference_sd(2.9, True) is None and reference_sd(204.1, True) is None
    assert reference_sd(193, False) is None  # the girls' table ends at 192 months
    assert len(REFERENCE_SD[True][0]) == 24 and len(REFERENCE_SD[False][0]) == 23


@pytest.mark.parametrize("male", [True, False])
def test_reference_band_edges_are_the_two_sds_limits(male):
    band = reference_band(male)
    assert band["ages_months"][0] == 3 and band["ages_months"][-1] == (204 if male else 192)
    for age, lower, upper in zip(band["ages_months"], band["lower_months"], band["upper_months"]):
        assert lower < age < upper
        # a bone age on the band's edge is exactly where the call changes
        assert compare_ages(upper, age, male)["sds"] == pytest.approx(2.0, abs=0.01)
        assert compare_ages(lower, age, male)["sds"] == pytest.approx(-2.0, abs=0.01)


def test_compare_ages_sds_and_call():
    delayed = compare_ages(100.0, 120.0, male=True)
    assert delayed["ba_minus_ca_months"] == -20.0
    assert delayed["sds"] == pytest.approx(-20.0 / 9.79, abs=0.005) and delayed["call"] == "delayed"
    advanced = compare_ages(150.0, 120.0, male=False)
    assert advanced["sds"] == pytest.approx(30 / 11.73, abs=0.005) and advanced["call"] == "advanced"
    normal = compare_ages(120.0 + 2 * 9.79, 120.0, male=True)  # exactly +2 SD is still normal
    assert normal["sds"] == pytest.approx(2.0) and normal["call"] == "normal"
    outside = compare_ages(230.0, 220.0, male=True)
    assert outside["sds"] is None and outside["call"] is None and "outside the reference" in outside["clinical_note"]
    assert advanced["clinical_note"] == normal["clinical_note"] == ""


def test_the_interval_gives_the_sds_range_and_says_when_the_call_is_uncertain():
    sd = 9.79  # boys at 120 months
    firm = compare_ages(120.0, 120.0, male=True, lower_months=120.0 - 1.5 * sd, upper_months=120.0 + 1.5 * sd)
    assert (firm["sds_lower"], firm["sds"], firm["sds_upper"]) == pytest.approx((-1.5, 0.0, 1.5), abs=0.01)
    assert firm["call"] == "normal" and firm["clinical_note"] == ""  # the whole interval is normal
    near = compare_ages(120.0 + sd, 120.0, male=True, lower_months=120.0, upper_months=120.0 + 2.5 * sd)
    assert near["call"] == "normal" and near["clinical_note"] == "call uncertain: the 90% interval reaches advanced"
    wide = compare_ages(120.0, 120.0, male=True, lower_months=120.0 - 2.2 * sd, upper_months=120.0 + 2.2 * sd)
    assert wide["clinical_note"] == "call uncertain: the 90% interval reaches delayed and advanced"
    delayed = compare_ages(120.0 - 2.5 * sd, 120.0, male=True, lower_months=120 - 3 * sd, upper_months=120 - sd)
    assert delayed["call"] == "delayed" and delayed["clinical_note"].endswith("reaches normal")
    flagged = compare_ages(144.0, 12.0, male=False, lower_months=126.0, upper_months=162.0)
    assert flagged["clinical_note"].startswith("|SDS| over 4 is rare") and "uncertain" not in flagged["clinical_note"]
    no_interval = compare_ages(130.0, 120.0, male=True)
    assert no_interval["sds_lower"] is None and no_interval["sds_upper"] is None and no_interval["clinical_note"] == ""


def test_an_implausible_sds_is_kept_and_flagged():
    years_typed_as_months = compare_ages(144.0, 12.0, male=False)  # a 12-year-old entered as "12"
    assert years_typed_as_months["call"] == "advanced" and years_typed_as_months["sds"] > 4
    assert "check the chronological age (12 months = 1y 0m) and the sex" in years_typed_as_months["clinical_note"]
    assert compare_ages(120.0 - 4.2 * 9.79, 120.0, male=True)["clinical_note"].startswith("|SDS| over 4 is rare")
    assert compare_ages(120.0 - 3.9 * 9.79, 120.0, male=True)["clinical_note"] == ""


@pytest.mark.parametrize("bad", ["abc", "-1", "241", "nan", "inf"])
def test_parse_chronological_age_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="metadata row 3"):
        parse_chronological_age(bad, "metadata row 3")


def test_parse_chronological_age_accepts_numbers_and_empty():
    assert parse_chronological_age("121.5") == 121.5 and parse_chronological_age(7) == 7.0
    assert parse_chronological_age("") is None and parse_chronological_age(None) is None


def test_ages_from_metadata_flag_and_dicom_tags(tmp_path):
    pixels = synthetic_radiograph(90).astype("uint16") * 16
    by_age = write_dicom(tmp_path / "a.dcm", pixels, PatientSex="F", PatientAge="010Y")
    by_dates = write_dicom(tmp_path / "b.dcm", pixels, PatientBirthDate="20100115", StudyDate="20160115")
    png = tmp_path / "c.png"
    Image.fromarray(synthetic_radiograph(90)).save(png)
    assert resolve_ages([by_age, by_dates, png]) == [pytest.approx(120.0), pytest.approx(72.0, abs=0.05), None]
    assert resolve_ages([by_age, png], chronological_age="30") == [30.0, 30.0]  # the flag wins over the header
    metadata = tmp_path / "meta.csv"
    metadata.write_text("id,male,chronological_age_months\na,F,55\nc,M,\n")
    assert resolve_ages([by_age, png], "30", metadata) == [55.0, 30.0]  # metadata first; empty falls through
    metadata.write_text("id,male,chronological_age_months\nc,M,ten\n")
    with pytest.raises(ValueError, match="id c, chronological_age_months"):
        resolve_ages([png], metadata=metadata)


def test_predict_rows_carry_sds_and_call(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    image = tmp_path / "x.png"
    Image.fromarray(synthetic_radiograph(90)).save(image)
    table = predict_paths([image], tmp_path / "p.csv", model_dir=model, sex="M", chronological_age=100, progress=False)
    row = table.iloc[0]
    expected = compare_ages(row["bone_age_months"], 100.0, male=True)
    assert row["chronological_age_months"] == 100.0
    assert row["ba_minus_ca_months"] == pytest.approx(expected["ba_minus_ca_months"], abs=0.01)
    assert row["sds"] == pytest.approx(expected["sds"], abs=0.01) and row["call"] == expected["call"]
    plain = predict_paths([image], tmp_path / "q.csv", model_dir=model, sex="M", progress=False)
    assert plain["sds"].isna().all() and plain["call"].isna().all()  # no age, no SDS


def test_monochrome1_dicom_gives_the_same_age_as_its_inverted_png(tmp_path):
    import torch

    from boneage.backends.torch import TorchPredictor
    from boneage.dataset import preprocess

    gray = synthetic_radiograph(120, size=96)
    gray[0, 0], gray[0, 1] = 0, 255  # full range, so DICOM min-max scaling equals PNG's /255
    png, negative = tmp_path / "hand.png", tmp_path / "negative.png"
    Image.fromarray(gray).save(png)
    Image.fromarray(255 - gray).save(negative)
    dicom = write_dicom(tmp_path / "hand.dcm", (255 - gray.astype("uint16")) * 16, photometric="MONOCHROME1")
    predictor = TorchPredictor.load()  # the shipped, trained model: an untrained one barely reacts to inversion
    predictor.tta_hflip, predictor.tta_views = False, [(0.0, 1.0)]  # one pass: the test is about the decoding
    images = torch.stack([preprocess(path, predictor.contract) for path in (png, dicom, negative)])
    months, _ = predictor.predict_tensor(images, torch.zeros(3, dtype=torch.long))
    assert abs(float(months[0] - months[1])) <= 0.5
    assert abs(float(months[0] - months[2])) > 2.0  # not inverting would change the age: the check can fail


def test_a_reading_outside_the_interval_is_noted():
    inside = compare_reading(144.4, 136.0, 126.9, 161.9)
    assert inside == {"reader_bone_age_months": 136.0, "reader_minus_model_months": -8.4, "reading_note": ""}
    outside = compare_reading(144.4, 170.0, 126.9, 161.9)
    assert outside["reader_minus_model_months"] == 25.6
    assert outside["reading_note"].startswith("the reader's 170 months is outside the model's 90% interval (127-162")
    assert compare_reading(144.4, 126.0, 126.9, 161.9)["reading_note"] != ""  # below the interval too
    assert compare_reading(144.4, 170.0)["reading_note"] == ""  # no interval, nothing to judge against
