"""Score a trained PanNuke model on a fold with the PanNuke protocol, or segment H&E images of any size.

    python pannuke/evaluate.py runs/pannuke/<run>                      # best.pth on the run's --test_fold
    python pannuke/evaluate.py runs/pannuke/<run> --fold 1 --tta --save_predictions
    python pannuke/evaluate.py runs/pannuke/<run>/swa.pth --data_dir DATA --fold 3
    python pannuke/evaluate.py runs/pannuke/<run> --images slides/     # PNG/TIF images of any size, tiled
    python pannuke/evaluate.py runs/pannuke/<run> --images scans20x/ --mpp 0.5 --stain_norm
    python pannuke/evaluate.py runs/pannuke/<run> --export exported/   # TorchScript + ONNX + model.json

Fold mode writes <run>/evaluation/<timestamp>_fold<k>/evaluation_report.json with
- Dice per class (background and the five nucleus types), their means, and binary (nucleus vs background) Dice;
- mPQ and bPQ as PanNuke-metrics computes them (PQ per tile and class at IoU > 0.5, NaN where a class is absent;
  mPQ = nan-mean over classes, then per tissue, then over tissues; bPQ on the merged instance map), PQ per class,
  and AJI (mean over tiles);
plus per_tissue.csv, and with --save_predictions masks.npy: the predicted instances in PanNuke's layout
(N, 256, 256, 6), which the official PanNuke-metrics `run.py` scores against the fold's masks.npy.

Image mode (--mpp for images at another scale than PanNuke's 0.25 um/px, --stain_norm for Macenko stain
normalisation) writes, per image, <name>_instances.tif (nucleus ids, uint16 or uint32, with the pixel size for
Fiji and napari), <name>_nuclei.csv (a row per nucleus id: type, area, centroid), <name>_nuclei.geojson (each
nucleus's outline and type for QuPath: File > Import objects), <name>_classes.png (0 = background, 1-5 =
Neoplastic, Inflammatory, Connective, Dead, Epithelial), <name>_overlay.png, and nuclei.csv (counts per image).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import csv
import json
import math
import time

import cv2
import numpy as np
import tifffile
import torch
import yaml
from scipy import ndimage
from skimage.measure import regionprops_table
from tqdm import tqdm

from common.bioimageio import model_rdf
from common.export import deployable
from common.formats import label_image_attrs, label_tiff, qupath_features
from common.metrics import (
    PANNUKE_CLASSES,
    ConfusionMatrix,
    aggregated_jaccard_index,
    nanmean,
    pannuke_aggregate,
    pannuke_tile_pq,
)
from common.tiling import (
    block_grid,
    closest_level,
    core_slices,
    paste_objects,
    pyramid_plan,
    tissue_mask,
)
from pannuke.data import (
    CLASS_COLORS,
    CLASS_NAMES,
    NUM_CLASSES,
    DataError,
    HelpFormatter,
    PanNukeDataset,
    load_fold,
    new_folder,
    normalize_image,
    overlay,
    preprocess_image,
    synthetic_tile,
    write_json,
)
from pannuke.model import (
    find_checkpoint,
    instances_from_outputs,
    load_checkpoint,
    pannuke_masks,
    pick_device,
    predict,
    predict_tiled,
)

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".svs", ".ndpi", ".scn", ".bif")
PANNUKE_MPP = 0.25  # um per pixel of PanNuke's tiles (40x), the scale the model learned
IN_MEMORY_PX = 8192 * 8192  # a tiled TIFF larger than this is read as a slide, a region at a time


@torch.no_grad()
def evaluate_fold(model, fold, args, out_dir: Path, device) -> dict:
    """Predict every tile of a cached fold and score it tile by tile (nothing of fold size is held in memory)."""
    loader = torch.utils.data.DataLoader(PanNukeDataset(fold), args.batch_size, num_workers=args.num_workers)
    n, h, w = fold.semantic.shape
    true_masks = np.load(fold.files.masks, mmap_mode="r")
    pred_masks = None
    if args.save_predictions:
        pred_masks = np.lib.format.open_memmap(out_dir / "masks.npy", mode="w+", dtype=np.int32, shape=(n, h, w, 6))
    matrix = ConfusionMatrix(NUM_CLASSES, device=device)
    class_pq, binary_pq, aji = np.full((n, 5), np.nan), np.full(n, np.nan), np.full(n, np.nan)
    for batch in tqdm(loader, desc=f"fold {fold.files.fold}", unit="batch", leave=False):
        probs, distance = predict(model, batch["image"].to(device), tta=args.tta)
        matrix.update(probs.argmax(1), batch["semantic"].to(device))
        probs, distance = probs.cpu().numpy(), distance[:, 0].cpu().numpy()
        for i, index in enumerate(batch["index"].tolist()):
            instances, classes = instances_from_outputs(probs[i], distance[i], args.seed_threshold, args.min_size)
            predicted = pannuke_masks(instances, classes)
            class_pq[index], binary_pq[index] = pannuke_tile_pq(true_masks[index], predicted)
            aji[index] = aggregated_jaccard_index(np.asarray(fold.instances[index]), instances)
            if pred_masks is not None:
                pred_masks[index] = predicted
    if pred_masks is not None:
        pred_masks.flush()
    pq = pannuke_aggregate(class_pq, binary_pq, fold.types)

    scores = matrix.compute()
    m = matrix.matrix.cpu().double().numpy()
    tp, fp, fn = m[1:, 1:].sum(), m[0, 1:].sum(), m[1:, 0].sum()
    per_tissue = {}
    for tissue, stats in pq["per_tissue"].items():
        rows = fold.types == tissue
        per_tissue[tissue] = {
            **stats,
            "aji": nanmean(aji[rows]),
            **{f"pq_{name}": nanmean(class_pq[rows, c]) for c, name in enumerate(PANNUKE_CLASSES)},
        }
    return {
        "tiles": int(n),
        "dice": dict(zip(CLASS_NAMES, scores["dice"], strict=True)),
        "mean_dice": scores["mean_dice"],
        "fg_mean_dice": scores["fg_mean_dice"],
        "binary_dice": float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else float("nan"),
        "mpq": pq["mpq"],
        "bpq": pq["bpq"],
        # False for a fold without types.npy: its tiles are one tissue, so mPQ and bPQ are means over tiles
        "tissue_averaged": fold.files.types.is_file(),
        "pq_per_class": pq["pq_per_class"],
        "aji": nanmean(aji),
        "per_tissue": per_tissue,
        "predictions": str(out_dir / "masks.npy") if args.save_predictions else None,
    }


def write_tissue_csv(path: Path, per_tissue: dict) -> None:
    columns = ["tissue", "tiles", "mpq", "bpq", "aji", *(f"pq_{name}" for name in PANNUKE_CLASSES)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for tissue, stats in sorted(per_tissue.items()):
            writer.writerow([tissue] + [stats[c] for c in columns[1:]])


def read_image(path: Path) -> np.ndarray:
    """An H&E image as uint8 RGB (H, W, 3): grey is repeated, alpha dropped, 16-bit scaled by 1/257."""
    try:
        image = tifffile.imread(path) if path.suffix.lower() in (".tif", ".tiff") else None
        if image is None:
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if image is not None and image.ndim == 3:
                image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    except Exception as error:
        raise DataError(f"{path}: cannot read the image ({error})") from None
    if image is None:
        raise DataError(f"{path}: cannot read the image (corrupt or not an image)")
    if image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[2] not in (3, 4):
        image = np.moveaxis(image, 0, -1)  # channel-first TIFF
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise DataError(f"{path}: expected an RGB image, found shape {image.shape}")
    image = image[..., :3]
    if image.dtype == np.uint16:
        image = (image / 257.0).round()
    return np.clip(image, 0, 255).astype(np.uint8)


def stain_amounts(image: np.ndarray, he: np.ndarray, tli: float = 240.0) -> np.ndarray:
    """(2, pixels) haematoxylin and eosin amounts of an RGB image with stain vectors `he` (3, 2), as MONAI's
    NormalizeHEStains measures them: absorbance against the transmitted light `tli`, by least squares."""
    absorbance = -np.log(np.minimum(image.reshape(-1, 3).astype(np.float32) + 1, tli) / tli)
    return np.linalg.lstsq(he, absorbance.T, rcond=None)[0]


def stain_normalizer(reference: str | None):
    """Macenko stain normalisation (MONAI's NormalizeHEStains) to the stains of a reference H&E image (its stain
    vectors, and the 99th percentiles of its stain amounts, as the normaliser measures them), or to MONAI's
    default reference (Macenko et al.'s) without one. Returns (normalise, description)."""
    try:
        from monai.apps.pathology.transforms import ExtractHEStains, NormalizeHEStains
    except ImportError:
        raise SystemExit("--stain_norm needs MONAI: pip install monai (it is in requirements.txt)") from None
    if reference is None:
        return NormalizeHEStains(), "MONAI's default H&E reference (Macenko et al.)"
    image = read_image(Path(reference))
    try:
        target_he = ExtractHEStains()(image)
    except ValueError as error:
        raise DataError(f"--stain_reference {reference}: {error} (is it an H&E image?)") from None
    max_cref = np.percentile(stain_amounts(image, target_he), 99, axis=1)
    return NormalizeHEStains(target_he=target_he, max_cref=max_cref), f"the stains of {reference}"


def normalize_stains(image: np.ndarray, normalise, name: str) -> np.ndarray:
    try:
        return normalise(image)
    except ValueError:  # no stained pixel at all (blank glass)
        print(f"{name}: no stained tissue found, stain normalisation skipped")
        return image


def slide_stain_normalizer(normalise, thumbnail: np.ndarray, tissue, name: str):
    """normalise (MONAI's NormalizeHEStains) with the slide's own stains measured once, on its thumbnail (the
    tissue mask's pixels, all of them without one), instead of on each block: every block of the slide then gets
    the same transform (as slideflow's context normalisation does), and a block of mostly glass or of one stain
    cannot skew its own. The transform is NormalizeHEStains's: absorbance, stain amounts by least squares, the
    99th percentiles scaled to the reference's. None when the thumbnail has no stained tissue (each block is then
    normalised on its own, as an image is)."""
    pixels = thumbnail.reshape(-1, 3) if tissue is None else thumbnail[tissue]
    try:
        he = normalise.stain_extractor(pixels[:, None, :])
    except ValueError:
        print(f"{name}: no stained tissue on the thumbnail: stains measured block by block")
        return None
    tli = normalise.tli
    per_reference = np.percentile(stain_amounts(pixels, he, tli), 99, axis=1).astype(np.float32) / normalise.max_cref

    def apply(region: np.ndarray) -> np.ndarray:
        scaled = stain_amounts(region, he, tli) / per_reference[:, None].astype(np.float32)
        out = (tli * np.exp(-normalise.target_he.dot(scaled))).astype(np.float32)
        out[out > 255] = 254  # as NormalizeHEStains
        return out.T.reshape(region.shape).astype(np.uint8)

    return apply


class NucleusWriter:
    """<stem>_nuclei.csv (a row per nucleus: its id in the label image, type, area, centroid) and
    <stem>_nuclei.geojson (its outline for QuPath, the type as QuPath's classification), appended block by block
    as the nuclei are found, so a slide's millions of nuclei never sit in memory; both are written under a
    temporary name and renamed when complete. Centroids and outlines are in the image's full-resolution pixels
    (a slide's level 0, as QuPath shows it): `downsample` of them per pixel of the label image."""

    COLUMNS = ["nucleus_id", "type", "area_px", "area_um2", "centroid_x_px", "centroid_y_px"]

    def __init__(self, out_dir: Path, stem: str, pixel_size: float, downsample: float = 1.0, keep_classes=False):
        self.stem, self.pixel_size, self.downsample = stem, pixel_size, downsample
        self.classes = [] if keep_classes else None  # every nucleus's type, for an image held in memory
        self.paths = [out_dir / f"{stem}_nuclei.csv", out_dir / f"{stem}_nuclei.geojson"]
        self.csv_file = open(self.paths[0].with_suffix(".csv.part"), "w", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=self.COLUMNS)
        self.csv.writeheader()
        self.geojson = open(self.paths[1].with_suffix(".geojson.part"), "w")
        self.geojson.write('{"type": "FeatureCollection", "features": [\n')
        self.count, self.per_class = 0, np.zeros(NUM_CLASSES, np.int64)

    def add(self, window: np.ndarray, y0: int, x0: int, first_id: int, classes) -> None:
        """The nuclei first_id .. first_id + len(classes) - 1 just pasted into `window` (the label image's
        region at (y0, x0)), classes[k] the type (1..5) of nucleus first_id + k."""
        local = np.where(window >= first_id, window - (first_id - 1), 0)  # the new ids as 1..k
        props = regionprops_table(local, properties=("label", "area", "centroid"))
        ds, rows = self.downsample, []
        for k, area, y, x in zip(props["label"], props["area"], props["centroid-0"], props["centroid-1"], strict=True):
            rows.append({"nucleus_id": int(k) + first_id - 1, "type": PANNUKE_CLASSES[classes[k - 1] - 1],
                         "area_px": int(area), "area_um2": round(float(area) * self.pixel_size**2, 3),
                         "centroid_x_px": round((float(x) + x0 + 0.5) * ds - 0.5, 2),
                         "centroid_y_px": round((float(y) + y0 + 0.5) * ds - 0.5, 2)})  # fmt: skip
        self.csv.writerows(rows)
        types = {r["nucleus_id"]: (r["type"], CLASS_COLORS[classes[r["nucleus_id"] - first_id]]) for r in rows}
        areas = {r["nucleus_id"]: {"Area um^2": r["area_um2"]} for r in rows}
        features = qupath_features(local, types, areas, scale=ds, name=self.stem, offset=(x0, y0),
                                   id_offset=first_id - 1)["features"]  # fmt: skip
        for feature in features:
            self.geojson.write(("" if self.count == 0 else ",\n") + json.dumps(feature))
            self.count += 1
        self.per_class += np.bincount(np.asarray(classes, np.int64), minlength=NUM_CLASSES)
        if self.classes is not None:
            self.classes.extend(classes)

    def close(self) -> None:
        self.geojson.write("\n]}\n")
        for handle, path in zip((self.csv_file, self.geojson), self.paths, strict=True):
            handle.close()
            path.with_suffix(path.suffix + ".part").replace(path)


class ImageSource:
    """An H&E image read a region at a time: a whole-slide file (.svs, .ndpi, .scn, .bif, a pyramidal or very
    large TIFF) through tiffslide at the pyramid level closest to PanNuke's scale, anything else from memory.
    shape (h, w) and mpp are the level's, downsample its level-0 pixels per pixel."""

    def __init__(self, path: Path, mpp: float | None):
        self.path, self.slide = path, None
        if is_slide(path):
            try:
                import tiffslide
            except ImportError:
                raise SystemExit(f"{path.name}: reading whole slides needs tiffslide: pip install tiffslide") from None
            try:
                self.slide = tiffslide.TiffSlide(path)
            except Exception as error:
                raise DataError(f"{path}: cannot open the slide ({type(error).__name__}: {error})") from None
            base = mpp or self.slide.properties.get("tiffslide.mpp-x")
            self.mpp_given = base is not None
            self.mpp_source = "--mpp" if mpp else "the slide" if base is not None else "assumed"
            base = float(base or PANNUKE_MPP)
            self.level = closest_level([base * d for d in self.slide.level_downsamples], PANNUKE_MPP)
            self.downsample = float(self.slide.level_downsamples[self.level])
            self.mpp = base * self.downsample
            w, h = self.slide.level_dimensions[self.level]
            self.shape, self.array = (h, w), None
        else:
            self.array, self.level, self.downsample = read_image(path), 0, 1.0
            self.mpp_given, self.mpp, self.shape = mpp is not None, mpp or PANNUKE_MPP, self.array.shape[:2]
            self.mpp_source = "--mpp" if mpp is not None else "assumed"

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self.slide is None:
            return self.array[y0:y1, x0:x1]
        d = self.downsample
        try:
            # tiffslide maps level-0 coordinates to the level by int(location / downsample): ceil keeps x0, y0 exact
            region = self.slide.read_region((math.ceil(x0 * d), math.ceil(y0 * d)), self.level, (x1 - x0, y1 - y0),
                                            as_array=True)  # fmt: skip
        except Exception as error:
            raise DataError(f"{self.path}: cannot read region x {x0}..{x1}, y {y0}..{y1} at level {self.level} "
                            f"({type(error).__name__}: {error})") from None  # fmt: skip
        region = np.asarray(region)
        return region if region.ndim == 3 and region.shape[2] == 3 else read_region_rgb(region, self.path)

    def thumbnail(self, longest: int = 2048) -> tuple[np.ndarray, float]:
        """(RGB thumbnail, the level's pixels per thumbnail pixel), read with a stride from the slide's coarsest
        level, a tile at a time (zarr), so even a one-level slide is never read whole."""
        if self.slide is None:
            step = max(1, int(np.ceil(max(self.shape) / longest)))
            return self.array[::step, ::step], float(step)
        import zarr

        coarsest = self.slide.level_count - 1
        group = zarr.open_group(self.slide.zarr_group.store, mode="r")
        level = group[str(coarsest)] if str(coarsest) in group else group
        step = max(1, int(np.ceil(max(level.shape[:2]) / longest)))
        thumb = read_region_rgb(np.asarray(level[::step, ::step]), self.path)
        return thumb, step * self.slide.level_downsamples[coarsest] / self.downsample


def is_slide(path: Path) -> bool:
    """A whole-slide format, or a TIFF that is a pyramid or larger than IN_MEMORY_PX."""
    suffix = path.suffix.lower()
    if suffix in (".svs", ".ndpi", ".scn", ".bif"):
        return True
    if suffix not in (".tif", ".tiff"):
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return len(tif.series[0].levels) > 1 or (page.is_tiled and page.shape[0] * page.shape[1] > IN_MEMORY_PX)
    except Exception as error:
        raise DataError(f"{path}: cannot read the image ({error})") from None


def read_region_rgb(region: np.ndarray, path: Path) -> np.ndarray:
    if region.ndim == 2:
        region = np.repeat(region[..., None], 3, axis=2)
    if region.ndim != 3 or region.shape[2] not in (3, 4):
        raise DataError(f"{path}: expected an RGB slide, found regions of shape {region.shape}")
    return region[..., :3] if region.dtype == np.uint8 else np.clip(region[..., :3] / 257.0, 0, 255).astype(np.uint8)


def open_labels(path: Path, shape, chunk: int = 1024):
    """A new OME-Zarr label image at <path> (its level 0: uint32 ids, 0 where nothing is written) to fill a
    block at a time; finish_labels adds the rest."""
    import zarr

    chunks = tuple(min(chunk, n) for n in shape)
    return zarr.open_group(str(path), mode="w").create_array("0", shape=tuple(shape), chunks=chunks, dtype="uint32",
                                                            fill_value=0)  # fmt: skip


def finish_labels(path: Path, pixel_size: float | None) -> None:
    """The label image's pyramid (common.tiling.pyramid_plan: every second pixel, so ids stay ids, a block at a
    time) and its OME-Zarr label-image metadata at its root (common.formats.label_image_attrs): napari
    (napari-ome-zarr) opens <path> as labels, QuPath's OME-Zarr reader as an image."""
    import zarr

    root = zarr.open_group(str(path), mode="r+")
    full = root["0"]
    plan = pyramid_plan(full.shape)
    for level, (shape, copies) in enumerate(plan, start=1):
        above = root[str(level - 1)]
        smaller = root.create_array(str(level), shape=shape, chunks=full.chunks, dtype=full.dtype, fill_value=0)
        for source, target in copies:
            smaller[target] = above[source]
    root.attrs.update(label_image_attrs(len(plan) + 1, pixel_size, "nuclei"))


def segment_region(
    model, region: np.ndarray, scale: float, args, normalise, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """(instances, classes) of one region (H, W, 3) uint8 at its own pixels: resized by `scale` to PanNuke's, stain
    normalised, CLAHE'd, predicted in tiles and decoded, and the instances brought back to the region's pixels."""
    at_scale = region if normalise is None else normalize_stains(region, normalise, name)
    if scale != 1:  # area averaging when shrinking, linear when enlarging
        size = (max(1, round(region.shape[1] * scale)), max(1, round(region.shape[0] * scale)))
        at_scale = cv2.resize(at_scale, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    clahe_image = torch.from_numpy(preprocess_image(at_scale)).permute(2, 0, 1)[None]
    probs, distance = predict_tiled(model, clahe_image, args.tile_size, args.overlap, tta=args.tta)
    instances, classes = instances_from_outputs(
        probs[0].cpu().numpy(), distance[0, 0].cpu().numpy(), args.seed_threshold, args.min_size
    )
    if scale != 1:  # the instance map back on the region's own pixels (nearest neighbour keeps the ids)
        rows_at = ((np.arange(region.shape[0]) + 0.5) * instances.shape[0] / region.shape[0]).astype(int)
        cols_at = ((np.arange(region.shape[1]) + 0.5) * instances.shape[1] / region.shape[1]).astype(int)
        instances = instances[np.ix_(rows_at, cols_at)]
        kept = np.unique(instances[instances > 0])  # a nucleus may be too small to survive the resize
        classes = classes[kept - 1]
        instances = np.searchsorted(np.concatenate([[0], kept]), instances).astype(np.int32)
    return instances, classes


def segment_source(model, source: ImageSource, args, labels, normalise, writer: NucleusWriter, tissue=None) -> dict:
    """Segment an image block by block (--block_size px at PanNuke's scale, overlapping by --block_overlap), each
    nucleus taken from the block whose core holds its centre (common.tiling) and pasted into `labels` (a NumPy
    array or, for a slide, a zarr array on disk) with the next id; its row and outline go to `writer`. With a
    tissue mask (thumbnail, the level's pixels per thumbnail pixel), blocks without tissue are skipped. Memory
    is one block's, whatever the image's size."""
    scale = source.mpp / PANNUKE_MPP  # pixels at PanNuke's scale per pixel of the level
    # an image already in memory is one block (as before blocks existed); a slide's blocks bound the memory
    size = max(source.shape) if source.slide is None else max(round(args.block_size / scale), 1)
    margin = min(round(args.block_overlap / scale), size - 1)
    blocks = block_grid(source.shape, size, margin)
    next_id, skipped = 1, 0
    for start, core in tqdm(blocks, desc=source.path.name, unit="block", leave=False, disable=len(blocks) == 1):
        (y0, x0), (h, w) = start, source.shape
        y1, x1 = min(y0 + size, h), min(x0 + size, w)
        if tissue is not None:
            mask, per = tissue  # the block's core on the thumbnail
            cy, cx = core_slices(start, core, source.shape)
            ty, tx = (
                slice(int(cy.start / per), int(np.ceil(cy.stop / per))),
                slice(int(cx.start / per), int(np.ceil(cx.stop / per))),
            )
            if not mask[ty, tx].any():
                skipped += 1
                continue
        region = source.read(y0, y1, x0, x1)
        where = source.path.name if len(blocks) == 1 else f"{source.path.name} at x {x0}, y {y0}"
        instances, classes = segment_region(model, region, scale, args, normalise, where)
        window = np.asarray(labels[y0:y1, x0:x1])
        pasted = paste_objects(window, instances, core, next_id)
        if not pasted:
            continue
        labels[y0:y1, x0:x1] = window
        new_classes = [int(classes[k - 1]) for _, k in pasted]
        writer.add(window, y0, x0, next_id, new_classes)
        next_id += len(pasted)
    return {"blocks": len(blocks), "blocks_without_tissue": skipped, "nuclei": next_id - 1}


@torch.no_grad()
def predict_folder(model, images: Path, args, out_dir: Path, device) -> dict:
    """Every image of a folder (or one file): an image that fits in memory gives <stem>_instances.tif and PNG
    overlays, a whole slide <stem>_instances.ome.zarr and <stem>_overview.png; both the CSV and GeoJSON."""
    paths = [images] if images.is_file() else sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    normalise = None
    if args.stain_norm:
        normalise, target = stain_normalizer(args.stain_reference)
        print(f"stain normalisation (Macenko) to {target}")
    rows, told = [], set()
    for path in tqdm(paths, desc=str(images), unit="image", leave=False, disable=len(paths) == 1):
        source = ImageSource(path, args.mpp)
        scale = source.mpp / PANNUKE_MPP
        message = (f"--mpp {args.mpp}: images are resized by {scale:.3g} to PanNuke's {PANNUKE_MPP} um/px, and back"
                   if args.mpp and source.slide is None else
                   f"assuming the images are at PanNuke's scale, {PANNUKE_MPP} um/px (40x); give --mpp otherwise"
                   if not source.mpp_given else None)  # fmt: skip
        if message and message not in told:
            print(message)
            told.add(message)
        writer = NucleusWriter(out_dir, path.stem, source.mpp, source.downsample, keep_classes=source.slide is None)
        entry = {"image": path.name, "mpp": source.mpp / source.downsample, "mpp_source": source.mpp_source}
        if source.slide is None:
            instances = np.zeros(source.shape, np.int32)
            segment_source(model, source, args, instances, normalise, writer)
            classes = np.asarray(writer.classes, np.int64)
            class_map = np.concatenate([[0], classes])[instances].astype(np.uint8)
            array, options = label_tiff(instances, source.mpp)  # ids and pixel size, for Fiji and napari
            tifffile.imwrite(out_dir / f"{path.stem}_instances.tif", array, **options)
            cv2.imwrite(str(out_dir / f"{path.stem}_classes.png"), class_map)
            cv2.imwrite(
                str(out_dir / f"{path.stem}_overlay.png"), overlay(source.array, class_map, instances)[..., ::-1]
            )
        else:
            thumb, per = source.thumbnail()
            tissue = tissue_mask(thumb) if args.tissue_mask else None
            fitted = None if normalise is None else slide_stain_normalizer(normalise, thumb, tissue, path.name)
            labels_path = out_dir / f"{path.stem}_instances.ome.zarr"
            labels = open_labels(labels_path, source.shape)
            h, w = source.shape
            tqdm.write(f"{path.name}: level {source.level} of the slide ({w} x {h} px, {source.mpp:.3g} um/px)"
                       + ("" if tissue is None else f", tissue on {tissue.mean():.0%} of the thumbnail"))  # fmt: skip
            entry.update(level=source.level, level_mpp=source.mpp, level_size=[w, h], instances=str(labels_path))
            searched = None if tissue is None else (tissue, per)
            entry.update(segment_source(model, source, args, labels, fitted or normalise, writer, searched))
            finish_labels(labels_path, source.mpp)
            cv2.imwrite(str(out_dir / f"{path.stem}_overview.png"), overview(thumb, tissue)[..., ::-1])
        writer.close()
        counts = writer.per_class
        entry.update(nuclei=int(writer.count), **{name: int(counts[c + 1]) for c, name in enumerate(PANNUKE_CLASSES)})
        rows.append(entry)
        tqdm.write(f"{path.name}: {writer.count} nuclei")
    with open(out_dir / "nuclei.csv", "w", newline="") as f:
        columns = ["image", "nuclei", *PANNUKE_CLASSES]
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return {"images": len(rows), "nuclei_per_image": rows}


def overview(thumbnail: np.ndarray, tissue) -> np.ndarray:
    """The slide's thumbnail with the area searched for nuclei (the tissue mask) outlined in green."""
    out = thumbnail.copy()
    if tissue is not None:
        edge = tissue & ~ndimage.binary_erosion(tissue)
        out[edge] = (0, 200, 0)
    return out


def export(args) -> Path:
    """--export DIR: the network with softmax and sigmoid as DIR/model.pt (TorchScript), DIR/model.onnx (checked
    with onnxruntime against PyTorch) and DIR/model.json (what goes in and comes out): common/export.py."""
    out = Path(args.export)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--export {out}: the folder is not empty (an earlier export?); give a new one")
    checkpoint_path = find_checkpoint(args.checkpoint)
    model, checkpoint = load_checkpoint(checkpoint_path, torch.device("cpu"))
    tile = args.tile_size
    description = {
        "domain": "pannuke", "checkpoint": str(checkpoint_path.resolve()), "epoch": checkpoint.get("epoch"),
        "input": {
            "axes": "bcyx", "channels": ["R", "G", "B"], "tile_size": tile, "pixel_size_um": PANNUKE_MPP,
            "normalisation": "H&E RGB at 0.25 um/px (40x; resize other scans), CLAHE on the Lab lightness (clip 2, "
            "one 32 px cell per 32 px: pannuke/data.py preprocess_image), then each tile z-scored per channel "
            "(its own mean and standard deviation)",
            "tiling": f"tiles of {tile} px (a multiple of 32) with {args.overlap} px overlap, raised-cosine blending "
            "(pannuke/model.py predict_tiled)",
        },
        "outputs": {
            "classes": {"channels": list(CLASS_NAMES), "meaning": "softmax probability per pixel"},
            "distance": {"channels": ["distance"], "meaning": "sigmoid of the normalised distance to the nucleus "
                         f"edge; seeds where it exceeds {args.seed_threshold}, nuclei under {args.min_size} px dropped "
                         "(pannuke/model.py instances_from_outputs)"},
        },
    }  # fmt: skip

    def head(out):
        return out["seg"].softmax(1), out["dist"].sigmoid()

    rgb, source = export_tile(checkpoint.get("args", {}), tile)
    example = torch.from_numpy(normalize_image(preprocess_image(rgb)))[None]  # as model.json says
    traced, onnx_model, spec, (classes, distance) = deployable(
        model, head, example, description, ["classes", "distance"], spatial_multiple=32
    )
    out.mkdir(parents=True, exist_ok=True)
    traced.save(str(out / "model.pt"))
    (out / "model.onnx").write_bytes(onnx_model)
    write_json(out / "model.json", spec)
    write_bioimageio_package(out, rgb, example.numpy(), classes, distance, source)
    print(f"exported to {out}: model.pt (TorchScript), model.onnx (onnxruntime within "
          f"{spec['checked']['onnxruntime_max_abs_difference']:.1e} of PyTorch), model.json, and a bioimage.io "
          f"package (rdf.yaml)")  # fmt: skip
    return out


def export_tile(train_args: dict, tile: int) -> tuple[np.ndarray, str]:
    """(an RGB tile of the run's test fold, where it came from), or a synthetic H&E tile when the fold is not found."""
    fold = train_args.get("test_fold", 3)
    found = sorted(Path(train_args.get("data_dir") or ".").glob(f"*/images/fold{fold}/images.npy"))
    if found:
        images = np.load(found[0], mmap_mode="r")
        if images.shape[1] >= tile and images.shape[2] >= tile:
            return np.clip(np.asarray(images[0, :tile, :tile, :3]), 0, 255).astype(np.uint8), f"{found[0]}, tile 0"
    return synthetic_tile(np.random.default_rng(0), tile)[0], "a synthetic H&E tile (the run's fold was not found)"


def write_bioimageio_package(out: Path, rgb, example, classes, distance, source: str) -> None:
    """rdf.yaml, test tensors, cover.png and README.md beside model.pt and model.onnx: a bioimage.io model package
    (`bioimageio test out/rdf.yaml` runs both weights on the test input). Its input is the CLAHE'd, z-scored tile
    (bioimage.io's preprocessing steps cannot compute CLAHE, so a tool that runs it needs that step first)."""
    np.save(out / "test_input.npy", example)
    np.save(out / "test_classes.npy", classes)
    np.save(out / "test_distance.npy", distance)
    coloured = CLASS_COLORS[classes[0].argmax(0)].astype(np.uint8)
    cover = np.concatenate([rgb, coloured], axis=1)
    cv2.imwrite(str(out / "cover.png"), cover[..., ::-1])
    rdf = model_rdf(
        name="PanNuke nucleus segmentation (Attention U-Net)",
        description="Six-class nucleus segmentation of H&E tiles at 0.25 um/px (PanNuke): class probabilities and "
        "a distance map for separating touching nuclei.",
        input_channels=["R", "G", "B"], outputs={"classes": list(CLASS_NAMES), "distance": ["distance"]},
        multiple=32, minimum=32, torch_version=torch.__version__, opset=18,
        authors=["biomedical image analysis scripts"],
        cite=[{"text": "Gamper et al. PanNuke Dataset Extension, Insights and Baselines. arXiv 2020.",
               "url": "https://arxiv.org/abs/2003.10778"},
              {"text": "Oktay et al. Attention U-Net. MIDL 2018.", "url": "https://arxiv.org/abs/1804.03999"}],
        tags=["segmentation", "instance-segmentation", "nuclei", "histopathology", "h-and-e", "2d", "pytorch", "onnx"],
    )  # fmt: skip
    (out / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    (out / "README.md").write_text(
        "# PanNuke nucleus segmentation\n\nAn Attention U-Net trained with pannuke/train.py. Input: an H&E tile "
        "at 0.25 um/px, CLAHE on the Lab lightness, then z-scored per channel (model.json states each step). "
        f"Outputs: softmax probabilities of {', '.join(CLASS_NAMES)}, and a distance map whose peaks seed one "
        "nucleus each.\n\n# Validation\n\n"
        f"The test tensors are {source} prepared as above and this model's outputs on it. mPQ, bPQ and Dice on "
        "the run's test fold are in its evaluation_report.json.\n"
    )


def main(args):
    if args.export:
        return export(args)
    device = pick_device()
    checkpoint_path = find_checkpoint(args.checkpoint)
    model, checkpoint = load_checkpoint(checkpoint_path, device)
    train_args = checkpoint.get("args", {})
    if args.tta is None:  # score as training's validation did
        args.tta = bool(train_args.get("tta", False))
    run_dir = checkpoint_path.parent
    started = time.time()
    report = {
        "checkpoint": str(checkpoint_path.resolve()),
        "checkpoint_epoch": checkpoint.get("epoch"),
        "tta": args.tta,
        "postprocessing": {"seed_threshold": args.seed_threshold, "min_size": args.min_size},
    }
    if args.images:
        if args.tile_size % 32 or not 0 <= args.overlap < args.tile_size:
            raise SystemExit(
                f"--tile_size {args.tile_size} must be a multiple of 32 and --overlap {args.overlap} smaller than it"
            )
        image_dir = Path(args.images)
        if not image_dir.exists():
            raise DataError(f"--images {image_dir}: no such folder or file")
        out_dir = new_folder(Path(args.output_dir) if args.output_dir else run_dir / "predictions", image_dir.stem)
        report.update(images=str(image_dir.resolve()), tile_size=args.tile_size, overlap=args.overlap)
        report.update(block_size=args.block_size, block_overlap=args.block_overlap, tissue_mask=args.tissue_mask)
        args.stain_norm = args.stain_norm or args.stain_reference is not None  # a reference implies --stain_norm
        report.update(stain_norm=args.stain_norm, stain_reference=args.stain_reference)
        report.update(predict_folder(model, image_dir, args, out_dir, device))
        read = {row["mpp_source"] for row in report["nuclei_per_image"]} - {"--mpp"}
        report.update(mpp=args.mpp if args.mpp else f"{PANNUKE_MPP} (assumed)" if read <= {"assumed"} else
                      "each image's (nuclei_per_image: mpp, mpp_source)", model_mpp=PANNUKE_MPP)  # fmt: skip
    else:
        data_dir = args.data_dir or train_args.get("data_dir")
        fold_number = args.fold or train_args.get("test_fold", 3)
        if data_dir is None:
            raise SystemExit(f"{checkpoint_path} does not record its data folder: give --data_dir")
        cache_dir = args.cache_dir or train_args.get("cache_dir") or "runs/pannuke/cache"
        fold = load_fold(data_dir, fold_number, cache_dir)  # checks the fold before any output is written
        out_dir = new_folder(Path(args.output_dir) if args.output_dir else run_dir / "evaluation", f"fold{fold_number}")
        report.update(data_dir=str(Path(data_dir).resolve()), fold=fold_number)
        report.update(evaluate_fold(model, fold, args, out_dir, device))
        write_tissue_csv(out_dir / "per_tissue.csv", report["per_tissue"])
        print(
            f"fold {fold_number}: mPQ {report['mpq']:.4f}  bPQ {report['bpq']:.4f}  AJI {report['aji']:.4f}  "
            f"Dice (fg mean) {report['fg_mean_dice']:.4f}  binary Dice {report['binary_dice']:.4f}"
        )
        if report["predictions"]:
            print(f"predicted instances in PanNuke layout: {report['predictions']}")
    report["seconds"] = time.time() - started
    write_json(out_dir / "evaluation_report.json", report)
    print(f"report: {out_dir / 'evaluation_report.json'}")
    return out_dir


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = p.add_argument
    add("checkpoint", help="a run folder (uses its best.pth) or a .pth file")
    add("--data_dir", "--data-dir", help="PanNuke folder; unless given, the one the run trained on")
    add("--fold", type=int, help="fold to score; unless given, the run's --test_fold")
    add("--cache_dir", "--cache-dir", help="preprocessed fold cache; unless given, the run's")
    add("--images", help="instead of a fold: a folder of H&E images (PNG/TIF/JPG) of any size, tiled")
    add("--output_dir", "--output-dir", help="a new timestamped folder is made in here; unless given, inside the run "
        "folder")  # fmt: skip
    add("--tta", action=argparse.BooleanOptionalAction, help="average predictions over the 8 flips and quarter "
        "turns; unless given, as the run validated (the checkpoint's --tta)")  # fmt: skip
    add("--save_predictions", "--save-predictions", action="store_true", help="write the predicted instances as "
        "masks.npy in PanNuke's (N, 256, 256, 6) layout")  # fmt: skip
    add("--seed_threshold", "--seed-threshold", type=float, default=0.5, help="distance-map level above which a "
        "nucleus seed starts")  # fmt: skip
    add("--min_size", "--min-size", type=int, default=10, help="smallest nucleus kept, in pixels")
    add("--mpp", type=float, help="--images: microns per pixel of the images (20x scans are about 0.5); they are "
        f"resized to PanNuke's {PANNUKE_MPP} and the masks back. Unless given, {PANNUKE_MPP} is assumed")  # fmt: skip
    add("--stain_norm", "--stain-norm", action="store_true", help="--images: Macenko stain normalisation (for "
        "scans from another lab or scanner) before segmenting; the overlays show the original colours")  # fmt: skip
    add("--stain_reference", "--stain-reference", help="--stain_norm: an H&E image whose stains the images are "
        "given (e.g. a tile of the training data); unless given, MONAI's built-in H&E stain matrix")  # fmt: skip
    add("--tile_size", "--tile-size", type=int, default=256, help="--images: tile size (at PanNuke's scale), "
        "multiple of 32")  # fmt: skip
    add("--overlap", type=int, default=64, help="--images: overlap of neighbouring tiles in px")
    add("--block_size", "--block-size", type=int, default=2048, help="--images: images are segmented in blocks of "
        "this many px (at PanNuke's scale), each decoded on its own: memory is one block's, whatever the image "
        "size")  # fmt: skip
    add("--block_overlap", "--block-overlap", type=int, default=128, help="--images: overlap of neighbouring blocks "
        "in px (at PanNuke's scale); above the largest nucleus, so each is taken whole from one block")  # fmt: skip
    add("--tissue_mask", action=argparse.BooleanOptionalAction, default=True, help="--images, whole "
        "slides: skip blocks without tissue (Otsu on the saturation of a thumbnail)")  # fmt: skip
    add("--export", metavar="DIR", help="write the network as TorchScript and ONNX with model.json into DIR, and stop")
    add("--batch_size", "--batch-size", type=int, default=8, help="tiles per forward pass")
    add("--num_workers", "--num-workers", type=int, default=0, help="loader workers")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
