"""Figures for stress-granule runs: training history, predictions, granule sizes.

    python stress_granules/visualize.py history metrics/<run>
    python stress_granules/visualize.py predictions metrics/<run>                  # 4 random test images
    python stress_granules/visualize.py predictions metrics/<run> --images DIR --masks DIR --names cell_003 cell_010
    python stress_granules/visualize.py sizes metrics/<run>/predictions_<timestamp>/granules.csv

history:     training loss (and its terms), validation Dice and granule F1, learning rate per epoch.
predictions: image / ground truth / prediction / probability map / overlay, one row per image.
sizes:       histogram of granule areas (um^2 when the CSV has them), overall and per image.
Figures are written beside their input with a timestamp in the name, never over an earlier one.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import json
import time

import matplotlib
import numpy as np
import pandas as pd

from stress_granules.data import HelpFormatter, list_images, plot_history, plot_predictions
from stress_granules.evaluate import figure_row, image_list, run_settings, segment
from stress_granules.model import find_checkpoint, load_checkpoint, pick_device

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def figure_path(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{time.strftime('%Y%m%d_%H%M%S')}"
    path, attempt = folder / f"{stem}.png", 1
    while path.exists():
        attempt += 1
        path = folder / f"{stem}_{attempt}.png"
    return path


def show_history(args) -> Path:
    history_path = Path(args.run) / "training_history.json"
    if not history_path.is_file():
        raise SystemExit(f"{args.run}: no training_history.json (not a stress_granules run folder?)")
    path = figure_path(Path(args.run) / "figures", "history")
    plot_history(json.loads(history_path.read_text()), path)
    print(f"wrote {path}")
    return path


def show_predictions(args) -> Path:
    checkpoint_path = find_checkpoint(args.run)
    device = pick_device()
    model, checkpoint = load_checkpoint(checkpoint_path, device)
    if args.images:
        images = list_images(Path(args.images))
        masks = list_images(Path(args.masks)) if args.masks else {}
        pairs = [(images[s], masks.get(s)) for s in images]
    else:
        pairs, _ = image_list(argparse.Namespace(images=None, masks=None, split=args.split), checkpoint,
                              checkpoint_path.parent)  # fmt: skip
    if args.names:
        wanted = set(args.names)
        pairs = [p for p in pairs if p[0].stem in wanted]
        if not pairs:
            raise SystemExit(f"none of {sorted(wanted)} among the images")
    else:
        rng = np.random.default_rng(args.seed)
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), min(args.n, len(pairs)), replace=False))]
    overrides = argparse.Namespace(channel=None, z_projection=None, tile_size=None, overlap=None,
                                   threshold=args.threshold, min_size=args.min_size, split_touching=None)  # fmt: skip
    prep, settings = run_settings(overrides, checkpoint)
    skipped = []
    found = segment(model, pairs, prep, settings, None, skipped)
    rows = [figure_row(item) for item in found]
    if not rows:
        raise SystemExit(f"none of the images could be read: {skipped[0]}")
    path = plot_predictions(rows, figure_path(checkpoint_path.parent / "figures", "predictions"))
    print(f"wrote {path}")
    return path


def show_sizes(args) -> Path:
    csv_path = Path(args.csv)
    if csv_path.is_dir():
        csv_path = csv_path / "granules.csv"
    if not csv_path.is_file():
        raise SystemExit(f"{csv_path}: no granules.csv (written by stress_granules/evaluate.py)")
    table = pd.read_csv(csv_path)
    sized = "area_um2" in table and table["area_um2"].notna().all() and len(table)  # every image had a pixel size
    column, unit = ("area_um2", "um^2") if sized else ("area_px", "px")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    if len(table):
        axes[0].hist(table[column], bins=min(50, max(5, len(table) // 5)), color="tab:orange")
        table.boxplot(column=column, by="image", ax=axes[1], rot=90, fontsize=7)
    axes[0].set_xlabel(f"granule area ({unit})")
    axes[0].set_ylabel("granules")
    axes[0].set_title(f"{len(table)} granules in {table['image'].nunique()} images")
    axes[1].set_title("per image")
    axes[1].set_ylabel(f"area ({unit})")
    fig.suptitle("")
    fig.tight_layout()
    path = figure_path(csv_path.parent, "granule_sizes")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def main(args):
    return {"history": show_history, "predictions": show_predictions, "sizes": show_sizes}[args.command](args)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, add_help=add_help)
    sub = p.add_subparsers(dest="command", required=True)
    history = sub.add_parser("history", help="training curves of a run", formatter_class=HelpFormatter)
    history.add_argument("run", help="run folder")
    pred = sub.add_parser("predictions", help="image / truth / prediction / probability / overlay grid",
                          formatter_class=HelpFormatter)  # fmt: skip
    pred.add_argument("run", help="run folder or checkpoint")
    pred.add_argument("--images", help="folder of images; without it, the run's --split images")
    pred.add_argument("--split", choices=["test", "val"], default="test", help="the run's test or validation images")
    pred.add_argument("--masks", help="their masks (optional)")
    pred.add_argument("--names", nargs="+", help="basenames to show; without them, --n random ones")
    pred.add_argument("--n", type=int, default=4, help="random images to show")
    pred.add_argument("--seed", type=int, default=0, help="which random images")
    pred.add_argument("--threshold", type=float, help="granule probability threshold; without it, the run's")
    pred.add_argument("--min_size", "--min-size", type=int, help="smallest granule in pixels; without it, the run's")
    sizes = sub.add_parser("sizes", help="granule size histogram from granules.csv", formatter_class=HelpFormatter)
    sizes.add_argument("csv", help="granules.csv or the predictions folder holding it")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
