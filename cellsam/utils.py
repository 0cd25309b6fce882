"""What train.py uses around its loop: memory (GPUMonitor), metrics per epoch (MetricsTracker), checkpoints
(CheckpointManager), early stopping (EarlyStopping), figures (TrainingVisualizer).

    from cellsam import GPUMonitor, MetricsTracker
    GPUMonitor().print_memory_summary("Training Start")
    tracker = MetricsTracker(save_dir="output/metrics")       # output/metrics/metrics.json
    tracker.update({"loss": 0.5, "f1": 0.8}, epoch=1)
    tracker.save_metrics()
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch


def write_json(path: Path, data) -> Path:
    """Atomically: a kill leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)
    return path


class GPUMonitor:
    """GPU memory of this process on CUDA (allocated, reserved by the caching allocator, peak, the card's total);
    where there is no GPU, the process's resident memory (current and peak), so a CPU run reports what it uses."""

    def __init__(self, device=None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)

    def memory(self) -> dict:
        """GiB: allocated, reserved, peak, total on CUDA; rss, peak_rss otherwise (empty where not measurable)."""
        gib = 2**30
        if self.device.type == "cuda":
            return {
                "allocated": torch.cuda.memory_allocated(self.device) / gib,
                "reserved": torch.cuda.memory_reserved(self.device) / gib,
                "peak": torch.cuda.max_memory_allocated(self.device) / gib,
                "total": torch.cuda.get_device_properties(self.device).total_memory / gib,
            }
        out = {}
        try:  # Linux
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            out["rss"] = pages * os.sysconf("SC_PAGE_SIZE") / gib
        except (OSError, ValueError, AttributeError):
            pass
        try:
            import resource
            import sys

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            out["peak_rss"] = peak / (gib if sys.platform == "darwin" else 2**20)
        except ImportError:  # Windows
            pass
        return out

    def summary(self) -> str:
        m = self.memory()
        if self.device.type == "cuda":
            return (f"GPU memory {m['allocated']:.2f} GiB allocated, {m['reserved']:.2f} reserved, "
                    f"peak {m['peak']:.2f} of {m['total']:.1f}")  # fmt: skip
        parts = [f"{m['rss']:.2f} GiB resident" if "rss" in m else "", f"peak {m['peak_rss']:.2f}" if "peak_rss" in m
                 else ""]  # fmt: skip
        return "process memory (no GPU) " + (", ".join(p for p in parts if p) or "not measurable here")

    def print_memory_summary(self, label: str = "") -> None:
        print(f"[{label}] {self.summary()}" if label else self.summary(), flush=True)


class MetricsTracker:
    """Metrics per epoch (and per fold, stage...: any keyword tags) in save_dir/NAME.json, a list of rows.
    Updating an epoch already there replaces it (a resumed run repeats no row); an existing file is read on start,
    so a resumed run carries on."""

    def __init__(self, save_dir, name: str = "metrics"):
        self.path = Path(save_dir) / f"{name}.json"
        self.rows = read_metrics(self.path) if self.path.is_file() else []

    def update(self, metrics: dict, epoch: int | None = None, **tags) -> None:
        key = {**tags, "epoch": epoch}
        self.rows = [r for r in self.rows if any(r.get(k) != v for k, v in key.items())]
        self.rows.append({**key, **metrics})

    def history(self, **tags) -> list[dict]:
        return [r for r in self.rows if all(r.get(k) == v for k, v in tags.items())]

    def save_metrics(self) -> Path:
        return write_json(self.path, self.rows)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics file; stage files of earlier versions ({"fold_1": [{"epoch", "train": {...}, "val":
    {...}}]}) are read as rows too."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        return data
    return [{"fold": int(fold.split("_")[-1]), **flat_row(h)} for fold, history in data.items() for h in history]


def flat_row(h: dict) -> dict:
    """A history row of an earlier version ({"epoch", "train": {...}, "val": {...}}) as this version writes it:
    epoch, train_<term>..., val_<term>..., seconds."""
    if "train" not in h:
        return h
    return {"epoch": h["epoch"], **{f"train_{k}": v for k, v in h["train"].items()},
            **{f"val_{k}": v for k, v in (h.get("val") or {}).items()}, "seconds": h.get("seconds")}  # fmt: skip


class EarlyStopping:
    """Stop after `patience` epochs without a lower loss than the best so far."""

    def __init__(self, patience: int):
        self.patience, self.best, self.bad_epochs = patience, math.inf, 0

    def step(self, loss: float) -> bool:
        """Records an epoch's loss; True when it is the best so far."""
        improved = loss < self.best
        self.best, self.bad_epochs = (loss, 0) if improved else (self.best, self.bad_epochs + 1)
        return improved

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs = state["best"], state.get("bad_epochs", state.get("patience", 0))


class CheckpointManager:
    """One stage's checkpoints in a fold folder, written atomically: best_model_s{stage}.pth (the trained modules'
    weights of the best epoch) and last_s{stage}.pth (also optimizer, scheduler, early stopping and history, for
    --resume). Checkpoints hold plain tensors and numbers and load with weights_only=True."""

    def __init__(self, folder, stage: int):
        self.folder = Path(folder)
        self.best_path = self.folder / f"best_model_s{stage}.pth"
        self.last_path = self.folder / f"last_s{stage}.pth"
        self.stage = stage

    @staticmethod
    def save(path: Path, checkpoint: dict) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
        return path

    def save_best(self, epoch: int, weights: dict) -> Path:
        return self.save(self.best_path, {"domain": "cellsam", "stage": self.stage, "epoch": epoch, "modules": weights})

    def save_last(self, checkpoint: dict) -> Path:
        return self.save(self.last_path, checkpoint)

    def load_last(self) -> dict | None:
        return torch.load(self.last_path, map_location="cpu", weights_only=True) if self.last_path.is_file() else None

    def load_best(self) -> dict | None:
        if not self.best_path.is_file():
            return None
        return torch.load(self.best_path, map_location="cpu", weights_only=True)["modules"]


class TrainingVisualizer:
    """Figures of one experiment folder: stage 1 boxes against the true ones, stage 2 masks, the pipeline's label
    image, loss curves and loss components. Each figure is a new PNG (name_2.png... where the name is taken)."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def save(self, fig, name: str) -> Path:
        import matplotlib.pyplot as plt

        self.folder.mkdir(parents=True, exist_ok=True)
        path, attempt = self.folder / f"{name}.png", 1
        while path.exists():
            attempt += 1
            path = self.folder / f"{name}_{attempt}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path

    @staticmethod
    def _figure(n: int):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, n, figsize=(5 * n, 5), squeeze=False)
        return fig, axes[0]

    def boxes(self, panels: list[tuple], name: str) -> Path:
        """panels: (image (H, W, 3) 0..255, true boxes (K, 4), found boxes (N, 4) xyxy px, title) each."""
        import matplotlib.pyplot as plt

        fig, axes = self._figure(len(panels))
        for ax, (image, true_boxes, found, title) in zip(axes, panels, strict=True):
            ax.imshow(np.clip(image / 255, 0, 1))
            for colour, drawn in (("lime", true_boxes), ("red", found)):
                for x0, y0, x1, y1 in np.asarray(drawn, float).reshape(-1, 4):
                    ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour, lw=0.8))
            ax.set_title(f"{title}: {len(true_boxes)} true (green), {len(found)} found (red)", fontsize=9)
            ax.axis("off")
        return self.save(fig, name)

    def masks(self, panels: list[tuple], name: str) -> Path:
        """panels: (image (H, W, 3) 0..255, masks (N, H, W) bool, true label map (H, W), title) each."""
        from skimage.segmentation import find_boundaries

        fig, axes = self._figure(len(panels))
        for ax, (image, masks, truth, title) in zip(axes, panels, strict=True):
            overlay = np.clip(image / 255, 0, 1).copy()
            colours = np.random.default_rng(0).uniform(0.2, 1, (len(masks), 3))
            for mask, colour in zip(masks, colours, strict=True):
                overlay[mask] = 0.5 * overlay[mask] + 0.5 * colour
            overlay[find_boundaries(truth, mode="inner")] = (0, 1, 0)
            ax.imshow(overlay)
            ax.set_title(f"{title}: SAM masks from the true boxes (true outlines green)", fontsize=9)
            ax.axis("off")
        return self.save(fig, name)

    def predictions(self, image: np.ndarray, truth: np.ndarray, labels: np.ndarray, name: str) -> Path:
        """Image with true (green) and predicted (red) cell outlines, and both label maps in random colours."""
        from skimage.segmentation import find_boundaries

        fig, axes = self._figure(3)
        shown = np.clip(image / 255, 0, 1).copy()
        shown[find_boundaries(truth, mode="inner")] = (0, 1, 0)
        shown[find_boundaries(labels, mode="inner")] = (1, 0, 0)
        axes[0].imshow(shown)
        axes[0].set_title("outlines: true (green), predicted (red)")
        for ax, mask, title in ((axes[1], truth, "true cells"), (axes[2], labels, "predicted cells")):
            colours = np.random.default_rng(0).uniform(0.2, 1, (int(mask.max()) + 1, 3))
            colours[0] = 0
            ax.imshow(colours[mask])
            ax.set_title(f"{title} ({len(np.unique(mask)) - 1})")
        for ax in axes:
            ax.axis("off")
        return self.save(fig, name)

    def loss_curves(self, stages: dict, name: str = "loss_curves") -> Path:
        """stages: {stage title: metric rows (epoch, train_loss, val_loss, fold...)}: the total loss per epoch."""
        fig, axes = self._figure(len(stages))
        for ax, (title, rows) in zip(axes, stages.items(), strict=True):
            for fold in sorted({r.get("fold", 1) for r in rows}):
                fold_rows = [r for r in rows if r.get("fold", 1) == fold]
                epochs = [r["epoch"] for r in fold_rows]
                for split, style in (("train", "-"), ("val", "--")):
                    values = [r.get(f"{split}_loss") for r in fold_rows]
                    if any(v is not None for v in values):
                        ax.plot(
                            epochs, [np.nan if v is None else v for v in values], style, label=f"fold {fold} {split}"
                        )
            ax.set_xlabel("epoch")
            ax.set_ylabel("loss")
            ax.set_title(title)
            ax.legend(fontsize=7)
        return self.save(fig, name)

    def loss_components(self, stages: dict, name: str = "loss_components") -> Path:
        """stages: {stage title: metric rows}: every loss term (train solid, validation dashed) per epoch."""
        fig, axes = self._figure(len(stages))
        for ax, (title, rows) in zip(axes, stages.items(), strict=True):
            terms = sorted({k[6:] for r in rows for k in r if k.startswith("train_") and k != "train_loss"})
            for term in terms:
                if term == "mask_iou":
                    continue
                epochs = [r["epoch"] for r in rows]
                line = ax.plot(epochs, [r.get(f"train_{term}", np.nan) for r in rows], label=f"train {term}")[0]
                if any(f"val_{term}" in r for r in rows):
                    ax.plot(epochs, [r.get(f"val_{term}", np.nan) for r in rows], "--", color=line.get_color(),
                            label=f"val {term}")  # fmt: skip
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_xlabel("epoch")
            ax.set_title(f"{title}: loss terms")
            ax.legend(fontsize=7, ncol=2)
        return self.save(fig, name)
