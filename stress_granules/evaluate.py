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
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import csv
import json
import time

import numpy as np
import tifffile
from skimage.measure import regionprops_table

from stress_granules.data import DataError, compute_features, list_images, new_folder, read_image, read_mask
from stress_granules.model import (
    GranuleScores,
    find_checkpoint,
    granules_from_probability,
    load_checkpoint,
    pick_device,
    predict_probability,
)


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
    report = Path(train_args.get("run_dir", "")) / "evaluation_report.json"
    if not report.is_file():
        raise SystemExit("give --images (this checkpoint's run has no validation list to fall back on)")
    masks = list_images(Path(train_args["val_masks"] or train_args["masks"]))
    return [(Path(p), masks.get(Path(p).stem)) for p in json.loads(report.read_text())["validation_images"]]


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
    checkpoint_path = find_checkpoint(args.checkpoint)
    model, checkpoint = load_checkpoint(checkpoint_path, device)
    features = checkpoint["args"]["features"]
    pairs = image_list(args, checkpoint)
    out_dir = new_folder(Path(args.output_dir) if args.output_dir else checkpoint_path.parent, "predictions")
    (out_dir / "masks").mkdir()
    started = time.time()
    granule_rows, summary_rows = [], []
    scores, skipped = GranuleScores(min_size=args.min_size), []
    for image_path, mask_path in pairs:
        try:
            image = read_image(image_path)
            mask = read_mask(mask_path, image.shape, image_path) if mask_path else None
        except DataError as error:  # the other images are still measured; the run ends with an error
            print(f"skipped: {error}")
            skipped.append(str(error))
            continue
        probability = predict_probability(model, compute_features(image, features), args.tile_size, args.overlap)
        labels = granules_from_probability(probability, args.threshold, args.min_size)
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
        print(f"{image_path.name}: {len(rows)} granules")
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
    (out_dir / "evaluation_report.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out_dir}")
    if skipped:
        raise SystemExit(
            f"{len(skipped)} image(s) could not be read and were skipped (listed in "
            f"{out_dir / 'evaluation_report.json'}), e.g. {skipped[0]}"
        )
    return out_dir


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("checkpoint", help="a run folder (its best_model.pth) or a .pth file")
    add("--images", help="folder of images (default: the run's validation images)")
    add("--masks", help="folder of masks with the same basenames: adds scores")
    add("--pixel_size", "--pixel-size", type=float, help="pixel size in micrometres: adds areas in um^2")
    add("--threshold", type=float, default=0.5, help="granule probability threshold (0.5)")
    add("--min_size", "--min-size", type=int, default=15, help="smallest granule in pixels (15)")
    add("--tile_size", "--tile-size", type=int, default=256, help="inference tile, multiple of 16 (256)")
    add("--overlap", type=int, default=64, help="overlap of neighbouring tiles in px (64)")
    add(
        "--output_dir",
        "--output-dir",
        help="a new predictions_<timestamp> folder is made in here (default: the checkpoint's folder)",
    )
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
