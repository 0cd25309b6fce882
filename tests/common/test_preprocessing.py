"""Preprocessing: CLAHE over dtypes and colour, normalisation, fundus border handling."""

import cv2
import numpy as np
import pytest

from common.preprocessing import (
    MULTISCALE_CLAHE_SETTINGS,
    ben_graham,
    circle_crop,
    clahe,
    crop_black_border,
    multiscale_clahe,
    percentile_normalize,
    zscore_normalize,
)


def fluorescence(shape=(128, 128), seed=0):
    """Float image in [0, 1]: a dim, unevenly lit cell with small bright spots and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = 0.1 + 0.2 * np.exp(-((yy - 50) ** 2 + (xx - 70) ** 2) / (2 * 30**2)) + 0.1 * xx / shape[1]
    for _ in range(15):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        image += 0.3 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4)
    return np.clip(image + 0.01 * rng.standard_normal(shape), 0, 1)


def fundus(height=300, width=420, radius=170, seed=0):
    """RGB uint8 fundus photo: orange-red disc cut flat at top and bottom, a noisy near-black frame (<= 6)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 7, size=(height, width, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:height, :width]
    disc = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 <= radius**2
    image[disc] = (200, 90, 40)
    image[disc & ((yy - 160) ** 2 + (xx - 230) ** 2 <= 15**2)] = (250, 230, 160)  # optic disc
    return image, disc


# ---------------------------------------------------------------------------------------------------- CLAHE


def test_clahe_uint8_is_opencv():
    image = (fluorescence() * 255).astype(np.uint8)
    expected = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 4)).apply(image)
    np.testing.assert_array_equal(clahe(image, 3.0, (4, 4)), expected)


def test_clahe_same_result_for_every_dtype():
    """A clip limit means the same for 8-bit, 16-bit and float input (16-bit is never truncated to a byte)."""
    image8 = (fluorescence() * 255).round().astype(np.uint8)
    image8[0, 0], image8[0, 1] = 0, 255  # full range, so the 16-bit min..max stretch is the identity
    out8 = clahe(image8).astype(np.float64) / 255
    image16 = image8.astype(np.uint16) * 257  # the same image in 16 bits
    out16 = clahe(image16)
    assert out16.dtype == np.uint16
    np.testing.assert_allclose(out16 / 65535, out8, atol=1 / 255)
    outf = clahe(image8.astype(np.float32) / 255)
    assert outf.dtype == np.float32 and 0 <= outf.min() and outf.max() <= 1
    np.testing.assert_allclose(outf, out8, atol=1 / 255)


def test_clahe_16bit_with_small_dynamic_range_is_stretched_not_truncated():
    # a typical camera image: values 100..1100 of 65535; truncating to the low byte would scramble it
    image = (100 + 1000 * fluorescence()).astype(np.uint16)
    out = clahe(image)
    assert out.dtype == np.uint16 and out.max() > 40000  # the contrast was used
    # equal to 8-bit CLAHE of the image stretched over its min..max
    stretched = np.rint((image - image.min()) / (image.max() - image.min()) * 255).astype(np.uint8)
    np.testing.assert_allclose(out / 65535, clahe(stretched) / 255, atol=1e-6)
    # local contrast enhancement keeps the bright spots bright
    spots = image > np.percentile(image, 99)
    assert out[spots].mean() > np.percentile(out, 90)


def test_clahe_16bit_rgb_is_stretched_like_grey():
    image, _ = fundus()
    dim = (image.astype(np.uint16) * 8).astype(np.uint16)  # a dim 16-bit photo, max 2000 of 65535
    out = clahe(dim)
    assert out.dtype == np.uint16 and out.max() > 40000
    stretched = np.rint(image.astype(float) * 255 / image.max()).astype(np.uint8)
    difference = np.abs(out / 65535 - clahe(stretched) / 255)  # float Lab vs 8-bit Lab rounding
    assert difference.mean() < 1 / 255 and difference.max() < 8 / 255


def test_clahe_raises_local_contrast():
    image = (fluorescence() * 255).astype(np.uint8)
    local_std = lambda a: (a.astype(float) - cv2.blur(a.astype(float), (9, 9))).std()  # noqa: E731
    assert local_std(clahe(image, 4.0)) > 1.5 * local_std(image)


def test_clahe_rgb_works_on_lightness_and_keeps_hue():
    image, disc = fundus()
    out = clahe(image, 2.0, (8, 8))
    assert out.shape == image.shape and out.dtype == np.uint8
    hue_in = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 0][disc].astype(int)
    hue_out = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)[..., 0][disc].astype(int)
    assert np.abs(hue_in - hue_out).mean() < 3
    # a grey RGB image stays grey and matches grey CLAHE closely
    grey = (fluorescence() * 255).astype(np.uint8)
    out = clahe(np.stack([grey] * 3, -1))
    assert np.abs(out[..., 0].astype(int) - out[..., 2].astype(int)).max() <= 2
    out_float = clahe(np.stack([grey] * 3, -1).astype(np.float32) / 255)
    assert out_float.dtype == np.float32
    assert np.abs(out_float - out / 255).mean() < 1 / 255  # float Lab and 8-bit Lab round differently
    assert np.abs(out_float - out / 255).max() < 6 / 255


def test_clahe_edge_cases():
    assert clahe(np.full((32, 32), 7, np.uint8)).std() == 0  # constant image: no crash, stays flat
    assert clahe(np.zeros((32, 32), np.uint16)).std() == 0
    assert clahe(np.zeros((16, 16, 1), np.uint8)).shape == (16, 16, 1)
    with pytest.raises(ValueError, match="grey"):
        clahe(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(TypeError, match="dtype"):
        clahe(np.zeros((8, 8), np.int32))


def test_multiscale_clahe_stack():
    image = (fluorescence() * 65535).astype(np.uint16)
    stack = multiscale_clahe(image)
    assert stack.shape == (len(MULTISCALE_CLAHE_SETTINGS), 128, 128) and stack.dtype == np.float32
    assert 0 <= stack.min() and stack.max() <= 1
    np.testing.assert_allclose(stack[1], clahe(image, 4.0, (8, 8)) / 65535, atol=1e-6)
    # a stronger clip limit gives more contrast
    assert stack[0].std() < stack[1].std()
    with pytest.raises(ValueError):
        multiscale_clahe(image, settings=())


# ---------------------------------------------------------------------------------------------------- normalisation


def test_percentile_normalize_hand_computed():
    image = np.arange(101, dtype=np.uint16)  # percentile p of 0..100 is p
    out = percentile_normalize(image, low=10, high=90)
    assert out.dtype == np.float32
    assert out[10] == 0 and out[90] == 1 and out[50] == pytest.approx(0.5)
    assert out[0] == 0 and out[100] == 1  # clipped
    assert percentile_normalize(image, 10, 90, clip=False)[100] == pytest.approx(1.125)
    # min_range: a stretch of at least 160 levels, so 10..90 (80 levels) maps to 0..0.5 instead of 0..1
    floored = percentile_normalize(image, 10, 90, min_range=160)
    assert floored[90] == pytest.approx(0.5) and floored[50] == pytest.approx(0.25) and floored[10] == 0
    np.testing.assert_array_equal(percentile_normalize(image, 10, 90, min_range=40), out)  # a wider range wins
    assert percentile_normalize(np.full((4, 4), 9.0), min_range=10).max() == 0


def test_percentile_normalize_ignores_hot_pixels():
    image = (200 + 800 * fluorescence()).astype(np.uint16)
    hot = image.copy()
    hot[5, 5] = 65535
    others = np.ones(image.shape, bool)
    others[5, 5] = False  # the hot pixel itself saturates at 1
    np.testing.assert_allclose(percentile_normalize(hot)[others], percentile_normalize(image)[others], atol=5e-3)
    min_max = (hot - hot.min()) / (hot.max() - hot.min())
    assert min_max.max() == 1 and np.median(min_max) < 0.02  # what min-max scaling would have done


def test_percentile_normalize_channels_mask_and_constant():
    image = np.stack([np.arange(100.0), 10 * np.arange(100.0)], axis=-1)
    out = percentile_normalize(image, 0, 100, channel_axis=-1)
    np.testing.assert_allclose(out[..., 0], out[..., 1])
    mask = np.arange(100) < 50
    assert percentile_normalize(np.arange(100.0), 0, 100, mask=mask)[49] == 1.0
    assert not percentile_normalize(np.full((4, 4), 9.0)).any()
    with pytest.raises(ValueError):
        percentile_normalize(image, 90, 10)


def test_zscore_normalize():
    rng = np.random.default_rng(0)
    image = rng.normal(50, 5, size=(64, 64, 3)) * np.array([1, 2, 3])
    out = zscore_normalize(image, channel_axis=-1)
    np.testing.assert_allclose(out.mean(axis=(0, 1)), 0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=(0, 1)), 1, atol=1e-4)
    given = zscore_normalize(np.array([[1.0, 3.0]]), mean=2.0, std=0.5)
    np.testing.assert_allclose(given, [[-2.0, 2.0]])
    per_channel = zscore_normalize(np.ones((2, 2, 3)), mean=[0, 1, 2], std=[1, 1, 1], channel_axis=-1)
    np.testing.assert_allclose(per_channel[0, 0], [1, 0, -1])
    assert not zscore_normalize(np.full((4, 4), 3.0)).any()
    scalar = zscore_normalize(np.ones((2, 2, 3)), mean=1.0, std=2.0, channel_axis=-1)
    assert not scalar.any()


# ---------------------------------------------------------------------------------------------------- fundus


def test_crop_black_border_keeps_the_disc():
    image, disc = fundus()
    cropped = crop_black_border(image)
    rows, cols = np.flatnonzero(disc.any(1)), np.flatnonzero(disc.any(0))
    assert cropped.shape[:2] == (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    # every pixel brighter than the tolerance survived the crop
    grey = lambda a: cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)  # noqa: E731
    assert (grey(cropped) > 7).sum() == (grey(image) > 7).sum()


@pytest.mark.parametrize("convert", [lambda a: a.astype(np.uint16) * 257, lambda a: a.astype(np.float64) / 255])
def test_crop_black_border_same_for_16_bit_and_float(convert):
    image, _ = fundus()
    assert crop_black_border(convert(image)).shape == crop_black_border(image).shape
    assert circle_crop(convert(image)).shape == circle_crop(image).shape


def test_crop_black_border_all_black_is_unchanged():
    black = np.zeros((20, 30, 3), np.uint8)
    assert crop_black_border(black).shape == black.shape


def test_circle_crop_makes_a_round_field_of_view():
    image, _ = fundus(height=300, width=420, radius=200)  # disc cut flat at top and bottom
    out = circle_crop(image)
    height, width = out.shape[:2]
    assert abs(height - width) <= 2 and height <= 300
    assert not out[0, 0].any() and not out[-1, -1].any()  # corners blacked out
    assert out[height // 2, width // 2].tolist() == [200, 90, 40]  # centre kept


def test_ben_graham_formula():
    image, _ = fundus()
    out = ben_graham(image, sigma=10)
    blurred = cv2.GaussianBlur(image, (0, 0), 10).astype(float)
    expected = np.clip(4 * image.astype(float) - 4 * blurred + 128, 0, 255)
    assert out.dtype == np.uint8
    assert np.abs(out.astype(float) - expected).max() <= 1
    flat = np.full((40, 40, 3), 90, np.uint8)
    assert (ben_graham(flat) == 128).all()  # no local structure: mid-grey
    flat_float = ben_graham(flat.astype(np.float32) / 255)
    np.testing.assert_allclose(flat_float, 128 / 255, atol=1e-5)
    # same on the 16-bit scale; the uint8 path blurs in whole numbers (OpenCV), which 4x amplifies to <= 4 levels
    difference = np.abs(ben_graham(image.astype(np.uint16) * 257) / 257 - out)
    assert difference.mean() < 0.5 and difference.max() <= 4.5
