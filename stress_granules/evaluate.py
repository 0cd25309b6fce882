"""Segment, count and measure stress granules with a trained model; score against masks when given.

    python stress_granules/evaluate.py metrics/<run>                          # the run's validation images
    python stress_granules/evaluate.py metrics/<run> --images NEW --pixel_size 0.108
    python stress_granules/evaluate.py robust_stress_granule_model.pth --images DIR --masks DIR

Whole images of any size go through tiled inference (overlapping tiles, cosine blending). Writes a new folder
<run>/predictions_<YYYYmmdd_HHMMSS>/ (or inside --output_dir) with
- masks/<basename>.tif: the predicted granule mask (uint8, 255 = granule) for every image;
- granules.csv: one row per granule: image, granule id, area (px, and um^2 with --pixel_size), centroid,
  mean and maximum intensity of the original image;
- image_summary.csv: per image the granule count, mean area and the granule area fraction (and Dice / F1
  with masks);
- evaluation_report.json: settings, totals and, with --masks, pixel scores (Dice, precision, recall, F1,
  accuracy, specificity) and granule scores (matched at IoU 0.5: precision, recall, F1).

--run_report (what train.py runs at its end) scores the run's validation images instead, beside Otsu's threshold on
the same images, and writes the run's own evaluation_report.json and validation_predictions.png into the run folder.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import csv
import json
import time
from typing import NamedTuple

import numpy as np
import tifffile
from skimage.filters import threshold_otsu
from skimage.measure import regionprops_table
from tqdm import tqdm

from common.preprocessing import percentile_normalize
from stress_granules.data import (
    DataError,
    HelpFormatter,
    compute_features,
    list_images,
    load_features,
    new_folder,
    plot_predictions,
    read_image,
    read_mask,
    write_json,
)
from stress_granules.model import (
    GranuleScores,
    find_checkpoint,
    granules_from_probability,
    load_checkpoint,
    pick_device,
    predict_probability,
)
from stress_granules.train import mixed_precision


def image_list(args, checkpoint: dict) -> list[tuple[Path, Path | None]]:
    """(image, mask or None) pairs: --images (and --masks), else the run's validation images and masks."""
    if args.images:
        images = list_images(Path(args.images))
        masks = list_images(Path(args.masks)) if args.masks else {}
        missing = [images[s] for s in images if args.masks and s not in masks]
        if missing:
            raise DataError(f"{missing[0]} has no mask in {args.masks} (masks pair with images by basename)")
        return [(images[s], masks.get(s)) for s in images]
    train_args = checkpoint.get("args", {})
    run_dir = Path(train_args["run_dir"]) if train_args.get("run_dir") else None
    if run_dir is not None and (run_dir / "split.json").is_file():
        names = json.loads((run_dir / "split.json").read_text())["val"]
    elif run_dir is not None and (run_dir / "evaluation_report.json").is_file():  # runs from before split.json
        names = json.loads((run_dir / "evaluation_report.json").read_text())["validation_images"]
    else:
        raise SystemExit("give --images (this checkpoint's run has no validation list to fall back on)")
    masks = list_images(Path(train_args["val_masks"] or train_args["masks"]))
    return [(Path(p), masks.get(Path(p).stem)) for p in names]


class Segmented(NamedTuple):
    path: Path
    image: np.ndarray  # as read
    mask: np.ndarray | None  # the true mask, when there is one
    features: np.ndarray  # the network's input (C, H, W)
    probability: np.ndarray
    labels: np.ndarray  # granule ids, 0 = background


def segment(model, pairs, features: str, tile, overlap, threshold, min_size, ctx, skipped, cache_dir=None):
    """Each readable image segmented by tiled inference, with a bar over the images; an image that cannot be read
    is named on the console and in `skipped`, and the others go on. cache_dir: the features from training's cache
    (float16, as training validated), not computed again."""
    for image_path, mask_path in tqdm(pairs, desc="images", disable=len(pairs) < 2):
        try:
            image = read_image(image_path)
            mask = read_mask(mask_path, image.shape, image_path) if mask_path else None
        except DataError as error:
            tqdm.write(f"skipped: {error}")
            skipped.append(str(error))
            continue
        if cache_dir is None:
            stack = compute_features(image, features)
        else:
            stack = np.load(load_features(image_path, features, cache_dir), mmap_mode="r")
        probability = predict_probability(model, stack, tile, overlap, ctx=ctx, progress=True)
        labels = granules_from_probability(probability, threshold, min_size)
        yield Segmented(image_path, image, mask, stack, probability, labels)


def figure_row(item: Segmented) -> dict:
    """One row of data.plot_predictions."""
    name, image, mask = item.path.stem, np.asarray(item.features[0], np.float32), item.mask
    return {"name": name, "image": image, "mask": mask, "probability": item.probability, "labels": item.labels}


def otsu_labels(image: np.ndarray, min_size: int) -> np.ndarray:
    """The classical baseline: Otsu's threshold on the percentile-normalised image, objects of at least min_size
    pixels."""
    normalized = percentile_normalize(image, 1.0, 99.8)
    binary = (normalized > threshold_otsu(normalized)).astype(np.float32)
    return granules_from_probability(binary, 0.5, min_size)


def write_run_report(model, checkpoint: dict, run_dir: Path, pairs, ctx, args) -> Path:
    """The run's evaluation_report.json (the best model's scores on the validation images beside Otsu's) and
    validation_predictions.png of the first four images. The features come from the run's cache, so the scores
    are those of the best epoch's validation."""
    model_scores, otsu = GranuleScores(min_size=args.min_size), GranuleScores(min_size=args.min_size)
    rows, skipped = [], []
    train_args = checkpoint["args"]
    settings = (train_args["features"], args.tile_size, args.overlap, args.threshold, args.min_size, ctx, skipped)
    for item in segment(model, pairs, *settings, Path(train_args["cache_dir"])):
        model_scores.update(item.labels, item.mask)
        otsu.update(otsu_labels(item.image, args.min_size), item.mask)
        if len(rows) < 4:
            rows.append(figure_row(item))
    if skipped:
        raise SystemExit(f"the validation images must all be readable: {skipped[0]}")
    report = {
        "selection_metric": train_args["selection_metric"],
        "best_epoch": checkpoint["epoch"],
        "validation_images": [str(p) for p, _ in pairs],
        "model": model_scores.compute(),
        "otsu_baseline": otsu.compute(),
    }
    write_json(run_dir / "evaluation_report.json", report)
    plot_predictions(rows, run_dir / "validation_predictions.png")
    print(f"wrote {run_dir / 'evaluation_report.json'} and validation_predictions.png")
    return run_dir


def measure(labels: np.ndarray, image: np.ndarray, name: str, pixel_size: float | None) -> list[dict]:
    props = regionprops_table(
        labels,
        intensity_image=image.astype(np.float64),
        properties=("label", "area", "centroid", "intensity_mean", "intensity_max"),
    )
    rows = []
    for i in range(len(props["label"])):
        row = {"image": name, "granule_id": int(props["label"][i]), "area_px": int(props["area"][i])}
        if pixel_size:
            row["area_um2"] = props["area"][i] * pixel_size**2
        row.update(
            centroid_y=props["centroid-0"][i],
            centroid_x=props["centroid-1"][i],
            mean_intensity=props["intensity_mean"][i],
            max_intensity=props["intensity_max"][i],
        )
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def main(args):
    if args.tile_size % 16 or not 0 <= args.overlap < args.tile_size:
        raise SystemExit(
            f"--tile_size {args.tile_size} must be a multiple of 16 and --overlap {args.overlap} smaller than it"
        )
    device = pick_device()
    ctx, _ = mixed_precision(device, args.use_mixed_precision)
    checkpoint_path = find_checkpoint(args.checkpoint)
    model, checkpoint = load_checkpoint(checkpoint_path, device)
    if args.run_report and args.images:
        raise SystemExit("--run_report scores the run's own validation images: leave out --images")
    pairs = image_list(args, checkpoint)
    if args.run_report:
        return write_run_report(model, checkpoint, checkpoint_path.parent, pairs, ctx, args)
    out_dir = new_folder(Path(args.output_dir) if args.output_dir else checkpoint_path.parent, "predictions")
    (out_dir / "masks").mkdir()
    started = time.time()
    granule_rows, summary_rows = [], []
    scores, skipped = GranuleScores(min_size=args.min_size), []
    settings = (checkpoint["args"]["features"], args.tile_size, args.overlap, args.threshold, args.min_size, ctx)
    for image_path, image, mask, _, _, labels in segment(model, pairs, *settings, skipped):
        tifffile.imwrite(
            out_dir / "masks" / f"{image_path.stem}.tif", ((labels > 0) * 255).astype(np.uint8), compression="zlib"
        )
        rows = measure(labels, image, image_path.name, args.pixel_size)
        granule_rows += rows
        summary = {
            "image": image_path.name,
            "granules": len(rows),
            "mean_area_px": float(np.mean([r["area_px"] for r in rows])) if rows else 0.0,
            "area_fraction": float((labels > 0).mean()),
        }
        if args.pixel_size:
            summary["mean_area_um2"] = summary["mean_area_px"] * args.pixel_size**2
        if mask is not None:
            single = GranuleScores(min_size=args.min_size)
            single.update(labels, mask)
            scores.update(labels, mask)
            result = single.compute()
            summary.update(
                true_granules=result["object"]["tp"] + result["object"]["fn"],
                dice=result["pixel"]["dice"],
                granule_f1=result["object"]["f1"],
            )
        summary_rows.append(summary)
        tqdm.write(f"{image_path.name}: {len(rows)} granules")
    area_columns = ["area_px", "area_um2"] if args.pixel_size else ["area_px"]
    write_csv(
        out_dir / "granules.csv",
        granule_rows,
        ["image", "granule_id", *area_columns, "centroid_y", "centroid_x", "mean_intensity", "max_intensity"],
    )
    write_csv(out_dir / "image_summary.csv", summary_rows, list(dict.fromkeys(k for r in summary_rows for k in r)))
    report = {
        "checkpoint": str(checkpoint_path.resolve()),
        "images": len(pairs),
        "threshold": args.threshold,
        "min_size": args.min_size,
        "pixel_size_um": args.pixel_size,
        "tile_size": args.tile_size,
        "overlap": args.overlap,
        "granules": len(granule_rows),
        "granules_per_image": len(granule_rows) / max(len(summary_rows), 1),
        "masks_folder": str(out_dir / "masks"),
        "granules_csv": str(out_dir / "granules.csv"),
    }
    if any(mask_path for _, mask_path in pairs):
        report.update(scores.compute())
        print(
            f"pixel Dice {report['pixel']['dice']:.4f}  granule F1 {report['object']['f1']:.4f} "
            f"(precision {report['object']['precision']:.4f}, recall {report['object']['recall']:.4f})"
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
    add("checkpoint", help="a run folder (its best_model.pth) or a .pth file")
    add("--images", help="folder of images; without it, the run's validation images")
    add("--masks", help="folder of masks with the same basenames: adds scores")
    add("--pixel_size", "--pixel-size", type=float, help="pixel size in micrometres: adds areas in um^2")
    add("--threshold", type=float, default=0.5, help="granule probability threshold")
    add("--min_size", "--min-size", type=int, default=15, help="smallest granule in pixels")
    add("--tile_size", "--tile-size", type=int, default=256, help="inference tile, multiple of 16")
    add("--overlap", type=int, default=64, help="overlap of neighbouring tiles in px")
    add("--output_dir", "--output-dir", help="a new predictions_<timestamp> folder is made in here; without it, the "
        "checkpoint's folder")  # fmt: skip
    flag = argparse.BooleanOptionalAction
    add("--use_mixed_precision", action=flag, help="autocast (bf16, or fp16 on older GPUs and MPS); on for CUDA")
    add("--use-mixed-precision", dest="use_mixed_precision", action=flag, help=argparse.SUPPRESS)  # hidden twin
    add("--run_report", "--run-report", action="store_true",
        help="write the run's evaluation_report.json and validation_predictions.png, see above")  # fmt: skip
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Autocast is on where train.py turns it on by default: CUDA."""
    parser = get_args_parser()
    parser.set_defaults(use_mixed_precision=pick_device().type == "cuda")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
