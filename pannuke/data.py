"""PanNuke folds: finding and checking the arrays, a preprocessed cache, the training dataset with progressive
augmentations, the synthetic demo folds, and class colours for figures.

On disk (both layouts are accepted, see ../shared/DATA_FORMATS.md):
    DATA/Fold 1/images/fold1/images.npy   (N, 256, 256, 3) RGB, uint8 or float64 holding 0..255
    DATA/Fold 1/images/fold1/types.npy    (N,) tissue name per tile (optional: without it, one tissue)
    DATA/Fold 1/masks/fold1/masks.npy     (N, 256, 256, 6) instance ids per class channel, channel 5 background
or  DATA/fold1/{images,masks,types}.npy

The arrays are never loaded whole: tiles are read with plain file reads (NpyRows), so the process's resident
memory stays flat however large the fold (a memory map would count every page it touched). The first use of a
fold writes a cache next to the run folders (`--cache_dir`, default runs/pannuke/cache): CLAHE'd uint8 images,
the semantic map (uint8) and the merged instance map (int32), 8 bytes per pixel (about 1.4 GB for a 2,700-tile
fold) instead of 72 bytes of float64 images and masks (12.7 GB), so epochs read 9x fewer bytes and CLAHE runs
once. The cache is keyed by the fold's paths, sizes and modification times.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from scipy import ndimage
from skimage.color import hed2rgb, rgb2hed
from torch.utils.data import Dataset
from tqdm import tqdm

from common.losses import signed_distance_map
from common.metrics import PANNUKE_CLASSES, PANNUKE_TISSUES
from common.preprocessing import clahe, zscore_normalize

NUM_CLASSES = 6
CLASS_NAMES = ("Background", *PANNUKE_CLASSES)
# RGB colours of the five nucleus types in figures (PanNuke paper / HoVer-Net overlay convention)
CLASS_COLORS = np.array(
    [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 165, 0]], dtype=np.uint8
)
CACHE_VERSION = 1
ONE_TISSUE = "all tiles"  # the tissue of every tile in a fold without types.npy
DEFAULT_DATA_DIR = "data/pannuke"  # where train.py, train_backup.py, visualize.py and the .bat wrappers look
DEMO_VERSION = 2  # of the synthetic tile generator; part of the demo folder name, so old demo data stays as it was


class DataError(SystemExit):
    """A problem with the user's data; the message names the file. Exits non-zero when not caught."""


# ----------------------------------------------------------------------------------------------------------------
# Finding and checking folds
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FoldFiles:
    fold: int
    images: Path
    masks: Path
    types: Path


def find_fold(data_dir: str | Path, fold: int) -> FoldFiles:
    """The three arrays of fold `fold` under data_dir, in the official or the flat layout."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data_dir {root}: no such folder")
    official = root / f"Fold {fold}"
    candidates = [
        FoldFiles(
            fold,
            official / "images" / f"fold{fold}" / "images.npy",
            official / "masks" / f"fold{fold}" / "masks.npy",
            official / "images" / f"fold{fold}" / "types.npy",
        ),
        FoldFiles(fold, *(root / f"fold{fold}" / f"{name}.npy" for name in ("images", "masks", "types"))),
    ]
    for files in candidates:
        if files.images.parent.is_dir() or files.masks.parent.is_dir():
            missing = [str(p) for p in (files.images, files.masks) if not p.is_file()]
            if missing:
                raise DataError(f"fold {fold} is incomplete: missing {', '.join(missing)}")
            return files  # types.npy may be missing: see open_fold
    raise DataError(
        f"fold {fold} not found in {root}: expected '{official}/images/fold{fold}/images.npy' (official layout) "
        f"or '{root / f'fold{fold}'}/images.npy' (flat layout); found {sorted(p.name for p in root.iterdir())[:10]}"
    )


def _load(path: Path, mmap: bool = True) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as error:
        if "pickle" in str(error):
            raise DataError(
                f"{path} holds Python objects (a pickled array); re-save it as plain strings, e.g. "
                f"np.save(path, np.load(path, allow_pickle=True).astype(str)) on a file you trust"
            ) from None
        raise DataError(f"{path}: not a readable .npy file ({error})") from None
    except OSError as error:
        raise DataError(f"{path}: not a readable .npy file ({error})") from None


def open_fold(files: FoldFiles, warn=logging.warning) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Memory-mapped images and masks, and the tissue names, after checking shapes and channel counts.

    PanNuke-format conversions of other datasets often have no types.npy: their tiles are then all one tissue,
    ONE_TISSUE, and `warn` says that mPQ and bPQ are then means over tiles, not over tissues."""
    images, masks = _load(files.images), _load(files.masks)
    if files.types.is_file():
        types = np.asarray(_load(files.types, mmap=False)).astype(str).reshape(-1)
    else:
        types = np.full(len(images), ONE_TISSUE)
        warn(
            f"{files.types} not found: the {len(images)} tiles of fold {files.fold} are scored as one tissue "
            f"('{ONE_TISSUE}'), so mPQ and bPQ are means over tiles, not PanNuke's mean over tissues"
        )
    if images.ndim != 4 or images.shape[3] != 3:
        raise DataError(f"{files.images} has shape {images.shape}; expected (N, H, W, 3) RGB tiles")
    if masks.ndim != 4 or masks.shape[3] != 6:
        raise DataError(
            f"{files.masks} has shape {masks.shape}; expected (N, H, W, 6): instance ids of the 5 nucleus "
            f"classes and a background channel"
        )
    if masks.shape[:3] != images.shape[:3]:
        raise DataError(f"{files.masks} has shape {masks.shape}, but {files.images} has {images.shape}")
    if len(types) != images.shape[0]:
        raise DataError(f"{files.types} names {len(types)} tissues for {images.shape[0]} tiles in {files.images}")
    if images.shape[1] % 32 or images.shape[2] % 32:
        raise DataError(f"{files.images}: tiles of {images.shape[1:3]} px; height and width must be multiples of 32")
    if images.shape[0] == 0:
        raise DataError(f"{files.images} holds no tiles")
    return images, masks, types


def semantic_and_instances(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(…, H, W, 6) PanNuke masks to the semantic map (class k+1 where channel k > 0; a later channel wins
    where channels overlap, as PanNuke-metrics' binarize) and one instance map with ids unique over the
    channels. Works on one tile or a stack."""
    masks = np.asarray(masks)[..., :5]
    semantic = np.zeros(masks.shape[:-1], dtype=np.uint8)
    keys = np.zeros(masks.shape[:-1], dtype=np.int64)
    for channel in range(5):
        ids = masks[..., channel].astype(np.int64)
        inside = ids > 0
        semantic[inside] = channel + 1
        keys[inside] = ids[inside] + (channel << 32)
    flat = keys.reshape(-1, *keys.shape[-2:])
    instances = np.zeros(flat.shape, dtype=np.int32)
    for i in range(flat.shape[0]):  # renumber 1..K per tile
        _, inverse = np.unique(flat[i], return_inverse=True)
        # np.unique numbers the smallest key 0: shift when the tile has no background pixel
        instances[i] = inverse.reshape(flat.shape[1:]) + int(flat[i].min() > 0)
    return semantic, instances.reshape(keys.shape)


CLAHE_CELL = 32  # px: an 8 x 8 grid on a 256 px PanNuke tile; larger images get more cells of the same size


def preprocess_image(image: np.ndarray) -> np.ndarray:
    """An RGB image (uint8, or float holding 0..255) to uint8 after CLAHE on the Lab lightness."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.nan_to_num(image.astype(np.float32)), 0, 255).round().astype(np.uint8)
    grid = (max(1, round(image.shape[1] / CLAHE_CELL)), max(1, round(image.shape[0] / CLAHE_CELL)))
    return clahe(image, clip_limit=2.0, tile_grid_size=grid)


def normalize_image(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) to float32 (3, H, W), z-scored per channel over the tile (stain differences between
    hospitals shift whole tiles, so per-tile statistics travel better than dataset ones)."""
    return zscore_normalize(image, channel_axis=-1).transpose(2, 0, 1).copy()


# ----------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------


class NpyRows:
    """A C-ordered .npy file read a row range at a time with ordinary file reads (seek + readinto), not a memory
    map: the pages read go to the page cache, which the kernel shares and evicts, not into this process's resident
    memory. Indexing with an int or a slice of the first axis reads those rows; other keys read the whole array.
    The file handle opens on first read in each process (loader workers do not share it)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise DataError(f"{self.path}: .npy format version {version} is not supported (1.0 or 2.0)")
            self.shape, fortran, self.dtype = read_header[version](f)
            self.offset = f.tell()
        if fortran or self.dtype.hasobject:
            raise DataError(f"{self.path}: expected a C-ordered numeric array")
        self.ndim = len(self.shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._handle = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None}

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a new array."""
        if self._handle is None:
            self._handle = open(self.path, "rb", buffering=0)  # noqa: SIM115 (kept open for the process)
        out = np.empty((max(stop - start, 0), *self.shape[1:]), self.dtype)
        self._handle.seek(self.offset + start * self.row_bytes)
        view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        while done < out.nbytes:
            read = self._handle.readinto(view[done:])
            if not read:
                raise DataError(f"{self.path}: the file ends before row {stop} of {self.shape[0]}")
            done += read
        return out

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            index = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= index < self.shape[0]:
                raise IndexError(f"row {key} of {self.shape[0]}")
            return self.rows(index, index + 1)[0]
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self.shape[0])
            return self.rows(start, stop)
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None):
        whole = self.rows(0, self.shape[0])
        return whole if dtype is None else whole.astype(dtype)


def write_npy(path: Path, shape: tuple, dtype):
    """A .npy file opened for writing its rows in order, its header already written: append each chunk's bytes
    with .write(chunk.tobytes()) and close it."""
    handle = open(path, "wb")  # noqa: SIM115 (closed by the caller)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(handle, header)
    return handle


class Fold:
    """A fold after preprocessing: the cached arrays (NpyRows), opened on first use in each process.

    images (N, H, W, 3) uint8 after CLAHE; semantic (N, H, W) uint8 0..5; instances (N, H, W) int32 (0 =
    background); types (N,) tissue names; class_pixels (6,) pixel count per class; files: the original arrays.
    Pickling (loader workers started by spawn, as on Windows and macOS) sends the paths, not the data.
    """

    ARRAYS = ("images", "semantic", "instances")

    def __init__(self, files: FoldFiles, folder: Path, types: np.ndarray, class_pixels: np.ndarray):
        self.files, self.folder, self.types, self.class_pixels = files, folder, types, class_pixels
        self._arrays: dict = {}

    def __getattr__(self, name: str) -> np.ndarray:
        if name not in Fold.ARRAYS:
            raise AttributeError(name)
        arrays = self.__dict__.setdefault("_arrays", {})
        if name not in arrays:
            arrays[name] = NpyRows(self.folder / f"{name}.npy")
        return arrays[name]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}}

    def __len__(self) -> int:
        return len(self.types)

    def class_masks(self, index: int) -> np.ndarray:
        """Tile `index` as PanNuke's five class channels (H, W, 5) of instance ids, from the cached maps: what
        PanNuke's metrics read (training's validation scores with them; evaluate.py reads the original masks)."""
        semantic, instances = np.asarray(self.semantic[index]), np.asarray(self.instances[index])
        return np.stack([np.where(semantic == c + 1, instances, 0) for c in range(5)], axis=-1)


def _cache_key(files: FoldFiles) -> str:
    parts = [f"v{CACHE_VERSION}"]
    for path in (files.images, files.masks, files.types):
        if not path.is_file():  # a fold without types.npy
            parts.append(f"{path.resolve()}:none")
            continue
        stat = path.stat()
        parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def load_fold(
    data_dir: str | Path, fold: int, cache_dir: str | Path, chunk: int = 64, log=print, warn=logging.warning
) -> Fold:
    """Find, check and (on first use) cache fold `fold`; returns the cached arrays, read a tile at a time."""
    files = find_fold(data_dir, fold)
    images, masks, types = open_fold(files, warn)
    folder = Path(cache_dir) / f"fold{fold}_{_cache_key(files)}"
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        log(f"caching fold {fold} ({len(images)} tiles) in {folder} (once)")
        folder.mkdir(parents=True, exist_ok=True)
        n, h, w = images.shape[:3]
        outputs = {
            "images": ((n, h, w, 3), np.uint8),
            "semantic": ((n, h, w), np.uint8),
            "instances": ((n, h, w), np.int32),
        }
        tmp = f"tmp{os.getpid()}"  # two runs caching the same fold at once each write their own files
        # the source and the cache are read and written with file reads and writes, never mapped: caching a fold
        # of any size keeps this process's resident memory flat
        files_out = {name: write_npy(folder / f"{name}.{tmp}.npy", shape, dtype)
                     for name, (shape, dtype) in outputs.items()}  # fmt: skip
        source_images = NpyRows(files.images) if images.flags.c_contiguous else images
        source_masks = NpyRows(files.masks) if masks.flags.c_contiguous else masks
        class_pixels = np.zeros(NUM_CLASSES, dtype=np.int64)
        try:
            for start in tqdm(range(0, n, chunk), desc=f"caching fold {fold}, {chunk} tiles a step", leave=False):
                stop = min(start + chunk, n)
                block = np.asarray(source_images[start:stop])
                if not np.isfinite(block).all():
                    bad = start + int(np.flatnonzero(~np.isfinite(block).reshape(stop - start, -1).all(1))[0])
                    raise DataError(f"{files.images}: tile {bad} contains NaN or infinite values")
                files_out["images"].write(np.stack([preprocess_image(tile) for tile in block]).tobytes())
                semantic, instances = semantic_and_instances(np.asarray(source_masks[start:stop]))
                files_out["semantic"].write(semantic.astype(np.uint8).tobytes())
                files_out["instances"].write(instances.astype(np.int32).tobytes())
                class_pixels += np.bincount(semantic.ravel(), minlength=NUM_CLASSES)
        except BaseException:
            for name, handle in files_out.items():
                handle.close()
                (folder / f"{name}.{tmp}.npy").unlink(missing_ok=True)
            raise
        for handle in files_out.values():
            handle.close()
        for name in outputs:
            os.replace(folder / f"{name}.{tmp}.npy", folder / f"{name}.npy")
        meta = {"fold": fold, "tiles": n, "class_pixels": class_pixels.tolist(), "source": str(files.images)}
        meta_tmp = meta_path.with_suffix(f".{tmp}")
        meta_tmp.write_text(json.dumps(meta, indent=2))
        os.replace(meta_tmp, meta_path)  # written last: a cache without meta.json is rebuilt
    meta = json.loads(meta_path.read_text())
    return Fold(files, folder, types, np.asarray(meta["class_pixels"], dtype=np.int64))


# ----------------------------------------------------------------------------------------------------------------
# Targets and the dataset
# ----------------------------------------------------------------------------------------------------------------


def distance_target(instances: np.ndarray) -> np.ndarray:
    """Per nucleus, the distance to the nearest pixel outside it, divided by that nucleus' maximum (see model.py).

    Pixels where the instance id changes are treated as outside, so touching nuclei get separate peaks."""
    inside = instances > 0
    if not inside.any():
        return np.zeros(instances.shape, dtype=np.float32)
    padded = np.pad(instances, 1, mode="edge")
    border = np.zeros_like(inside)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        border |= padded[dy : dy + instances.shape[0], dx : dx + instances.shape[1]] != instances
    distance = ndimage.distance_transform_edt(inside & ~border) + inside  # edge pixels 1, centre largest
    distance = distance * inside
    maxima = ndimage.maximum(distance, labels=instances, index=np.arange(instances.max() + 1))
    maxima = np.asarray(maxima, dtype=np.float64)
    maxima[0] = 1.0
    return (distance / np.maximum(maxima[instances], 1.0)).astype(np.float32)


AUG_STAGES = ("geometric", "colour", "noise", "distortion")
# What a rotation, zoom-out or warp uncovers at the tile's edges: empty glass (white) and background in the targets.
# A mirrored border would copy the nuclei next to the edge, and a copy keeps its original's instance id.
EMPTY_BORDER = {"border_mode": cv2.BORDER_CONSTANT, "fill": 255, "fill_mask": 0}


class HEDJitter(A.ImageOnlyTransform):
    """H&E stain augmentation in HED space (Tellez et al. 2018): colour deconvolution into haematoxylin, eosin
    and residual (DAB) amounts with Ruifrok and Johnston's stain vectors (skimage's rgb2hed), then the haematoxylin
    and eosin amounts of the whole tile scaled by U(1 - scale, 1 + scale) and shifted by U(-shift, shift), and back.
    The residual is kept, so no jitter gives the tile back (within about 2 grey levels: rgb2hed clips negative
    amounts); the defaults change a tile by about 10 grey levels on average (skimage's amounts are about 0 to 0.1
    on H&E tiles, so a shift of 0.01 is already a visible tint)."""

    def __init__(self, scale: float = 0.25, shift: float = 0.01, p: float = 0.5):
        super().__init__(p=p)
        self.scale, self.shift = scale, shift

    def get_params(self) -> dict:
        alpha = np.array([self.py_random.uniform(1 - self.scale, 1 + self.scale) for _ in range(2)] + [1.0])
        beta = np.array([self.py_random.uniform(-self.shift, self.shift) for _ in range(2)] + [0.0])
        return {"alpha": alpha, "beta": beta}

    def apply(self, img: np.ndarray, alpha: np.ndarray, beta: np.ndarray, **params) -> np.ndarray:
        rgb = hed2rgb(rgb2hed(img) * alpha + beta)
        return np.clip(rgb * 255, 0, 255).round().astype(np.uint8)

    def get_transform_init_args_names(self) -> tuple:
        return ("scale", "shift")


def build_augmentation(crop_size: int, stage: int, seed: int | None = None) -> A.Compose:
    """Augmentations up to `stage` (0 = geometric only, 3 = everything), then a random crop of crop_size.

    Colour: H&E stains differ between labs (stain amounts in HED space, HEDJitter; hue/saturation, brightness,
    gamma). Noise: scanner noise and focus.
    Distortion: elastic and grid warps of tissue. Masks follow with nearest-neighbour interpolation; what a
    transform uncovers at the edges is empty (EMPTY_BORDER), never mirrored tissue.
    """
    transforms: list = [
        A.RandomRotate90(p=1.0),
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.9, 1.1), rotate=(-15, 15), **EMPTY_BORDER, p=0.5),
    ]
    if stage >= 1:
        transforms += [
            HEDJitter(p=0.5),
            A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
            A.RandomGamma(gamma_limit=(85, 115), p=0.3),
        ]
    if stage >= 2:
        transforms += [A.GaussNoise(std_range=(0.01, 0.05), p=0.3), A.GaussianBlur(blur_limit=(3, 5), p=0.2)]
    if stage >= 3:
        transforms += [
            A.ElasticTransform(alpha=30, sigma=6, **EMPTY_BORDER, p=0.2),
            A.GridDistortion(distort_limit=0.2, **EMPTY_BORDER, p=0.2),
        ]
    transforms.append(A.RandomCrop(crop_size, crop_size))
    return A.Compose(transforms, seed=seed)


class PanNukeDataset(Dataset):
    """Tiles of one cached fold as dicts of tensors:

    image (3, H, W) float32 z-scored; semantic (H, W) int64; dist (1, H, W) float32; index;
    with boundary maps: sdf (6, H, W) float32, the signed distance map of each class (Kervadec boundary loss).

    train=True applies the augmentation of `configure(crop_size, stage, seed)`. With a seed, each tile's
    augmentation is seeded from (seed, tile index), so it is the same whichever loader worker draws it and however
    many workers there are: train.py passes a seed per epoch, which makes --resume exact.
    """

    def __init__(self, fold: Fold, train: bool = False, boundary_maps: bool = False, indices=None):
        self.fold = fold
        self.train = train
        self.boundary_maps = boundary_maps
        self.indices = np.arange(len(fold)) if indices is None else np.asarray(indices)
        self.transform, self.seed = None, None
        if train:
            self.configure(fold.images.shape[1], len(AUG_STAGES) - 1)

    def configure(self, crop_size: int, stage: int, seed: int | None = None) -> None:
        self.crop_size, self.stage, self.seed = crop_size, stage, seed
        self.transform = build_augmentation(crop_size, stage)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = int(self.indices[i])
        image = np.asarray(self.fold.images[index])
        instances = np.asarray(self.fold.instances[index])
        semantic = np.asarray(self.fold.semantic[index])
        if self.transform is not None:
            if self.seed is not None:
                self.transform.set_random_seed(int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0]))
            out = self.transform(image=image, mask=np.stack([semantic.astype(np.int32), instances], -1))
            image, semantic, instances = out["image"], out["mask"][..., 0], out["mask"][..., 1]
        sample = {
            "image": torch.from_numpy(normalize_image(image)),
            "semantic": torch.from_numpy(semantic.astype(np.int64)),
            "dist": torch.from_numpy(distance_target(instances))[None],
            "index": index,
        }
        if self.boundary_maps:
            sdf = np.stack([signed_distance_map(semantic == c) for c in range(NUM_CLASSES)])
            sample["sdf"] = torch.from_numpy(sdf)
        return sample


# ----------------------------------------------------------------------------------------------------------------
# Synthetic PanNuke folds for --demo and tests
# ----------------------------------------------------------------------------------------------------------------

# Per nucleus type: radius range (px), axis ratio range, RGB colour, count range per tile, cluster spread (px)
NUCLEUS_TYPES = {
    1: {"radius": (7, 11), "ratio": (0.7, 1.0), "rgb": (95, 40, 125), "count": (12, 30), "spread": 30},  # Neoplastic
    2: {"radius": (3, 5), "ratio": (0.85, 1.0), "rgb": (45, 20, 85), "count": (15, 40), "spread": 20},  # Inflammatory
    3: {"radius": (7, 11), "ratio": (0.25, 0.4), "rgb": (120, 70, 150), "count": (6, 15), "spread": 90},  # Connective
    4: {"radius": (2, 4), "ratio": (0.5, 0.9), "rgb": (30, 10, 50), "count": (3, 8), "spread": 70},  # Dead
    5: {"radius": (5, 7), "ratio": (0.75, 1.0), "rgb": (150, 95, 175), "count": (12, 24), "spread": 22},  # Epithelial
}


def synthetic_tile(rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One H&E-like tile: pink stroma with eosin fibres and purple nuclei of five types that differ in size,
    shape, darkness and clustering (neoplastic large and irregular in clusters, inflammatory small, dark, dense;
    connective spindles; dead small, pyknotic, scattered; epithelial medium, pale, in rows). Some tiles lack some
    types. Returns uint8 RGB (size, size, 3) and PanNuke masks (size, size, 6)."""
    stroma = np.array([235, 170, 200], np.float32) + rng.normal(0, 8, 3)
    image = np.ones((size, size, 3), np.float32) * stroma
    fibres = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(10, 25)):
        p = rng.integers(0, size, 2)
        angle = rng.uniform(0, np.pi)
        q = p + (np.array([np.cos(angle), np.sin(angle)]) * rng.uniform(40, 160)).astype(int)
        cv2.line(fibres, tuple(int(v) for v in p), tuple(int(v) for v in q), float(rng.uniform(0.3, 1)), 2)
    fibres = cv2.GaussianBlur(fibres, (0, 0), 2)
    image -= fibres[..., None] * np.array([10, 45, 25], np.float32)
    masks = np.zeros((size, size, 6), np.int32)
    occupied = np.zeros((size, size), bool)
    texture = rng.normal(0, 1, (size, size, 1)).astype(np.float32)
    present = [c for c in NUCLEUS_TYPES if rng.random() < 0.75] or [int(rng.integers(1, 6))]
    for c in present:
        spec = NUCLEUS_TYPES[c]
        clusters = rng.uniform(30, size - 30, (int(rng.integers(1, 3)), 2))
        angle = rng.uniform(0, np.pi)
        next_id = 1
        for _ in range(int(rng.integers(*spec["count"]))):
            centre = clusters[rng.integers(len(clusters))]
            if c == 5:  # epithelial: along a line (a gland border)
                t = rng.uniform(-1, 1)
                xy = centre + t * spec["spread"] * 3 * np.array([np.cos(angle), np.sin(angle)])
                xy += rng.normal(0, 3, 2)
            else:
                xy = centre + rng.normal(0, spec["spread"], 2)
            r = rng.uniform(*spec["radius"])
            axes = (max(int(r), 1), max(int(r * rng.uniform(*spec["ratio"])), 1))
            half = axes[0] + 3
            x0, y0 = max(int(xy[0]) - half, 0), max(int(xy[1]) - half, 0)
            x1, y1 = min(int(xy[0]) + half + 1, size), min(int(xy[1]) + half + 1, size)
            if x1 - x0 < 3 or y1 - y0 < 3:
                continue
            nucleus = np.zeros((y1 - y0, x1 - x0), np.uint8)
            local = (int(xy[0]) - x0, int(xy[1]) - y0)
            if c == 1:  # neoplastic: irregular outline
                angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
                radii = r * rng.uniform(0.75, 1.15, 9) * np.where(np.arange(9) % 2, 1.0, rng.uniform(*spec["ratio"]))
                points = np.stack([local[0] + radii * np.cos(angles), local[1] + radii * np.sin(angles)], 1)
                cv2.fillPoly(nucleus, [points.round().astype(np.int32)], 1)
            else:
                cv2.ellipse(nucleus, local, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
            window = (slice(y0, y1), slice(x0, x1))
            pieces, n_pieces = ndimage.label((nucleus > 0) & ~occupied[window])
            if n_pieces == 0:
                continue
            pixels = pieces == 1 + np.argmax(np.bincount(pieces.ravel())[1:])  # one piece where nuclei overlap
            if pixels.sum() < 6:
                continue
            masks[window + (c - 1,)][pixels] = next_id
            occupied[window] |= pixels
            tone = np.array(spec["rgb"], np.float32) + rng.normal(0, 10, 3)
            image[window][pixels] = tone + (12 if c in (1, 5) else 5) * texture[window][pixels]  # chromatin
            next_id += 1
    masks[..., 5] = ~occupied
    image = cv2.GaussianBlur(image, (0, 0), 0.8) + rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), masks


def write_demo_dataset(root: str | Path, tiles: tuple[int, int, int] = (128, 48, 48), size: int = 256, seed: int = 0):
    """Three synthetic folds of tiles[k] tiles in the official PanNuke layout under root (images uint8, masks
    int32; real folds are often float64, which the loader reads the same way). Skips writing when the same set
    exists already."""
    root = Path(root)
    marker = root / "demo.json"
    settings = {"tiles": list(tiles), "size": size, "seed": seed, "version": DEMO_VERSION}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    rng = np.random.default_rng(seed)
    for fold, count in zip((1, 2, 3), tiles, strict=True):
        fold_tiles = [synthetic_tile(rng, size) for _ in range(count)]
        image_dir = root / f"Fold {fold}" / "images" / f"fold{fold}"
        mask_dir = root / f"Fold {fold}" / "masks" / f"fold{fold}"
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        np.save(image_dir / "images.npy", np.stack([t[0] for t in fold_tiles]))
        np.save(mask_dir / "masks.npy", np.stack([t[1] for t in fold_tiles]))
        np.save(image_dir / "types.npy", rng.choice(np.array(PANNUKE_TISSUES), count))
    marker.write_text(json.dumps(settings))
    return root


# ----------------------------------------------------------------------------------------------------------------
# Outputs and --help (shared by train.py, evaluate.py, visualize.py)
# ----------------------------------------------------------------------------------------------------------------


def new_folder(parent: Path, name: str) -> Path:
    """A new folder parent/<timestamp>_<name> (with _2, _3, ... if that exists): outputs never overwrite others."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        folder = parent / (f"{stamp}_{name}" + (f"_{attempt}" if attempt > 1 else ""))
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise SystemExit(f"could not create a new folder in {parent}")


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


# ----------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------


def overlay(image: np.ndarray, semantic: np.ndarray, instances: np.ndarray | None = None, alpha: float = 0.4):
    """RGB uint8 image with the classes tinted in CLASS_COLORS and, given instances, their outlines."""
    out = image.astype(np.float32).copy()
    inside = semantic > 0
    out[inside] = (1 - alpha) * out[inside] + alpha * CLASS_COLORS[semantic[inside]]
    if instances is not None:
        outline = (ndimage.grey_dilation(instances, size=3) != ndimage.grey_erosion(instances, size=3)) & (
            instances > 0
        )
        out[outline] = CLASS_COLORS[semantic[outline]]
    return out.astype(np.uint8)


def to_display(image: np.ndarray) -> np.ndarray:
    """Any RGB tile (uint8 or float 0..255) as uint8 for figures."""
    image = np.asarray(image)
    return image if image.dtype == np.uint8 else np.clip(image, 0, 255).astype(np.uint8)
