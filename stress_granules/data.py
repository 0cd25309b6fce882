"""Stress-granule image/mask folders: reading microscopy files, pairing, the cached contrast features, crop
strategies, augmentations, the granule-balanced sampler, and synthetic fluorescence images for --demo.

On disk (see ../shared/DATA_FORMATS.md):
    DATA/images/cell_001.tif   8- or 16-bit grey, or an ImageJ hyperstack / OME-TIFF (--channel picks the granule
                               channel, --z_projection max|mean flattens a z-stack), any size
    DATA/masks/cell_001.tif    same basename (.tif/.tiff/.png), same height and width, 0 = background; a label image
                               (one id per granule) or a binary mask (>0 = granule, 8-connected components)

Features (computed once per image and cached as float16 .npy, see `load_features`): the image is percentile
normalised (1st..99.8th percentile to 0..1, stretched by at least --min_dynamic_range so an unstressed control
stays dim, and 16-bit data is never truncated), then (--features)
- multiscale (preset robust): CLAHE at clip limits 2, 4, 8 (common.preprocessing.multiscale_clahe) + edge channel
- clahe (preset improved):    CLAHE at clip limit 2 + the edge channel
- raw:                        the normalised image alone (1 channel)
The edge channel is the gradient magnitude of the Gaussian-smoothed image (sigma 1 px) on a fixed scale
(EDGE_FULL_SCALE): granule borders are its ridges, which helps the network place boundaries of small, dim granules.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import tifffile
import torch
from PIL import Image
from scipy import ndimage
from skimage.segmentation import relabel_sequential
from tqdm import tqdm

from common.formats import contiguous_pixels, label_tiff, pixel_size_from_tiff
from common.preprocessing import MULTISCALE_CLAHE_SETTINGS, multiscale_clahe, percentile_normalize, stretch

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
# Input channels (--features): CLAHE settings of each set; all but "raw" add the edge channel.
FEATURE_SETTINGS = {
    "multiscale": MULTISCALE_CLAHE_SETTINGS,  # clip limits 2, 4, 8 with their grids (preset robust)
    "clahe": MULTISCALE_CLAHE_SETTINGS[:1],  # clip limit 2 (preset improved)
    "raw": (),  # the percentile-normalised image alone: a 1-channel U-Net
}
CACHE_VERSION = 2  # 2: the dynamic-range floor, channel and z-projection, the fixed edge scale
# Crop strategies and their shares (--crops_per_image crops per image per epoch)
CROP_STRATEGIES = {"granule": 0.30, "edge": 0.20, "background": 0.15, "mixed": 0.20, "random": 0.15}


class DataError(SystemExit):
    """A problem with the user's data; the message names the file. Exits non-zero when not caught."""


# ----------------------------------------------------------------------------------------------------------------
# Reading and pairing
# ----------------------------------------------------------------------------------------------------------------


def _describe(axes: str, shape: tuple[int, ...], kind: str) -> str:
    """What a file holds, in words: 'an ImageJ hyperstack of 2 channels x 5 z-slices of 256 x 256 px (axes CZYX)'."""
    names = {"C": "channels", "Z": "z-slices", "T": "time points", "S": "colour samples", "Q": "pages", "I": "pages"}
    parts = [f"{n} {names.get(a, a)}" for a, n in zip(axes, shape, strict=True) if a not in "YX"]
    size = f"{shape[axes.index('Y')]} x {shape[axes.index('X')]} px" if "Y" in axes and "X" in axes else str(shape)
    return f"{kind} of {' x '.join(parts)} of {size} (axes {axes})" if parts else f"{kind} of {size}"


def read_array(path: Path) -> tuple[np.ndarray, str, str]:
    """(pixels, axes, kind) of a TIFF (tifffile's first series: ImageJ hyperstacks and OME-TIFFs keep their
    channel, z and time axes, singleton axes dropped) or a PNG (Pillow: palette PNGs give their indices, 16-bit
    stays 16-bit). axes uses tifffile's letters: Y, X, C (channels), Z, T, S (RGB samples), Q/I (pages of a
    plain multi-page TIFF: channels or slices, the file does not say). kind names the file type for messages."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                array, axes = series.asarray(), series.axes
                kind = "an OME-TIFF" if tif.is_ome else "an ImageJ hyperstack" if tif.is_imagej else "a TIFF"
        else:
            with Image.open(path) as png:
                array = np.asarray(png)
            axes, kind = ("YX" if array.ndim == 2 else "YXS"), "a PNG"
    except Exception as error:
        raise DataError(f"{path}: cannot read the image ({type(error).__name__}: {error})") from None
    array = np.asarray(array)
    if array.size == 0:
        raise DataError(f"{path}: cannot read the image (empty or corrupt file)")
    keep = [i for i, n in enumerate(array.shape) if n > 1 or axes[i] in "YX"]
    array, axes = array.reshape([array.shape[i] for i in keep]), "".join(axes[i] for i in keep)
    if "S" in axes and axes[-1] != "S":  # planar (channel-first) RGB: samples last, as in a PNG
        array, axes = np.moveaxis(array, axes.index("S"), -1), axes.replace("S", "") + "S"
    if set(axes) - set("YXCZTSQI") or not {"Y", "X"} <= set(axes):
        raise DataError(f"{path}: expected an image with Y and X axes, found {_describe(axes, array.shape, kind)}")
    return array, axes, kind


def _take(array: np.ndarray, axes: str, axis: str, index: int) -> tuple[np.ndarray, str]:
    i = axes.index(axis)
    return np.take(array, index, axis=i), axes[:i] + axes[i + 1 :]


def read_image(path: Path, channel: int | None = None, z_projection: str | None = None) -> np.ndarray:
    """A 2D grey image (H, W) in its own dtype: the granule channel (`channel`, counted from 0: Fiji's C1 is 0) of
    a multi-channel file, a z-stack flattened by `z_projection` ("max" or "mean"), 3 identical RGB samples
    reduced to one. Anything else that is not one 2D plane is an error that says what the file holds."""
    array, axes, kind = read_array(path)
    holds = _describe(axes, array.shape, kind)
    if "T" in axes:
        raise DataError(f"{path} holds {holds}: save one time point per file")
    if "C" in axes and "S" in axes:
        raise DataError(f"{path} holds {holds}: save the granule channel as a grey image")
    channel_axis = next((a for a in "CSQI" if a in axes), None)
    if channel_axis in ("Q", "I") and z_projection and channel is None:  # a plain page stack taken as z-slices
        axes = axes.replace(channel_axis, "Z")
        channel_axis = None
    if channel_axis is not None:
        count = array.shape[axes.index(channel_axis)]
        if channel is not None:
            if not 0 <= channel < count:
                raise DataError(f"{path} holds {holds}: --channel {channel} is not among its channels 0..{count - 1}")
            array, axes = _take(array, axes, channel_axis, channel)
        elif (
            channel_axis == "S"
            and count in (3, 4)
            and all(np.array_equal(array[..., 0], array[..., c]) for c in (1, 2))
        ):
            array, axes = array[..., 0], axes[:-1]
        else:
            what = "an RGB image whose channels differ" if channel_axis == "S" else holds
            hint = "" if channel_axis in ("C", "S") else " (or --z_projection max|mean if they are z-slices)"
            raise DataError(
                f"{path} holds {what}: give --channel 0..{count - 1} for the granule channel (0 is Fiji's C1){hint}, "
                f"or save the granule channel as a grey image"
            )
    elif channel:
        raise DataError(f"{path} holds {holds}, one channel: --channel {channel} does not exist")
    if "Z" in axes:
        if z_projection not in ("max", "mean"):
            raise DataError(f"{path} holds {holds}: give --z_projection max or mean to flatten the z-stack")
        i = axes.index("Z")
        array = array.max(axis=i) if z_projection == "max" else array.mean(axis=i, dtype=np.float32)
        axes = axes[:i] + axes[i + 1 :]
    if axes != "YX":
        raise DataError(f"{path}: expected a 2D image, found {holds}")
    return array.astype(np.uint8) if array.dtype == bool else array


IN_MEMORY_PX = 8192 * 8192  # a TIFF plane larger than this is read a block at a time (LargeImage)


def is_large(path: Path) -> bool:
    """A TIFF whose planes are larger than IN_MEMORY_PX pixels: segmented block by block."""
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return int(page.imagelength) * int(page.imagewidth) > IN_MEMORY_PX
    except Exception:  # the reader names the file and its problem
        return False


class LargeImage:
    """A 2D plane of a large TIFF read a region at a time, never whole: tile by tile or strip by strip through
    tifffile's zarr view, or through a memory map opened for each read when the pixels are uncompressed and
    contiguous (one strip per plane: the zarr view would decode the plane whole). The granule channel
    (`channel`) of a multi-channel file; z-stacks and time series are refused (project them first). shape is
    (H, W); `image[y0:y1, x0:x1]` reads a region; close() (or a with block) releases the file."""

    def __init__(self, path: Path, channel: int | None = None):
        import zarr

        self.path, self.store = path, None
        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                axes, shape, self.dtype = series.axes, series.shape, np.dtype(series.dtype)
                self.contiguous = contiguous_pixels(series, tif.byteorder)  # (offset, stored dtype) or None
            if self.contiguous is None:
                self.store = tifffile.imread(path, aszarr=True)
                node = zarr.open(self.store, mode="r")
                self.array = node if hasattr(node, "shape") else node["0"]  # a pyramid: its first level
        except Exception as error:
            raise DataError(f"{path}: cannot read the image ({type(error).__name__}: {error})") from None
        self.full_shape = tuple(shape)
        try:
            self.index, self.axes = self._plane(axes, shape, channel)
        except DataError:
            self.close()
            raise
        self.shape = tuple(n for a, n in zip(axes, shape, strict=True) if a in "YX")

    def _plane(self, axes: str, shape, channel: int | None) -> tuple[list, list]:
        """The index of the granule plane in the series, and its axes ("YX"); DataError for a stack."""
        path = self.path
        index, holds = [], _describe(axes, shape, "a TIFF")
        for axis, n in zip(axes, shape, strict=True):
            if axis in "YX":
                index.append(slice(None))
            elif n == 1:
                index.append(0)
            elif axis in "CSQI":
                if channel is None or not 0 <= channel < n:
                    raise DataError(f"{path} holds {holds}: give --channel 0..{n - 1} for the granule channel")
                index.append(channel)
            else:
                raise DataError(f"{path} holds {holds}: a large image is read in blocks of one plane; save the "
                                "granule channel's projection as a 2D TIFF")  # fmt: skip
        return index, [a for a in axes if a in "YX"]

    def __getitem__(self, region) -> np.ndarray:
        rows, cols = region
        key = [rows if a == "Y" else cols for a in self.axes]
        full = tuple(key.pop(0) if isinstance(i, slice) else i for i in self.index)
        if self.contiguous is None:
            plane = np.asarray(self.array[full])
        else:  # the map's pages leave the process with it
            offset, stored = self.contiguous
            pixels = np.memmap(self.path, dtype=stored, mode="r", offset=offset, shape=self.full_shape)
            plane = np.array(pixels[full], dtype=stored.newbyteorder("="))
            del pixels
        return plane.astype(np.uint8) if plane.dtype == bool else plane

    def percentiles(self, samples: int = 4_000_000) -> tuple[float, float]:
        """The 1st and 99.8th percentiles (Preprocess.normalize) of a strided sample of about `samples`
        pixels, read chunk by chunk."""
        step = max(1, int(np.sqrt(self.shape[0] * self.shape[1] / samples)))
        sample = self[::step, ::step].astype(np.float64)
        low, high = np.percentile(sample, [1.0, 99.8])
        return float(low), float(high)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_pixel_size(path: Path) -> float | None:
    """The pixel size in micrometres stored in a TIFF (OME, ImageJ, or per centimetre: see
    common.formats.pixel_size_from_tiff); None for PNGs and TIFFs without one."""
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            return pixel_size_from_tiff(tif)
    except Exception:  # unreadable metadata: the caller reads the pixels and reports the file then
        return None


def write_labels(path: Path, labels: np.ndarray, pixel_size: float | None) -> None:
    """A label TIFF at its pixel size (common.formats.label_tiff: uint16 ImageJ, uint32 past 65,535 ids)."""
    array, options = label_tiff(labels, pixel_size)
    tifffile.imwrite(path, array, **options)


def list_images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    files = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            if path.stem in files:
                raise DataError(
                    f"{folder}: two files share the name {path.stem} ({files[path.stem].name}, {path.name})"
                )
            files[path.stem] = path
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


def pair_files(image_dir: Path, mask_dir: Path, skip_unpaired: bool = False, log=print) -> list[tuple[Path, Path]]:
    """(image, mask) pairs matched by basename; an image without a mask, or the reverse, is an error unless
    skip_unpaired."""
    images, masks = list_images(Path(image_dir)), list_images(Path(mask_dir))
    lonely = [images[s] for s in images if s not in masks] + [masks[s] for s in masks if s not in images]
    if lonely and not skip_unpaired:
        raise DataError(
            f"{len(lonely)} file(s) without a partner, e.g. {lonely[0]} (images and masks pair by basename); "
            f"add the missing files or pass --skip_unpaired"
        )
    if lonely:
        log(f"skipping {len(lonely)} unpaired file(s), e.g. {lonely[0]}")
    pairs = [(images[s], masks[s]) for s in images if s in masks]
    if not pairs:
        raise DataError(f"no image in {image_dir} has a mask in {mask_dir}")
    return pairs


def split_pairs(args, log=print) -> tuple[list, list, list, dict]:
    """(training, validation, test) pairs and, for each image, whether its mask holds a granule.
    Validation: --val_images/--val_masks, or --val_fraction of the pairs. Test: --test_fraction of the pairs, held
    out from training and from model selection (the final report scores them). Both are drawn with --seed
    separately from the images with granules and from the control images (empty masks), so each split holds its
    share of controls; training and validation keep at least one image with granules."""
    pairs = pair_files(Path(args.images), Path(args.masks), args.skip_unpaired, log)
    explicit = None
    if args.val_images:
        explicit = pair_files(Path(args.val_images), Path(args.val_masks), args.skip_unpaired, log)
    has_granules = mask_has_granules(pairs + (explicit or []))
    rng = np.random.default_rng(args.seed)
    train, val, test = [], [], []
    for group in ([p for p in pairs if has_granules[p[0]]], [p for p in pairs if not has_granules[p[0]]]):
        order = [group[i] for i in rng.permutation(len(group))]
        reserve = 1 if group and has_granules[group[0][0]] else 0  # an image with granules stays for training
        n_test = min(round(args.test_fraction * len(group)), max(len(group) - reserve - (explicit is None), 0))
        n_val = 0 if explicit else min(round(args.val_fraction * len(group)), len(group) - n_test - reserve)
        if reserve and explicit is None:
            n_val = max(n_val, 1)  # validation needs an image with granules to choose a model
        test += order[:n_test]
        val += order[n_test : n_test + n_val]
        train += order[n_test + n_val :]
    if explicit:
        val = explicit
    if not train or not val:
        raise SystemExit(
            f"{args.images} holds {len(pairs)} image(s): too few to split into training, validation and test "
            f"images; give more, or --val_images and --val_masks, or --test_fraction 0"
        )
    rank = {p: i for i, p in enumerate(pairs)}
    train, val, test = (sorted(part, key=lambda p: rank.get(p, -1)) for part in (train, val, test))
    return train, val, test, has_granules


def split_from_file(path: Path, args, log=print) -> tuple[list, list, list, dict]:
    """split_pairs' result as a run's split.json records it (a resumed run keeps the images it started with, even
    when the splitting rule or the folder has changed since). An image it names that is gone is a DataError."""
    stored = json.loads(Path(path).read_text())
    pairs = pair_files(Path(args.images), Path(args.masks), args.skip_unpaired, log)
    if args.val_images:
        pairs += pair_files(Path(args.val_images), Path(args.val_masks), args.skip_unpaired, log)
    by_image = {str(image): (image, mask) for image, mask in pairs}
    parts = []
    for name in ("train", "val", "test"):
        missing = [p for p in stored.get(name, []) if p not in by_image]
        if missing:
            raise DataError(f"{path} names {missing[0]} ({name}), which is no longer in {args.images} with a mask")
        parts.append([by_image[p] for p in stored.get(name, [])])
    used = [pair for part in parts for pair in part]
    counts = ", ".join(f"{len(p)} {n}" for p, n in zip(parts, ("training", "validation", "test"), strict=True))
    log(f"split: as the run's {path} records it ({counts})")
    return *parts, mask_has_granules(used)


def anti_aliased(array: np.ndarray, top) -> bool:
    """Is a mask with several values a binary mask drawn with anti-aliasing (a drawing program's or a resize's
    soft edges) rather than a label image? In a label image the ids have interior pixels (all four neighbours of
    the same value); soft edges are thin, so there only the top value has them."""
    padded = np.pad(array, 1)
    centre = padded[1:-1, 1:-1]
    interior = (centre > 0) & (padded[:-2, 1:-1] == centre) & (padded[2:, 1:-1] == centre)
    interior &= (padded[1:-1, :-2] == centre) & (padded[1:-1, 2:] == centre)
    return bool(interior[array == top].any()) and not interior[(array > 0) & (array != top)].any()


def read_mask(path: Path, image_shape: tuple[int, ...], image_path: Path) -> np.ndarray:
    """The granule label image (uint16, or int32 past 65,535 ids; 0 = background). A mask with several non-zero
    values is a label image (Fiji, napari, CellProfiler): each value is one granule, so touching granules stay
    apart. A mask with one non-zero value (0/1, 0/255, a palette PNG, a colour mask with any channel > 0) is
    binary: each 8-connected component is one granule; so is an anti-aliased binary mask (soft edges beside the
    top value, see anti_aliased), cut at half its top value."""
    array, axes, kind = mask_plane(path)
    if axes != "YX":
        raise DataError(f"{path}: a mask is one 2D plane, found {_describe(axes, array.shape, kind)}")
    if array.shape != image_shape:
        raise DataError(f"{path} has shape {array.shape}, but its image {image_path} has {image_shape}")
    values = np.unique(array[array > 0])
    if len(values) > 1 and np.array_equal(values, np.round(values)) and not anti_aliased(array, values[-1]):
        labels = array.astype(np.int64)
    else:  # binary (an anti-aliased one cut at half its top value): 8-connected components
        foreground = array >= values[-1] / 2 if len(values) > 1 else array > 0
        labels = ndimage.label(foreground, structure=np.ones((3, 3)))[0]
    return labels.astype(np.uint16 if labels.max(initial=0) < 65536 else np.int32)


# ----------------------------------------------------------------------------------------------------------------
# Features and their cache
# ----------------------------------------------------------------------------------------------------------------

# The edge channel's full scale: a gradient of 0.15 normalised intensity per pixel (Sobel's gain 8 divided out),
# about the 99.5th percentile of the gradient on stressed demo cells: the flank of a granule. A fixed scale, not
# each image's own percentile, so the flat field of a control image has faint edges, not full-contrast noise.
EDGE_FULL_SCALE = 0.15
# --min_dynamic_range auto: the median stretch (99.8th minus 1st percentile) of the training images with granules.
# Images of one experiment are taken with the same settings, so the intensity scale of a granule is about the same
# in all of them; an unstressed control has no bright puncta, its 99.8th percentile is the diffuse cytoplasm, and
# stretching that to 0..1 turns its cytoplasm and noise into bright, granule-like specks. Measured on the demo's
# synthetic cells, pixels above 0.5 in the clip-2 CLAHE channel: controls 21.7 % by their own percentiles, 1.0 %
# with the floor (stressed images 2.9 % and 2.1 %); a flat Poisson field 49 % and none.
FLOOR_SHARE = 1.0


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes the network's input: which channel, which z-projection, the smallest
    stretch of the percentile normalisation, the feature set. Stored with the run (checkpoint args), so
    evaluate.py reads new images exactly as training read its own."""

    features: str = "multiscale"
    min_range: float = 0.0
    channel: int | None = None
    z_projection: str | None = None

    @classmethod
    def from_args(cls, args) -> Preprocess:
        get = args.get if isinstance(args, dict) else lambda key, default=None: getattr(args, key, default)
        return cls(get("features"), float(get("min_dynamic_range") or 0.0), get("channel"), get("z_projection"))

    def read(self, path: Path) -> np.ndarray:
        return read_image(path, self.channel, self.z_projection)

    def normalize(self, image: np.ndarray, bounds: tuple[float, float] | None = None) -> np.ndarray:
        """Stretched from its 1st to 99.8th percentile to 0..1; `bounds`: those percentiles of the whole image
        (LargeImage.percentiles), for a block of an image too large to read at once."""
        if bounds is None:
            return percentile_normalize(image, 1.0, 99.8, min_range=self.min_range)
        return stretch(image, *bounds, min_range=self.min_range)

    def compute(self, image: np.ndarray, bounds: tuple[float, float] | None = None, train_shape=None) -> np.ndarray:
        """(C, H, W) float32 in 0..1: the CLAHE channel(s) of the normalised image and the edge channel, or
        (features="raw") the normalised image alone. `train_shape`, for a block of a large image: the training
        images' (H, W), so that CLAHE's tiles have the pixel size they had in training (block_clahe_settings)."""
        normalized = self.normalize(image, bounds)
        if self.features == "raw":
            return normalized[None]
        settings = FEATURE_SETTINGS[self.features]
        if train_shape is not None:
            settings = block_clahe_settings(settings, image.shape[:2], train_shape)
        clahe_channels = multiscale_clahe(normalized, settings)
        return np.concatenate([clahe_channels, edge_channel(normalized)[None]])


def block_clahe_settings(settings, shape, train_shape) -> list:
    """CLAHE settings (clip limit, (tiles across, tiles down)) for a block of `shape` (H, W) px: each grid
    rescaled so that a tile covers as many pixels as it did on an image of `train_shape` (the training images'
    median), so a granule's local contrast is the one training saw whatever --block_size is."""
    (h, w), (train_h, train_w) = shape, train_shape
    return [(clip, (max(1, round(across * w / train_w)), max(1, round(down * h / train_h))))
            for clip, (across, down) in settings]  # fmt: skip


def edge_channel(normalized: np.ndarray) -> np.ndarray:
    smooth = ndimage.gaussian_filter(normalized, 1.0)
    gradient = np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1)) / 8.0
    return np.clip(gradient / EDGE_FULL_SCALE, 0, 1).astype(np.float32)


def compute_features(image: np.ndarray, features: str, min_range: float = 0.0) -> np.ndarray:
    return Preprocess(features, min_range).compute(image)


def feature_channels(features: str) -> int:
    return 1 if features == "raw" else len(FEATURE_SETTINGS[features]) + 1


def _cache_path(image_path: Path, cache_dir: Path, what: str, suffix: str) -> Path:
    stat = image_path.stat()
    key = f"v{CACHE_VERSION}|{image_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{what}"
    return Path(cache_dir) / f"{image_path.stem}_{hashlib.sha1(key.encode()).hexdigest()[:16]}{suffix}"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def load_features(image_path: Path, prep: Preprocess, cache_dir: Path) -> Path:
    """The cache file of prep.compute(image), computed and stored (float16, atomically) unless the cache holds it
    already; keyed by path, size, modification time and every setting of prep."""
    path = _cache_path(image_path, cache_dir, json.dumps(asdict(prep)), ".npy")
    if not path.is_file():
        _save_atomic(path, prep.compute(prep.read(image_path)).astype(np.float16))
    return path


def intensity_range(image_path: Path, prep: Preprocess, cache_dir: Path) -> float:
    """99.8th minus 1st percentile of an image (cached beside its features)."""
    path = _cache_path(image_path, cache_dir, f"range|{prep.channel}|{prep.z_projection}", ".range.npy")
    if not path.is_file():
        low, high = np.percentile(prep.read(image_path), (1.0, 99.8))
        _save_atomic(path, np.array(high - low, np.float64))
    return float(np.load(path))


def dynamic_range_floor(pairs, has_granules: dict, prep: Preprocess, cache_dir: Path) -> float:
    """FLOOR_SHARE x the median stretch of the images with granules among `pairs` (the training images); 0 when
    none has granules."""
    ranges = [intensity_range(image, prep, cache_dir) for image, _ in pairs if has_granules[image]]
    return FLOOR_SHARE * float(np.median(ranges)) if ranges else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Crops
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One image: its cached features (C, H, W) by path, its granule labels (H, W; 0 = background), and pixel
    lists for the crop strategies. `features` opens the cache file on each use, so a sample holds no open file
    and pickles small (loader workers started by spawn, as on Windows and macOS, receive paths, not arrays)."""

    name: str
    feature_path: Path
    mask: np.ndarray
    granule: np.ndarray  # (n, 2) coordinates inside granules
    edge: np.ndarray  # on granule borders
    background: np.ndarray  # far enough from granules that a centred crop holds none
    mixed: np.ndarray  # about crop/4 away from a granule: the crop holds granules and background

    @property
    def features(self) -> np.ndarray:
        return np.load(self.feature_path, mmap_mode="r")

    @property
    def granule_fraction(self) -> float:
        return float((self.mask > 0).mean())


def coordinates(where: np.ndarray, limit: int = 20_000, seed: int = 0) -> np.ndarray:
    """Up to `limit` (row, col) coordinates of True pixels (a fixed subsample keeps large images cheap)."""
    points = np.argwhere(where)
    if len(points) > limit:
        points = points[np.random.default_rng(seed).choice(len(points), limit, replace=False)]
    return points.astype(np.int32)


def make_sample(name: str, feature_path: Path, mask: np.ndarray, crop_size: int) -> Sample:
    inside = mask > 0
    border = inside & ~ndimage.binary_erosion(inside)
    distance = ndimage.distance_transform_edt(~inside) if inside.any() else np.full(mask.shape, np.inf)
    # background: a crop centred here holds no granule (its corners are crop/sqrt(2) away); in crowded images,
    # the 5 % of pixels farthest from any granule
    far = distance >= crop_size / np.sqrt(2)
    if not far.any() and inside.any():
        far = distance >= np.percentile(distance, 95)
    quarter = crop_size / 4
    return Sample(
        name=name,
        feature_path=Path(feature_path),
        mask=mask,
        granule=coordinates(inside),
        edge=coordinates(border),
        background=coordinates(far),
        mixed=coordinates((distance >= quarter * 0.75) & (distance <= quarter * 1.25)),
    )


def mask_plane(path: Path) -> tuple[np.ndarray, str, str]:
    """A mask file's pixels: a colour mask (RGB, RGBA, grey + alpha) becomes one plane, granule where any colour
    channel is > 0 (the alpha channel, opaque everywhere, is left out)."""
    array, axes, kind = read_array(path)
    if axes == "YXS":
        colours = array.shape[-1] - 1 if array.shape[-1] in (2, 4) else array.shape[-1]
        array, axes = (array[..., :colours] > 0).any(-1), "YX"
    return array, axes, kind


def mask_has_granules(pairs) -> dict:
    """image path -> whether its mask holds a granule (False: a control image); reads each mask once."""
    return {image_path: bool((mask_plane(mask_path)[0] > 0).any()) for image_path, mask_path in pairs}


def load_samples(pairs, args, cache_dir: Path, log=print, progress: bool = True) -> list:
    """A Sample per (image, mask) pair: the image's features, computed once and cached (with a bar while the cache
    fills), and its granule labels."""
    prep, samples = Preprocess.from_args(args), []
    for image_path, mask_path in tqdm(pairs, desc="features", disable=not progress, leave=False):
        feature_path = load_features(image_path, prep, cache_dir)
        mask = read_mask(mask_path, np.load(feature_path, mmap_mode="r").shape[1:], image_path)
        samples.append(make_sample(image_path.stem, feature_path, mask, args.image_size))
    controls = sum(int(not s.mask.any()) for s in samples)
    log(f"{len(samples)} images: {len(samples) - controls} with granules, {controls} control(s) without")
    return samples


def draw_strategy(rng: np.random.Generator) -> str:
    return str(rng.choice(list(CROP_STRATEGIES), p=list(CROP_STRATEGIES.values())))


def crop_centre(sample: Sample, strategy: str, rng: np.random.Generator) -> tuple[int, int]:
    """A crop centre by strategy; a strategy with no candidate pixel (no granule in the image, no background
    far enough) falls back to a random centre."""
    points = getattr(sample, strategy) if strategy != "random" else np.empty((0, 2))
    if len(points):
        y, x = points[rng.integers(len(points))]
        return int(y), int(x)
    h, w = sample.mask.shape
    return int(rng.integers(h)), int(rng.integers(w))


def crop(array: np.ndarray, centre: tuple[int, int], size: int) -> np.ndarray:
    """size x size crop of the last two axes around centre; reflect padding where it leaves the image (so an
    image smaller than the crop is padded, not an error)."""
    h, w = array.shape[-2:]
    top, left = centre[0] - size // 2, centre[1] - size // 2
    pads = [(max(0, -top), max(0, top + size - h)), (max(0, -left), max(0, left + size - w))]
    if any(p for pair in pads for p in pair):
        array = np.pad(array, [(0, 0)] * (array.ndim - 2) + pads, mode="reflect" if min(h, w) > 1 else "edge")
        top, left = top + pads[0][0], left + pads[1][0]
    return array[..., top : top + size, left : left + size]


# ----------------------------------------------------------------------------------------------------------------
# Augmentations
# ----------------------------------------------------------------------------------------------------------------


class ChannelCLAHE(A.ImageOnlyTransform):
    """CLAHE with a random clip limit on every channel of a float (H, W, C) image in 0..1; albumentations'
    own CLAHE takes only 1- or 3-channel uint8 images, and the feature stack has 2 or 4 channels."""

    def __init__(self, clip_limit: tuple[float, float] = (1.0, 3.0), p: float = 0.5):
        super().__init__(p=p)
        self.clip_limit = clip_limit

    def get_params(self) -> dict:
        return {"clip": self.py_random.uniform(*self.clip_limit)}

    def apply(self, img: np.ndarray, clip: float = 2.0, **params) -> np.ndarray:
        equaliser = cv2.createCLAHE(clipLimit=clip, tileGridSize=(4, 4))
        levels = np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)
        out = np.stack([equaliser.apply(np.ascontiguousarray(levels[..., c])) for c in range(img.shape[-1])], -1)
        return out.astype(np.float32) / 255.0


def build_augmentation(preset: str) -> A.Compose:
    """robust: geometric, elastic/grid/optical distortion, intensity, CLAHE, noise, blur and CoarseDropout.
    improved: flips, rotations and mild intensity changes only."""
    border = cv2.BORDER_REFLECT_101
    geometric = [
        A.RandomRotate90(p=1.0),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.85, 1.15), rotate=(-45, 45), border_mode=border, p=0.5),
    ]
    if preset == "improved":
        return A.Compose([*geometric, A.RandomBrightnessContrast(0.1, 0.1, brightness_by_max=False, p=0.3)])
    return A.Compose(
        [
            *geometric,
            A.OneOf(
                [
                    A.ElasticTransform(alpha=20, sigma=5, border_mode=border),
                    A.GridDistortion(distort_limit=0.2, border_mode=border),
                    A.OpticalDistortion(distort_limit=0.2, border_mode=border),
                ],
                p=0.3,
            ),
            A.RandomBrightnessContrast(0.2, 0.2, brightness_by_max=False, p=0.5),  # shifts by the mean: dim
            # fluorescence background is not clipped to 0
            A.RandomGamma(gamma_limit=(80, 120), p=0.3),
            ChannelCLAHE(p=0.2),
            A.OneOf([A.GaussNoise(std_range=(0.01, 0.05)), A.MultiplicativeNoise(multiplier=(0.9, 1.1))], p=0.3),
            A.OneOf(
                [A.MotionBlur(blur_limit=(3, 5)), A.MedianBlur(blur_limit=(3, 5)), A.GaussianBlur(blur_limit=(3, 5))],
                p=0.2,
            ),
            # dropped squares become background in the mask too: no granules to find in a blank patch
            A.CoarseDropout(
                num_holes_range=(1, 4), hole_height_range=(8, 24), hole_width_range=(8, 24), fill_mask=0, p=0.2
            ),
        ]
    )


# ----------------------------------------------------------------------------------------------------------------
# Datasets and the sampler
# ----------------------------------------------------------------------------------------------------------------


class CropDataset(torch.utils.data.Dataset):
    """crops_per_image random crops of every image per epoch. A key is (i, epoch seed): crop i % crops_per_image
    of image i // crops_per_image, with strategy, centre and augmentation seeded from (epoch seed, i), so an
    epoch is the same whichever worker draws an item, and a resumed run repeats it exactly (the seed travels
    with the index, so persistent workers need no message). Items: image (C, S, S) float32, mask (1, S, S)
    float32, strategy."""

    def __init__(self, samples: list[Sample], crop_size: int, crops_per_image: int, preset: str, augment: bool):
        self.samples, self.crop_size, self.crops_per_image = samples, crop_size, crops_per_image
        self.transform = build_augmentation(preset) if augment else None

    def __len__(self) -> int:
        return len(self.samples) * self.crops_per_image

    def __getitem__(self, key: tuple[int, int]) -> dict:
        i, seed = key
        sample = self.samples[i // self.crops_per_image]
        rng = np.random.default_rng([seed, i])
        strategy = draw_strategy(rng)
        centre = crop_centre(sample, strategy, rng)
        image = crop(sample.features, centre, self.crop_size).astype(np.float32).transpose(1, 2, 0)
        mask = (crop(sample.mask, centre, self.crop_size) > 0).astype(np.uint8)  # the network learns granule pixels
        if self.transform is not None:
            self.transform.set_random_seed(int(rng.integers(2**31)))
            out = self.transform(image=np.ascontiguousarray(image), mask=np.ascontiguousarray(mask))
            image, mask = out["image"], out["mask"]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "mask": torch.from_numpy(mask[None].astype(np.float32)),
            "strategy": strategy,
        }


class BalancedEpochSampler(torch.utils.data.Sampler):
    """Per epoch, items drawn with replacement by `weights` (the same draw on every rank, from seed and epoch),
    this rank's share of them, each paired with the epoch seed for CropDataset."""

    def __init__(self, weights: np.ndarray, seed: int, rank: int = 0, world_size: int = 1):
        if len(weights) < world_size:
            raise SystemExit(f"{len(weights)} crops per epoch cannot be shared by {world_size} processes")
        self.weights, self.seed, self.rank, self.world_size, self.epoch = weights, seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.weights) // self.world_size

    def __iter__(self):
        epoch_seed = self.seed * 1000 + self.epoch
        indices = weighted_indices(self.weights, epoch_seed, self.rank, self.world_size)
        return iter([(i, epoch_seed) for i in indices])


def granule_balance_weights(samples: list[Sample], crops_per_image: int) -> np.ndarray:
    """Sampling weight per crop item: images are put in three bins by granule area fraction (none, below the
    median of the others, above it) and each bin gets the same total weight, so crops from the few images rich
    (or poor) in granules are not drowned out by the many ordinary ones."""
    fractions = np.array([s.granule_fraction for s in samples])
    bins = np.zeros(len(samples), dtype=int)
    positive = fractions > 0
    if positive.any():
        bins[positive] = 1 + (fractions[positive] > np.median(fractions[positive]))
    counts = np.bincount(bins, minlength=3)
    weights = 1.0 / counts[bins]
    return np.repeat(weights / weights.sum(), crops_per_image)


def weighted_indices(weights: np.ndarray, seed: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """One epoch of item indices drawn with replacement by weight (the same draw on every rank, from seed),
    then this rank's share: a weighted sampler that also works under DDP."""
    generator = torch.Generator().manual_seed(seed)
    n = len(weights) - len(weights) % world_size
    drawn = torch.multinomial(torch.as_tensor(weights, dtype=torch.float64), n, replacement=True, generator=generator)
    return drawn[rank::world_size].tolist()


# ----------------------------------------------------------------------------------------------------------------
# Synthetic fluorescence images for --demo and tests
# ----------------------------------------------------------------------------------------------------------------


def synthetic_cell_image(
    rng: np.random.Generator, size: tuple[int, int] = (320, 320), stressed: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """A 16-bit widefield-like image of cells and its granule label image (uint16, one id per granule): cells with
    a textured cytoplasm and a darker nucleus, a smooth uneven illumination, Poisson shot noise and camera read
    noise. Stressed: most cells hold 6-24 bright punctate granules of varied size and brightness (touching ones
    keep their own ids), about one in four holds none. Not stressed (an untreated control): no granules, and a
    brighter diffuse cytoplasm (the granule protein is not recruited into puncta)."""
    h, w = size
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    signal = np.zeros((h, w), np.float32)
    labels = np.zeros((h, w), np.int32)
    strongest = np.zeros((h, w), np.float32)  # each pixel belongs to the granule that is brightest there
    texture = 1 + 0.15 * ndimage.gaussian_filter(rng.normal(0, 1, (h, w)), 3) / 0.094  # about 15 % cytoplasm texture
    n_granules = 0
    for _ in range(int(rng.integers(2, 5))):
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        ry, rx = rng.uniform(45, 80), rng.uniform(45, 80)
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u, v = dy * np.cos(angle) + dx * np.sin(angle), -dy * np.sin(angle) + dx * np.cos(angle)
        cell = (u / ry) ** 2 + (v / rx) ** 2 <= 1
        nucleus = ((u - rng.uniform(-10, 10)) / (ry * 0.4)) ** 2 + ((v - rng.uniform(-10, 10)) / (rx * 0.4)) ** 2 <= 1
        cytoplasm = cell & ~nucleus
        signal[cell] = np.maximum(signal[cell], rng.uniform(500, 900) if stressed else rng.uniform(550, 1000))
        signal[nucleus & cell] = rng.uniform(250, 400)
        if not stressed or rng.random() < 0.25:
            continue
        points = np.argwhere(cytoplasm)
        for y, x in points[rng.choice(len(points), int(rng.integers(6, 25)), replace=False)]:
            sigma = rng.uniform(1.9, 3.8)  # granules of about 12-45 px above half their peak
            amplitude = rng.uniform(1200, 6000)
            half = int(4 * sigma) + 1
            y0, y1, x0, x1 = max(y - half, 0), min(y + half + 1, h), max(x - half, 0), min(x + half + 1, w)
            blob = amplitude * np.exp(-((yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2) / (2 * sigma**2))
            signal[y0:y1, x0:x1] += blob
            n_granules += 1
            mine = (blob > amplitude / 2) & (blob > strongest[y0:y1, x0:x1])  # granule = above half its peak
            labels[y0:y1, x0:x1][mine] = n_granules
            strongest[y0:y1, x0:x1][mine] = blob[mine]
    illumination = 0.6 + 0.8 * (
        0.5 + 0.5 * np.sin(xx / w * rng.uniform(1, 3) + rng.uniform(0, 6)) * np.cos(yy / h * rng.uniform(1, 3))
    )
    image = rng.poisson(np.maximum((signal * texture + 150) * illumination, 0)).astype(np.float32)
    image += rng.normal(0, 20, image.shape)
    return np.clip(image, 0, 65535).astype(np.uint16), relabel_sequential(labels)[0].astype(np.uint16)


def write_demo_dataset(
    root: str | Path, n_images: int = 26, size: tuple[int, int] = (320, 320), seed: int = 0, controls: int = 8
):
    """n_images synthetic 16-bit TIFFs in root/images and their granule label masks in root/masks (16-bit TIFF,
    one id per granule), the layout of real data; the last `controls` images are unstressed controls (empty
    masks). Skips writing when the same set exists already."""
    root = Path(root)
    marker = root / "demo.json"
    settings = {"n_images": n_images, "size": list(size), "seed": seed, "controls": controls, "version": 3}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    for sub in ("images", "masks"):
        shutil.rmtree(root / sub, ignore_errors=True)  # an earlier version's files would pair up wrongly
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        image, labels = synthetic_cell_image(rng, size, stressed=i < n_images - controls)
        tifffile.imwrite(root / "images" / f"cell_{i + 1:03d}.tif", image)
        tifffile.imwrite(root / "masks" / f"cell_{i + 1:03d}.tif", labels)
    marker.write_text(json.dumps(settings))
    return root


# ----------------------------------------------------------------------------------------------------------------
# Run folders, JSON files and --help (train.py, evaluate.py and visualize.py)
# ----------------------------------------------------------------------------------------------------------------


def write_json(path: Path, data) -> None:
    """Written to a temporary file, then renamed: a killed run never leaves half a file."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as a user reads it: the description as written, each flag under one name (its other spelling, - or
    _, works too), and each default as the parser holds it, after a recipe, preset or --demo has set it."""

    def _format_action_invocation(self, action):
        if len(action.option_strings) > 1:
            shown = action.option_strings[: 2 if isinstance(action, argparse.BooleanOptionalAction) else 1]
            action = copy.copy(action)
            action.option_strings = shown
        return super()._format_action_invocation(action)

    def _get_help_string(self, action):
        text = action.help or ""
        quiet = action.default in (None, argparse.SUPPRESS) or (action.nargs == 0 and action.default is False)
        if "%(default)" in text or not action.option_strings or quiet:
            return text
        return f"{text} (default: %(default)s)"


def new_folder(parent: Path, name: str) -> Path:
    """A new folder parent/<name>_<YYYYmmdd_HHMMSS> (with _2, _3, ... if that exists): never reuses one."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    for attempt in range(1, 1000):
        folder = parent / (f"{name}_{stamp}" + (f"_{attempt}" if attempt > 1 else ""))
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise SystemExit(f"could not create a new folder in {parent}")


# ----------------------------------------------------------------------------------------------------------------
# Figures (train.py and visualize.py)
# ----------------------------------------------------------------------------------------------------------------


def plot_history(history: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, [h["train"].get("loss", np.nan) for h in history], label="total")
    for term in ("bce", "focal_tversky", "dice"):
        axes[0].plot(epochs, [h["train"].get(term, np.nan) for h in history], label=term, alpha=0.6)
    axes[0].set_title("training loss")
    axes[0].legend(fontsize=8)
    for key, label in (("pixel", "pixel Dice"), ("object", "granule F1")):
        metric = "dice" if key == "pixel" else "f1"
        axes[1].plot(epochs, [h["val"][key][metric] for h in history], label=label)
    axes[1].set_title("validation")
    axes[1].legend(fontsize=8)
    axes[2].plot(epochs, [h["lr"] for h in history])
    axes[2].set_yscale("log")
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def plot_predictions(rows: list[dict], path: Path) -> Path:
    """A row per image: image / ground truth / prediction / probability / overlay. Each row is a dict with
    name, image (H, W, display values), probability (H, W), labels (H, W granule ids) and mask (or None)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 5, figsize=(17, 3.4 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows, strict=True):
        image, labels, mask = row["image"], row["labels"], row.get("mask")
        rgb = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=2)
        outline = (ndimage.grey_dilation(labels, size=3) != labels) & (ndimage.grey_dilation(labels, size=3) > 0)
        overlay = rgb.copy()
        overlay[outline] = (1.0, 0.2, 0.2)
        if mask is not None:
            truth_edge = (mask > 0) & ~ndimage.binary_erosion(mask > 0)
            overlay[truth_edge] = (0.2, 1.0, 0.2)
        panels = [
            (rgb, row["name"], None),
            (
                mask if mask is not None else np.zeros_like(labels),
                "ground truth" if mask is not None else "no mask",
                "gray",
            ),
            (labels > 0, f"prediction ({int(labels.max())} granules)", "gray"),
            (row["probability"], "probability", "magma"),
            (overlay, "overlay (red: predicted, green: truth)", None),
        ]
        for ax, (picture, title, cmap) in zip(ax_row, panels, strict=True):
            ax.imshow(picture, cmap=cmap, vmin=0 if cmap else None, vmax=1 if cmap else None)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
