"""Stress-granule image/mask folders: pairing and reading, the cached contrast features, crop strategies,
augmentations, the granule-balanced sampler, and synthetic fluorescence images for --demo.

On disk (see ../shared/DATA_FORMATS.md):
    DATA/images/cell_001.tif   8- or 16-bit, 1 channel (or 3 identical channels), any size
    DATA/masks/cell_001.tif    same basename (.tif/.tiff/.png), same height and width, 0 = background, >0 = granule

Features (computed once per image and cached as float16 .npy, see `load_features`): the image is percentile
normalised (1st..99.8th percentile to 0..1, so 16-bit data is never truncated), then (--features)
- multiscale (preset robust): CLAHE at clip limits 2, 4, 8 (common.preprocessing.multiscale_clahe) + edge channel
- clahe (preset improved):    CLAHE at clip limit 2 + the edge channel
- raw:                        the normalised image alone (1 channel)
The edge channel is the gradient magnitude of the Gaussian-smoothed image (sigma 1 px), scaled by its 99.5th
percentile: granule borders are its ridges, which helps the network place boundaries of small, dim granules.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import tifffile
import torch
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from common.preprocessing import MULTISCALE_CLAHE_SETTINGS, multiscale_clahe, percentile_normalize

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
# Input channels (--features): CLAHE settings of each set; all but "raw" add the edge channel.
FEATURE_SETTINGS = {
    "multiscale": MULTISCALE_CLAHE_SETTINGS,  # clip limits 2, 4, 8 with their grids (preset robust)
    "clahe": MULTISCALE_CLAHE_SETTINGS[:1],  # clip limit 2 (preset improved)
    "raw": (),  # the percentile-normalised image alone: a 1-channel U-Net
}
CACHE_VERSION = 1
# Crop strategies and their shares (--crops_per_image crops per image per epoch)
CROP_STRATEGIES = {"granule": 0.30, "edge": 0.20, "background": 0.15, "mixed": 0.20, "random": 0.15}


class DataError(SystemExit):
    """A problem with the user's data; the message names the file. Exits non-zero when not caught."""


# ----------------------------------------------------------------------------------------------------------------
# Reading and pairing
# ----------------------------------------------------------------------------------------------------------------


def read_array(path: Path) -> np.ndarray:
    """The pixel array of a TIFF (tifffile) or PNG (Pillow: palette PNGs give their indices, 16-bit stays
    16-bit), channels last, singleton axes removed."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            array = tifffile.imread(path)
        else:
            with Image.open(path) as png:
                array = np.asarray(png)
    except Exception as error:
        raise DataError(f"{path}: cannot read the image ({type(error).__name__}: {error})") from None
    array = np.squeeze(np.asarray(array))
    if array.size == 0:
        raise DataError(f"{path}: cannot read the image (empty or corrupt file)")
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # channel-first TIFF
    if array.ndim not in (2, 3):
        raise DataError(f"{path}: expected a 2D image, found shape {array.shape}")
    return array


def read_image(path: Path) -> np.ndarray:
    """A 2D grey image (H, W) in its own dtype; 3 identical channels are reduced to one."""
    image = read_array(path)
    if image.ndim == 3:
        channels = image[..., :3]
        if channels.shape[-1] != 3 or not (
            np.array_equal(channels[..., 0], channels[..., 1]) and np.array_equal(channels[..., 0], channels[..., 2])
        ):
            raise DataError(
                f"{path}: an RGB image whose channels differ; expected one fluorescence channel (or three identical "
                f"channels). Save the granule channel as a grey image."
            )
        image = channels[..., 0]
    if image.dtype == bool:
        image = image.astype(np.uint8)
    return image


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


def split_pairs(args, log=print) -> tuple[list, list]:
    """(training, validation) pairs: --val_images/--val_masks, or --val_fraction of the pairs (at least one, and
    one left to train on) drawn with --seed."""
    pairs = pair_files(Path(args.images), Path(args.masks), args.skip_unpaired, log)
    if args.val_images:
        return pairs, pair_files(Path(args.val_images), Path(args.val_masks), args.skip_unpaired, log)
    if len(pairs) < 2:
        raise SystemExit(f"{args.images} holds one image: give at least two, or --val_images and --val_masks")
    order = np.random.default_rng(args.seed).permutation(len(pairs))
    n_val = min(len(pairs) - 1, max(1, round(args.val_fraction * len(pairs))))
    return [pairs[i] for i in sorted(order[n_val:])], [pairs[i] for i in sorted(order[:n_val])]


def read_mask(path: Path, image_shape: tuple[int, ...], image_path: Path) -> np.ndarray:
    """Binary uint8 mask: any value > 0 in any channel is granule (0/1, 0/255, label images, palette PNGs)."""
    mask = read_array(path)
    if mask.ndim == 3:
        mask = (mask[..., :3] > 0).any(-1)
    if mask.shape != image_shape:
        raise DataError(f"{path} has shape {mask.shape}, but its image {image_path} has {image_shape}")
    return (mask > 0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Features and their cache
# ----------------------------------------------------------------------------------------------------------------


def edge_channel(normalized: np.ndarray) -> np.ndarray:
    smooth = ndimage.gaussian_filter(normalized, 1.0)
    magnitude = np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1))
    scale = np.percentile(magnitude, 99.5)
    return np.clip(magnitude / scale, 0, 1).astype(np.float32) if scale > 0 else np.zeros_like(normalized)


def compute_features(image: np.ndarray, features: str) -> np.ndarray:
    """(C, H, W) float32 in 0..1: the CLAHE channel(s) of the percentile-normalised image and the edge channel,
    or (features="raw") the normalised image alone."""
    normalized = percentile_normalize(image, 1.0, 99.8)
    if features == "raw":
        return normalized[None]
    return np.concatenate([multiscale_clahe(normalized, FEATURE_SETTINGS[features]), edge_channel(normalized)[None]])


def feature_channels(features: str) -> int:
    return 1 if features == "raw" else len(FEATURE_SETTINGS[features]) + 1


def load_features(image_path: Path, features: str, cache_dir: Path) -> Path:
    """The cache file of compute_features(image, features), computed and stored (float16, atomically) unless the
    cache holds it already; keyed by path, size, modification time and feature set."""
    stat = image_path.stat()
    key = f"v{CACHE_VERSION}|{image_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{features}"
    path = Path(cache_dir) / f"{image_path.stem}_{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy"
    if not path.is_file():
        stack = compute_features(read_image(image_path), features).astype(np.float16)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, stack)
        os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Crops
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One image: its cached features (C, H, W) by path, its mask (H, W), and pixel lists for the crop
    strategies. `features` opens the cache file on each use, so a sample holds no open file and pickles
    small (loader workers started by spawn, as on Windows and macOS, receive paths, not arrays)."""

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
        return float(self.mask.mean())


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


def load_samples(pairs, args, cache_dir: Path, log=print, progress: bool = True) -> list:
    """A Sample per (image, mask) pair: the image's features, computed once and cached (with a bar while the cache
    fills), and its mask."""
    samples = []
    for image_path, mask_path in tqdm(pairs, desc="features", disable=not progress, leave=False):
        feature_path = load_features(image_path, args.features, cache_dir)
        mask = read_mask(mask_path, np.load(feature_path, mmap_mode="r").shape[1:], image_path)
        samples.append(make_sample(image_path.stem, feature_path, mask, args.image_size))
    log(f"{len(samples)} images, {sum(int(s.mask.any()) for s in samples)} with granules")
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
        mask = crop(sample.mask, centre, self.crop_size)
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


def synthetic_cell_image(rng: np.random.Generator, size: tuple[int, int] = (320, 320)) -> tuple[np.ndarray, np.ndarray]:
    """A 16-bit widefield-like image of stressed cells and its granule mask: cells with a dim cytoplasm and a
    darker nucleus, bright punctate granules of varied size and brightness in the cytoplasm, a smooth uneven
    illumination, Poisson shot noise and camera read noise."""
    h, w = size
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    signal = np.zeros((h, w), np.float32)
    mask = np.zeros((h, w), np.uint8)
    cytoplasm_all = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(2, 5))):
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        ry, rx = rng.uniform(45, 80), rng.uniform(45, 80)
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u, v = dy * np.cos(angle) + dx * np.sin(angle), -dy * np.sin(angle) + dx * np.cos(angle)
        cell = (u / ry) ** 2 + (v / rx) ** 2 <= 1
        nucleus = ((u - rng.uniform(-10, 10)) / (ry * 0.4)) ** 2 + ((v - rng.uniform(-10, 10)) / (rx * 0.4)) ** 2 <= 1
        cytoplasm = cell & ~nucleus
        signal[cell] = np.maximum(signal[cell], rng.uniform(500, 900))
        signal[nucleus & cell] = rng.uniform(250, 400)
        cytoplasm_all |= cytoplasm
        points = np.argwhere(cytoplasm)
        for y, x in points[rng.choice(len(points), int(rng.integers(6, 25)), replace=False)]:
            sigma = rng.uniform(1.9, 3.8)  # granules of about 12-45 px above half their peak
            amplitude = rng.uniform(1200, 6000)
            half = int(4 * sigma) + 1
            y0, y1, x0, x1 = max(y - half, 0), min(y + half + 1, h), max(x - half, 0), min(x + half + 1, w)
            blob = np.exp(-((yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2) / (2 * sigma**2))
            signal[y0:y1, x0:x1] += amplitude * blob
            mask[y0:y1, x0:x1] |= (blob > 0.5).astype(np.uint8)  # granule = above half its peak
    illumination = 0.6 + 0.8 * (
        0.5 + 0.5 * np.sin(xx / w * rng.uniform(1, 3) + rng.uniform(0, 6)) * np.cos(yy / h * rng.uniform(1, 3))
    )
    image = rng.poisson(np.maximum((signal + 150) * illumination, 0)).astype(np.float32)
    image += rng.normal(0, 20, image.shape)
    return np.clip(image, 0, 65535).astype(np.uint16), mask * 255


def write_demo_dataset(root: str | Path, n_images: int = 16, size: tuple[int, int] = (320, 320), seed: int = 0):
    """n_images synthetic 16-bit TIFFs in root/images and their masks in root/masks (8-bit PNG, 255 = granule),
    the layout of real data. Skips writing when the same set exists already."""
    root = Path(root)
    marker = root / "demo.json"
    settings = {"n_images": n_images, "size": list(size), "seed": seed, "version": 2}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        image, mask = synthetic_cell_image(rng, size)
        tifffile.imwrite(root / "images" / f"cell_{i + 1:03d}.tif", image)
        cv2.imwrite(str(root / "masks" / f"cell_{i + 1:03d}.png"), mask)
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
