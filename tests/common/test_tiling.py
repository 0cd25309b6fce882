"""Blocks and stitching (common/tiling.py): the cores tile the array, and a segmentation done block by block
equals the one done on the whole array, each object crossing a block border counted once."""

import numpy as np
import pytest
from scipy import ndimage

from common.tiling import block_grid, closest_level, core_slices, paste_objects, tissue_mask


@pytest.mark.parametrize(
    "shape, size, overlap",
    [((100, 130), 32, 8), ((64, 64), 64, 16), ((20, 50), 32, 8), ((9, 70, 45), (4, 32, 32), (1, 8, 8))],
)
def test_cores_cover_every_pixel_once(shape, size, overlap):
    count = np.zeros(shape, int)
    for start, core in block_grid(shape, size, overlap):
        count[core_slices(start, core, shape)] += 1
    assert (count == 1).all()


def test_block_grid_steps_and_end_alignment():
    blocks = block_grid((100,), 40, 10)
    assert [s for (s,), _ in blocks] == [0, 30, 60]  # step 30, the last aligned to the end (60 + 40 = 100)
    assert [c for _, (c,) in blocks] == [(0, 35), (5, 35), (5, 40)]  # middles of the overlaps: 35, 65
    with pytest.raises(ValueError, match="overlap"):
        block_grid((100,), 40, 40)


def discs(shape, n, radius_range, seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    for _ in range(n):
        centre = [rng.uniform(0, s) for s in shape]
        r = rng.uniform(*radius_range)
        mask |= sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= r**2
    return mask


def stitched(mask, size, overlap):
    labels = np.zeros(mask.shape, np.int32)
    next_id = 1
    for start, core in block_grid(mask.shape, size, overlap):
        region = tuple(slice(a, a + s) for a, s in zip(start, np.broadcast_to(size, mask.ndim), strict=True))
        block_labels, _ = ndimage.label(mask[region])
        window = labels[region]  # a view: pasted in place
        next_id += len(paste_objects(window, block_labels, core, next_id))
    return labels


def same_partition(a, b):
    """The two label images name the same objects (ids may differ)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(pairs[0]) == len(np.unique(a)) == len(np.unique(b)) and ((pairs[0] == 0) == (pairs[1] == 0)).all()


@pytest.mark.parametrize("ndim", [2, 3])
def test_tiled_equals_untiled_and_counts_border_objects_once(ndim):
    shape, size, overlap = ((300, 260), 64, 32) if ndim == 2 else ((40, 90, 80), 24, 12)
    mask = discs(shape, 60 if ndim == 2 else 40, (3, 7) if ndim == 2 else (2, 5), seed=ndim)
    whole, n = ndimage.label(mask)
    tiled = stitched(mask, size, overlap)
    assert tiled.max() == n  # every object once, none split, none lost
    assert same_partition(whole, tiled)
    # the check means something: many objects cross a border between cores
    owner = np.zeros(shape, int)
    for i, (start, core) in enumerate(block_grid(shape, size, overlap)):
        owner[core_slices(start, core, shape)] = i
    crossing = sum(len(np.unique(owner[whole == k])) > 1 for k in range(1, n + 1))
    assert crossing >= 5


def test_object_larger_than_the_overlap_is_not_counted_twice():
    mask = np.zeros((40, 120), bool)
    mask[10:20, 20:100] = True  # 80 px long, blocks of 64 overlapping by 16
    tiled = stitched(mask, 64, 16)
    assert tiled.max() <= 2 and np.unique(tiled[mask]).size == tiled.max()
    assert (tiled[~mask] == 0).all()


def test_paste_keeps_earlier_objects():
    window = np.zeros((10, 10), np.int32)
    window[:, :5] = 7
    block = np.zeros((10, 10), np.int32)
    block[2:8, 3:9] = 1  # a third of it on the earlier object: pasted on the free voxels only
    block[0:2, 0:4] = 2  # all on the earlier object: dropped
    assert paste_objects(window, block, ((0, 10), (0, 10)), 8) == [(8, 1)]
    assert (window[:, :5] == 7).all() and (window[2:8, 5:9] == 8).all() and (window == 8).sum() == 24


def test_tissue_mask_finds_stained_tissue_not_glass():
    glass = np.full((60, 80, 3), 235, np.uint8)
    assert not tissue_mask(glass).any()
    slide = glass.copy()
    slide[20:40, 30:60] = (200, 120, 180)  # pink, eosin-like
    mask = tissue_mask(slide)
    assert mask[20:40, 30:60].all() and not mask[:10].any() and not mask[:, :20].any()


def test_closest_level():
    assert closest_level([0.25, 1.0, 4.0], 0.25) == 0
    assert closest_level([0.25, 1.0, 4.0], 0.9) == 1
    assert closest_level([0.25, 1.0, 4.0], 0.5) == 0  # a tie on the log scale: the finer


@pytest.mark.parametrize("shape", [(2500, 3100), (2, 13, 2100, 900)])
def test_pyramid_plan_halves_the_last_two_axes_by_blocks(shape):
    from common.tiling import ngff_datasets, pyramid_plan

    rng = np.random.default_rng(0)
    level = rng.integers(0, 50, size=shape)
    plan = pyramid_plan(shape, smallest=600, block=512, lead=4)
    for smaller, copies in plan:
        out = np.full(smaller, -1)
        for source, target in copies:
            out[target] = level[source]
        assert np.array_equal(out, level[..., ::2, ::2])  # every second pixel, every pixel filled
        level = out
    assert max(level.shape[-2:]) <= 600 < max(level.shape[-2:]) * 2
    datasets = ngff_datasets(len(plan) + 1, [1.0] * (len(shape) - 2) + [0.25, 0.25])
    assert datasets[-1]["coordinateTransformations"][0]["scale"][-1] == 0.25 * 2 ** len(plan)
