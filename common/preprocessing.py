"""Image preprocessing: CLAHE (single and multi-scale), intensity normalisation, fundus helpers.

Pure functions on numpy arrays: grey images are (H, W), colour images (H, W, 3) RGB.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

# (clip limit, tile grid) pairs of the multi-scale CLAHE: gentle, medium, strong local contrast.
MULTISCALE_CLAHE_SETTINGS: tuple[tuple[float, tuple[int, int]], ...] = ((2.0, (8, 8)), (4.0, (8, 8)), (8.0, (16, 16)))


def _to_unit_float(image: np.ndarray) -> np.ndarray:
    """uint8/uint16 scaled by their dtype range, floats clipped to [0, 1]; float32 out."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if np.issubdtype(image.dtype, np.floating):
        return np.clip(image, 0.0, 1.0).astype(np.float32)
    raise TypeError(f"expected a uint8, uint16 or float image, got dtype {image.dtype}")


def _from_unit_float(image: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Inverse of _to_unit_float: back to the given dtype (floats come back as float32 in [0, 1])."""
    if dtype == np.uint8:
        return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if dtype == np.uint16:
        return np.clip(np.rint(image * 65535.0), 0, 65535).astype(np.uint16)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def clahe(image: np.ndarray, clip_limit: float = 2.0, tile_grid_size: tuple[int, int] = (8, 8)) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (OpenCV), same dtype and shape out as in.

    - Grey (H, W) or RGB (H, W, 3); RGB is equalised on the L channel of CIE Lab, so hues are kept.
    - uint8 as is; uint16 (grey or RGB) is first stretched over its own min..max (never truncated to the low
      byte); float images are taken as [0, 1] and come back as float32 in [0, 1].
    The equalisation itself works on 256 levels for every dtype, so a clip limit means the same thing for
    8-bit, 16-bit and float input (OpenCV's native 16-bit CLAHE uses 65,536 bins, which turns the same
    clip limit into almost global equalisation and amplifies noise several times more). For 16-bit
    microscopy with hot pixels, call `percentile_normalize` first.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        return clahe(image[..., 0], clip_limit, tile_grid_size)[..., None]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"CLAHE expects a grey (H, W) or RGB (H, W, 3) image, got shape {image.shape}")
    equaliser = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=tuple(int(t) for t in tile_grid_size))
    dtype = image.dtype
    if dtype == np.uint8:
        if image.ndim == 2:
            return equaliser.apply(np.ascontiguousarray(image))
        lab = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2LAB)
        lab[..., 0] = equaliser.apply(lab[..., 0])
        return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    if dtype == np.uint16:
        # stretched over its own min..max (all channels together, so colours keep their ratios)
        low, high = float(image.min()), float(image.max())
        unit = (image.astype(np.float32) - low) / max(high - low, 1.0)
    else:
        unit = _to_unit_float(image)
    if image.ndim == 2:
        levels = np.rint(unit * 255.0).astype(np.uint8)
        return _from_unit_float(equaliser.apply(levels).astype(np.float32) / 255.0, dtype)
    # uint16 / float colour: float Lab (L in 0..100) keeps the colour precision; L goes through 256 levels.
    lab = cv2.cvtColor(unit, cv2.COLOR_RGB2LAB)
    lightness = np.rint(np.clip(lab[..., 0], 0, 100) * 2.55).astype(np.uint8)
    lab[..., 0] = equaliser.apply(lightness).astype(np.float32) / 2.55
    return _from_unit_float(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB), dtype)


def multiscale_clahe(
    image: np.ndarray, settings: Sequence[tuple[float, tuple[int, int]]] = MULTISCALE_CLAHE_SETTINGS
) -> np.ndarray:
    """CLAHE at several (clip limit, tile grid) pairs, stacked first: (K, H, W) or (K, H, W, 3), float32 in [0, 1]."""
    if not settings:
        raise ValueError("multiscale_clahe needs at least one (clip_limit, tile_grid_size) pair")
    return np.stack([_to_unit_float(clahe(image, clip, grid)) for clip, grid in settings])


def percentile_normalize(
    image: np.ndarray,
    low: float = 1.0,
    high: float = 99.8,
    clip: bool = True,
    channel_axis: int | None = None,
    mask: np.ndarray | None = None,
    min_range: float = 0.0,
) -> np.ndarray:
    """(image - p_low) / max(p_high - p_low, min_range) as float32, for 16-bit microscopy and EM.

    Robust to hot pixels and dark borders, unlike min-max scaling. clip=True clips to [0, 1]. With
    channel_axis, each channel gets its own percentiles. mask (same spatial shape): percentiles from the
    masked pixels only (e.g. a valid region). min_range (in the image's units): the smallest stretch, so an
    image without bright structures (a flat field, an unstressed control) stays dim instead of having its noise
    stretched to full contrast. A constant image (p_high == p_low, no min_range) gives zeros.
    """
    image = np.asarray(image)
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got low={low}, high={high}")
    if channel_axis is not None:
        channels = np.moveaxis(image, channel_axis, 0)
        out = np.stack([percentile_normalize(c, low, high, clip, None, mask, min_range) for c in channels])
        return np.moveaxis(out, 0, channel_axis)
    values = image if mask is None else image[np.asarray(mask, dtype=bool)]
    if values.size == 0:
        return np.zeros(image.shape, dtype=np.float32)
    p_low, p_high = np.percentile(values, (low, high))
    return stretch(image, p_low, p_high, clip, min_range)


def stretch(image: np.ndarray, p_low: float, p_high: float, clip: bool = True, min_range: float = 0.0) -> np.ndarray:
    """percentile_normalize with the percentiles given: (image - p_low) / max(p_high - p_low, min_range), e.g.
    for a block of an image too large to read, with percentiles of a sample of the whole."""
    scale = max(float(p_high) - float(p_low), min_range)
    if scale <= 0:
        return np.zeros(np.shape(image), dtype=np.float32)
    out = (np.asarray(image).astype(np.float32) - np.float32(p_low)) / np.float32(scale)
    return np.clip(out, 0.0, 1.0) if clip else out


def zscore_normalize(
    image: np.ndarray,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    channel_axis: int | None = None,
    eps: float = 1e-6,
) -> np.ndarray:
    """(image - mean) / std as float32. Without mean/std, the image's own statistics (per channel with
    channel_axis); with them (e.g. dataset statistics), those. A constant image gives zeros."""
    image = np.asarray(image, dtype=np.float32)
    axes = None
    shape = [1] * image.ndim
    if channel_axis is not None:
        channel_axis %= image.ndim
        axes = tuple(a for a in range(image.ndim) if a != channel_axis)
        shape[channel_axis] = image.shape[channel_axis]
    channels = 1 if channel_axis is None else image.shape[channel_axis]

    def given(value):  # one number, or one per channel
        return np.broadcast_to(np.asarray(value, np.float32).reshape(-1), (channels,)).reshape(shape)

    mean = image.mean(axis=axes, keepdims=True) if mean is None else given(mean)
    std = image.std(axis=axes, keepdims=True) if std is None else given(std)
    return ((image - mean) / np.maximum(std, eps)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Fundus photographs (APTOS / Kaggle diabetic retinopathy conventions)
# ----------------------------------------------------------------------------------------------------------------


def _grey_255(image: np.ndarray) -> np.ndarray:
    """Grey values on the 0-255 scale whatever the dtype, so one tolerance fits 8-bit, 16-bit and float photos."""
    unit = _to_unit_float(image)
    if unit.ndim == 3:
        unit = cv2.cvtColor(unit, cv2.COLOR_RGB2GRAY)
    return unit * 255.0


def crop_black_border(image: np.ndarray, tolerance: float = 7) -> np.ndarray:
    """Crop the dark frame around a fundus photo: keep the bounding box of pixels whose grey value exceeds
    `tolerance` on the 0-255 scale (7 is the usual APTOS choice; 16-bit and float photos are compared on the
    same scale). An all-dark image is returned unchanged; callers that must reject it check for that."""
    image = np.asarray(image)
    inside = _grey_255(image) > tolerance
    if not inside.any():
        return image
    rows = np.flatnonzero(inside.any(axis=1))
    cols = np.flatnonzero(inside.any(axis=0))
    return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def circle_crop(image: np.ndarray, tolerance: float = 7) -> np.ndarray:
    """Crop the black border, then black out everything outside the largest centred circle and crop to it.

    Fundus photos are often cut flat at the top and bottom; the circle makes every image the same round
    field of view, so the network cannot learn the camera's framing."""
    image = crop_black_border(image, tolerance)
    height, width = image.shape[:2]
    radius = min(height, width) / 2.0
    yy, xx = np.ogrid[:height, :width]
    outside = (yy - (height - 1) / 2.0) ** 2 + (xx - (width - 1) / 2.0) ** 2 > radius**2
    image = image.copy()
    image[outside] = 0
    return crop_black_border(image, tolerance)


def ben_graham(image: np.ndarray, sigma: float = 10.0, weight: float = 4.0) -> np.ndarray:
    """Ben Graham's local-average subtraction (Kaggle DR 2015 winner): weight * (image - GaussianBlur(image, sigma))
    plus mid-grey, i.e. 4 * img - 4 * blur + 128 for uint8. Removes lighting differences between cameras
    and brings out small lesions. Same dtype out (uint8: 0..255 saturated; uint16 and float on the same scale)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        blurred = cv2.GaussianBlur(image, (0, 0), sigma)
        return cv2.addWeighted(image, weight, blurred, -weight, 128)
    unit = _to_unit_float(image)
    blurred = cv2.GaussianBlur(unit, (0, 0), sigma)
    return _from_unit_float(weight * (unit - blurred) + 128.0 / 255.0, image.dtype)
