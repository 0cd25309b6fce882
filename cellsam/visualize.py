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
from skimage.segmentation import find_boundaries

from cellsam.data import boxes_from_mask, find_pairs
from cellsam.evaluate import load_fold
from cellsam.model import decode_masks, encode
from cellsam.train import read_pair

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def save(fig, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{time.strftime('%Y%m%d_%H%M%S')}"
    path, attempt = folder / f"{stem}.png", 1
    while path.exists():
        attempt += 1
        path = folder / f"{stem}_{attempt}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return path


def held_out(experiment: Path, fold: int, config, n: int):
    results = json.loads((experiment / "results" / "individual_results.json").read_text())
    names = next((r["val_images"] or r["train_images"] for r in results if r["fold"] == fold), [])
    return [p for p in find_pairs(config.img_path, config.mask_path) if p.name in names][:n]


@torch.no_grad()
def plot_boxes_or_masks(args) -> Path:
    experiment = Path(args.experiment)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, config = load_fold(experiment, args.fold, device)
    pairs = held_out(experiment, args.fold, config, args.n)
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 5), squeeze=False)
    for ax, pair in zip(axes[0], pairs, strict=True):
        image, truth = read_pair(pair, config.gamma, model.read_image)
        boxes, scores, (h, w) = model.detect(image, device)
        image, truth = image[:h, :w], truth[:h, :w]  # the first window, as the model sees it
        _, true_boxes = boxes_from_mask(truth)
        shown = image / 255
        if args.command == "boxes":
            keep = model.kept_boxes(scores, config.stage1.score_threshold)  # the boxes the pipeline keeps
            ax.imshow(shown)
            for colour, drawn in (("lime", true_boxes), ("red", boxes[keep].numpy())):
                for x0, y0, x1, y1 in drawn:
                    ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour, lw=0.8))
            ax.set_title(f"{pair.name}: {len(true_boxes)} true (green), {int(keep.sum())} found (red)", fontsize=9)
        else:
            masks = true_box_masks(model, image, true_boxes, device)
            overlay = shown.copy()
            colours = np.random.default_rng(0).uniform(0.2, 1, (len(masks), 3))
            for mask, colour in zip(masks, colours, strict=True):
                overlay[mask] = 0.5 * overlay[mask] + 0.5 * colour
            overlay[find_boundaries(truth, mode="inner")] = (0, 1, 0)
            ax.imshow(overlay)
            ax.set_title(f"{pair.name}: SAM masks from the true boxes (true outlines green)", fontsize=9)
        ax.axis("off")
    return save(fig, Path(args.output_dir or experiment / "figures"), args.command)


def true_box_masks(model, image: np.ndarray, true_boxes: np.ndarray, device) -> np.ndarray:
    """The masks the model draws from the true boxes, (K, h, w) bool: the published CellSAM as cellSAM runs it
    with given boxes (masks of low predicted IoU dropped), this folder's model on the window padded to SAM's
    input."""
    if model.architecture == "published":
        from cellsam.published import predict

        labels = predict(model, image / 255, true_boxes, device)[0]
        return np.array([labels == k for k in range(1, labels.max() + 1)]).reshape(-1, *image.shape[:2])
    sam, size = model.mask_sam, model.input_size
    padded = np.zeros((size, size, 3), np.float32)
    padded[: image.shape[0], : image.shape[1]] = image
    _, embedding = encode(sam, torch.from_numpy(padded.transpose(2, 0, 1))[None].to(device))
    logits, _ = decode_masks(sam, embedding, torch.from_numpy(true_boxes).to(device))
    masks = torch.nn.functional.interpolate(logits[:, None], size=(size, size), mode="bilinear")[:, 0] > 0
    return masks.cpu().numpy()[:, : image.shape[0], : image.shape[1]]


def plot_curves(args) -> Path:
    experiment = Path(args.experiment)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, stage in zip(axes, (1, 2), strict=True):
        path = experiment / "metrics" / f"stage{stage}_metrics.json"
        if not path.is_file():
            raise SystemExit(f"{path}: missing (give output/<name> of cellsam/train.py)")
        for fold, history in json.loads(path.read_text()).items():
            epochs = [h["epoch"] for h in history]
            for key in history[0]["train"]:
                if key == "mask_iou":
                    continue
                line = ax.plot(epochs, [h["train"][key] for h in history], label=f"{fold} train {key}")[0]
                if history[0]["val"]:
                    ax.plot(
                        epochs,
                        [h["val"][key] for h in history],
                        "--",
                        color=line.get_color(),
                        label=f"{fold} val {key}",
                    )
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(f"stage {stage}: " + ("CellFinder (focal, L1, GIoU)" if stage == 1 else "SAM masks (focal, Dice)"))
        ax.legend(fontsize=6, ncol=2)
    return save(fig, Path(args.output_dir or experiment / "figures"), "curves")


def plot_summary(args) -> Path:
    folder = Path(args.experiment)
    search = folder / "search_results.csv"
    if search.is_file():
        table = pd.read_csv(search)
        fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(table)), 4))
        colours = ["tab:blue" if s == "finished" else "tab:red" for s in table["status"]]
        ax.bar(table["trial"].astype(str), table["f1"].fillna(0), color=colours)
        ax.set_xlabel("trial (red: failed)")
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
