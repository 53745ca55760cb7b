"""The clouds submission format, pinned by hand-made examples, and its round trip."""

from __future__ import annotations

import numpy as np
import pytest

from segplat.submission import (
    decode_colour_prediction,
    encode_binary_mask,
    encode_colour_prediction,
    read_submission,
    rle_decode,
    rle_encode,
    write_submission,
)


def test_rle_is_one_indexed_start_length_pairs():
    assert rle_encode(np.array([0, 1, 1, 0, 255, 0, 0, 3])) == "2 2 5 1 8 1"
    assert rle_encode(np.zeros(5)) == ""
    assert rle_decode("2 2 5 1 8 1", 8).tolist() == [0, 1, 1, 0, 1, 0, 0, 1]


def test_colour_encoding_follows_the_competition_layout():
    # 2x3 image (H=2, W=3). Thick cloud at row 0, col 1 -> BGR (0,0,255): only the R plane.
    pred = np.zeros((2, 3), np.uint8)
    pred[0, 1] = 1
    # flattened img.T: plane B (6 values), G (6), R (6); inside a plane column-major: (r0c0, r1c0, r0c1, ...)
    # R plane starts at 12; (row 0, col 1) is position 2 inside it -> 1-indexed 15
    assert encode_colour_prediction(pred) == "15 1"
    pred[1, 1] = 3  # shadow (0,255,255): G and R planes, (row 1, col 1) = position 3
    assert encode_colour_prediction(pred) == "10 1 15 2"
    pred[:] = 2  # thin cloud everywhere: the whole G plane
    assert encode_colour_prediction(pred) == "7 6"


def test_colour_round_trip_on_random_predictions():
    rng = np.random.default_rng(0)
    for h, w in ((7, 5), (32, 48)):
        pred = rng.integers(0, 4, (h, w)).astype(np.uint8)
        assert np.array_equal(decode_colour_prediction(encode_colour_prediction(pred), h, w), pred)


def test_per_class_binary_masks_are_column_major():
    mask = np.array([[0, 1], [1, 1]], bool)
    assert encode_binary_mask(mask) == "2 3"


@pytest.mark.parametrize("per_class", [False, True])
def test_write_and_read_submission(tmp_path, per_class):
    rng = np.random.default_rng(1)
    rows = [(f"img_{i}.png", rng.integers(0, 4, (6, 9)).astype(np.uint8)) for i in range(3)]
    path = write_submission(rows, tmp_path / "submission.csv", per_class=per_class)
    text = path.read_text().splitlines()
    assert text[0] == "Image_Label,EncodedPixels"
    table = read_submission(path)
    if per_class:
        assert len(table) == 3 * 3 and "img_0.png_thin_cloud" in table
    else:
        assert list(table) == [name for name, _ in rows]
        for name, pred in rows:
            assert np.array_equal(decode_colour_prediction(table[name], 6, 9), pred)
