"""Blocks of an image or volume too large to hold, and instances stitched across them.

An image (or volume) is cut into blocks that overlap; every block is segmented on its own, and each object is
taken from the one block whose *core* holds its centre (the cores tile the image without gaps or overlaps, as
in CellSAM's and StarDist's tiled prediction). An object cut by one block's edge lies whole in the neighbour
whose core holds its centre, provided the overlap exceeds its diameter; so every object is counted once, and a
tiled segmentation equals the untiled one wherever the segmenter itself only looks at the overlap's width.

Memory is that of one block: the caller reads a block from its (lazy) input, segments it, and pastes it into
the output's window with `paste_objects`, which only needs that window (a zarr array, an HDF5 dataset or a
NumPy array, read and written back by the caller).
"""

from collections.abc import Sequence
from itertools import product

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu


def block_grid(shape: Sequence[int], size, overlap) -> list[tuple[tuple[int, ...], tuple[tuple[int, int], ...]]]:
    """Blocks of `size` (an int or one per axis) overlapping by at least `overlap` that cover an array of `shape`
    padded to at least `size`: (start, core) each, the core as (lo, hi) per axis in block coordinates, reaching
    on each side shared with a neighbour to the middle of their overlap; the last block of a row is aligned to
    the array's end (and overlaps its neighbour more). The cores tile the padded array without gaps or
    overlaps."""
    ndim = len(shape)
    size = (size,) * ndim if np.isscalar(size) else tuple(size)
    overlap = (overlap,) * ndim if np.isscalar(overlap) else tuple(overlap)
    per_axis = []
    for n, s, o in zip(shape, size, overlap, strict=True):
        if not 0 <= o < s:
            raise ValueError(f"overlap {o} must be in 0..{s - 1} for blocks of {s}")
        n = max(n, s)
        starts = list(range(0, n - s + 1, s - o))
        if starts[-1] != n - s:
            starts.append(n - s)
        bounds = [0] + [(a + s + b) // 2 for a, b in zip(starts, starts[1:], strict=False)] + [n]
        per_axis.append([(a, (bounds[i] - a, bounds[i + 1] - a)) for i, a in enumerate(starts)])
    blocks = [((), ())]
    for axis in per_axis:
        blocks = [(start + (a,), core + (c,)) for start, core in blocks for a, c in axis]
    return blocks


def paste_objects(
    window: np.ndarray, block_labels: np.ndarray, core, next_id: int, min_free: float = 0.5
) -> list[tuple[int, int]]:
    """Paste into `window` (the output's labels under the block, cropped where the block overhangs the array's
    end; changed in place) the objects of `block_labels` whose centre (mean voxel position) lies in `core` and
    that land mostly (`min_free`) on voxels no earlier object took; each gets the next id from `next_id` on.
    Returns [(new id, its label in block_labels), ...] in the order pasted."""
    pasted = []
    for found, box in enumerate(ndimage.find_objects(block_labels), start=1):
        if box is None:
            continue
        where = np.nonzero(block_labels[box] == found)
        centre = [w.mean() + b.start for w, b in zip(where, box, strict=True)]
        if not all(lo <= c < hi for c, (lo, hi) in zip(centre, core, strict=True)):
            continue
        coords = tuple(w + b.start for w, b in zip(where, box, strict=True))
        inside = np.all([c < n for c, n in zip(coords, window.shape, strict=True)], axis=0)
        coords = tuple(c[inside] for c in coords)
        free = window[coords] == 0
        if not len(free) or free.sum() < min_free * len(free):  # outside the array, or mostly an earlier object's
            continue
        window[tuple(c[free] for c in coords)] = next_id
        pasted.append((next_id, found))
        next_id += 1
    return pasted


def core_slices(start, core, shape) -> tuple[slice, ...]:
    """The array region (slices) a block's core covers, cropped to the array."""
    return tuple(slice(min(a + lo, n), min(a + hi, n)) for a, (lo, hi), n in zip(start, core, shape, strict=True))


def tissue_mask(thumbnail: np.ndarray, min_saturation: float = 0.05) -> np.ndarray:
    """Where a slide's thumbnail (H, W, 3) uint8 RGB shows tissue: saturation above its Otsu threshold (glass is
    grey or white, stained tissue coloured), at least `min_saturation`, the mask dilated by 2 px so that tissue
    edges are kept. A thumbnail without colour has no tissue."""
    rgb = thumbnail.astype(np.float32) / 255
    high, low = rgb.max(-1), rgb.min(-1)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0)
    if saturation.max() < min_saturation:
        return np.zeros(saturation.shape, bool)
    level = max(threshold_otsu(saturation), min_saturation)
    return ndimage.binary_dilation(saturation > level, iterations=2)


def closest_level(level_mpp: Sequence[float], target_mpp: float) -> int:
    """The pyramid level whose microns per pixel are closest to `target_mpp` on a log scale, the finer one on a
    tie (downsampling a finer level loses less than enlarging a coarser one)."""
    gaps = [abs(np.log(m / target_mpp)) for m in level_mpp]
    best = min(gaps)
    return min(i for i, g in enumerate(gaps) if g <= best + 1e-9)


def pyramid_plan(shape: Sequence[int], smallest: int = 1024, block: int = 4096, lead: int = 8) -> list[tuple]:
    """The levels below a full-resolution array of an image pyramid (OME-Zarr, napari): each level the last two
    axes of the one before halved (every second pixel, so label ids stay ids), until they fit in `smallest`.
    Returns [(shape, [(source slices in the level above, target slices), ...]), ...], the copies a block of
    `block` px (and `lead` along a third-from-last axis) at a time, so building the pyramid holds one block."""
    levels, shape = [], tuple(shape)
    while max(shape[-2:]) > smallest:
        smaller = (*shape[:-2], *((n + 1) // 2 for n in shape[-2:]))
        leading = [range(0, n, lead if i == len(shape) - 3 else 1) for i, n in enumerate(shape[:-2])]
        copies = []
        for index in product(*leading, range(0, shape[-2], block), range(0, shape[-1], block)):
            *front, y, x = index
            head = tuple(slice(a, a + (lead if i == len(shape) - 3 else 1)) for i, a in enumerate(front))
            copies.append(((*head, slice(y, y + block, 2), slice(x, x + block, 2)),
                           (*head, slice(y // 2, (y + block) // 2), slice(x // 2, (x + block) // 2))))  # fmt: skip
        levels.append((smaller, copies))
        shape = smaller
    return levels


def ngff_datasets(levels: int, scale: Sequence[float]) -> list[dict]:
    """OME-Zarr `datasets` of a pyramid of `levels` arrays named 0, 1, ...: level k's scale is `scale` (one per
    axis) with the last two axes times 2^k."""
    return [{"path": str(k), "coordinateTransformations": [
        {"type": "scale", "scale": [*map(float, scale[:-2]), *(float(s) * 2**k for s in scale[-2:])]}]}
        for k in range(levels)]  # fmt: skip
