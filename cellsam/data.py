"""Image and instance-mask folders for CellSAM: reading and checking, boxes from masks, the training dataset, and
synthetic microscopy for --demo.

On disk (see ../shared/DATA_FORMATS.md):
    DATA/images/img_0001.png|.tif|.npy   grey, RGB, or 2-channel (nuclear, whole-cell) microscopy, 8/16-bit or float
    DATA/masks/img_0001.png|.tif|.npy    integer label map, 0 = background, 1..K = cells
Images and masks pair by file name without the extension.

Every image becomes a 3-channel float image in 0..255 (what SAM's pixel mean and std expect): each channel scaled
from its 1st to 99.8th percentile; grey is repeated three times; 2-channel images go to (nuclear, whole-cell,
zero) like CellSAM's (blank, nuclear, whole-cell) channel layout reversed into RGB order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import tifffile
import torch
from PIL import Image
from scipy import ndimage
from skimage.color import hed2rgb, rgb2hed

from common.formats import contiguous_pixels
from common.preprocessing import stretch
from common.tiling import block_grid

SUFFIXES = (".png", ".tif", ".tiff", ".npy")


class DataError(SystemExit):
    """A problem with the user's data; the message names the file. Exits non-zero when not caught."""


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Pair:
    name: str
    image: Path
    mask: Path | None


def files_by_stem(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{what} {folder}: no such folder")
    files = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in SUFFIXES}
    if not files:
        raise DataError(f"{what} {folder}: no images ({', '.join(SUFFIXES)})")
    return files


def find_pairs(img_path: str | Path, mask_path: str | Path | None) -> list[Pair]:
    """Every image with its mask (same file name without extension); an image without a mask is an error that
    names it. mask_path None: images only (inference)."""
    images = files_by_stem(Path(img_path), "img_path")
    if mask_path is None:
        return [Pair(name, path, None) for name, path in images.items()]
    masks = files_by_stem(Path(mask_path), "mask_path")
    missing = [images[name].name for name in images if name not in masks]
    if missing:
        raise DataError(
            f"{len(missing)} image(s) without a mask in {mask_path}, e.g. {missing[0]} "
            f"(masks pair with images by file name, e.g. {Path(missing[0]).stem}.png)"
        )
    orphans = [masks[name].name for name in masks if name not in images]
    if orphans:
        raise DataError(
            f"{len(orphans)} mask(s) without an image in {img_path}, e.g. {Path(mask_path) / orphans[0]} "
            f"(masks pair with images by file name: is its image missing or named differently?)"
        )
    return [Pair(name, path, masks[name]) for name, path in images.items()]


def read_array(path: Path) -> np.ndarray:
    """The array of a PNG (Pillow: 16-bit stays 16-bit), TIFF (tifffile) or .npy file, singleton axes removed."""
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        elif path.suffix.lower() in (".tif", ".tiff"):
            array = tifffile.imread(path)
        else:
            with Image.open(path) as png:
                array = np.asarray(png)
    except Exception as error:
        raise DataError(f"{path}: cannot read it ({type(error).__name__}: {error})") from None
    array = np.squeeze(np.asarray(array))
    if array.size == 0 or array.ndim not in (2, 3):
        raise DataError(f"{path}: expected a 2D image (H, W) or (H, W, C), found shape {array.shape}")
    if array.ndim == 3 and array.shape[0] <= 4 and array.shape[-1] > 4:
        array = np.moveaxis(array, 0, -1)  # channels first
    return array


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) float32 in 0..255, see the module docstring."""
    array = image_channels(read_array(path), path)
    low, high = np.percentile(array, (1, 99.8), axis=(0, 1))
    return scale_channels(array, low, high)


def image_channels(array: np.ndarray, path: Path) -> np.ndarray:
    """(H, W, C) with C in 1..3: grey gets a channel axis, RGBA loses alpha; more channels are an error."""
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 4:  # RGBA: drop alpha
        array = array[..., :3]
    if array.shape[-1] not in (1, 2, 3):
        raise DataError(f"{path}: {array.shape[-1]} channels; expected grey, 2 (nuclear, whole-cell) or RGB")
    return array


def scale_channels(array: np.ndarray, low, high) -> np.ndarray:
    """(H, W, C) stretched per channel from `low` to `high` (its 1st and 99.8th percentiles) to 0..255, as
    (H, W, 3) float32: grey repeated, two channels as (nuclear, whole-cell, 0)."""
    scaled = np.stack([stretch(array[..., c], low[c], high[c]) for c in range(array.shape[-1])], -1)
    if scaled.shape[-1] == 1:
        scaled = np.repeat(scaled, 3, -1)
    elif scaled.shape[-1] == 2:
        scaled = np.concatenate([scaled, np.zeros_like(scaled[..., :1])], -1)
    return (np.clip(scaled, 0, 1) * 255).astype(np.float32)


IN_MEMORY_PX = 8192 * 8192  # a TIFF larger than this is segmented a tile at a time (LargeImage)


def is_large(path: Path) -> bool:
    """A TIFF whose planes are larger than IN_MEMORY_PX pixels."""
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return int(page.imagelength) * int(page.imagewidth) > IN_MEMORY_PX
    except Exception:  # the reader names the file and its problem
        return False


class LargeImage:
    """A large TIFF (H, W), (H, W, C) or channels first, read a region at a time, never whole: tile by tile or
    strip by strip through tifffile's zarr view, or through a memory map opened for each read when the pixels are
    uncompressed and contiguous (one strip per plane: the zarr view would decode the plane whole).
    `image[y0:y1, x0:x1]` gives the region ready for the model, (h, w, 3) float32 0..255: `prepare(region (h, w,
    C))` (a model's normalisation with statistics of the whole image, from sample()); `raw[...]` the pixels as
    stored. close() (or a with block) releases the file."""

    def __init__(self, path: Path, prepare=None):
        import zarr

        self.path, self.prepare, self.store = path, prepare, None
        try:
            with tifffile.TiffFile(path) as tif:
                shape = self.full_shape = tuple(tif.series[0].shape)
                self.contiguous = contiguous_pixels(tif.series[0], tif.byteorder)  # (offset, stored dtype) or None
            if self.contiguous is None:
                self.store = tifffile.imread(path, aszarr=True)
                node = zarr.open(self.store, mode="r")
                self.array = node if hasattr(node, "shape") else node["0"]  # a pyramid: its first level
        except Exception as error:
            raise DataError(f"{path}: cannot read it ({type(error).__name__}: {error})") from None
        long = [i for i, n in enumerate(shape) if n > 1]  # the axes that are not singletons
        if len(long) not in (2, 3):
            raise DataError(f"{path}: expected a 2D image (H, W) or (H, W, C), found shape {tuple(shape)}")
        self.channels_first = len(long) == 3 and shape[long[0]] <= 4 and shape[long[-1]] > 4
        channel = None if len(long) == 2 else long[0] if self.channels_first else long[-1]
        self.roles = ["drop" if n == 1 else "channel" if i == channel else "space" for i, n in enumerate(shape)]
        self.shape2d = tuple(shape[i] for i in long if i != channel)
        self.shape = (*self.shape2d, 3)

    def raw(self, rows: slice, cols: slice) -> np.ndarray:
        """(h, w, C) as stored: singleton axes dropped, channels last."""
        spatial = iter((rows, cols))
        key = tuple(0 if r == "drop" else slice(None) if r == "channel" else next(spatial) for r in self.roles)
        if self.contiguous is None:
            region = np.asarray(self.array[key])
        else:  # the map's pages leave the process with it
            offset, stored = self.contiguous
            pixels = np.memmap(self.path, dtype=stored, mode="r", offset=offset, shape=self.full_shape)
            region = np.array(pixels[key], dtype=stored.newbyteorder("="))
            del pixels
        if region.ndim == 2:
            return region[..., None]
        return np.moveaxis(region, 0, -1) if self.channels_first else region

    def sample(self, pixels: int = 4_000_000) -> np.ndarray:
        """A strided (every k-th pixel) sample of about `pixels` pixels, (h, w, C), read chunk by chunk."""
        step = max(1, int(np.sqrt(self.shape2d[0] * self.shape2d[1] / pixels)))
        return self.raw(slice(None, None, step), slice(None, None, step))

    def __getitem__(self, region) -> np.ndarray:
        rows, cols = region[:2]
        return self.prepare(self.raw(rows, cols))

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def large_image_preparer(sample: np.ndarray, path: Path, gamma: float = 1.0):
    """read_image's normalisation (and the input gamma) for regions of a LargeImage: each channel stretched
    from its 1st to 99.8th percentile in `sample`."""
    sample = image_channels(sample, path)
    low, high = np.percentile(sample, (1, 99.8), axis=(0, 1))

    def prepare(region: np.ndarray) -> np.ndarray:
        image = scale_channels(image_channels(region, path), low, high)
        return image if gamma == 1.0 else (255.0 * (image / 255.0) ** gamma).astype(np.float32)

    return prepare


def read_mask(path: Path, image_shape: tuple[int, int] | None = None, image_path: Path | None = None) -> np.ndarray:
    """An integer label map (H, W) int32; float masks must hold whole numbers; the size must match the image."""
    mask = read_array(path)
    if mask.ndim != 2:
        raise DataError(f"{path}: a mask must be one integer label map (H, W), found shape {mask.shape}")
    if np.issubdtype(mask.dtype, np.floating):
        if not np.array_equal(mask, np.round(mask)):
            raise DataError(
                f"{path}: not an integer label map (fractional {mask.dtype} values, e.g. a probability map)"
            )
    elif not np.issubdtype(mask.dtype, np.integer) and mask.dtype != bool:
        raise DataError(f"{path}: not an integer label map (dtype {mask.dtype})")
    if mask.min() < 0:
        raise DataError(f"{path}: negative label {mask.min()} (0 = background, 1..K = cells)")
    if image_shape is not None and mask.shape != tuple(image_shape):
        raise DataError(f"{path} has shape {mask.shape}, its image {image_path.name} has {tuple(image_shape)}")
    return mask.astype(np.int32)


def check_cells(mask: np.ndarray, path: Path) -> None:
    if mask.max() == 0:
        raise DataError(f"{path}: the mask holds no cell (all 0); draw its cells or remove the pair")


def check_pairs(pairs: list[Pair]) -> None:
    """Every image readable, every mask an integer label map of the image's size with at least one cell: checked
    before an experiment writes anything."""
    for pair in pairs:
        shape = read_image(pair.image).shape[:2]
        check_cells(read_mask(pair.mask, shape, pair.image), pair.mask)


def boxes_from_mask(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids (K,), boxes (K, 4) xyxy in pixels, right/bottom edges exclusive) of every cell in a label map."""
    ids, boxes = [], []
    for index, found in enumerate(ndimage.find_objects(mask), start=1):
        if found is not None:
            ids.append(index)
            boxes.append([found[1].start, found[0].start, found[1].stop, found[0].stop])
    return np.array(ids, np.int64), np.array(boxes, np.float32).reshape(-1, 4)


def tile_grid(h: int, w: int, size: int, overlap: int) -> list[tuple]:
    """Tiles of size x size px overlapping by at least `overlap` px that cover an (h, w) image padded to at least
    size: (y0, x0, core_y, core_x) each, the cores (in tile coordinates) tiling the image (common.tiling's
    block_grid)."""
    return [(y0, x0, core_y, core_x) for (y0, x0), (core_y, core_x) in block_grid((h, w), size, overlap)]


def xyxy_to_cxcywh(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pixel xyxy to (cx, cy, w, h) in 0..1 of the image, the DETR head's target."""
    scale = boxes.new_tensor([width, height, width, height])
    x0, y0, x1, y1 = (boxes / scale).unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


# ----------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------


def stain_jitter(image: np.ndarray, rng: np.random.Generator, sigma: float = 0.05) -> np.ndarray:
    """H&E stain augmentation (Tellez et al. 2018): in the haematoxylin-eosin-DAB space of scikit-image's
    colour deconvolution, each stain is scaled by 1 +- sigma and shifted by +- sigma. image: RGB float 0..255."""
    hed = rgb2hed(np.clip(image / 255.0, 0, 1))
    hed = hed * rng.uniform(1 - sigma, 1 + sigma, 3) + rng.uniform(-sigma, sigma, 3) * hed.std((0, 1))
    return (np.clip(hed2rgb(hed), 0, 1) * 255).astype(np.float32)


def build_augmentation(enabled: bool, size: int, train: bool = True, resize: bool = False, window=None) -> A.Compose:
    """Images keep their pixel scale (a cell stays as many pixels wide as in the microscope image): a training
    sample is a random size x size crop (padded where the image is smaller), a validation sample the central one.
    With `enabled`: flips, 90-degree rotations, scale/shift, brightness/contrast and blur; the masks follow every
    geometric change (nearest neighbour) and boxes are recomputed from them. Images go in as float 0..1, the range
    albumentations assumes for float images. resize: the whole image is resized to size x size instead (the
    published CellSAM's rule for an image that fits its window); window: crops of window px resized to size."""
    crop_size = window or size
    crop = A.RandomCrop(crop_size, crop_size) if train else A.CenterCrop(crop_size, crop_size)
    fit = [A.PadIfNeeded(crop_size, crop_size, border_mode=cv2.BORDER_CONSTANT), crop]
    to_size = [A.Resize(size, size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)]
    if resize:
        fit = to_size
    elif crop_size != size:
        fit += to_size
    if not (enabled and train):
        return A.Compose(fit)
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.Affine(scale=(0.8, 1.25), translate_percent=(-0.05, 0.05), border_mode=cv2.BORDER_CONSTANT, p=0.5),
            A.RandomBrightnessContrast(0.15, 0.15, p=0.5),
            A.GaussianBlur(blur_limit=(3, 5), p=0.1),
            *fit,
        ]
    )


class CellDataset(torch.utils.data.Dataset):
    """(image (3, S, S) float 0..255, mask (S, S) int64, boxes (K, 4) xyxy pixels) per sample: in training a
    random crop of S pixels per image (see build_augmentation); in validation (train=False) every tile of the image
    (tile_grid, no overlap), so the validation loss sees all of each image. Images and masks are read once and
    kept: cell datasets are small.
    reader: how an image file becomes (H, W, 3) float 0..255 (read_image, or the published CellSAM's
    normalisation); resize_small: an image that fits the window (window px, default S) is resized to S x S whole
    instead of padded (the published CellSAM's rule), a larger one gives crops of window px resized to S."""

    def __init__(self, pairs: list[Pair], size: int, augment: bool = False, gamma: float = 1.0, seed: int = 0,
                 train: bool = True, stain: bool = False, reader=None, resize_small: bool = False,
                 window: int | None = None):  # fmt: skip
        self.pairs, self.size, self.gamma, self.seed, self.epoch, self.stain = pairs, size, gamma, seed, 0, stain
        self.window = window or size
        self.transform = build_augmentation(augment, size, train, window=window)
        self.resize = build_augmentation(augment, size, train, resize=True) if resize_small else None
        self.items = []
        for pair in pairs:
            image = (reader or read_image)(pair.image)
            mask = read_mask(pair.mask, image.shape[:2], pair.image)
            check_cells(mask, pair.mask)
            self.items.append((image, mask))
        self.index = [(i, None) for i in range(len(self.items))]
        if not train:  # validation: every tile of each image (one whole image where it is resized whole)
            self.index = [(i, tile) for i, (image, _) in enumerate(self.items) for tile in self.tiles(image.shape[:2])]

    def tiles(self, shape: tuple[int, int]) -> list:
        if self.resize is not None and max(shape) <= self.window:
            return [None]
        return [(y0, x0) for y0, x0, _, _ in tile_grid(*shape, self.window, 0)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        i, tile = self.index[k]
        image, mask = self.items[i]
        whole = self.resize is not None and max(image.shape[:2]) <= self.window  # the published rule, resized whole
        if tile is not None:
            (y0, x0), crop = tile, self.window
            image, mask = image[y0 : y0 + crop, x0 : x0 + crop], mask[y0 : y0 + crop, x0 : x0 + crop]
        seed = int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0])
        transform = self.resize if whole else self.transform
        transform.set_random_seed(seed)
        if self.stain:
            image = stain_jitter(image, np.random.default_rng(seed))
        # albumentations takes float images to hold 0..1: brightness, contrast and blur clip to that range
        out = transform(image=image / 255.0, mask=mask)
        image, mask = np.clip(out["image"], 0, 1) * 255.0, out["mask"]
        if self.gamma != 1.0:  # input gamma correction
            image = 255.0 * (image / 255.0) ** self.gamma
        _, boxes = boxes_from_mask(mask)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float(),
            "mask": torch.from_numpy(mask.astype(np.int64)),
            "boxes": torch.from_numpy(boxes),
            "name": self.pairs[i].name,
        }


def collate(batch: list[dict]) -> dict:
    """Images and masks stacked; boxes stay a list (a different number of cells per image)."""
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "mask": torch.stack([b["mask"] for b in batch]),
        "boxes": [b["boxes"] for b in batch],
        "name": [b["name"] for b in batch],
    }


# ----------------------------------------------------------------------------------------------------------------
# Synthetic microscopy for --demo and tests
# ----------------------------------------------------------------------------------------------------------------


def synthetic_cells(size: int = 256, n_cells: int = 30, rng: np.random.Generator | None = None):
    """(image uint16 (H, W), mask uint16 (H, W)): a widefield fluorescence field as a camera records it, with what
    makes real cells hard to threshold:
    - cells of varied size and irregular outline grown from random seeds by a distance-limited Voronoi split, so
      neighbours touch along shared borders with no dark gap between them;
    - brightness varying about six-fold from cell to cell (log-uniform), dim cells beside bright ones, a brighter
      nucleus off the centre and a mottled cytoplasm (smooth multiplicative texture);
    - uneven illumination (a vignette and a tilt: the corners get about half the centre's light);
    - about one cell in eight out of focus (blurred, spread wider and dimmer);
    - the microscope's blur, autofluorescent background, shot noise (Poisson on photon counts), camera gain,
      offset and read noise."""
    rng = rng or np.random.default_rng(0)
    seeds = rng.uniform(10, size - 10, (n_cells, 2))
    radii = rng.uniform(7, 18, n_cells)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    dy, dx = yy[None] - seeds[:, 0, None, None], xx[None] - seeds[:, 1, None, None]
    angle, distance = np.arctan2(dy, dx), np.hypot(dy, dx)
    phase = rng.uniform(0, 6.3, (n_cells, 2, 1, 1))
    strength = rng.uniform(0.05, 0.2, (n_cells, 2, 1, 1))
    wobble = 1 + strength[:, 0] * np.sin(2 * angle + phase[:, 0]) + strength[:, 1] * np.sin(3 * angle + phase[:, 1])
    reach = distance / (radii[:, None, None] * wobble)  # < 1 inside each cell's own outline
    nearest = reach.argmin(0)
    mask = np.where(reach.min(0) < 1, nearest + 1, 0)
    sizes = np.bincount(mask.ravel(), minlength=n_cells + 1)
    mask[sizes[mask] < 40] = 0  # cells cut to slivers by their neighbours
    # each cell's own brightness, nucleus and texture
    brightness = np.exp(rng.uniform(np.log(0.25), np.log(1.5), n_cells + 1))
    offset = rng.uniform(-0.25, 0.25, (n_cells, 2)) * radii[:, None]
    nucleus_reach = np.hypot(dy - offset[:, 0, None, None], dx - offset[:, 1, None, None]) / (
        0.45 * radii[:, None, None]
    )
    in_nucleus = np.take_along_axis(nucleus_reach, nearest[None], 0)[0] < 1
    texture = 1 + 0.25 * ndimage.gaussian_filter(rng.normal(size=(size, size)), 2.0) / 0.14
    cells = np.where(mask > 0, brightness[mask] * (1 + 0.7 * in_nucleus) * np.clip(texture, 0.3, None), 0.0)
    # out of focus: about one cell in eight blurred (drawn into its own layer)
    blurred_ids = np.flatnonzero(rng.random(n_cells + 1) < 0.125)
    blurred_ids = blurred_ids[blurred_ids > 0]
    defocused = np.isin(mask, blurred_ids)
    layer = ndimage.gaussian_filter(np.where(defocused, cells, 0.0), 3.5) * 0.8
    signal = ndimage.gaussian_filter(np.where(defocused, 0.0, cells), 1.2) + layer
    # uneven illumination: a vignette and a tilt
    r2 = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (size / 2) ** 2
    tilt = rng.uniform(-0.2, 0.2, 2)
    illumination = (1 - 0.3 * r2) * (1 + tilt[0] * (yy / size - 0.5) + tilt[1] * (xx / size - 0.5))
    background = 0.06 * (1 + 0.5 * ndimage.gaussian_filter(rng.normal(size=(size, size)), 20) / 0.02)
    photons = 300 * illumination * (signal + np.clip(background, 0.01, None))
    image = rng.poisson(np.clip(photons, 0, None)) * 2.0 + 100 + rng.normal(0, 6, photons.shape)  # gain, offset, read
    mask = np.unique(mask, return_inverse=True)[1].reshape(mask.shape)
    return np.clip(image, 0, 65535).astype(np.uint16), mask.astype(np.uint16)


def write_demo_dataset(root: str | Path, n_images: int = 12, size: int = 256, seed: int = 0, n_test: int = 0) -> Path:
    """root/images/img_0001.tif (16-bit) and root/masks/img_0001.png (16-bit label maps); with n_test, also
    root/test/images and root/test/masks, other fields drawn the same way, for scores that took no part in
    training or model choice."""
    root = Path(root)
    marker = root / "demo.txt"
    settings = f"{n_images} {size} {seed} {n_test} v3"
    if marker.is_file() and marker.read_text() == settings:
        return root
    rng = np.random.default_rng(seed)
    for folder, count in ((root, n_images), (root / "test", n_test)):
        if not count:
            continue
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(1, count + 1):
            image, mask = synthetic_cells(size, int(rng.integers(20, 36)), rng)
            tifffile.imwrite(folder / "images" / f"img_{i:04d}.tif", image)
            Image.fromarray(mask).save(folder / "masks" / f"img_{i:04d}.png")
    marker.write_text(settings)
    return root
