"""Figures for PanNuke runs: predictions, the dataset, and a comparison of runs.

    python pannuke/visualize.py                                  # the newest run's predictions on its test fold
    python pannuke/visualize.py dataset                          # the folds in data/pannuke
    python pannuke/visualize.py predictions runs/pannuke/<run> --fold 2 --n 8 --tta
    python pannuke/visualize.py dataset runs/pannuke/<run>       # the folds that run used (or --data_dir DATA)
    python pannuke/visualize.py compare runs/pannuke/<run1> runs/pannuke/<run2> ...

predictions: a grid per tile of image / ground truth / prediction / predicted nuclei outlined on the image.
dataset:     nuclei per class in each fold, nuclei per class and tissue, tiles per tissue, and sample tiles.
compare:     training curves of several runs in one figure, and a table (CSV and Markdown) of their best scores
             (with mPQ / bPQ where a run has been evaluated).
Figures go to <run>/figures/ (compare: runs/pannuke/comparisons/<timestamp>_compare/), timestamped. A run's
curves.png (losses, validation Dice per class, learning rate) is drawn by train.py with plot_curves after each epoch.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import csv
import json
import os
import time

import matplotlib
import numpy as np
import torch

from common.metrics import PANNUKE_CLASSES
from pannuke.data import (
    CLASS_COLORS,
    CLASS_NAMES,
    DEFAULT_DATA_DIR,
    HelpFormatter,
    PanNukeDataset,
    load_fold,
    new_folder,
    overlay,
    to_display,
)
from pannuke.model import find_checkpoint, instances_from_outputs, load_checkpoint, pick_device, predict

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COMMANDS = ("predictions", "dataset", "compare")


def newest_run(runs_dir: Path) -> Path:
    runs = sorted(runs_dir.glob("*/best.pth"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit(f"no trained run (a folder with best.pth) in {runs_dir}; give a run folder or checkpoint")
    return runs[-1]


def save(fig, folder: Path, name: str) -> Path:
    """Save as folder/<name>_<timestamp>.png, never over an existing figure."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"
    path, attempt = folder / f"{stem}.png", 1
    while path.exists():
        attempt += 1
        path = folder / f"{stem}_{attempt}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return path


def run_config(run: Path) -> dict:
    config = run / "config.json"
    if not config.is_file():
        raise SystemExit(f"{run} is not a pannuke run folder (no config.json)")
    return json.loads(config.read_text())


@torch.no_grad()
def plot_predictions(args) -> Path:
    checkpoint_path = find_checkpoint(args.run) if args.run else newest_run(Path(args.runs_dir))
    device = pick_device()
    model, checkpoint = load_checkpoint(checkpoint_path, device)
    train_args = checkpoint.get("args", {})
    fold_number = args.fold or train_args.get("test_fold", 3)
    data_dir = args.data_dir or train_args.get("data_dir")
    fold = load_fold(data_dir, fold_number, args.cache_dir or train_args.get("cache_dir") or "runs/pannuke/cache")
    # Tiles with the most nuclei classes first: the figure shows the classes, not empty stroma.
    classes_per_tile = [len(np.unique(fold.semantic[i])) for i in range(len(fold))]
    picked = np.argsort(classes_per_tile, kind="stable")[::-1][: args.n]
    batch = [PanNukeDataset(fold)[int(i)] for i in picked]
    probs, distance = predict(model, torch.stack([b["image"] for b in batch]).to(device), tta=args.tta)
    fig, axes = plt.subplots(len(picked), 4, figsize=(12, 3 * len(picked)), squeeze=False)
    raw = np.load(fold.files.images, mmap_mode="r")
    for row, index in enumerate(picked):
        image = to_display(raw[index])
        instances, classes = instances_from_outputs(probs[row].cpu().numpy(), distance[row, 0].cpu().numpy())
        predicted = np.concatenate([[0], classes])[instances]
        truth = np.asarray(fold.semantic[index])
        panels = [
            (image, f"{fold.types[index]} (tile {index})"),
            (CLASS_COLORS[truth], "ground truth"),
            (CLASS_COLORS[predicted], f"prediction ({len(classes)} nuclei)"),
            (overlay(image, predicted, instances), "overlay"),
        ]
        for ax, (picture, title) in zip(axes[row], panels, strict=True):
            ax.imshow(picture)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=CLASS_COLORS[c] / 255) for c in range(1, 6)]
    fig.legend(handles, PANNUKE_CLASSES, loc="lower center", ncol=5, frameon=False)
    return save(fig, checkpoint_path.parent / "figures", f"predictions_fold{fold_number}")


def nuclei_per_class(fold) -> np.ndarray:
    """(N, 5) number of nuclei of each class in each tile, from the cached instance and semantic maps."""
    counts = np.zeros((len(fold), 5), dtype=np.int64)
    for i in range(len(fold)):
        semantic, instances = np.asarray(fold.semantic[i]), np.asarray(fold.instances[i])
        inside = instances > 0
        pairs = np.unique(instances[inside].astype(np.int64) * 8 + semantic[inside])
        counts[i] = np.bincount(pairs % 8, minlength=6)[1:6]
    return counts


def plot_dataset(args) -> Path:
    if args.run:
        config = run_config(Path(args.run))
        data_dir = args.data_dir or config["data_dir"]
        cache_dir = args.cache_dir or config.get("cache_dir")
        out_dir = Path(args.run) / "figures"
    else:
        data_dir, cache_dir = args.data_dir or DEFAULT_DATA_DIR, args.cache_dir  # where train.py looks too
        if not Path(data_dir).is_dir():
            raise SystemExit(f"no PanNuke folder at {data_dir}: give a run folder or --data_dir")
        out_dir = Path(args.output_dir or "runs/pannuke/figures")
    cache_dir = cache_dir or "runs/pannuke/cache"
    folds = {k: load_fold(data_dir, k, cache_dir) for k in args.folds}
    counts = {k: nuclei_per_class(fold) for k, fold in folds.items()}
    tissues = sorted({t for fold in folds.values() for t in fold.types})
    colors = CLASS_COLORS[1:] / 255

    # Left: per class and fold. Right: one panel per fold, nuclei per class in each tissue (tiles in brackets).
    rows = max(2, len(folds))
    fig, axes = plt.subplots(rows, 2, figsize=(17, 3.6 * rows), gridspec_kw={"width_ratios": [1, 3]}, squeeze=False)
    width = 0.8 / len(folds)
    for j, (k, c) in enumerate(counts.items()):
        axes[0, 0].bar(np.arange(5) + j * width, c.sum(0), width, label=f"fold {k} ({len(folds[k])} tiles)")
        axes[1, 0].bar(np.arange(5) + j * width, (c > 0).mean(0), width, label=f"fold {k}")
    titles = ("nuclei per class and fold", "share of tiles where the class is present")
    for ax, title in zip(axes[:2, 0], titles, strict=True):
        ax.set_xticks(np.arange(5) + width * (len(folds) - 1) / 2, PANNUKE_CLASSES, rotation=30)
        ax.set_title(title)
    axes[0, 0].legend(fontsize=8)
    for ax in axes[2:, 0]:
        ax.axis("off")
    for j, (k, fold) in enumerate(folds.items()):
        per_tissue = np.array([counts[k][fold.types == tissue].sum(0) for tissue in tissues]).reshape(-1, 5)
        labels = [f"{tissue} ({int((fold.types == tissue).sum())})" for tissue in tissues]
        bottom = np.zeros(len(tissues))
        for c in range(5):
            axes[j, 1].bar(labels, per_tissue[:, c], bottom=bottom, color=colors[c], label=PANNUKE_CLASSES[c])
            bottom += per_tissue[:, c]
        axes[j, 1].set_title(f"fold {k}: nuclei per class and tissue (tiles)", fontsize=10)
        axes[j, 1].tick_params(axis="x", rotation=60, labelsize=7)
    axes[0, 1].legend(fontsize=8)
    for ax in axes[len(folds) :, 1]:
        ax.axis("off")
    fig.tight_layout()
    written = save(fig, out_dir, "dataset")

    fold = next(iter(folds.values()))
    rng = np.random.default_rng(0)
    picked = rng.choice(len(fold), size=min(args.n, len(fold)), replace=False)
    raw = np.load(fold.files.images, mmap_mode="r")
    fig, axes = plt.subplots(2, len(picked), figsize=(3 * len(picked), 6), squeeze=False)
    for col, index in enumerate(picked):
        image = to_display(raw[index])
        axes[0, col].imshow(image)
        axes[0, col].set_title(str(fold.types[index]), fontsize=9)
        axes[1, col].imshow(overlay(image, np.asarray(fold.semantic[index]), np.asarray(fold.instances[index])))
        axes[1, col].set_title(
            ", ".join(f"{n} {CLASS_NAMES[c + 1][:4]}" for c, n in enumerate(counts[fold.files.fold][index]) if n),
            fontsize=7,
        )
        for ax in axes[:, col]:
            ax.axis("off")
    save(fig, out_dir, "dataset_samples")
    return written


@torch.no_grad()
def prediction_strips(model, fold, device, ctx, n: int = 3) -> np.ndarray:
    """(n, H, 3W, 3) uint8: the CLAHE'd image | ground-truth classes | predicted classes of the first n tiles."""
    model.eval()
    tiles = PanNukeDataset(fold)
    picked = range(min(n, len(fold)))
    probs, _ = predict(model, torch.stack([tiles[i]["image"] for i in picked]).to(device), ctx=ctx)
    predicted = probs.argmax(1).cpu().numpy()
    rows = [(fold.images[i], CLASS_COLORS[fold.semantic[i]], CLASS_COLORS[predicted[k]]) for k, i in enumerate(picked)]
    return np.stack([np.concatenate(row, axis=1) for row in rows])


def plot_curves(history: list, path: Path) -> None:
    """curves.png of one run, redrawn by train.py after each epoch: losses, validation Dice per class, lr."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, [h["train"]["loss"] for h in history], label="train")
    axes[0].plot(epochs, [h["val"]["loss"] for h in history], label="validation")
    axes[0].set_title("loss")
    for name in CLASS_NAMES[1:]:
        axes[1].plot(epochs, [h["val"]["dice"][name] for h in history], label=name, alpha=0.6)
    axes[1].plot(epochs, [h["val"]["fg_mean_dice"] for h in history], "k-", lw=2, label="mean (foreground)")
    axes[1].set_title("validation Dice")
    axes[2].plot(epochs, [h["lr"] for h in history])
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".tmp.png"), dpi=100)
    plt.close(fig)
    os.replace(path.with_suffix(".tmp.png"), path)


def plot_compare(args) -> Path:
    runs = [Path(r) for r in args.runs]
    rows, histories = [], {}
    for run in runs:
        config = run_config(run)
        history_path = run / "training_history.json"
        if not history_path.is_file():
            raise SystemExit(f"{run}: no training_history.json (has this run finished an epoch?)")
        history = json.loads(history_path.read_text())
        histories[run.name] = history
        best = max(history, key=lambda h: h["val"]["fg_mean_dice"])
        row = {
            "run": run.name,
            "recipe": config.get("recipe"),
            "epochs": len(history),
            "best_epoch": best["epoch"],
            "best_fg_mean_dice": best["val"]["fg_mean_dice"],
            "mpq": None,
            "bpq": None,
            "aji": None,
        }
        reports = sorted(run.glob("evaluation/*/evaluation_report.json"))
        if reports:
            report = json.loads(reports[-1].read_text())
            row.update(mpq=report["mpq"], bpq=report["bpq"], aji=report["aji"])
        rows.append(row)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for name, history in histories.items():
        epochs = [h["epoch"] for h in history]
        axes[0].plot(epochs, [h["train"]["loss"] for h in history], label=name)
        axes[1].plot(epochs, [h["val"]["loss"] for h in history], label=name)
        axes[2].plot(epochs, [h["val"]["fg_mean_dice"] for h in history], label=name)
    for ax, title in zip(axes, ("training loss", "validation loss", "validation Dice (fg mean)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    out_dir = new_folder(Path(args.output_dir) if args.output_dir else runs[0].parent / "comparisons", "compare")
    written = save(fig, out_dir, "compare_curves")
    with open(out_dir / "compare_table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    def cell(value):
        return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell(v) for v in row.values()) + " |" for row in rows]
    (out_dir / "compare_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return written


def main(args):
    return {"predictions": plot_predictions, "dataset": plot_dataset, "compare": plot_compare}[args.command](args)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    pred = command("predictions", "image / ground truth / prediction / overlay grid")
    pred.add_argument("run", nargs="?", help="run folder or checkpoint; unless given, the newest run in --runs_dir")
    pred.add_argument("--runs_dir", "--runs-dir", default="runs/pannuke", help="where to look for the newest run")
    pred.add_argument("--fold", type=int, help="fold to show; unless given, the run's --test_fold")
    pred.add_argument("--n", type=int, default=6, help="tiles to show")
    pred.add_argument("--tta", action="store_true", help="test-time augmentation: the 8 flips and quarter turns")
    data = command("dataset", "class distribution per fold and tissue, sample tiles")
    data.add_argument("run", nargs="?", help="a run folder: show the folds it used; unless given, data/pannuke")
    data.add_argument("--folds", type=int, nargs="+", default=[1, 2, 3], help="folds to count")
    data.add_argument("--n", type=int, default=6, help="sample tiles to show")
    data.add_argument("--output_dir", "--output-dir", help="where figures go without a run folder")
    comp = command("compare", "curves and best scores of several runs")
    comp.add_argument("runs", nargs="+", help="run folders")
    comp.add_argument("--output_dir", "--output-dir", help="a new timestamped folder is made in here; unless given, "
                      "in the comparisons/ folder next to the first run")  # fmt: skip
    for parser in (pred, data):
        parser.add_argument("--data_dir", "--data-dir", help="PanNuke folder; unless given, the run's")
        parser.add_argument("--cache_dir", "--cache-dir", help="fold cache; unless given, the run's")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """`visualize.py RUN` is short for `visualize.py predictions RUN`, and `visualize.py` alone for `visualize.py
    predictions` (the newest run's predictions, as the design document's visualize_predictions.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0] not in COMMANDS and not argv[0].startswith("-")):
        argv = ["predictions", *argv]
    return get_args_parser().parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
