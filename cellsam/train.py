"""Fine-tune CellSAM's two stages on your own image + instance-mask folders.

    python cellsam/train.py --demo                                   # synthetic cells, vit_tiny, a few minutes on a CPU
    python cellsam/train.py --img_path DATA/images --mask_path DATA/masks --output_name my_cells \\
        --cellsam_checkpoint cellsam_general.pt --preeval             # the published CellSAM, fine-tuned
    python cellsam/train.py --img_path DATA/images --mask_path DATA/masks --output_name my_cells \\
        --sam_size vit_b --sam_checkpoint sam_vit_b_01ec64.pth --strategy k_fold --k_folds 5
    python cellsam/train.py --resume output/my_cells                 # after a kill: finished folds are kept

Two architectures (--architecture; auto: published for vit_b, shared_encoder for the other sizes):
- published: cellSAM's own module (published.py): CellFinder (AnchorDETR) on its own ViT-B, masks from a second
  SAM (model_cp); starts from a released or fine-tuned file (--cellsam_checkpoint) or an official SAM file
  (--sam_checkpoint); images normalised as cellSAM does and resized to 1024 px when they fit that window; each
  fold's best model is also written as models/fold_X/cellsam_finetuned.pt, which cellSAM loads.
- shared_encoder: this folder's CellFinder on the encoder of the one SAM that draws the masks (any SAM size),
  images at their own pixel scale.

Stage 1 trains CellFinder on Hungarian-matched queries; loss ce_loss_weight x focal + bbox_loss_weight x L1 +
giou_loss_weight x GIoU, for every decoder layer. --stage1_type cellfinder: the image encoders frozen;
image_encoder: CellFinder's encoder too; all_backbones: also the encoder the masks come from, which then learns
from the mask loss of true-box prompts added to the box loss.
Stage 2 trains SAM prompted by the ground-truth boxes (jittered by --box_jitter): --train_parts neck (the paper's
choice), mask_decoder or both. Loss: focal + Dice (+ boundary) with optional online hard negative mining, on
the pixels of each prompt box grown by --loss_margin.
Both stages: AdamW, cosine annealing (stepped per epoch), AMP on CUDA, early stopping after --patience_s1/_s2
epochs without a lower validation loss, the best epoch kept.

Strategies: train_val_split (--val_fraction held out), k_fold (--k_folds models; mean, standard deviation and 95 %
confidence interval of each metric), full_dataset (no validation; trains the set epochs). After each fold the
whole pipeline (CellFinder boxes -> SAM masks -> label image) is scored on the held-out images: CellSAM's F1 at
IoU 0.5 (TP / (TP + (FP + FN) / 2), averaged per image), precision, recall and PQ, beside a classical baseline
(Otsu threshold + distance-transform watershed) on the same images.

Output (output/NAME_2, ... when output/NAME holds an earlier experiment):
    output/NAME/experiment_config.json   logs/experiment.log
    models/fold_X/best_model_s1.pth, best_model_s2.pth (and last_s1.pth, last_s2.pth for --resume),
        cellsam_finetuned.pt (published architecture: the fold's model in cellSAM's layout)
    results/individual_results.json, results/aggregated_results.json, results/fold_X/visualizations/
    metrics/stage1_metrics.json, metrics/stage2_metrics.json   (per fold and epoch)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import fields
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from scipy import ndimage, stats
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed
from sklearn.model_selection import KFold, train_test_split
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, Subset

from cellsam.config import ExperimentConfig, Stage1Config, Stage2Config
from cellsam.data import (
    CellDataset,
    check_pairs,
    collate,
    find_pairs,
    read_image,
    read_mask,
    write_demo_dataset,
    xyxy_to_cxcywh,
)
from cellsam.model import (
    MaskLoss,
    SetCriterion,
    SharedEncoderCellSAM,
    box_region,
    build_cellfinder,
    build_sam,
    decode_masks,
    encode,
)
from common.metrics import instance_overlaps, match_instances, nanmean, panoptic_quality

# --demo: small synthetic cells and the tiny SAM, trained from scratch (nothing is pretrained here)
DEMO = {
    "sam_size": "vit_tiny", "batch_size": 2, "strategy": "train_val_split", "val_fraction": 0.25, "num_workers": 0,
    # a query on every token (32 x 32 anchors): dense anchors converge far faster than 8 x 8 from scratch
    "stage1": {"epochs": 90, "lr": 1e-3, "stage1_type": "image_encoder", "hidden": 64, "heads": 4,
               "encoder_layers": 1, "decoder_layers": 2, "anchor_grid": 32, "patterns": 1, "dropout": 0.0,
               "score_threshold": 0.3, "patience": 1000},
    # from scratch, SAM's 20 : 1 focal : Dice first drives every mask to background
    "stage2": {"epochs": 12, "lr": 4e-3, "train_parts": "both", "patience": 1000, "max_prompts": 16,
               "focal_loss_weight": 1.0, "loss_margin": 0.25},
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Stage 1 and stage 2: one epoch, one validation pass
# ----------------------------------------------------------------------------------------------------------------


def build_model(config: ExperimentConfig, log=print):
    """The two-stage model of config.architecture: the published CellSAM (published.CellSAM, from
    --cellsam_checkpoint or --sam_checkpoint) or this folder's shared-encoder one (model.SharedEncoderCellSAM)."""
    if config.architecture == "published":
        from cellsam.published import CellSAM, load_cellsam_weights

        model = CellSAM(config.sam_size, config.sam_checkpoint)
        if config.cellsam_checkpoint:
            load_cellsam_weights(model, config.cellsam_checkpoint, config.allow_missing_keys, log)
        model.window = config.window
        return model
    sam = build_sam(config.sam_size, config.sam_checkpoint)
    return SharedEncoderCellSAM(sam, build_cellfinder(sam, config.stage1))


def prompted_masks(model, images, prompts: list, encoder_grad: bool = True) -> list:
    """Mask logits (N_i, S/4, S/4) per image from the SAM that draws the masks, prompted by each image's boxes
    (None where it has none)."""
    sam = model.mask_sam
    with nullcontext() if encoder_grad else torch.no_grad():
        _, embeddings = encode(sam, model.mask_input(images))
    return [None if p is None else decode_masks(sam, e[None], p)[0] for e, p in zip(embeddings, prompts, strict=True)]


class Stage1Net(torch.nn.Module):
    """CellFinder (and its image encoder) as one module, so DistributedDataParallel can wrap it; with prompts
    (stage1_type all_backbones) also the masks of the true boxes, so the masks' image encoder learns too."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, prompts: list | None = None):
        out = self.model.finder_forward(images)
        if prompts is not None:
            out["masks"] = prompted_masks(self.model, images, prompts)
        return out


class Stage2Net(torch.nn.Module):
    """SAM with box prompts: a list of mask logits (N_i, S/4, S/4) per image (None where it has no prompt)."""

    def __init__(self, model, train_parts: str):
        super().__init__()
        self.model, self.train_parts = model, train_parts

    def forward(self, images, prompts: list):
        return prompted_masks(self.model, images, prompts, self.train_parts != "mask_decoder")


def sample_prompts(batch, s2, rng, train: bool, device) -> tuple[list, list]:
    """Per image, up to max_prompts cells: their true boxes (jittered in training) and masks; None for a crop
    without a cell."""
    size = batch["image"].shape[-1]
    prompts, truths = [], []
    for boxes, mask in zip(batch["boxes"], batch["mask"], strict=True):
        if len(boxes) == 0:
            prompts.append(None)
            truths.append(None)
            continue
        ids = np.unique(mask.numpy())
        ids = ids[ids > 0]  # the cells, in the order of their boxes (a confluent crop may hold no background)
        chosen = rng.choice(len(ids), min(len(ids), s2.max_prompts), replace=False)
        prompt = boxes[chosen].clone()
        if train and s2.box_jitter:  # each corner moves by up to box_jitter of the box side
            side = (prompt[:, 2:] - prompt[:, :2]).repeat(1, 2)
            prompt = (prompt + torch.from_numpy(rng.uniform(-1, 1, prompt.shape)).float() * s2.box_jitter * side).clamp(
                0, size
            )
        prompts.append(prompt.to(device))
        truths.append(torch.stack([mask == ids[i] for i in chosen]).float().to(device))
    return prompts, truths


def mask_loss_terms(outputs, truths, prompts, size, criterion, s2, sums: dict) -> list:
    """Each image's mask loss (upsampled logits against the cells' masks, counted near each prompt box); adds its
    terms and the predicted masks' IoU (cut to the box, as the pipeline does) to sums. Returns the losses."""
    losses = []
    for logits, truth, prompt in zip(outputs, truths, prompts, strict=True):
        if logits is None:
            continue
        logits = torch.nn.functional.interpolate(logits[:, None], size=(size, size), mode="bilinear")[:, 0]
        loss, terms = criterion(logits, truth, box_region(prompt, size, s2.loss_margin))
        losses.append(loss)
        predicted = (logits.detach() > 0) & box_region(prompt, size, 0.0, 2)
        iou = (predicted & (truth > 0)).sum((1, 2)) / (predicted | (truth > 0)).sum((1, 2)).clamp_min(1)
        sums["mask_count"] = sums.get("mask_count", 0) + 1
        for name, value in {"mask_loss": float(loss.detach()), **terms, "mask_iou": float(iou.mean())}.items():
            sums[name] = sums.get(name, 0.0) + value
    return losses


def zero_loss(outputs, images):
    """A batch of empty crops still steps (with a zero loss), so every process takes the same steps."""
    return sum(o.sum() * 0 for o in outputs if o is not None) + images.sum() * 0


def stage1_epoch(net, criterion, optimizer, scaler, loader, device, train: bool, mask_loss=None, s2=None,
                 rng=None, mixed_precision: bool = True) -> dict:  # fmt: skip
    """One pass of CellFinder over a loader (training, or validation with train=False): mean loss and terms over
    every batch of every process. With mask_loss (stage1_type all_backbones) the masks of true-box prompts are
    scored too and added to the loss."""
    net.train(train)
    sums, count = {}, 0
    for batch in loader:
        images = batch["image"].to(device)
        size = images.shape[-1]
        targets = [xyxy_to_cxcywh(boxes, size, size).to(device) for boxes in batch["boxes"]]
        prompts, truths = sample_prompts(batch, s2, rng, train, device) if mask_loss else (None, None)
        with torch.set_grad_enabled(train), amp(device, mixed_precision):
            out = net(images, prompts)
            loss, terms = criterion(out, targets)
            if mask_loss:
                losses = mask_loss_terms(out["masks"], truths, prompts, size, mask_loss, s2, sums)
                loss = loss + (torch.stack(losses).mean() if losses else zero_loss(out["masks"], images))
        if train:
            step(loss, optimizer, scaler)
        count += 1
        for name, value in {"loss": float(loss.detach()), **terms}.items():
            sums[name] = sums.get(name, 0.0) + value
    return reduce_means(sums, count, device, ("loss", "class", "bbox", "giou"))


def stage2_epoch(net, criterion, optimizer, scaler, loader, device, config, rng, train: bool) -> dict:
    """One pass of box-prompted SAM over a loader: up to max_prompts cells per image, their boxes jittered in
    training, each predicted mask (upsampled to the image) against the cell's mask. Mean loss, terms and the mean
    IoU of the predicted masks, over every process."""
    s2 = config.stage2
    net.train(train)
    sums = {}
    for batch in loader:
        images = batch["image"].to(device)
        prompts, truths = sample_prompts(batch, s2, rng, train, device)
        with torch.set_grad_enabled(train), amp(device, config.mixed_precision):
            outputs = net(images, prompts)
            losses = mask_loss_terms(outputs, truths, prompts, images.shape[-1], criterion, s2, sums)
            loss = torch.stack(losses).mean() if losses else zero_loss(outputs, images)
        if train:
            step(loss, optimizer, scaler)
    sums["loss"] = sums.pop("mask_loss", 0.0)
    names = ("loss", "focal", "dice", "mask_iou") + (("boundary",) if s2.boundary_loss_weight else ())
    return reduce_means(sums, sums.get("mask_count", 0), device, names)


def reduce_means(sums: dict, count: int, device, names) -> dict:
    """Means over every batch of every process (terms a loss did not compute are left out)."""
    values = torch.tensor([sums.get(n, 0.0) for n in names] + [count], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(values)
    return {n: float(values[i] / max(float(values[-1]), 1.0)) for i, n in enumerate(names)}


def step(loss, optimizer, scaler) -> None:
    finite = torch.isfinite(loss.detach()).float()
    if dist.is_initialized():  # every process stops together
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite:
        raise SystemExit("the training loss is not finite: lower the learning rate (--lr_s1 / --lr_s2)")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    scaler.step(optimizer)
    scaler.update()


# ----------------------------------------------------------------------------------------------------------------
# The pipeline on held-out images, and the classical baseline
# ----------------------------------------------------------------------------------------------------------------


def otsu_watershed(image: np.ndarray, min_distance: int = 5) -> np.ndarray:
    """Otsu threshold of the summed channels, then a watershed of the distance transform from its local maxima."""
    grey = ndimage.gaussian_filter(image.sum(-1), 1.0)
    foreground = grey > threshold_otsu(grey)
    distance = ndimage.distance_transform_edt(foreground)
    peaks = peak_local_max(distance, min_distance=min_distance, threshold_abs=2, labels=ndimage.label(foreground)[0])
    markers = np.zeros(distance.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=foreground).astype(np.int32)


def score_images(predictions: list[np.ndarray], truths: list[np.ndarray]) -> dict:
    """CellSAM's F1 at IoU 0.5 averaged per image, precision, recall, PQ (mean over images)."""
    rows = []
    for pred, true in zip(predictions, truths, strict=True):
        overlaps = instance_overlaps(true, pred)
        match = match_instances(true, pred, 0.5, overlaps)
        rows.append([match.f1, match.precision, match.recall, panoptic_quality(true, pred, overlaps=overlaps)["pq"]])
    f1, precision, recall, pq = (nanmean(column) for column in zip(*rows, strict=True))
    return {"f1": f1, "precision": precision, "recall": recall, "pq": pq}


def read_pair(pair, gamma: float = 1.0, reader=read_image) -> tuple[np.ndarray, np.ndarray]:
    """A whole image (H, W, 3) float 0..255 with the input gamma applied, and its label map (None without one).
    reader: read_image, or a model's own (the published CellSAM normalises as cellSAM does)."""
    image = reader(pair.image)
    if gamma != 1.0:
        image = 255.0 * (image / 255.0) ** gamma
    return image, None if pair.mask is None else read_mask(pair.mask, image.shape[:2], pair.image)


@torch.no_grad()
def evaluate_pipeline(model, pairs, config, device, out_dir: Path | None = None) -> dict:
    """The whole pipeline on whole images (tiled where larger than the model's window) and the Otsu baseline on
    the same images (read as read_image reads them); figures of the first four go to out_dir."""
    model.eval()
    predictions, baselines, truths = [], [], []
    for i, pair in enumerate(pairs):
        image, truth = read_pair(pair, config.gamma, model.read_image)
        labels = model.segment(image, config.stage1.score_threshold, device=device)
        predictions.append(labels)
        baselines.append(otsu_watershed(read_pair(pair, config.gamma)[0]))  # read_image's scaling, either model
        truths.append(truth)
        if out_dir is not None and i < 4:
            save_prediction_figure(image, truth, labels, out_dir / f"{pair.name}.png")
    return {**score_images(predictions, truths), "baseline_otsu_watershed": score_images(baselines, truths)}


def save_prediction_figure(image: np.ndarray, truth: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """Image with true (green) and predicted (red) cell outlines, and both label maps in random colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    path.parent.mkdir(parents=True, exist_ok=True)
    shown = image / 255
    shown[find_boundaries(truth, mode="inner")] = (0, 1, 0)
    shown[find_boundaries(labels, mode="inner")] = (1, 0, 0)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    axes[0].imshow(shown)
    axes[0].set_title("outlines: true (green), predicted (red)")
    for ax, mask, title in ((axes[1], truth, "true cells"), (axes[2], labels, "predicted cells")):
        colours = np.random.default_rng(0).uniform(0.2, 1, (int(mask.max()) + 1, 3))
        colours[0] = 0
        ax.imshow(colours[mask])
        ax.set_title(f"{title} ({len(np.unique(mask)) - 1})")
    for ax in axes:
        ax.axis("off")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# One fold: stage 1, stage 2, scores
# ----------------------------------------------------------------------------------------------------------------


def amp(device, enabled: bool = True):
    """Autocast on CUDA (bf16 where supported, else fp16 with fit's GradScaler) unless --no-mixed_precision."""
    if device.type != "cuda" or not enabled:
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def fit(stage: int, run_epoch, modules: dict, parameters, stage_config, fold_dir: Path, history: list, log, device,
        mixed_precision: bool = True):  # fmt: skip
    """The loop both stages share: AdamW, cosine annealing per epoch, early stopping on the validation loss,
    best_model_s{stage}.pth (the trained modules' weights) and last_s{stage}.pth (everything, for --resume); only
    the first process writes. run_epoch(optimizer, scaler, epoch, train) -> metrics (None: no validation set)."""
    optimizer = torch.optim.AdamW(parameters, lr=stage_config.lr, weight_decay=stage_config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(stage_config.epochs, 1))
    fp16 = device.type == "cuda" and mixed_precision and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    state = {"epoch": 0, "best": math.inf, "patience": 0}
    last_path, best_path = fold_dir / f"last_s{stage}.pth", fold_dir / f"best_model_s{stage}.pth"
    best_weights = None
    if last_path.is_file():  # --resume
        last = torch.load(last_path, map_location="cpu", weights_only=True)
        for name, module in modules.items():
            if name in last["modules"]:  # runs before the prompt encoder was saved rebuild it from the seed
                module.load_state_dict(last["modules"][name])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        state = last["state"]
        history[:] = last["history"]
        if best_path.is_file():
            best_weights = torch.load(best_path, map_location="cpu", weights_only=True)["modules"]
        log(f"  stage {stage}: resumed at epoch {state['epoch'] + 1}")
    stopped = state["patience"] >= stage_config.patience  # it had stopped early before the kill
    for epoch in range(state["epoch"], 0 if stopped else stage_config.epochs):
        started = time.time()
        train_stats = run_epoch(optimizer, scaler, epoch, train=True)
        val_stats = run_epoch(None, None, epoch, train=False)
        scheduler.step()
        loss = train_stats["loss"] if val_stats is None else val_stats["loss"]
        improved = loss < state["best"]
        state = {
            "epoch": epoch + 1,
            "best": min(loss, state["best"]),
            "patience": 0 if improved else state["patience"] + 1,
        }
        history.append({"epoch": epoch + 1, "train": train_stats, "val": val_stats, "seconds": time.time() - started})
        weights = {
            name: {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            for name, module in modules.items()
        }
        if improved:
            best_weights = weights
        if is_main():
            if improved:
                save_checkpoint(
                    best_path, {"domain": "cellsam", "stage": stage, "epoch": epoch + 1, "modules": weights}
                )
            save_checkpoint(last_path, {"modules": weights, "optimizer": optimizer.state_dict(), "scheduler":
                                        scheduler.state_dict(), "state": state, "history": history})  # fmt: skip
        shown = val_stats or train_stats
        log(f"  stage {stage} epoch {epoch + 1}/{stage_config.epochs}  train loss {train_stats['loss']:.4f}  "
            f"val loss {shown['loss']:.4f}" + (f" (mask IoU {shown['mask_iou']:.3f})" if "mask_iou" in shown else "")
            + f"  {memory_summary(device)}" + ("  best" if improved else ""))  # fmt: skip
        if state["patience"] >= stage_config.patience:
            log(f"  stage {stage}: early stopping, no lower validation loss for {stage_config.patience} epochs")
            break
    if best_weights is not None:
        for name, module in modules.items():
            module.load_state_dict(best_weights[name])


def memory_summary(device) -> str:
    """Peak GPU memory of this process on CUDA, its peak resident memory (RSS) otherwise."""
    if device.type == "cuda":
        return f"GPU peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    try:
        import resource

        return f"RSS peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"  # Linux: KiB
    except ImportError:  # Windows
        return ""


def distributed(net, device):
    """DistributedDataParallel under torchrun (a crop without cells leaves the mask decoder unused in a step:
    find_unused_parameters), the module itself otherwise."""
    if not dist.is_initialized():
        return net
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)  # fmt: skip


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def setup_device() -> torch.device:
    """CUDA, Apple MPS or CPU; under torchrun one process per GPU (NCCL) or per CPU process (gloo)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=1))
    if dist.is_initialized():
        return torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")


def run_fold(config: ExperimentConfig, fold: int, train_pairs, val_pairs, root: Path, log, device) -> dict:
    fold_dir = root / "models" / f"fold_{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed + fold)  # the same initial weights in every process
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rng = np.random.default_rng([config.seed, fold, rank])
    model = build_model(config, log if rank == 0 else lambda *_: None).to(device)
    published = model.architecture == "published"
    size = model.input_size
    s1, s2 = config.stage1, config.stage2
    # the published CellSAM resizes an image that fits its window to its input size; this folder's model keeps the
    # pixel scale and crops
    data_args = {"reader": model.read_image, "resize_small": published, "window": model.window if published else None}
    train_set = CellDataset(train_pairs, size, config.augmentation, config.gamma, config.seed, True,
                            config.stain_transform, **data_args)  # fmt: skip
    val_set = CellDataset(val_pairs, size, False, config.gamma, train=False, **data_args) if val_pairs else None
    loader_args = {"batch_size": config.batch_size, "collate_fn": collate, "num_workers": config.num_workers}
    # under torchrun each process takes its share of the training images, and of the validation images
    sampler = DistributedSampler(train_set, seed=config.seed + fold) if world > 1 else None
    generator = torch.Generator().manual_seed(fold)
    train_loader = torch.utils.data.DataLoader(
        train_set, shuffle=sampler is None, sampler=sampler, generator=generator, **loader_args
    )
    val_share = Subset(val_set, range(rank, len(val_set), world)) if val_set else None
    val_loader = torch.utils.data.DataLoader(val_share, **loader_args) if val_set else None
    log(
        f"fold {fold}: {len(train_pairs)} training and {len(val_pairs)} validation images, "
        f"{'published CellSAM' if published else 'shared-encoder CellSAM'}, SAM {config.sam_size} ({size} px)"
    )
    results = {"fold": fold, "train_images": [p.name for p in train_pairs], "val_images": [p.name for p in val_pairs]}
    if config.preeval and val_set and rank == 0:  # the model as loaded, on the images that will score it after
        results["before_training"] = evaluate_pipeline(model, val_pairs, config, device)
        log(f"fold {fold}: before training F1 {results['before_training']['f1']:.3f}")

    # stage 1: CellFinder (and, by stage1_type, its image encoder; all_backbones: the masks' encoder too)
    cell_class = s1.cell_class if s1.cell_class >= 0 else pick_cell_class(model, train_set, config, device, log)
    results["cell_class"] = cell_class
    criterion = SetCriterion(s1.ce_loss_weight, s1.bbox_loss_weight, s1.giou_loss_weight, s1.focal_alpha,
                             s1.focal_gamma, s1.one_to_many, cell_class)  # fmt: skip
    mask_loss = MaskLoss(s2.focal_gamma, s2.focal_loss_weight, s2.dice_loss_weight, s2.boundary_loss_weight,
                         s2.hard_negative_mining, s2.negative_ratio)  # fmt: skip
    joint = mask_loss if s1.stage1_type == "all_backbones" else None
    trained = model.freeze_for_stage1(s1.stage1_type)
    history1 = []
    net1 = Stage1Net(model)
    ddp1 = distributed(net1, device)  # after freezing: DDP syncs the parameters that need gradients

    def epoch1(optimizer, scaler, epoch, train):
        if not train and val_loader is None:
            return None
        train_set.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        net, loader = (ddp1, train_loader) if train else (net1, val_loader)
        # validation draws the same cells every epoch, so early stopping compares like with like
        draws = rng if train else np.random.default_rng([config.seed, fold, rank, 1])
        return stage1_epoch(net, criterion, optimizer, scaler, loader, device, train, joint, s2, draws,
                            config.mixed_precision)  # fmt: skip

    parameters = [p for module in trained.values() for p in module.parameters() if p.requires_grad]
    fit(1, epoch1, trained, parameters, s1, fold_dir, history1, log, device, config.mixed_precision)

    # stage 2: the SAM that draws the masks, prompted by true boxes: its neck, mask decoder or both
    model.requires_grad_(False)
    parts, modules2 = model.stage2_parts(s2.train_parts)
    for part in parts:
        part.requires_grad_(True)
    history2 = []
    net2 = Stage2Net(model, s2.train_parts)
    ddp2 = distributed(net2, device)

    def epoch2(optimizer, scaler, epoch, train):
        if not train and val_loader is None:
            return None
        train_set.set_epoch(1000 + epoch)
        if sampler is not None:
            sampler.set_epoch(1000 + epoch)
        net, loader = (ddp2, train_loader) if train else (net2, val_loader)
        draws = rng if train else np.random.default_rng([config.seed, fold, rank, 2])
        return stage2_epoch(net, mask_loss, optimizer, scaler, loader, device, config, draws, train)

    parameters2 = [p for part in parts for p in part.parameters()]
    fit(2, epoch2, modules2, parameters2, s2, fold_dir, history2, log, device, config.mixed_precision)
    results["stage1_history"], results["stage2_history"] = history1, history2
    if published and rank == 0:  # the best epochs of both stages, in the layout cellSAM loads
        from cellsam.published import save_published

        log(f"fold {fold}: wrote {save_published(model, fold_dir / 'cellsam_finetuned.pt')}")
    if val_set and rank == 0:  # the pipeline on whole held-out images: the first process alone
        results["metrics"] = evaluate_pipeline(model, val_pairs, config, device,
                                               root / "results" / f"fold_{fold}" / "visualizations")  # fmt: skip
        m, b = results["metrics"], results["metrics"]["baseline_otsu_watershed"]
        before = results.get("before_training")
        log(f"fold {fold}: F1 {m['f1']:.3f} (precision {m['precision']:.3f}, recall {m['recall']:.3f}, PQ "
            f"{m['pq']:.3f})" + (f", before training {before['f1']:.3f}" if before else "")
            + f"; Otsu + watershed F1 {b['f1']:.3f}, PQ {b['pq']:.3f}")  # fmt: skip
    return results


@torch.no_grad()
def pick_cell_class(model, train_set, config, device, log) -> int:
    """The published CellFinder scores two classes; either counts as a cell at inference, and cellSAM does not
    say which one its released models use. Fine-tuning trains the column that scores the training images' cells
    highest: the one with more queries above the score threshold over the first training images (column 1,
    DETR's convention with class 0 unused, on a tie or for a model that finds nothing yet)."""
    if model.architecture != "published":
        return 1
    model.eval()
    counts = torch.zeros(2)
    for i in range(min(2, len(train_set))):
        logits = model.finder_forward(train_set[i]["image"][None].to(device))["logits"][0]
        counts += (logits.sigmoid() > config.stage1.score_threshold).sum(0).cpu().float()
    if dist.is_initialized():  # every process trains the same column
        dist.broadcast(counts, 0)
    column = 0 if counts[0] > counts[1] else 1
    log(f"  stage 1: CellFinder's class column {column} learns cells ({int(counts[0])} and {int(counts[1])} "
        "queries above the threshold on the first training images)")  # fmt: skip
    return column


# ----------------------------------------------------------------------------------------------------------------
# The experiment: strategies, outputs, aggregation
# ----------------------------------------------------------------------------------------------------------------


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def aggregate(folds: list[dict]) -> dict:
    """Mean, standard deviation (n - 1) and 95 % confidence interval (Student's t) of each metric over folds."""
    out = {}
    sources = (
        ("", lambda f: f.get("metrics")),
        ("baseline_", lambda f: f.get("metrics", {}).get("baseline_otsu_watershed")),
        ("before_", lambda f: f.get("before_training")),  # --preeval: the loaded model on the same images
    )
    for key in ("f1", "precision", "recall", "pq"):
        for prefix, pick in sources:
            values = np.array([pick(f)[key] for f in folds if "metrics" in f and pick(f)], float)
            if not len(values):
                continue
            mean = float(values.mean())
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            half = float(stats.t.ppf(0.975, len(values) - 1) * std / np.sqrt(len(values))) if len(values) > 1 else 0.0
            out[prefix + key] = {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": len(values)}
    return out


class ExperimentRunner:
    """Runs an ExperimentConfig: its strategy's folds, each fold's two stages, the output tree."""

    def __init__(self, config: ExperimentConfig, root: Path | None = None):
        self.config, self.root = config.check(), root

    def splits(self, pairs) -> list[tuple[list, list]]:
        c = self.config
        if c.strategy == "full_dataset":
            return [(pairs, [])]
        if c.strategy == "train_val_split":
            if len(pairs) < 2:
                raise SystemExit(
                    f"--strategy train_val_split needs at least 2 images (one to train, one to validate); {c.img_path} "
                    f"holds {len(pairs)}: add images or use --strategy full_dataset"
                )
            train, val = train_test_split(pairs, test_size=c.val_fraction, random_state=c.seed)
            return [(list(train), list(val))]
        if len(pairs) < c.k_folds:
            raise SystemExit(
                f"--k_folds {c.k_folds} needs at least {c.k_folds} images (one held out per fold); {c.img_path} holds "
                f"{len(pairs)}"
            )
        folds = KFold(c.k_folds, shuffle=True, random_state=c.seed).split(pairs)
        return [([pairs[i] for i in train], [pairs[i] for i in val]) for train, val in folds]

    def run(self) -> dict:
        c = self.config
        pairs = find_pairs(c.img_path, c.mask_path)
        if c.debug:
            pairs = pairs[: max(4, c.k_folds if c.strategy == "k_fold" else 4)]
            c.stage1.epochs, c.stage2.epochs = min(c.stage1.epochs, 2), min(c.stage2.epochs, 2)
        check_pairs(pairs)  # a bad file stops the run before anything is written
        if c.cellsam_checkpoint:  # so does a checkpoint of another layout, cut short, or with keys missing or extra
            from cellsam.published import check_cellsam_checkpoint

            check_cellsam_checkpoint(c.cellsam_checkpoint, c.sam_size, c.allow_missing_keys)
        splits = self.splits(pairs)  # too few images for the strategy: also before anything is written
        device = setup_device()
        main_process = is_main()
        root = self.root or (new_experiment_dir(Path(c.output_dir), c.output_name) if main_process else None)
        if dist.is_initialized():  # every process writes into the folder the first one made
            shared = [root]
            dist.broadcast_object_list(shared)
            root = shared[0]
        logger = logging.getLogger(f"cellsam.{root}")
        logger.handlers.clear()
        logger.setLevel(logging.INFO)
        if main_process:
            write_json(root / "experiment_config.json", c.to_dict())
            (root / "logs").mkdir(parents=True, exist_ok=True)
            logger.addHandler(logging.FileHandler(root / "logs" / "experiment.log"))
            logger.addHandler(logging.StreamHandler(sys.stdout))
        log = logger.info
        world = dist.get_world_size() if dist.is_initialized() else 1
        log(
            f"CellSAM experiment {root} ({c.strategy}, {len(pairs)} images, device {device.type} x {world} process(es))"
        )
        individual_path = root / "results" / "individual_results.json"
        done = json.loads(individual_path.read_text()) if individual_path.is_file() else []
        for fold, (train_pairs, val_pairs) in enumerate(splits, start=1):
            if any(r["fold"] == fold for r in done):
                log(f"fold {fold}: finished in an earlier run, kept")
                continue
            result = run_fold(c, fold, train_pairs, val_pairs, root, log, device)
            done.append(result)
            if main_process:
                stage1 = {f"fold_{fold}": result.pop("stage1_history")}
                stage2 = {f"fold_{fold}": result.pop("stage2_history")}
                for name, new in (("stage1_metrics.json", stage1), ("stage2_metrics.json", stage2)):
                    path = root / "metrics" / name
                    write_json(path, {**(json.loads(path.read_text()) if path.is_file() else {}), **new})
                write_json(individual_path, done)  # a finished fold survives a kill
            if dist.is_initialized():
                dist.barrier()
        aggregated = {"strategy": c.strategy, "folds": len(done), "metrics": aggregate(done) if main_process else {},
                      "scored_on": "each fold's validation images, which also chose its best epochs: score a separate "
                      "test folder with evaluate.py --images --masks for an unbiased number"}  # fmt: skip
        if main_process:
            write_json(root / "results" / "aggregated_results.json", aggregated)
        if aggregated["metrics"]:
            f1, base = aggregated["metrics"]["f1"], aggregated["metrics"]["baseline_f1"]
            before = aggregated["metrics"].get("before_f1")
            log(f"F1 at IoU 0.5 on the validation images (they also chose each stage's best epoch): "
                f"{f1['mean']:.3f} +- {f1['std']:.3f} over {f1['n']} fold(s)"
                + (f" (before training {before['mean']:.3f})" if before else "")
                + f"; Otsu + watershed {base['mean']:.3f}")  # fmt: skip
        log(f"wrote {root}")
        for handler in logger.handlers:
            handler.close()
        return {"output_dir": str(root), **aggregated}


def new_experiment_dir(parent: Path, name: str) -> Path:
    for attempt in range(1, 1000):
        folder = parent / (name if attempt == 1 else f"{name}_{attempt}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise SystemExit(f"could not create a new experiment folder in {parent}")


def finetune(img_path, mask_path, output_name, total_epochs_s1=50, total_epochs_s2=30, k_fold_training=False,
             strategy=None, debug=False, **settings) -> dict:  # fmt: skip
    """Train both stages from Python: `finetune("data/images", "data/masks", "my_cells", 50, 30,
    k_fold_training=True)`. Other ExperimentConfig fields (and Stage1Config / Stage2Config fields) are keywords."""
    stage1 = {
        k: settings.pop(k) for k in list(settings) if k in {f.name for f in fields(Stage1Config)} and k != "epochs"
    }
    stage2 = {k: settings.pop(k) for k in list(settings) if k in {f.name for f in fields(Stage2Config)}}
    config = ExperimentConfig(
        img_path=str(img_path), mask_path=str(mask_path), output_name=output_name,
        strategy=strategy or ("k_fold" if k_fold_training else "train_val_split"), debug=debug,
        stage1=Stage1Config(epochs=total_epochs_s1, **stage1), stage2=Stage2Config(epochs=total_epochs_s2, **stage2),
        **settings,
    )  # fmt: skip
    return ExperimentRunner(config).run()


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

SHARED = {f.name for f in fields(Stage1Config)} & {f.name for f in fields(Stage2Config)}


def flag_name(field_name: str, stage: int | None) -> str:
    """Stage fields both stages have (epochs, lr, ...) get a _s1 / _s2 suffix; the others keep their names."""
    return f"{field_name}_s{stage}" if stage and field_name in SHARED else field_name


def config_from_args(args) -> ExperimentConfig:
    values = vars(args)
    top = {f.name: values[f.name] for f in fields(ExperimentConfig) if f.name not in ("stage1", "stage2")}
    s1 = {f.name: values[flag_name(f.name, 1)] for f in fields(Stage1Config)}
    s2 = {f.name: values[flag_name(f.name, 2)] for f in fields(Stage2Config)}
    return ExperimentConfig(**top, stage1=Stage1Config(**s1), stage2=Stage2Config(**s2))


def main(args) -> dict:
    if args.search:
        from cellsam.search import HyperparameterOptimizer, HyperparameterSpace

        space = (
            HyperparameterSpace(**json.loads(Path(args.search_space).read_text()))
            if args.search_space
            else HyperparameterSpace()
        )
        config = config_from_args(args)
        folder = new_experiment_dir(Path(config.output_dir), f"{config.output_name}_search")
        search = HyperparameterOptimizer(config, space, folder, args.max_parallel)
        table = (
            search.run_random_search(args.n_trials, config.seed)
            if args.search == "random"
            else search.run_grid_search()
        )
        print(table.to_string(index=False))
        print(f"wrote {folder / 'search_results.csv'}")
        return {"output_dir": str(folder), "trials": len(table)}
    if args.resume:
        root = Path(args.resume)
        if not (root / "experiment_config.json").is_file():
            raise SystemExit(f"--resume {root}: no experiment_config.json there (give output/<name>)")
        config = ExperimentConfig.from_dict(json.loads((root / "experiment_config.json").read_text()))
        return ExperimentRunner(config, root).run()
    config = config_from_args(args)
    if args.demo:
        given = {a.lstrip("-").split("=")[0] for a in sys.argv[1:] if a.startswith("--")}
        data = write_demo_dataset(Path(args.output_dir) / "demo_data")
        config.img_path, config.mask_path = str(data / "images"), str(data / "masks")
        config.output_name = "cellsam_demo" if "output_name" not in given else config.output_name
        apply_demo(config, given)
    return ExperimentRunner(config).run()


def apply_demo(config: ExperimentConfig, given=()) -> None:
    """The --demo settings (DEMO) on config, except the flags in `given` (the user's own, which win)."""
    for key, value in DEMO.items():
        if isinstance(value, dict):
            stage = 1 if key == "stage1" else 2
            for name, v in value.items():
                if flag_name(name, stage) not in given:
                    setattr(getattr(config, key), name, v)
        elif key not in given:
            setattr(config, key, value)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--demo", action="store_true", help="synthetic cells in OUTPUT_DIR/demo_data, vit_tiny, both stages")
    p.add_argument("--resume", help="an experiment folder output/<name>: carries on where it stopped")
    p.add_argument("--search", choices=["random", "grid"], help="hyperparameter search instead of one experiment")
    p.add_argument("--n_trials", type=int, default=20, help="random search: trials [20]")
    p.add_argument("--max_parallel", type=int, default=1, help="search: trials at once, one GPU each [1]")
    p.add_argument("--search_space", help="search: a JSON file of HyperparameterSpace fields (lists of values)")
    for cls, stage in ((ExperimentConfig, None), (Stage1Config, 1), (Stage2Config, 2)):
        defaults = cls()
        for f in fields(cls):
            if f.name in ("stage1", "stage2"):
                continue
            default = getattr(defaults, f.name)
            name = flag_name(f.name, stage)
            where = f"stage {stage}: " if stage else ""
            if isinstance(default, bool):
                p.add_argument(
                    f"--{name}", action=argparse.BooleanOptionalAction, default=default, help=f"{where}[{default}]"
                )
            else:
                # a None default (str | None, int | None): the annotated type
                kind = type(default) if default is not None else int if str(f.type).startswith("int") else str
                p.add_argument(f"--{name}", type=kind, default=default, help=f"{where}[{default}]")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
    if dist.is_initialized():
        dist.destroy_process_group()
