"""Figures for CellSAM experiments: stage 1 boxes, stage 2 masks, loss curves, fold and search summaries.

    python cellsam/visualize.py boxes output/my_cells [--fold 2]      # CellFinder's boxes vs the true ones
    python cellsam/visualize.py masks output/my_cells                 # SAM's masks from the true boxes, overlaid
    python cellsam/visualize.py curves output/my_cells                # each loss term per epoch, both stages
    python cellsam/visualize.py summary output/my_cells               # metrics per fold (bar chart)
    python cellsam/visualize.py summary output/my_cells_search        # F1 per trial of a search

Figures go to <folder>/figures/<kind>_<timestamp>.png (or --output_dir); earlier figures are never overwritten.
The whole pipeline's predictions on the held-out images are drawn during training, in results/fold_X/visualizations/.
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
import torch

from cellsam.data import boxes_from_mask, find_pairs
from cellsam.evaluate import load_fold
from cellsam.model import detect_tiled, window_size
from cellsam.train import read_pair, true_box_masks
from cellsam.utils import TrainingVisualizer, read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def save(fig, folder: Path, name: str) -> Path:
    path = TrainingVisualizer(folder).save(fig, f"{name}_{time.strftime('%Y%m%d_%H%M%S')}")
    print(f"wrote {path}")
    return path


def held_out(experiment: Path, fold: int, config, n: int):
    results = json.loads((experiment / "results" / "individual_results.json").read_text())
    names = next((r["val_images"] or r["train_images"] for r in results if r["fold"] == fold), [])
    return [p for p in find_pairs(config.img_path, config.mask_path) if p.name in names][:n]


@torch.no_grad()
def plot_boxes_or_masks(args) -> Path:
    """boxes: the boxes the pipeline keeps on whole images (tiled as it tiles them); masks: SAM's masks from the
    true boxes on each image's first window."""
    experiment = Path(args.experiment)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, config = load_fold(experiment, args.fold, device)
    panels = []
    for pair in held_out(experiment, args.fold, config, args.n):
        image, truth = read_pair(pair, config.gamma, model.read_image)
        if args.command == "boxes":
            boxes, scores = detect_tiled(model, image, device=device)
            keep = model.kept_boxes(scores, config.stage1_config.score_threshold)  # the boxes the pipeline keeps
            panels.append((image, boxes_from_mask(truth)[1], boxes[keep].numpy(), pair.name))
        else:
            window = window_size(model)
            image, truth = image[:window, :window], truth[:window, :window]
            panels.append((image, true_box_masks(model, image, boxes_from_mask(truth)[1], device), truth, pair.name))
    figures = TrainingVisualizer(Path(args.output_dir or experiment / "figures"))
    stamp = f"{args.command}_{time.strftime('%Y%m%d_%H%M%S')}"
    path = figures.boxes(panels, stamp) if args.command == "boxes" else figures.masks(panels, stamp)
    print(f"wrote {path}")
    return path


def plot_curves(args) -> Path:
    """Every loss term per epoch of both stages (train solid, validation dashed), one panel per stage and fold."""
    experiment = Path(args.experiment)
    stages = {}
    for stage in (1, 2):
        path = experiment / "metrics" / f"stage{stage}_metrics.json"
        if not path.is_file():
            raise SystemExit(f"{path}: missing (give output/<name> of cellsam/train.py)")
        rows = read_metrics(path)
        for fold in sorted({r.get("fold", 1) for r in rows}):
            stages[f"stage {stage}, fold {fold}"] = [r for r in rows if r.get("fold", 1) == fold]
    figures = TrainingVisualizer(Path(args.output_dir or experiment / "figures"))
    path = figures.loss_components(stages, f"curves_{time.strftime('%Y%m%d_%H%M%S')}")
    print(f"wrote {path}")
    return path


def plot_summary(args) -> Path:
    folder = Path(args.experiment)
    search = folder / "search_results.csv"
    if search.is_file():
        table = pd.read_csv(search)
        fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(table)), 4))
        colours = ["tab:blue" if s == "complete" else "tab:red" for s in table["state"]]
        ax.bar(table["study"].str.replace("cellsam_", "") + " " + table["trial"].astype(str), table["f1"].fillna(0),
               color=colours)  # fmt: skip
        ax.set_xlabel("study and trial (red: failed or pruned)")
        ax.set_ylabel("validation F1 at IoU 0.5")
    else:
        results_file = folder / "results" / "individual_results.json"
        if not results_file.is_file():
            raise SystemExit(f"{folder}: neither a search (search_results.csv) nor an experiment (results/)")
        folds = [r for r in json.loads(results_file.read_text()) if "metrics" in r]
        if not folds:
            raise SystemExit(f"{results_file}: no fold has validation metrics (full_dataset?)")
        keys = ["f1", "precision", "recall", "pq"]
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / (len(folds) + 1)
        for i, fold in enumerate(folds):
            ax.bar(
                np.arange(4) + i * width, [fold["metrics"][k] or 0 for k in keys], width, label=f"fold {fold['fold']}"
            )
        baseline = np.mean([[f["metrics"]["baseline_otsu_watershed"][k] or 0 for k in keys] for f in folds], 0)
        ax.bar(np.arange(4) + len(folds) * width, baseline, width, color="grey", label="Otsu + watershed")
        ax.set_xticks(np.arange(4) + 0.4 - width / 2, keys)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    ax.set_title(folder.name)
    return save(fig, Path(args.output_dir or folder / "figures"), "summary")


def main(args) -> Path:
    if args.command in ("boxes", "masks"):
        return plot_boxes_or_masks(args)
    return {"curves": plot_curves, "summary": plot_summary}[args.command](args)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=["boxes", "masks", "curves", "summary"], help="which figure")
    p.add_argument("experiment", help="output/<name> of cellsam/train.py (summary: or a search folder)")
    p.add_argument("--fold", type=int, default=1, help="boxes, masks: which fold's models and held-out images [1]")
    p.add_argument("--n", type=int, default=3, help="boxes, masks: how many images [3]")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", help="[FOLDER/figures]")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
