"""EM volumes for hydra_lv: the YAML configuration, lazy patch reading, targets, EM augmentations, and
synthetic volumes for --demo.

On disk (pytorch_connectomics convention, see ../shared/DATA_FORMATS.md):
    DATA/vol1_im.h5            uint8, uint16 or float (z, y, x), anisotropic voxels 30 x 8 x 8 nm
    DATA/vol1_vesicle_ins.h5   uint16/uint32 instance ids, 0 = background
    DATA/vol1_mask.h5          uint8 valid region (train and score only inside it); optional
Each file holds one dataset, usually `main`; a file with exactly one dataset is read whatever its name. Zarr and
OME-Zarr folders (`vol1_im.zarr`, `vol1_im.ome.zarr`: the full-resolution level) and TIFF stacks (`vol1_im.tif`,
one page per section) are read the same way, in any split.

Volumes are never loaded whole: a patch reads only its slab of each file (h5py, zarr or tifffile slicing, chunk by
chunk), so a volume larger than RAM trains. Files are opened lazily in each loader worker (handles do not pickle).
"""

from __future__ import annotations

import argparse
import copy
import csv
import difflib
import glob
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml
from scipy import ndimage
from skimage.segmentation import find_boundaries, relabel_sequential

DOMAIN = "hydra_lv"  # checkpoints carry it; a copy of the folder renames it with the folder
DEFAULT_CONFIG = Path(__file__).with_name("hydra-lv.yaml")
SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class DataError(SystemExit):
    """A problem with the user's data or configuration; the message names the file or key."""


# ----------------------------------------------------------------------------------------------------------------
# Configuration: YAML defaults, dotted.key=value overrides
# ----------------------------------------------------------------------------------------------------------------


def dotted_keys(config: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        keys.append(name)
        if isinstance(value, dict):
            keys += dotted_keys(value, name + ".")
    return keys


def load_config(path: str | Path = DEFAULT_CONFIG, overrides: list[str] = ()) -> dict:
    """The YAML file with `dotted.key=value` overrides applied (see apply_overrides)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--config {path}: no such file")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise DataError(f"--config {path}: not valid YAML ({error})") from None
    return apply_overrides(config, overrides, path.name)


def apply_overrides(config: dict, overrides: list[str], source: str = "the config") -> dict:
    """`dotted.key=value` items, values parsed as YAML (`[24,96,96]`, `1e-4`, `null`). An unknown key is an error
    that lists the closest known keys. Returns a new dict."""
    config = copy.deepcopy(config)
    known = dotted_keys(config)
    for item in overrides:
        if "=" not in item:
            raise DataError(f"override {item!r}: expected dotted.key=value, e.g. system.training.batch_size=8")
        key, text = item.split("=", 1)
        if key not in known:
            close = difflib.get_close_matches(key, known, n=4, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise DataError(f"override {item!r}: unknown key {key!r} in {source}{hint}")
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise DataError(f"override {item!r}: the value is not valid YAML ({error})") from None
        if isinstance(value, str) and SCIENTIFIC.fullmatch(value):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string; everyone means the number
        node[last] = value
    return config


def as_overrides(settings: dict) -> list[str]:
    """{"model.filters": [8, 16]} as ["model.filters=[8, 16]"]: what apply_overrides reads."""
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}" for key, value in settings.items()]


def describe_config(path: str | Path, settings: dict, note: str = "") -> str:
    """Every key of the YAML file with its value, read now (the settings over it), for --help."""
    try:
        config = load_config(path, as_overrides(settings))
    except SystemExit as error:
        return f"settings: {error}"
    lines = [f"settings, each one to set as dotted.key=value: the values of {path}{note}"]
    for key in dotted_keys(config):
        node = config
        for part in key.split("."):
            node = node[part]
        if not isinstance(node, dict):
            lines.append(
                f"  {key}: {yaml.safe_dump(node, default_flow_style=True).strip().removesuffix('...').strip()}"
            )
    return "\n".join(lines)


def write_json(path: Path, data) -> None:
    """Written to a temporary file, then renamed: a killed run never leaves half a file."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    columns = list(history[0])
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(history)
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


def new_folder(root: Path, name: str) -> Path:
    """root/<name>, or <name>_2, _3, ... when an earlier run or result is there: nothing is ever overwritten."""
    for attempt in range(1, 1000):
        folder = Path(root) / (name if attempt == 1 else f"{name}_{attempt}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise SystemExit(f"could not create a new folder in {root}")


# ----------------------------------------------------------------------------------------------------------------
# Volumes: HDF5, zarr / OME-Zarr, TIFF stacks, read a block at a time
# ----------------------------------------------------------------------------------------------------------------

H5_SUFFIXES = (".h5", ".hdf5", ".hdf")
TIFF_SUFFIXES = (".tif", ".tiff")


class Volume:
    """A (z, y, x) volume on disk that reads only the region it is sliced with: an HDF5 dataset (`main`, or the
    file's only dataset), a zarr array or OME-Zarr image (its full-resolution level; `.zarr` folders) or a TIFF
    stack (one page per section, through tifffile's zarr view: tile by tile or strip by strip; an uncompressed
    stack, whose sections are one strip each, through ContiguousPixels). shape and dtype as NumPy's; close()
    releases the file."""

    def __init__(self, path: Path):
        self.path = path = Path(path)
        suffix = path.suffix.lower()
        self._file = None
        try:
            if suffix in H5_SUFFIXES:
                try:
                    self._file = h5py.File(path, "r")
                except OSError as error:
                    raise DataError(f"{path}: not a readable HDF5 file ({error})") from None
                self.array = self._file[h5_dataset_name(self._file, path)]
            elif suffix == ".zarr":
                self.array = zarr_array(path)
            elif suffix in TIFF_SUFFIXES:
                import tifffile
                import zarr

                from common.formats import contiguous_pixels

                with tifffile.TiffFile(path) as tif:
                    contiguous = contiguous_pixels(tif.series[0], tif.byteorder)  # (offset, stored dtype) or None
                    shape = tuple(tif.series[0].shape)
                if contiguous is None:
                    self._file = tifffile.imread(path, aszarr=True)
                    node = zarr.open(self._file, mode="r")
                    self.array = node if hasattr(node, "shape") else node["0"]  # a pyramid: its first level
                else:
                    self.array = ContiguousPixels(path, *contiguous, shape)
            else:
                raise DataError(f"{path}: not a volume format we read (HDF5 {', '.join(H5_SUFFIXES)}, .zarr, "
                                f"TIFF {', '.join(TIFF_SUFFIXES)})")  # fmt: skip
        except (OSError, ValueError, KeyError) as error:
            raise DataError(f"{path}: not a readable volume ({type(error).__name__}: {error})") from None
        self.shape, self.dtype = tuple(self.array.shape), np.dtype(self.array.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        return np.asarray(self.array[key])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # the whole volume: for small ones only
        return np.asarray(self.array[...], dtype=dtype)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ContiguousPixels:
    """An uncompressed TIFF stack's pixels (one run of bytes from `offset`) read a region at a time through a
    memory map opened for each read, whose pages leave the process with it."""

    def __init__(self, path: Path, offset: int, stored: np.dtype, shape):
        self.path, self.offset, self.stored, self.shape = path, offset, stored, tuple(shape)
        self.dtype = stored.newbyteorder("=")

    def __getitem__(self, key) -> np.ndarray:
        pixels = np.memmap(self.path, dtype=self.stored, mode="r", offset=self.offset, shape=self.shape)
        region = np.array(pixels[key], dtype=self.dtype)
        del pixels
        return region


def h5_dataset_name(f: h5py.File, path: Path) -> str:
    """`main`, or the only dataset of the file."""
    if "main" in f and isinstance(f["main"], h5py.Dataset):
        return "main"
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    if len(names) == 1:
        return names[0]
    if not names:
        raise DataError(f"{path}: holds no dataset")
    raise DataError(f"{path}: holds {len(names)} datasets ({', '.join(names[:6])}) and none named 'main'")


def zarr_array(path: Path):
    """The array of a .zarr folder: the array itself, an OME-Zarr image's first (full-resolution) level, or a
    group's `main` or only array."""
    import zarr

    node = zarr.open(str(path), mode="r")
    if hasattr(node, "shape"):
        return node
    multiscales = node.attrs.get("ome", node.attrs).get("multiscales")
    if multiscales:
        return node[multiscales[0]["datasets"][0]["path"]]
    arrays = [name for name, _ in node.arrays()]
    if "main" in arrays or len(arrays) == 1:
        return node["main" if "main" in arrays else arrays[0]]
    raise DataError(f"{path}: a zarr group with {len(arrays)} arrays ({', '.join(arrays[:6])}), no OME-Zarr "
                    "multiscales and none named 'main'")  # fmt: skip


def volume_shape(path: Path) -> tuple[int, ...]:
    with Volume(path) as volume:
        return volume.shape


def volume_dtype(path: Path) -> np.dtype:
    with Volume(path) as volume:
        return volume.dtype


def expand(pattern: str | None, key: str) -> list[Path]:
    """The files a glob names, sorted; a glob that matches nothing is an error."""
    if not pattern:
        return []
    paths = sorted(Path(p) for p in glob.glob(str(pattern)))
    if not paths:
        raise DataError(f"{key}={pattern}: the pattern matches no file")
    return paths


def check_splits_disjoint(data: dict) -> None:
    """No volume may be in two of training, validation and test. The document's `vol*_im.h5` also matches its
    `vol_val*_im.h5`: validation volumes would be trained on, and their score would not be a score; a test volume
    that validated chose the model, so its score is not independent either. Globs that match nothing are left to
    find_volumes."""
    matched = {}
    for split in ("train", "val", "test"):
        pattern = data.get(f"{split}_image")
        for path in sorted(glob.glob(str(pattern))) if pattern else []:
            first = matched.setdefault(os.path.realpath(path), split)
            if first != split:
                raise DataError(
                    f"{path} matches both data.{first}_image={data[f'{first}_image']} and data.{split}_image="
                    f"{pattern}: a volume in two splits is scored on what chose or trained the model; make the globs "
                    f"exclusive (e.g. vol[0-9]*_im.h5 for training beside vol_val*_im.h5)"
                )


@dataclass
class VolumeFiles:
    image: Path
    label: Path | None
    mask: Path | None
    shape: tuple[int, int, int]
    bounds: tuple[tuple[int, int], ...] | None = None  # a region (start, stop per axis): patches lie inside it

    @property
    def name(self) -> str:
        name = self.image.name
        for suffix in (".ome.zarr", ".zarr", *H5_SUFFIXES, *TIFF_SUFFIXES):
            name = name.removesuffix(suffix)
        return name.removesuffix("_im")

    @property
    def region(self) -> str:
        """'' for the whole volume, else e.g. ' z 19:24' (the axes the region cuts)."""
        if self.bounds is None:
            return ""
        cuts = [
            f"{axis} {a}:{b}"
            for axis, (a, b), n in zip("zyx", self.bounds, self.shape, strict=True)
            if (a, b) != (0, n)
        ]
        return " " + " ".join(cuts)

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in (self.bounds or [(0, n) for n in self.shape]))


def held_out_regions(volumes: list[VolumeFiles], patch, fraction: float) -> tuple[list, list]:
    """Without validation volumes: (training regions, validation regions). Of each training volume the last
    `fraction` of its z sections (at least one patch deep) is held out for validation and never sampled by
    training; a volume too shallow for two patches in z is cut along x instead."""
    train, val = [], []
    for volume in volumes:
        for axis in (0, 2, 1):
            n, p = volume.shape[axis], int(patch[axis])
            held = max(p, int(round(n * float(fraction))))
            if n - held >= p:
                break
        else:
            raise DataError(
                f"{volume.image}: {list(volume.shape)} voxels hold no validation region besides a training one of "
                f"data.patch_size={list(patch)}: give validation volumes (data.val_image, data.val_label)"
            )
        cut = n - held
        whole = [(0, m) for m in volume.shape]
        train.append(VolumeFiles(volume.image, volume.label, volume.mask, volume.shape,
                                 tuple(whole[:axis] + [(0, cut)] + whole[axis + 1 :])))  # fmt: skip
        val.append(VolumeFiles(volume.image, volume.label, volume.mask, volume.shape,
                               tuple(whole[:axis] + [(cut, n)] + whole[axis + 1 :])))  # fmt: skip
    return train, val


def find_volumes(data: dict, split: str, need_labels: bool = True) -> list[VolumeFiles]:
    """The image / label / mask files of a split (`train`, `val`, `test`), paired in sorted order and checked:
    same count, 3D, same shape."""
    images = expand(data.get(f"{split}_image"), f"data.{split}_image")
    labels = expand(data.get(f"{split}_label"), f"data.{split}_label")
    masks = expand(data.get(f"{split}_mask"), f"data.{split}_mask")
    if need_labels and images and not labels:
        raise DataError(f"data.{split}_label is not set: training needs instance labels for data.{split}_image")
    for name, files in (("label", labels), ("mask", masks)):
        if files and len(files) != len(images):
            raise DataError(
                f"data.{split}_image matches {len(images)} file(s) but data.{split}_{name} {len(files)}: "
                f"{[p.name for p in images]} vs {[p.name for p in files]}"
            )
    volumes = []
    for i, image in enumerate(images):
        shape = volume_shape(image)
        if len(shape) != 3:
            raise DataError(f"{image}: expected a 3D (z, y, x) volume, found shape {shape}")
        dtype = volume_dtype(image)
        if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
            raise DataError(f"{image}: the image is {dtype}; expected uint8, uint16 or float intensities")
        label = labels[i] if labels else None
        mask = masks[i] if masks else None
        for other in (label, mask):
            if other is not None and volume_shape(other) != shape:
                raise DataError(f"{other} has shape {volume_shape(other)}, its image {image.name} has {shape}")
        volumes.append(VolumeFiles(image, label, mask, shape))
    return volumes


_OPEN: dict = {}


def open_dataset(path: Path) -> Volume:
    """The volume, opened once per process (a loader worker opens its own handle: they do not pickle and must
    not cross a fork)."""
    key = (os.getpid(), str(path))
    if key not in _OPEN:
        _OPEN[key] = Volume(path)
    return _OPEN[key]


# Percentiles of the intensity stretch of a uint16 or float volume (uint8 keeps 0..255: the 8-bit EM convention).
INTENSITY_PERCENTILES = (0.5, 99.5)
SAMPLE_VOXELS = 4_000_000  # the percentiles come from a strided sample of about this many voxels


def intensity_scale(dataset) -> tuple[float, float]:
    """(offset, span) that map a volume's intensities to 0..1: (0, 255) for uint8; for uint16 and float volumes
    the 0.5th and 99.5th percentiles of a strided sample (the whole volume is never read), so a 12- or 16-bit
    camera's range is stretched, not truncated. Training and inference both use it."""
    if dataset.dtype == np.uint8:
        return 0.0, 255.0
    step = max(1, int(round((int(np.prod(dataset.shape)) / SAMPLE_VOXELS) ** (1 / 3))))
    sample = np.asarray(dataset[::step, ::step, ::step], dtype=np.float64)
    low, high = np.percentile(sample[np.isfinite(sample)], INTENSITY_PERCENTILES)
    return float(low), float(max(high - low, 1e-6))


def scale_intensity(block: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """float32 in 0..1 by (offset, span) from intensity_scale (uint8: exactly block / 255)."""
    offset, span = scale
    out = (np.asarray(block, dtype=np.float32) - np.float32(offset)) / np.float32(span)
    return out if (offset, span) == (0.0, 255.0) else np.clip(np.nan_to_num(out), 0.0, 1.0)


def read_block(path: Path, start, stop, reflect: bool = False) -> np.ndarray:
    """volume[start:stop] in every axis, read from disk alone. Parts outside the volume are mirrored (images,
    reflect=True) or zero (labels, masks), so a patch larger than a small volume still works."""
    dataset = open_dataset(path)
    lo = [max(0, s) for s in start]
    hi = [min(n, e) for n, e in zip(dataset.shape, stop, strict=True)]
    block = dataset[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
    pad = [(a - s, e - b) for s, e, a, b in zip(start, stop, lo, hi, strict=True)]
    if any(p for pair in pad for p in pair):
        block = np.pad(block, pad, mode="reflect") if reflect else np.pad(block, pad)
    return block


# ----------------------------------------------------------------------------------------------------------------
# Targets: binary, boundary, distance
# ----------------------------------------------------------------------------------------------------------------


def make_targets(labels: np.ndarray, resolution=(30, 8, 8)) -> np.ndarray:
    """(3, z, y, x) float32 targets from an instance volume, as in the connectomics tutorial:
    0 binary foreground; 1 instance boundary on both sides of every border (pytorch_connectomics' edge_mode
    `all`), drawn per 2D section (z sections are 30 nm apart, too far for a 3D contour): a voxel, vesicle or
    background, with a 4-neighbour in its section of another id, so two touching vesicles are parted by a 2-voxel
    line and each vesicle is ringed inside and out; 2 per-instance Euclidean distance to the instance's outside,
    in physical units (`resolution`, nm per voxel), divided by the instance's maximum: (0, 1] inside, -1 on
    background. The border of the block is not an outside: a vesicle it cuts is taken to go on beyond it, so its
    distances near the cut are not truncated to zero (data.pad_size of context around each patch keeps the
    remaining error, in its maximum, to vesicles larger than the context)."""
    labels = relabel_sequential(np.asarray(labels))[0]  # ids 1..n: find_objects costs memory per id value
    binary = labels > 0
    # per section, scikit-image's thick boundaries (both sides) with 4-connected (in-plane) neighbours
    boundary = np.stack([find_boundaries(section, connectivity=1, mode="thick") for section in labels])
    distance = np.full(labels.shape, -1.0, dtype=np.float32)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)  # one voxel of outside around it
        inside = labels[box] == index
        # edge padding: where the box meets the block's border the vesicle goes on beyond it (its distances are not
        # cut short there); elsewhere the box holds one voxel of outside, which the padding repeats
        edt = ndimage.distance_transform_edt(np.pad(inside, 1, mode="edge"), sampling=resolution)[1:-1, 1:-1, 1:-1]
        peak = edt[inside].max()
        distance[box][inside] = edt[inside] / peak
    return np.stack([binary, boundary, distance]).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# EM augmentations, on a patch (z, y, x) with its labels and mask
# ----------------------------------------------------------------------------------------------------------------


def augment_em(image: np.ndarray, labels: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
    """Flips and 90-degree rotations in-plane, z flip, intensity, misalignment, missing sections, motion blur of
    a few sections, elastic. image is float in 0..1; labels and mask follow every geometric change."""
    # geometry: the dihedral group in-plane, z flip (anisotropy forbids rotations out of plane)
    k = int(rng.integers(4)) if image.shape[1] == image.shape[2] else 2 * int(rng.integers(2))  # keep the shape
    flips = [axis for axis in (0, 1, 2) if rng.random() < 0.5]
    volumes = []
    for v in (image, labels, mask):
        v = np.rot90(v, k, axes=(1, 2))
        volumes.append(np.ascontiguousarray(np.flip(v, flips) if flips else v))
    image, labels, mask = volumes
    z = image.shape[0]
    if rng.random() < 0.5:  # elastic: one smooth in-plane displacement field for all sections
        alpha, sigma = rng.uniform(4, 8), 8.0
        dy, dx = (ndimage.gaussian_filter(rng.uniform(-1, 1, image.shape[1:]), sigma) * alpha * 8 for _ in range(2))
        yy, xx = np.meshgrid(np.arange(image.shape[1]), np.arange(image.shape[2]), indexing="ij")
        coords = [yy + dy, xx + dx]
        image = np.stack([ndimage.map_coordinates(s, coords, order=1, mode="reflect") for s in image])
        labels = np.stack([ndimage.map_coordinates(s, coords, order=0, mode="reflect") for s in labels])
        mask = np.stack([ndimage.map_coordinates(s, coords, order=0, mode="reflect") for s in mask])
    if rng.random() < 0.3 and z > 2:  # misalignment: the sections from one z on shift by 8-16 px
        start = int(rng.integers(1, z))
        shift = rng.integers(8, 17, 2) * rng.choice([-1, 1], 2)
        for v, order in ((image, 1), (labels, 0), (mask, 0)):
            v[start:] = ndimage.shift(v[start:], (0, *shift), order=order, mode="nearest")
    if rng.random() < 0.8:  # intensity: contrast, brightness, gamma
        image = image * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1)
        image = np.clip(image, 0, 1) ** rng.uniform(0.7, 1.4)
    if rng.random() < 0.3:  # motion blur of one or two sections, along a random in-plane direction
        for section in rng.choice(z, min(z, int(rng.integers(1, 3))), replace=False):
            length = int(rng.integers(5, 11))
            kernel = np.zeros((length, length), np.float32)
            kernel[length // 2] = 1 / length
            kernel = ndimage.rotate(kernel, rng.uniform(0, 180), reshape=False, order=1)
            image[section] = ndimage.convolve(image[section], kernel / max(kernel.sum(), 1e-6), mode="reflect")
    if rng.random() < 0.3:  # missing sections: one or two sections carry no image (the labels stay)
        for section in rng.choice(z, min(z, int(rng.integers(1, 3))), replace=False):
            image[section] = image.mean()
    return np.clip(image, 0, 1).astype(np.float32), labels, mask


# ----------------------------------------------------------------------------------------------------------------
# Patches
# ----------------------------------------------------------------------------------------------------------------


def valid_centres(volume: VolumeFiles, patch, step=(4, 16, 16)) -> np.ndarray:
    """Candidate patch centres on a coarse grid from the first to the last centre that keeps a patch inside the
    volume (the middle, for a volume smaller than the patch), where the valid-region mask is set (every grid point
    without a mask). The mask is read section by section: memory stays small for any volume."""
    grid = []
    bounds = volume.bounds or [(0, n) for n in volume.shape]
    for (lo, hi), p, s in zip(bounds, patch, step, strict=True):
        first, last = lo + p // 2, hi - (p - p // 2)  # a patch starts at centre - p // 2
        middle = np.array([(lo + hi) // 2])
        grid.append(np.unique(np.append(np.arange(first, last, s), last)) if last >= first else middle)
    if volume.mask is None:
        return np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, 3)
    centres = []
    with Volume(volume.mask) as dataset:  # not the cached handle: loader workers fork after this
        for z in grid[0]:
            ys, xs = np.nonzero(dataset[int(z)][np.ix_(grid[1], grid[2])] > 0)
            centres.append(np.stack([np.full(len(ys), z), grid[1][ys], grid[2][xs]], -1))
    centres = np.concatenate(centres)
    if not len(centres):
        raise DataError(f"{volume.mask}: the valid-region mask is empty (no voxel > 0)")
    return centres


class PatchDataset(torch.utils.data.Dataset):
    """Patches of `patch` voxels with their targets and loss weights (the valid mask):
    {"image": (1, z, y, x), "target": (3, z, y, x), "weight": (1, z, y, x)}.

    Training (fixed=False): `length` random patches per epoch, centred where the mask is set, augmented; each
    item's randomness comes from (epoch seed, index), so an epoch is the same whichever worker draws it.
    Validation (fixed=True): the same `length` patches every epoch, not augmented."""

    def __init__(self, volumes, patch, pad, resolution, length, augment=False, fixed=False, seed=0):
        self.volumes, self.patch, self.pad = volumes, tuple(patch), tuple(pad)
        self.resolution, self.length, self.augment, self.fixed = tuple(resolution), length, augment, fixed
        self.seed, self.epoch_seed = seed, 0
        self.centres = [valid_centres(v, self.patch) for v in volumes]
        self.scales = []  # each volume's intensity stretch (opened here and closed: loader workers fork later)
        for v in volumes:
            with Volume(v.image) as image:
                self.scales.append(intensity_scale(image))
        sizes = np.array([len(c) for c in self.centres], float)
        self.volume_share = sizes / sizes.sum()

    def set_epoch_seed(self, seed: int) -> None:
        self.epoch_seed = seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key) -> dict:
        """key: an index, or (index, epoch seed) from EpochSampler."""
        return self.item(*key) if isinstance(key, tuple) else self.item(key, self.epoch_seed)

    def item(self, i: int, epoch_seed: int) -> dict:
        rng = np.random.default_rng([self.seed, 0 if self.fixed else epoch_seed, i])
        v = int(rng.choice(len(self.volumes), p=self.volume_share))
        centres = self.centres[v]
        jitter = np.array([rng.integers(-1, 2), *rng.integers(-8, 9, 2)])  # off the coarse grid
        centre = centres[rng.integers(len(centres))] + jitter
        bounds = self.volumes[v].bounds
        if bounds is not None:  # a region: the jitter never takes the patch over its edge (into held-out voxels)
            for axis, ((lo, hi), p) in enumerate(zip(bounds, self.patch, strict=True)):
                if hi - lo >= p:
                    centre[axis] = min(max(centre[axis], lo + p // 2), hi - (p - p // 2))
        return self.patch_at(v, centre, rng)

    def patch_at(self, v: int, centre, rng: np.random.Generator | None = None) -> dict:
        """The patch of volume v centred at `centre` (z, y, x), with its context; augmented when rng is given."""
        volume = self.volumes[v]
        start = [int(c) - p // 2 - q for c, p, q in zip(centre, self.patch, self.pad, strict=True)]
        stop = [s + p + 2 * q for s, p, q in zip(start, self.patch, self.pad, strict=True)]
        image = scale_intensity(read_block(volume.image, start, stop, reflect=True), self.scales[v])
        labels = read_block(volume.label, start, stop).astype(np.int64)
        # loss and metrics count inside the volume (not its mirrored margin) and inside the valid mask
        mask = np.zeros(labels.shape, bool)
        # (and inside its region: a held-out validation slab carries no training loss, whatever the jitter)
        bounds = volume.bounds or [(0, n) for n in volume.shape]
        mask[
            tuple(
                slice(max(lo - a, 0), max(min(hi, b) - a, 0))
                for a, b, (lo, hi) in zip(start, stop, bounds, strict=True)
            )
        ] = True
        if volume.mask is not None:
            mask &= read_block(volume.mask, start, stop) > 0
        if self.augment and rng is not None:
            image, labels, mask = augment_em(image, labels, mask.astype(np.uint8), rng)
        target = make_targets(labels, self.resolution)
        crop = tuple(slice(q, q + p) for p, q in zip(self.patch, self.pad, strict=True))
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image[crop]))[None],
            "target": torch.from_numpy(np.ascontiguousarray(target[(slice(None), *crop)])),
            "weight": torch.from_numpy(np.ascontiguousarray(mask[crop] > 0)).float()[None],
        }


# ----------------------------------------------------------------------------------------------------------------
# Synthetic EM volumes for --demo and tests
# ----------------------------------------------------------------------------------------------------------------


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of an epoch as (index, epoch seed) keys. The seed travels with each index, so persistent
    loader workers (which hold their own copy of the dataset) draw exactly the patches of this epoch, and a resumed
    run repeats an interrupted epoch. Every rank gets the same number of patches (DDP steps in lockstep)."""

    def __init__(self, length: int, rank: int = 0, world: int = 1):
        self.per_rank, self.rank, self.world, self.seed = math.ceil(length / world), rank, world, 0

    def set_epoch_seed(self, seed: int) -> None:
        self.seed = seed

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        return iter([(self.rank + k * self.world, self.seed) for k in range(self.per_rank)])


def synthetic_em_volume(shape=(24, 160, 160), n_vesicles: int = 30, rng: np.random.Generator | None = None):
    """(image uint8, instance labels uint16, valid mask uint8) that look like anisotropic EM (30 x 8 x 8 nm):
    grainy grey cytoplasm, dark membrane sheets, and large vesicles as ellipsoids 120-220 nm across (2-4 sections
    thick, 7-14 px in-plane radius) with a dark membrane and a lighter lumen; about a third touch a neighbour.
    The mask leaves out one corner block (not annotated there: its vesicles carry no labels)."""
    rng = rng or np.random.default_rng(0)
    z, h, w = shape
    image = 150 + 10 * ndimage.gaussian_filter(rng.normal(0, 1, shape), (0.5, 3, 3)) * 3
    field = ndimage.gaussian_filter(rng.normal(0, 1, shape), (3, 14, 14))
    field /= field.std() + 1e-9
    for level in (-0.8, 0.9):  # membranes: thin dark sheets along level sets of a smooth field
        image -= 70 * np.exp(-(((field - level) / 0.06) ** 2))
    labels = np.zeros(shape, np.uint16)
    zz, yy, xx = np.ogrid[:z, :h, :w]
    centres, count = [], 0
    for _ in range(n_vesicles * 20):
        if count == n_vesicles:
            break
        r_nm = rng.uniform(60, 110)
        radii = np.array([max(r_nm / 30, 1.6), r_nm / 8, r_nm / 8 * rng.uniform(0.85, 1.15)])
        if centres and rng.random() < 0.35:  # touch the previous vesicle in-plane
            previous, previous_radii = centres[-1]
            angle = rng.uniform(0, 2 * np.pi)
            gap = previous_radii[1] + radii[1]
            centre = previous + np.array([rng.uniform(-0.5, 0.5), gap * np.sin(angle), gap * np.cos(angle)])
        else:
            centre = rng.uniform([1, 10, 10], [z - 1, h - 10, w - 10])
        rho = np.sqrt(((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2
                      + ((xx - centre[2]) / radii[2]) ** 2)  # fmt: skip
        inside = rho <= 1
        if not inside.any() or (labels[inside] > 0).mean() > 0.02:
            continue
        count += 1
        inside &= labels == 0
        labels[inside] = count
        image[inside & (rho > 0.72)] = 60 + rng.normal(0, 8)  # the membrane
        image[inside & (rho <= 0.72)] = 195 + rng.normal(0, 8)  # the lumen
        centres.append((centre, radii))
    image = ndimage.gaussian_filter(image, (0.3, 0.8, 0.8)) + rng.normal(0, 12, shape)
    mask = np.ones(shape, np.uint8)
    mask[:, : h // 4, : w // 4] = 0  # a corner nobody annotated
    labels[mask == 0] = 0
    return np.clip(image, 0, 255).astype(np.uint8), labels, mask


def write_volume(path: Path, volume: np.ndarray) -> None:
    """One dataset `main`, chunked so that a patch reads only its own chunks."""
    chunks = tuple(min(n, c) for n, c in zip(volume.shape, (8, 64, 64), strict=True))
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("main", data=volume, chunks=chunks, compression="gzip", compression_opts=1)
    os.replace(tmp, path)


def write_demo_volumes(root: str | Path, n_volumes: int = 4, shape=(24, 160, 160), seed: int = 0) -> Path:
    """vol1..volN as <name>_im.h5, <name>_vesicle_ins.h5, <name>_mask.h5 in root. Skips writing when the same set
    exists already."""
    root = Path(root)
    marker = root / "demo.json"
    settings = {"n_volumes": n_volumes, "shape": list(shape), "seed": seed, "version": 1}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_vesicles = max(4, int(np.prod(shape) / 24 / 160 / 160 * 30))
    for i in range(1, n_volumes + 1):
        image, labels, mask = synthetic_em_volume(shape, n_vesicles, rng)
        write_volume(root / f"vol{i}_im.h5", image)
        write_volume(root / f"vol{i}_vesicle_ins.h5", labels)
        write_volume(root / f"vol{i}_mask.h5", mask)
    marker.write_text(json.dumps(settings))
    return root
