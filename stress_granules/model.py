"""U-Net for stress-granule segmentation, tiled inference on whole images, granules from probabilities,
and checkpoint loading shared by train.py, evaluate.py and visualize.py."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import relabel_sequential, watershed
from torch import Tensor, nn
from tqdm import tqdm

from common.metrics import ConfusionMatrix, match_instances

ARCHITECTURE = "unet"
DOMAIN = "stress_granules"  # the tag of this folder's checkpoints


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with BatchNorm and bilinear upsampling; widths base, 2x, 4x, 8x, 16x.
    Input (N, in_channels, H, W) with H, W multiples of 16; output (N, 1, H, W) granule logits.
    Four poolings give a 16x receptive-field growth: enough for granules (2-20 px) and their cell context."""

    def __init__(self, in_channels: int = 1, base_channels: int = 32, depth: int = 4, dropout: float = 0.0):
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([double_conv(in_channels, widths[0])])
        self.down.extend(double_conv(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(double_conv(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth)))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = self.dropout(skips.pop())
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return self.head(x)


def pick_device() -> torch.device:
    """CUDA, then Apple MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or best_model.pth inside a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "best_model.pth"
    if not path.is_file():
        raise SystemExit(f"{path}: no such checkpoint (give a run folder holding best_model.pth, or a .pth file)")
    return path


def checkpoint_dict(args, model_args: dict, weights: dict, **extra) -> dict:
    """Plain data: evaluate.py and visualize.py rebuild the U-Net from model_args (load_checkpoint)."""
    return {"domain": DOMAIN, "arch": ARCHITECTURE, "model_args": model_args, "args": vars(args), "model": weights,
            **extra}  # fmt: skip


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the U-Net from the arguments stored in a stress_granules checkpoint and load its weights."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SystemExit(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("domain") != DOMAIN:
        found = checkpoint.get("domain", "no domain recorded") if isinstance(checkpoint, dict) else type(checkpoint)
        raise SystemExit(f"{path} is not a {DOMAIN} checkpoint (domain: {found})")
    if checkpoint.get("arch") != ARCHITECTURE:
        raise SystemExit(f"{path} holds a {checkpoint.get('arch')!r} network; this script builds {ARCHITECTURE!r}")
    model = UNet(**checkpoint["model_args"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise SystemExit(f"{path}: weights do not fit the network stored with them ({error})") from None
    return model.to(device).eval(), checkpoint


def _window_weights(size: int) -> Tensor:
    """Raised-cosine blending weights of a tile (never exactly 0, so image borders keep their weight)."""
    ramp = torch.sin(torch.linspace(0.0, math.pi, size + 2)[1:-1]) ** 2
    return torch.outer(ramp, ramp) + 1e-3


@torch.no_grad()
def predict_probability(
    model: nn.Module,
    features: np.ndarray,
    tile: int = 256,
    overlap: int = 64,
    batch_size: int = 4,
    ctx=None,
    progress: bool = False,
) -> np.ndarray:
    """Granule probability (H, W) of a whole image from its features (C, H, W): overlapping tiles blended with
    cosine weights, accumulated on the CPU. Images smaller than a tile are reflect-padded. ctx: the caller's
    autocast context (None: full precision); progress: a bar over the tiles of a large image."""
    if tile % 16 or not 0 <= overlap < tile:
        raise ValueError(f"tile {tile} must be a multiple of 16 and overlap {overlap} in 0..tile-1")
    device = next(model.parameters()).device
    image = torch.from_numpy(np.asarray(features, dtype=np.float32))[None]
    _, _, h, w = image.shape
    pad_h, pad_w = max(tile - h, 0), max(tile - w, 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), mode="reflect" if pad_h < h and pad_w < w else "replicate")
    ph, pw = image.shape[-2:]
    ys = sorted({*range(0, ph - tile, tile - overlap), ph - tile})
    xs = sorted({*range(0, pw - tile, tile - overlap), pw - tile})
    corners = [(y, x) for y in ys for x in xs]
    weight = _window_weights(tile)
    total, norm = torch.zeros(ph, pw), torch.zeros(ph, pw)
    starts = range(0, len(corners), batch_size)
    # a bar only where it helps: an image of many tiles (a few tiles pass too quickly to watch)
    for start in tqdm(starts, desc="tiles", leave=False, disable=not progress or len(starts) < 16):
        batch = corners[start : start + batch_size]
        crops = torch.cat([image[..., y : y + tile, x : x + tile] for y, x in batch]).to(device)
        with ctx or nullcontext():
            logits = model(crops)
        probs = logits.float().sigmoid()[:, 0].cpu()
        for p, (y, x) in zip(probs, batch, strict=True):
            total[y : y + tile, x : x + tile] += p * weight
            norm[y : y + tile, x : x + tile] += weight
    return (total / norm)[:h, :w].numpy()


def granules_from_probability(
    probability: np.ndarray, threshold: float = 0.5, min_size: int = 15, split: bool = True
) -> np.ndarray:
    """Granule label image (int32, 0 = background, ids 1..K): connected components (8-connected) of probability >
    threshold with at least min_size pixels, and (split) touching granules cut apart by `split_touching`. About
    15 px is the usual lower size of a granule in classical foci-counting pipelines; it filters predictions only,
    never the ground truth."""
    labels, n = ndimage.label(probability > threshold, structure=np.ones((3, 3)))
    if n:
        labels = _drop_small(labels, min_size)
    if split and labels.any():
        labels = split_touching(labels, min_size)
    return labels.astype(np.int32)


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Objects of at least min_size pixels, renumbered 1..K in the order of their ids."""
    areas = np.bincount(labels.ravel())
    keep = areas >= min_size
    keep[0] = False
    renumber = np.zeros(len(areas), dtype=np.int32)
    renumber[keep] = np.arange(1, keep.sum() + 1)
    return renumber[labels]


# A neck between two granules is a border when both distance maxima rise at least this far (px) above it. 0.5 px
# separated the touching granules of the demo's masks best: on 12 synthetic images, 567 true granules of which
# 113 touched another, F1 against the true ids 0.85 for connected components, 0.95 at 0.5 px, 0.92 at 1 px.
SPLIT_HEIGHT = 0.5


def split_touching(labels: np.ndarray, min_size: int = 15) -> np.ndarray:
    """Touching granules cut apart by a watershed on the distance map (shape declumping, as CellProfiler's
    IdentifyPrimaryObjects does it): granules are round, so two maxima of the distance to the background joined
    by a neck are two granules. Markers are the h-maxima (skimage) of height SPLIT_HEIGHT; a piece smaller than
    min_size is given back to its neighbours (its marker dropped, the watershed run again), so splitting never
    removes pixels. Ids 1..K in raster order of the markers."""
    binary = labels > 0
    distance = ndimage.distance_transform_edt(binary)
    markers = ndimage.label(h_maxima(distance, SPLIT_HEIGHT) & binary, structure=np.ones((3, 3)))[0]
    pieces = watershed(-distance, markers, mask=binary, connectivity=2)  # 8-connected, as the components
    small = np.bincount(pieces.ravel(), minlength=markers.max() + 1) < min_size
    small[0] = False
    if small.any():
        markers[small[markers]] = 0
        pieces = watershed(-distance, markers, mask=binary, connectivity=2)  # 8-connected, as the components
    orphans = binary & (pieces == 0)  # an object all of whose pieces were small: kept whole
    if orphans.any():
        pieces[orphans] = labels[orphans] + pieces.max()
    return relabel_sequential(pieces)[0]


class GranuleScores:
    """Pixel scores (granule class of a 2-class confusion matrix), granule-level scores (true granules, by their
    ids, matched one to one with predicted ones at IoU > 0.5) and the false granules in control images (images
    whose mask is empty: every granule found there is false), summed over images; `all_reduce` sums them over DDP
    ranks."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.matrix = ConfusionMatrix(2, device=device)
        # tp, fp, fn, images, control images, granules predicted in control images
        self.objects = torch.zeros(6, dtype=torch.int64, device=device)

    def update(self, pred_labels: np.ndarray, true_labels: np.ndarray) -> None:
        """true_labels: the mask's granule ids (data.read_mask), all of them: no size filter on the truth."""
        true_labels = np.asarray(true_labels)
        self.matrix.update(torch.from_numpy(pred_labels > 0), torch.from_numpy(true_labels > 0))
        match = match_instances(true_labels, pred_labels, 0.5)
        control = not true_labels.any()
        counts = [match.tp, match.fp, match.fn, 1, int(control), match.fp if control else 0]
        self.objects += torch.tensor(counts, device=self.objects.device)

    def all_reduce(self) -> GranuleScores:
        self.matrix.all_reduce()
        if dist.is_available() and dist.is_initialized():
            counts = (
                self.objects.to(f"cuda:{torch.cuda.current_device()}")
                if dist.get_backend() == "nccl"
                else (self.objects)
            )
            dist.all_reduce(counts)
            self.objects.copy_(counts)
        return self

    def compute(self) -> dict:
        scores = self.matrix.compute()
        tp, fp, fn, images, controls, control_fp = (int(v) for v in self.objects.cpu())
        pixel = {name: scores[name][1] for name in ("dice", "iou", "precision", "recall", "f1", "specificity")}
        pixel["accuracy"] = scores["overall_accuracy"]

        def ratio(a, b):
            return a / b if b else float("nan")

        return {
            "images": images,
            "pixel": pixel,
            "object": {
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "precision": ratio(tp, tp + fp),
                "recall": ratio(tp, tp + fn),
                "f1": ratio(2 * tp, 2 * tp + fp + fn),
            },
            "controls": {
                "images": controls,
                "false_granules": control_fp,
                "false_granules_per_control_image": ratio(control_fp, controls),
            },
        }
