"""Segment, count and measure stress granules with a trained model; score against masks when given.

    python stress_granules/evaluate.py metrics/<run>                          # the run's held-out test images
    python stress_granules/evaluate.py metrics/<run> --split val              # its validation images (they chose it)
    python stress_granules/evaluate.py metrics/<run> --images NEW --cells CELL_MASKS
    python stress_granules/evaluate.py robust_stress_granule_model.pth --images DIR --masks DIR --pixel_size 0.108

Whole images of any size go through tiled inference (overlapping tiles, cosine blending). Threshold, minimum
size, splitting of touching granules, tile size, channel and z-projection are the run's own (stored in the
checkpoint) unless given. Writes a new folder <run>/predictions_<YYYYmmdd_HHMMSS>/ (or inside --output_dir) with
- masks/<basename>.tif: the granule label image (uint16, 0 = background, ids = granule_id of granules.csv), with
  the pixel size in its ImageJ resolution tags, so Fiji and napari open it at its scale;
- granules.csv: one row per granule: image, granule id, (cell id,) area in px and um^2, centroid, mean and maximum
  intensity of the original image;
- cells.csv (with --cells DIR, cell or nucleus label masks with the images' basenames, e.g. from Cellpose or
  CellProfiler): one row per cell: its area, granule count, granule area fraction, mean granule intensity;
- image_summary.csv: per image the granule count, mean area, granule area fraction (with --cells the per-cell
  means; with masks Dice, granule F1 and whether it is a control image);
- evaluation_report.json: which images were scored and whether training saw them, the settings, totals and, with
  masks, pixel scores (Dice, precision, recall, F1, accuracy, specificity), granule scores (true granules by their
  ids, matched at IoU 0.5: precision, recall, F1) and false granules per control image (an image with an empty
  mask).
The pixel size is --pixel_size, or read from each TIFF (ImageJ or OME resolution); areas in um^2 need one.

--run_report (what train.py runs at its end) scores the run's test images (--split) beside Otsu's threshold on the
same images, and writes the run's own evaluation_report.json and <split>_predictions.png into the run folder.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import csv
import json
import time
from dataclasses import replace
from typing import NamedTuple

import cv2
import numpy as np
import torch
import yaml
from skimage.filters import threshold_otsu
from skimage.measure import regionprops_table
from tqdm import tqdm

from common.bioimageio import model_rdf
from common.export import deployable
from common.formats import label_image_attrs
from common.tiling import block_grid, paste_objects, pyramid_plan
from stress_granules.data import (
    EDGE_FULL_SCALE,
    FEATURE_SETTINGS,
    IN_MEMORY_PX,
    DataError,
    HelpFormatter,
    LargeImage,
    Preprocess,
    is_large,
    list_images,
    load_features,
    new_folder,
    plot_predictions,
    read_mask,
    read_pixel_size,
    write_json,
    write_labels,
)
from stress_granules.model import (
    GranuleScores,
    find_checkpoint,
    granules_from_probability,
    load_checkpoint,
    pick_device,
    predict_probability,
)
from stress_granules.train import LEGACY, mixed_precision


class Settings(NamedTuple):
    """How probabilities become granules, as the run validated them unless the command line says otherwise."""

    tile: int
    overlap: int
    threshold: float
    min_size: int
    split: bool
    train_shape: tuple[int, int] | None = None  # the training images' median (H, W): CLAHE's tiles on large images


def run_settings(args, checkpoint: dict) -> tuple[Preprocess, Settings]:
    """The preprocessing and post-processing of the run (stored in its checkpoint), each overridden by its flag."""
    stored = {**LEGACY, **checkpoint.get("args", {})}
    prep = Preprocess.from_args(stored)
    prep = replace(
        prep,
        channel=stored["channel"] if args.channel is None else args.channel,
        z_projection=args.z_projection or stored["z_projection"],
    )
    tile = args.tile_size or stored.get("image_size", 256)
    settings = Settings(
        tile=tile,
        overlap=tile // 4 if args.overlap is None else args.overlap,
        threshold=stored.get("threshold", 0.5) if args.threshold is None else args.threshold,
        min_size=stored.get("min_size", 15) if args.min_size is None else args.min_size,
        split=stored["split_touching"] if args.split_touching is None else args.split_touching,
        train_shape=stored.get("train_image_shape"),  # None in runs before it was stored: the block's own grid
    )
    if settings.tile % 16 or not 0 <= settings.overlap < settings.tile:
        raise SystemExit(
            f"--tile_size {settings.tile} must be a multiple of 16 and --overlap {settings.overlap} smaller than it"
        )
    return prep, settings


def run_split(checkpoint: dict, folder: Path | None = None) -> dict | None:
    """The run's split.json ({"train": [...], "val": [...], "test": [...]}): beside the checkpoint (`folder`, so a
    run folder that was moved or copied still finds it), else in the run folder the checkpoint records; None for
    a bare checkpoint."""
    for run_dir in (folder, checkpoint.get("args", {}).get("run_dir")):
        if run_dir and (Path(run_dir) / "split.json").is_file():
            return json.loads((Path(run_dir) / "split.json").read_text())
    return None


def image_list(args, checkpoint: dict, folder: Path | None = None) -> tuple[list[tuple[Path, Path | None]], dict]:
    """(image, mask or None) pairs and where they come from: --images (and --masks), else the run's --split
    images (test by default; its validation images, said so, when the run held none out for testing). folder:
    the checkpoint's own folder, where split.json is looked for first."""
    split = run_split(checkpoint, folder)
    if args.images:
        images = list_images(Path(args.images))
        masks = list_images(Path(args.masks)) if args.masks else {}
        missing = [images[s] for s in images if args.masks and s not in masks]
        if missing:
            raise DataError(f"{missing[0]} has no mask in {args.masks} (masks pair with images by basename)")
        pairs = [(images[s], masks.get(s)) for s in images]
        used = {str(Path(p).resolve()) for p in (split or {}).get("train", []) + (split or {}).get("val", [])}
        seen = sum(str(p.resolve()) in used for p, _ in pairs)
        note = f"images from {args.images}; {seen} of them were used in training or validation" + (
            "" if split else " (unknown: this checkpoint has no run folder with split.json)"
        )
        return pairs, {"split": "images", "note": note, "seen_by_training": seen if split else None}
    if split is None:
        raise SystemExit("give --images (this checkpoint's run has no split.json to take its images from)")
    name = args.split
    note = {"test": "held out from training and model selection", "val": "the validation images, which chose this "
            "model: not an independent score"}[name]  # fmt: skip
    if name == "test" and not split.get("test"):
        name, note = "val", "the validation images, which chose this model (the run held no test images out)"
    train_args = {**LEGACY, **checkpoint["args"]}
    masks = list_images(
        Path(train_args["val_masks"] if name == "val" and train_args["val_masks"] else train_args["masks"])
    )
    pairs = [(Path(p), masks.get(Path(p).stem)) for p in split[name]]
    return pairs, {"split": name, "note": note, "seen_by_training": len(pairs) if name == "val" else 0}


class Segmented(NamedTuple):
    path: Path
    image: np.ndarray  # the granule channel as read (after --channel / --z_projection)
    mask: np.ndarray | None  # the true granule labels, when there is a mask
    features: np.ndarray  # the network's input (C, H, W)
    probability: np.ndarray
    labels: np.ndarray  # granule ids, 0 = background


def segment(model, pairs, prep: Preprocess, settings: Settings, ctx, skipped: list, cache_dir=None):
    """Each readable image segmented by tiled inference, with a bar over the images; an image that cannot be read
    is named on the console and in `skipped`, and the others go on. The features are rounded to float16, as
    training's cache holds them, so a run's own images score exactly as in its validation (cache_dir: read them
    from training's cache)."""
    for image_path, mask_path in tqdm(pairs, desc="images", disable=len(pairs) < 2):
        try:
            image = prep.read(image_path)
            mask = read_mask(mask_path, image.shape, image_path) if mask_path else None
        except DataError as error:
            tqdm.write(f"skipped: {error}")
            skipped.append(str(error))
            continue
        if cache_dir is None:
            stack = prep.compute(image).astype(np.float16)
        else:
            stack = np.load(load_features(image_path, prep, cache_dir), mmap_mode="r")
        probability = predict_probability(model, stack, settings.tile, settings.overlap, ctx=ctx, progress=True)
        labels = granules_from_probability(probability, settings.threshold, settings.min_size, settings.split)
        yield Segmented(image_path, image, mask, stack, probability, labels)


def figure_row(item: Segmented) -> dict:
    """One row of data.plot_predictions."""
    name, image, mask = item.path.stem, np.asarray(item.features[0], np.float32), item.mask
    return {"name": name, "image": image, "mask": mask, "probability": item.probability, "labels": item.labels}


def otsu_labels(image: np.ndarray, prep: Preprocess, settings: Settings) -> np.ndarray:
    """The classical baseline: Otsu's threshold on the normalised image, then the model's post-processing
    (touching granules split, objects of at least min_size pixels)."""
    normalized = prep.normalize(image)
    if normalized.max() == normalized.min():
        return np.zeros(image.shape, np.int32)
    binary = (normalized > threshold_otsu(normalized)).astype(np.float32)
    return granules_from_probability(binary, 0.5, settings.min_size, settings.split)


def write_run_report(model, checkpoint: dict, run_dir: Path, pairs, source: dict, prep, settings, ctx) -> Path:
    """The run's evaluation_report.json (the best model's scores on the --split images beside Otsu's, with false
    granules per control image) and <split>_predictions.png of the first four images. The features come from the
    run's cache."""
    model_scores, otsu = GranuleScores(), GranuleScores()
    rows, skipped = [], []
    for item in segment(model, pairs, prep, settings, ctx, skipped, Path(checkpoint["args"]["cache_dir"])):
        model_scores.update(item.labels, item.mask)
        otsu.update(otsu_labels(item.image, prep, settings), item.mask)
        if len(rows) < 4:
            rows.append(figure_row(item))
    if skipped:
        raise SystemExit(f"the run's {source['split']} images must all be readable: {skipped[0]}")
    report = {
        "split": source["split"],
        "note": source["note"],
        "images": [str(p) for p, _ in pairs],
        "selection_metric": checkpoint["args"]["selection_metric"],
        "best_epoch": checkpoint["epoch"],
        "settings": settings._asdict(),
        "model": model_scores.compute(),
        "otsu_baseline": otsu.compute(),
    }
    write_json(run_dir / "evaluation_report.json", report)
    plot_predictions(rows, run_dir / f"{source['split']}_predictions.png")
    print(f"wrote {run_dir / 'evaluation_report.json'} and {source['split']}_predictions.png")
    return run_dir


def measure(labels: np.ndarray, image: np.ndarray, name: str, pixel_size: float | None) -> list[dict]:
    """One row per granule (its id is its value in the label image)."""
    props = regionprops_table(
        labels,
        intensity_image=image.astype(np.float64),
        properties=("label", "area", "centroid", "intensity_mean", "intensity_max"),
    )
    rows = []
    for i in range(len(props["label"])):
        rows.append(
            {
                "image": name,
                "granule_id": int(props["label"][i]),
                "area_px": int(props["area"][i]),
                "area_um2": props["area"][i] * pixel_size**2 if pixel_size else None,
                "centroid_y": props["centroid-0"][i],
                "centroid_x": props["centroid-1"][i],
                "mean_intensity": props["intensity_mean"][i],
                "max_intensity": props["intensity_max"][i],
            }
        )
    return rows


def measure_cells(labels, cells, image, name, pixel_size, granule_rows) -> list[dict]:
    """One row per cell of a cell (or nucleus) label image. A granule belongs to the cell that holds most of its
    pixels (none when most lie outside every cell: its cell_id in granule_rows is 0); a cell's granule area
    fraction and mean granule intensity are over the granule pixels inside it."""
    n_granules, n_cells = int(labels.max(initial=0)), int(cells.max(initial=0))
    inside = labels > 0
    pairs = np.bincount(
        labels[inside].astype(np.int64) * (n_cells + 1) + cells[inside], minlength=(n_granules + 1) * (n_cells + 1)
    )
    owner = pairs.reshape(n_granules + 1, n_cells + 1).argmax(1)  # per granule id, the cell with most of its pixels
    for row in granule_rows:
        row["cell_id"] = int(owner[row["granule_id"]])
    count = np.bincount(owner[1:], minlength=n_cells + 1)
    area = np.bincount(cells.ravel(), minlength=n_cells + 1)
    granule_area = np.bincount(cells[inside], minlength=n_cells + 1)
    intensity = np.bincount(cells[inside], weights=image[inside].astype(np.float64), minlength=n_cells + 1)
    rows = []
    for cell in np.flatnonzero(area[1:]) + 1:
        rows.append(
            {
                "image": name,
                "cell_id": int(cell),
                "area_px": int(area[cell]),
                "area_um2": area[cell] * pixel_size**2 if pixel_size else None,
                "granules": int(count[cell]),
                "granule_area_fraction": granule_area[cell] / area[cell],
                "mean_granule_intensity": intensity[cell] / granule_area[cell] if granule_area[cell] else None,
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def cell_masks(args, pairs) -> dict:
    """--cells: image basename -> its cell label mask; an image without one is an error naming it."""
    if not args.cells:
        return {}
    cells = list_images(Path(args.cells))
    missing = [p for p, _ in pairs if p.stem not in cells]
    if missing:
        raise DataError(f"{missing[0]} has no cell mask in {args.cells} (cell masks pair with images by basename)")
    return cells


def summarise(image_path, labels, rows, cell_rows, pixel_size, mask) -> dict:
    """A row of image_summary.csv."""
    summary = {
        "image": image_path.name,
        "pixel_size_um": pixel_size,
        "granules": len(rows),
        "mean_area_px": float(np.mean([r["area_px"] for r in rows])) if rows else 0.0,
        "mean_area_um2": float(np.mean([r["area_px"] for r in rows])) * pixel_size**2 if rows and pixel_size else None,
        "area_fraction": float((labels > 0).mean()),
    }
    if cell_rows is not None:
        summary.update(
            cells=len(cell_rows),
            mean_granules_per_cell=float(np.mean([c["granules"] for c in cell_rows])) if cell_rows else None,
            mean_granule_area_fraction_per_cell=(
                float(np.mean([c["granule_area_fraction"] for c in cell_rows])) if cell_rows else None
            ),
            cells_with_granules=sum(c["granules"] > 0 for c in cell_rows),
            granules_outside_cells=sum(r["cell_id"] == 0 for r in rows),
        )
    if mask is not None:
        single = GranuleScores()
        single.update(labels, mask)
        result = single.compute()
        summary.update(
            control=not mask.any(),
            true_granules=int(len(np.unique(mask[mask > 0]))),
            dice=result["pixel"]["dice"],
            granule_f1=result["object"]["f1"],
        )
    return summary


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
    (napari-ome-zarr) opens <path> as labels, Fiji's and QuPath's OME-Zarr readers as an image."""
    import zarr

    root = zarr.open_group(str(path), mode="r+")
    full = root["0"]
    plan = pyramid_plan(full.shape)
    for level, (shape, copies) in enumerate(plan, start=1):
        above = root[str(level - 1)]
        smaller = root.create_array(str(level), shape=shape, chunks=full.chunks, dtype=full.dtype, fill_value=0)
        for source, target in copies:
            smaller[target] = above[source]
    root.attrs.update(label_image_attrs(len(plan) + 1, pixel_size, "granules"))


def segment_large(model, image_path: Path, prep: Preprocess, settings: Settings, ctx, out: Path, pixel_size,
                  block: int, overlap: int, write_rows) -> dict:  # fmt: skip
    """An image too large to hold (data.LargeImage), block by block (`block` px overlapping by `overlap`): each
    block is read, stretched by the whole image's percentiles (from a strided sample), given its features,
    predicted in tiles and turned into granules on its own; each granule whose centre lies in the block's core is
    pasted into the label image `out` (OME-Zarr, on disk) with the next id (common.tiling), and its row goes to
    write_rows. Memory is one block's. Returns its image_summary row."""
    with LargeImage(image_path, prep.channel) as image:
        bounds = image.percentiles()
        labels = open_labels(out, image.shape)
        blocks = block_grid(image.shape, block, min(overlap, block - 1))
        next_id, granule_area = 1, 0
        for start, core in tqdm(blocks, desc=image_path.name, unit="block", leave=False):
            (y0, x0), (h, w) = start, image.shape
            y1, x1 = min(y0 + block, h), min(x0 + block, w)
            raw = image[y0:y1, x0:x1]
            features = prep.compute(raw, bounds, settings.train_shape).astype(np.float16)  # as cached
            probability = predict_probability(model, features, settings.tile, settings.overlap, ctx=ctx)
            found = granules_from_probability(probability, settings.threshold, settings.min_size, settings.split)
            window = np.asarray(labels[y0:y1, x0:x1])
            pasted = paste_objects(window, found, core, next_id)
            if not pasted:
                continue
            labels[y0:y1, x0:x1] = window
            rows = measure(np.where(window >= next_id, window - (next_id - 1), 0), raw, image_path.name, pixel_size)
            for row in rows:  # block coordinates and ids to the image's
                row.update(granule_id=row["granule_id"] + next_id - 1, centroid_y=row["centroid_y"] + y0,
                           centroid_x=row["centroid_x"] + x0)  # fmt: skip
                granule_area += row["area_px"]
            write_rows(rows)
            next_id += len(pasted)
    finish_labels(out, pixel_size)
    n, pixels = next_id - 1, image.shape[0] * image.shape[1]
    return {"image": image_path.name, "pixel_size_um": pixel_size, "granules": n,
            "mean_area_px": granule_area / n if n else 0.0,
            "mean_area_um2": granule_area / n * pixel_size**2 if n and pixel_size else None,
            "area_fraction": granule_area / pixels, "blocks": len(blocks)}  # fmt: skip


def export(args) -> Path:
    """--export DIR: the U-Net with its sigmoid as DIR/model.pt (TorchScript), DIR/model.onnx (checked with
    onnxruntime against PyTorch) and DIR/model.json (what goes in and comes out): common/export.py."""
    out = Path(args.export)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--export {out}: the folder is not empty (an earlier export?); give a new one")
    checkpoint_path = find_checkpoint(args.checkpoint)
    model, checkpoint = load_checkpoint(checkpoint_path, torch.device("cpu"))
    prep, settings = run_settings(args, checkpoint)
    channels = checkpoint["model_args"].get("in_channels", 1)
    features = FEATURE_SETTINGS[prep.features]
    names = [f"CLAHE clip {clip}, grid {grid} of the normalised image" for clip, grid in features]
    names += ["edge"] * bool(features)
    names = names or ["normalised image"]  # --features raw: the percentile-stretched image alone
    description = {
        "domain": "stress_granules", "checkpoint": str(checkpoint_path.resolve()), "epoch": checkpoint.get("epoch"),
        "input": {
            "axes": "bcyx", "channels": names, "tile_size": settings.tile,
            "normalisation": f"the granule channel (--channel {prep.channel}, z projection {prep.z_projection}) "
            f"stretched from its 1st to 99.8th percentile to 0..1, the stretch at least {prep.min_range:g} "
            f"(--min_dynamic_range), then the '{prep.features}' features: CLAHE at clip limits "
            f"{[clip for clip, _ in features]} (common/preprocessing.py multiscale_clahe) and the edge channel "
            f"(gradient magnitude of the Gaussian-smoothed image, sigma 1 px, / 8 / {EDGE_FULL_SCALE}, clipped to "
            "0..1): stress_granules/data.py Preprocess.compute",
            "tiling": f"tiles of {settings.tile} px (a multiple of 16) with {settings.overlap} px overlap",
        },
        "outputs": {"granule": {"channels": ["granule probability"], "meaning": f"sigmoid; granules where it "
                                f"exceeds {settings.threshold}, under {settings.min_size} px dropped"}},
    }  # fmt: skip
    example, source = export_example(args, checkpoint, checkpoint_path, prep, settings.tile, channels)
    traced, onnx_model, spec, (probability,) = deployable(
        model, torch.sigmoid, example, description, ["granule"], spatial_multiple=16
    )
    out.mkdir(parents=True, exist_ok=True)
    traced.save(str(out / "model.pt"))
    (out / "model.onnx").write_bytes(onnx_model)
    write_json(out / "model.json", spec)
    write_bioimageio_package(out, example.numpy(), probability, names, source)
    print(f"exported to {out}: model.pt (TorchScript), model.onnx (onnxruntime within "
          f"{spec['checked']['onnxruntime_max_abs_difference']:.1e} of PyTorch), model.json, and a bioimage.io "
          f"package (rdf.yaml)")  # fmt: skip
    return out


def export_example(args, checkpoint, checkpoint_path, prep, tile: int, channels: int) -> tuple[torch.Tensor, str]:
    """(the features of one of the run's images, cut to at most a tile, y and x multiples of 16; its file name).
    Random features when the run's images cannot be found."""
    try:
        pairs, _ = image_list(args, checkpoint, Path(checkpoint_path).parent)
        features = prep.compute(prep.read(pairs[0][0]))
    except (SystemExit, IndexError, OSError):
        torch.manual_seed(0)
        return torch.rand(1, channels, tile, tile), "random features (the run's images were not found)"
    h, w = (max(16, min(n, tile) // 16 * 16) for n in features.shape[1:])
    crop = np.zeros((channels, h, w), np.float32)
    crop[:, : features.shape[1], : features.shape[2]] = features[:, :h, :w]
    return torch.from_numpy(crop)[None], Path(pairs[0][0]).name


def write_bioimageio_package(out: Path, example: np.ndarray, probability: np.ndarray, channels, source) -> None:
    """rdf.yaml, test tensors, cover.png and README.md beside model.pt and model.onnx: a bioimage.io model package
    (`bioimageio test out/rdf.yaml` runs both weights on the test input). Its input is the run's features, not
    the raw image: bioimage.io's preprocessing steps cannot compute CLAHE, so a tool that runs it (deepImageJ,
    ilastik) needs those features made as stress_granules/data.py makes them."""
    np.save(out / "test_input.npy", example)
    np.save(out / "test_granule.npy", probability)
    cover = np.concatenate([example[0, 0], probability[0, 0]], axis=1)
    cv2.imwrite(str(out / "cover.png"), np.clip(cover * 255, 0, 255).astype(np.uint8))
    rdf = model_rdf(
        name="Stress granule segmentation (U-Net)",
        description="Binary segmentation of stress granules in fluorescence microscopy: granule probability per "
        "pixel from the stress_granules features (percentile stretch, CLAHE, edge channel).",
        input_channels=list(channels), outputs={"granule": ["granule probability"]}, multiple=16, minimum=16,
        torch_version=torch.__version__, opset=18, authors=["biomedical image analysis scripts"],
        cite=[{"text": "Ronneberger, Fischer, Brox. U-Net: Convolutional Networks for Biomedical Image "
               "Segmentation. MICCAI 2015.", "doi": "10.1007/978-3-319-24574-4_28"}],
        tags=["segmentation", "fluorescence-light-microscopy", "2d", "stress-granules", "pytorch", "onnx"],
    )  # fmt: skip
    (out / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    (out / "README.md").write_text(
        "# Stress granule segmentation\n\nA U-Net trained with stress_granules/train.py. The input is the run's "
        f"features ({', '.join(channels)}), computed from the granule channel as stress_granules/data.py "
        "Preprocess.compute does; model.json states every step. The output is the granule probability; "
        "granules are its connected regions above the threshold in model.json.\n\n# Validation\n\n"
        f"The test tensors are the features of {source} (cut to a multiple of 16) and this model's output on "
        "them. Granule F1 and Dice on the run's held-out test images are in its evaluation_report.json.\n"
    )


def main(args):
    if args.export:
        return export(args)
    device = pick_device()
    checkpoint_path = find_checkpoint(args.checkpoint)
    model, checkpoint = load_checkpoint(checkpoint_path, device)
    enabled = args.use_mixed_precision
    if enabled is None:  # as the run validated: its own setting where it ran on this kind of device
        stored = checkpoint.get("args", {}).get("use_mixed_precision")
        enabled = device.type == "cuda" if stored is None or device.type != "cuda" else bool(stored)
    ctx, _ = mixed_precision(device, enabled)
    if args.run_report and args.images:
        raise SystemExit("--run_report scores the run's own test (or validation) images: leave out --images")
    prep, settings = run_settings(args, checkpoint)
    pairs, source = image_list(args, checkpoint, checkpoint_path.parent)
    if args.run_report:
        return write_run_report(model, checkpoint, checkpoint_path.parent, pairs, source, prep, settings, ctx)
    cells = cell_masks(args, pairs)
    out_dir = new_folder(Path(args.output_dir) if args.output_dir else checkpoint_path.parent, "predictions")
    (out_dir / "masks").mkdir()
    print(f"scoring {len(pairs)} image(s): {source['note']}")
    if not cells:
        print("counts are per image (give --cells DIR with cell or nucleus label masks for granules per cell)")
    started = time.time()
    large = [pair for pair in pairs if is_large(pair[0])]  # segmented block by block, after the others
    cell_column = ["cell_id"] if cells else []
    granule_columns = ["image", "granule_id", *cell_column, "area_px", "area_um2", "centroid_y", "centroid_x",
                       "mean_intensity", "max_intensity"]  # fmt: skip
    with open(out_dir / "granules.csv", "w", newline="") as granules_file:  # a row per granule, written as found
        granule_csv = csv.DictWriter(granules_file, fieldnames=granule_columns, extrasaction="ignore")
        granule_csv.writeheader()
        granule_count, cell_rows, summary_rows = 0, [], []
        scores, skipped = GranuleScores(), []
        small = [pair for pair in pairs if pair not in large]
        for image_path, image, mask, _, _, labels in segment(model, small, prep, settings, ctx, skipped):
            pixel_size = args.pixel_size or read_pixel_size(image_path)
            rows = measure(labels, image, image_path.name, pixel_size)
            these_cells = None
            if cells:
                try:
                    cell_labels = read_mask(cells[image_path.stem], image.shape, image_path)
                except DataError as error:
                    tqdm.write(f"skipped: {error}")
                    skipped.append(str(error))
                    continue
                these_cells = measure_cells(labels, cell_labels, image, image_path.name, pixel_size, rows)
                cell_rows += these_cells
            write_labels(out_dir / "masks" / f"{image_path.stem}.tif", labels, pixel_size)
            granule_csv.writerows(rows)
            granule_count += len(rows)
            if mask is not None:
                scores.update(labels, mask)
            summary_rows.append(summarise(image_path, labels, rows, these_cells, pixel_size, mask))
            tqdm.write(f"{image_path.name}: {len(rows)} granules" + (f" in {len(these_cells)} cells" if cells else ""))
        for image_path, mask_path in large:
            if mask_path or cells:
                tqdm.write(f"{image_path.name}: larger than {IN_MEMORY_PX:,} px, segmented block by block; its mask "
                           "and cell mask are not used (scores and cells need the image whole)")  # fmt: skip
            pixel_size = args.pixel_size or read_pixel_size(image_path)
            out = out_dir / "masks" / f"{image_path.stem}.ome.zarr"
            try:
                summary = segment_large(model, image_path, prep, settings, ctx, out, pixel_size, args.block_size,
                                        args.block_overlap, granule_csv.writerows)  # fmt: skip
            except DataError as error:  # as for the others: recorded in the report, the run goes on
                tqdm.write(f"skipped: {error}")
                skipped.append(str(error))
                continue
            granule_count += summary["granules"]
            summary_rows.append(summary)
            tqdm.write(f"{image_path.name}: {summary['granules']} granules in {summary['blocks']} blocks -> {out}")
    if cells:
        columns = ["image", "cell_id", "area_px", "area_um2", "granules", "granule_area_fraction",
                   "mean_granule_intensity"]  # fmt: skip
        write_csv(out_dir / "cells.csv", cell_rows, columns)
    write_csv(out_dir / "image_summary.csv", summary_rows, list(dict.fromkeys(k for r in summary_rows for k in r)))
    report = {
        "checkpoint": str(checkpoint_path.resolve()),
        "images": [str(p) for p, _ in pairs],
        "source": source["note"],
        "split": source["split"],
        "seen_by_training": source["seen_by_training"],
        "settings": {
            **settings._asdict(),
            "channel": prep.channel,
            "z_projection": prep.z_projection,
            "min_dynamic_range": prep.min_range,
        },  # fmt: skip
        "pixel_size_um": {r["image"]: r["pixel_size_um"] for r in summary_rows},
        "counts_per": "cell" if cells else "image",
        "granules": granule_count,
        "granules_per_image": granule_count / max(len(summary_rows), 1),
        "masks_folder": str(out_dir / "masks"),
        "granules_csv": str(out_dir / "granules.csv"),
    }
    if cells:
        report["cells"] = len(cell_rows)
        report["granules_per_cell"] = float(np.mean([c["granules"] for c in cell_rows])) if cell_rows else None
    if any(mask_path for image_path, mask_path in pairs if not is_large(image_path)):  # scored whole only
        computed = scores.compute()
        report["images_with_masks"] = computed.pop("images")
        report.update(computed)
        controls = report["controls"]
        print(
            f"pixel Dice {report['pixel']['dice']:.4f}  granule F1 {report['object']['f1']:.4f} "
            f"(precision {report['object']['precision']:.4f}, recall {report['object']['recall']:.4f})"
            + (
                f"  false granules per control image {controls['false_granules_per_control_image']:.2f} "
                f"({controls['images']} controls)"
                if controls["images"]
                else ""
            )  # fmt: skip
        )
    report["skipped"] = skipped
    report["seconds"] = time.time() - started
    write_json(out_dir / "evaluation_report.json", report)
    print(f"wrote {out_dir}")
    if skipped:
        raise SystemExit(
            f"{len(skipped)} image(s) could not be read and were skipped (listed in "
            f"{out_dir / 'evaluation_report.json'}), e.g. {skipped[0]}"
        )
    return out_dir


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, add_help=add_help)
    add = p.add_argument
    flag = argparse.BooleanOptionalAction
    add("checkpoint", help="a run folder (its best_model.pth) or a .pth file")
    add("--images", help="folder of images; without it, the run's --split images")
    add("--masks", help="folder of masks with the same basenames: adds scores")
    add(
        "--split", choices=["test", "val"], default="test", help="without --images: the run's test or validation images"
    )
    add("--cells", help="folder of cell (or nucleus) label masks with the images' basenames: writes cells.csv")
    add("--pixel_size", "--pixel-size", type=float,
        help="pixel size in micrometres; without it, read from each TIFF (ImageJ or OME)")  # fmt: skip
    add("--channel", type=int, help="granule channel of multi-channel files, from 0; without it, the run's")
    add("--z_projection", "--z-projection", choices=["max", "mean"], help="z-stack projection; without it, the run's")
    add("--threshold", type=float, help="granule probability threshold; without it, the run's")
    add("--min_size", "--min-size", type=int, help="smallest predicted granule in pixels; without it, the run's")
    add("--split_touching", action=flag,
        help="split touching granules (watershed on the distance map); without it, as the run did")  # fmt: skip
    add("--split-touching", dest="split_touching", action=flag, help=argparse.SUPPRESS)  # hidden twin
    add("--tile_size", "--tile-size", type=int, help="inference tile, multiple of 16; without it, the run's crop size")
    add("--overlap", type=int, help="overlap of neighbouring tiles in px; without it, a quarter tile")
    add("--block_size", "--block-size", type=int, default=2048, help="a TIFF of more than 8192 x 8192 px is "
        "segmented in blocks of this many px, each on its own, into masks/<name>.ome.zarr: memory is one "
        "block's")  # fmt: skip
    add("--block_overlap", "--block-overlap", type=int, default=128, help="overlap of neighbouring blocks in px, "
        "above the largest granule's diameter (each granule is taken whole from one block)")  # fmt: skip
    add("--output_dir", "--output-dir", help="a new predictions_<timestamp> folder is made in here; without it, the "
        "checkpoint's folder")  # fmt: skip
    add("--use_mixed_precision", action=flag, help="autocast (bf16, or fp16 on older GPUs and MPS); without it, on "
        "CUDA as the run trained, off elsewhere")  # fmt: skip
    add("--use-mixed-precision", dest="use_mixed_precision", action=flag, help=argparse.SUPPRESS)  # hidden twin
    add("--export", metavar="DIR", help="write the network as TorchScript and ONNX with model.json into DIR, and stop")
    add("--run_report", "--run-report", action="store_true",
        help="write the run's evaluation_report.json and <split>_predictions.png, see above")  # fmt: skip
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Autocast: as given, else on CUDA the run's own setting (on where train.py turns it on by default), off
    elsewhere."""
    return get_args_parser().parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
