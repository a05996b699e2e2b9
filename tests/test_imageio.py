"""The hand localiser and the framing normalisation (:func:`boneage.imageio.hand_box`, :func:`frame_hand`)."""

from __future__ import annotations

import numpy as np
import pytest

from boneage.config import Config, DataConfig, contract_from_description
from boneage.errors import ConfigError
from boneage.imageio import frame_hand, hand_box, resize_array
from tests.helpers import synthetic_radiograph

SIZE = 120


def hand(size: int = SIZE) -> np.ndarray:
    """The synthetic radiograph with the soft tissue of its fingers, which joins their bones to the palm as on a
    real film (the helper draws the bones alone)."""
    image = synthetic_radiograph(120, size=size).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for k, x0 in enumerate(np.linspace(0.32, 0.68, 5)):
        finger = (np.abs(xx - x0) < 0.04) & (yy > 0.11 + 0.03 * abs(k - 2)) & (yy < 0.6)
        image[finger] = np.maximum(image[finger], 80.0)
    return image / 255.0


def pad(image: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    return np.pad(image, ((top, bottom), (left, right)), constant_values=20 / 255)


def test_hand_box_surrounds_the_synthetic_hand():
    top, bottom, left, right = hand_box(hand())
    # fingers start at 11% of the height, the palm ends at 90%; the palm spans 28-72% of the width
    assert top == pytest.approx(0.11 * SIZE, abs=4) and bottom == pytest.approx(0.90 * SIZE, abs=4)
    assert left == pytest.approx(0.28 * SIZE, abs=4) and right == pytest.approx(0.72 * SIZE, abs=4)


def test_hand_box_follows_a_shift_and_padding_and_is_the_same_on_a_large_film():
    base = np.array(hand_box(hand()))
    assert np.abs(np.array(hand_box(pad(hand(), 30, 0, 70, 5))) - (base + [30, 30, 70, 70])).max() <= 2
    large = np.array(hand_box(hand(size=4 * SIZE)))  # a full-size film: searched on the same small copy
    assert np.abs(large / 4 - base).max() <= 2


def test_hand_box_leaves_out_a_side_marker_and_takes_the_whole_of_a_flat_frame():
    image = hand()
    image[2:12, 2:12] = 1.0  # an "L" marker in the corner, brighter than any bone
    top, _, left, _ = hand_box(image)
    assert top > 0.1 * SIZE and left > 0.25 * SIZE
    assert hand_box(np.full((50, 80), 0.4, np.float32)) == (0, 50, 0, 80)


@pytest.mark.parametrize(
    "framed",
    [
        lambda image: pad(image, 60, 60, 60, 60),  # placed small in a large frame
        lambda image: pad(image, 0, 40, 90, 0),  # off-centre
        lambda image: image[10:-8, 25:-25],  # cropped tightly around the hand
    ],
)
def test_frame_hand_reads_a_film_the_same_however_it_was_framed(framed):
    fill = (0.89, 0.75)
    for image in (hand(), framed(hand())):
        out = frame_hand(image, fill)
        top, bottom, left, right = hand_box(out)
        height, width = out.shape
        # the hand fills the asked fraction of the frame, in its middle, whatever the framing it came with
        assert (bottom - top) / height == pytest.approx(fill[0], abs=0.04)
        assert (right - left) / width == pytest.approx(fill[1], abs=0.04)
        assert (top + bottom) / 2 / height == pytest.approx(0.5, abs=0.03)
        assert (left + right) / 2 / width == pytest.approx(0.5, abs=0.03)
    # so the model inputs agree far better than those of the films as given
    reframed = np.abs(resize_array(frame_hand(framed(hand()), fill), 32) - resize_array(frame_hand(hand(), fill), 32))
    as_given = np.abs(resize_array(framed(hand()), 32) - resize_array(hand(), 32))
    assert reframed.mean() < 0.6 * as_given.mean()


def test_frame_hand_fills_the_asked_fraction_and_pads_with_the_background():
    image = pad(hand(), 5, 5, 5, 5) * 0.5 + 0.4  # a bright background, as many clinic films have
    top, bottom, left, right = hand_box(image)
    framed = frame_hand(image, (0.5, 0.5))
    assert framed.shape == (round((bottom - top) / 0.5), round((right - left) / 0.5))
    assert framed[0, 0] == pytest.approx(np.median(image[:3]), abs=0.02)


def test_frame_hand_only_above_leaves_a_loosely_framed_film_as_it_is():
    loose = pad(hand(), 20, 20, 20, 20)
    assert frame_hand(loose, (0.89, 0.75), only_above=(0.96, 1.0)) is loose
    tight = hand()[14:-12, 30:-30]  # the hand box fills the whole height: re-framed
    framed = frame_hand(tight, (0.89, 0.75), only_above=(0.96, 1.0))
    assert framed.shape != tight.shape
    assert np.array_equal(framed, frame_hand(tight, (0.89, 0.75)))


def test_hand_fill_is_in_the_contract_only_when_set():
    old = {"data_contract": DataConfig(image_size=64).contract()}
    assert "hand_fill" not in old["data_contract"]  # an old folder's config.json is written as it always was
    assert contract_from_description(old).hand_fill is None
    new = {"data_contract": DataConfig(image_size=64, hand_fill=(0.9, 0.7)).contract()}
    assert contract_from_description(new).hand_fill == (0.9, 0.7)
    assert contract_from_description(new).hand_fill_above is None and "hand_fill_above" not in new["data_contract"]
    both = {"data_contract": DataConfig(image_size=64, hand_fill=(0.9, 0.7), hand_fill_above=(0.96, 1.0)).contract()}
    assert contract_from_description(both).hand_fill_above == (0.96, 1.0)
    with pytest.raises(ConfigError, match="hand_fill: expected two fractions"):
        Config.from_dict({"data": {"hand_fill": [0.9, 1.5]}})
    with pytest.raises(ValueError, match="hand_fill: expected two fractions"):  # a folder's config.json, unchecked
        frame_hand(hand(), (0.9, 0.01))
