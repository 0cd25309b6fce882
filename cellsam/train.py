"""Fine-tune CellSAM's two stages on your own image + instance-mask folders.

    python cellsam/train.py --demo                                   # synthetic cells, vit_tiny, a few minutes on a CPU
    python cellsam/train.py --img_path DATA/images --mask_path DATA/masks --output_name my_cells \\
        --cellsam_checkpoint cellsam_general.pt --preeval             # the published CellSAM, fine-tuned
    python cellsam/train.py --img_path DATA/images --mask_path DATA/masks --output_name my_cells \\
        --sam_size vit_b --sam_checkpoint sam_vit_b_01ec64.pth --strategy k_fold --k_folds 5 \\
        --total_epochs_s1 200 --learning_rate_s2 5e-5 --test_img_path TEST/images --test_mask_path TEST/masks
    python cellsam/train.py --resume output/my_cells                 # after a kill: finished folds are kept
    torchrun --nproc_per_node=4 cellsam/train.py ...                 # DDP: one GPU (or CPU process) each
    python cellsam/search.py ...                                     # a hyperparameter search (Optuna) over this

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
choice), mask_decoder or both. Loss: focal + Dice + boundary, with optional online hard negative mining, on the
pixels of each prompt box grown by --loss_margin.
Both stages: AdamW, cosine annealing (stepped per epoch), AMP on CUDA, early stopping after --patience_s1/_s2
epochs without a lower validation loss (the validation loss sees every tile of each validation image, with the
same prompts each epoch), the best epoch kept.

Strategies: train_val_split (--val_fraction held out), k_fold (--k_folds models; mean, standard deviation and 95 %
confidence interval of each metric), full_dataset (no validation; trains the set epochs). After each fold the
whole pipeline (CellFinder boxes -> SAM masks -> label image) is scored: CellSAM's F1 at IoU 0.5 (TP / (TP + (FP +
FN) / 2), averaged per image), precision, recall and PQ, beside a classical baseline (Otsu threshold +
distance-transform watershed) on the same images. The validation images also chose the best epochs, so their
score is optimistic; the score to report is the one on --test_img_path / --test_mask_path, images that take no
part in training or model choice.

--debug: memory and every loss term at each step, step-by-step progress, box and mask figures each epoch.

Output (output/NAME_2, ... when output/NAME holds an earlier experiment):
    output/NAME/experiment_config.json   logs/experiment.log
    models/fold_X/best_model_s1.pth, best_model_s2.pth (and last_s1.pth, last_s2.pth for --resume),
        cellsam_finetuned.pt (published architecture: the fold's model in cellSAM's layout)
    results/individual_results.json, results/aggregated_results.json, results/fold_X/visualizations/
        (stage 1 boxes, stage 2 masks, loss curves, loss components, the pipeline on the validation images)
    metrics/stage1_metrics.json, metrics/stage2_metrics.json   (one row per fold and epoch)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import copy
import difflib
import json
import logging
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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, Subset

from cellsam.config import OLD_NAMES, ExperimentConfig, Stage1Config, Stage2Config, field_names
from cellsam.data import (
    CellDataset,
    boxes_from_mask,
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
    detect_tiled,
    encode,
    window_size,
)
from cellsam.strategies import strategy_for
from cellsam.utils import (
    CheckpointManager,
    EarlyStopping,
    GPUMonitor,
    MetricsTracker,
    TrainingVisualizer,
    flat_row,
    write_json,
)
from common.metrics import instance_overlaps, match_instances, nanmean, panoptic_quality

# --demo: small synthetic cells and the tiny SAM, trained from scratch (nothing is pretrained here)
DEMO = {
    "sam_size": "vit_tiny", "batch_size": 2, "strategy": "train_val_split", "val_fraction": 0.25, "num_workers": 0,
    # a query on every token (32 x 32 anchors): dense anchors converge far faster than 8 x 8 from scratch
    "stage1_config": {"total_epochs": 40, "learning_rate": 1e-3, "stage1_type": "image_encoder", "hidden": 64,
                      "heads": 4, "encoder_layers": 1, "decoder_layers": 2, "anchor_grid": 32, "patterns": 1,
                      "dropout": 0.0, "score_threshold": 0.3, "patience": 1000, "ce_loss_weight": 2.0},
    "stage2_config": {"total_epochs": 8, "learning_rate": 4e-3, "train_parts": "both", "patience": 1000,
                      "max_prompts": 16, "focal_loss_weight": 1.0, "boundary_loss_weight": 0.0, "loss_margin": 0.25},
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The model, and one pass of each stage over a loader
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
    return SharedEncoderCellSAM(sam, build_cellfinder(sam, config.stage1_config))


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
                 rng=None, mixed_precision: bool = True, log_step=None) -> dict:  # fmt: skip
    """One pass of CellFinder over a loader (training, or validation with train=False): mean loss and terms over
    every batch of every process. With mask_loss (stage1_type all_backbones) the masks of true-box prompts are
    scored too and added to the loss. log_step(step, steps, terms): called after each step (--debug)."""
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
                step_sums = {}
                losses = mask_loss_terms(out["masks"], truths, prompts, size, mask_loss, s2, step_sums)
                loss = loss + (torch.stack(losses).mean() if losses else zero_loss(out["masks"], images))
                terms = {**terms, **{k: v / max(step_sums.get("mask_count", 0), 1) for k, v in step_sums.items()
                                     if k != "mask_count"}}  # fmt: skip
        if train:
            step(loss, optimizer, scaler)
        count += 1
        terms = {"loss": float(loss.detach()), **terms}
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value
        if log_step:
            log_step(count, len(loader), terms)
    names = ("loss", "class", "bbox", "giou") + (("mask_loss", "focal", "dice", "mask_iou") if mask_loss else ())
    return reduce_means(sums, count, device, names)


def stage2_epoch(net, criterion, optimizer, scaler, loader, device, config, rng, train: bool, log_step=None) -> dict:
    """One pass of box-prompted SAM over a loader: up to max_prompts cells per image, their boxes jittered in
    training, each predicted mask (upsampled to the image) against the cell's mask. Mean loss, terms and the mean
    IoU of the predicted masks, over every process."""
    s2 = config.stage2_config
    net.train(train)
    sums = {}
    for i, batch in enumerate(loader, start=1):
        images = batch["image"].to(device)
        prompts, truths = sample_prompts(batch, s2, rng, train, device)
        step_sums = {}
        with torch.set_grad_enabled(train), amp(device, config.mixed_precision):
            outputs = net(images, prompts)
            losses = mask_loss_terms(outputs, truths, prompts, images.shape[-1], criterion, s2, step_sums)
            loss = torch.stack(losses).mean() if losses else zero_loss(outputs, images)
        if train:
            step(loss, optimizer, scaler)
        for name, value in step_sums.items():
            sums[name] = sums.get(name, 0) + value
        if log_step:
            n = max(step_sums.pop("mask_count", 0), 1)
            step_sums.pop("mask_loss", None)  # the loss itself
            log_step(i, len(loader), {"loss": float(loss.detach()), **{k: v / n for k, v in step_sums.items()}})
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
        raise SystemExit(
            "the training loss is not finite: lower the learning rate (--learning_rate_s1 / --learning_rate_s2)"
        )
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    scaler.step(optimizer)
    scaler.update()


# ----------------------------------------------------------------------------------------------------------------
# The pipeline on whole images, and the classical baseline
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
def evaluate_pipeline(model, pairs, config, device, visualizer: TrainingVisualizer | None = None) -> dict:
    """The whole pipeline on whole images (tiled where larger than the model's window) and the Otsu baseline on
    the same images (read as read_image reads them); with a visualizer, figures of the first four. The names of
    the images go into the result, so every score says what it was computed on."""
    model.eval()
    predictions, baselines, truths = [], [], []
    for i, pair in enumerate(pairs):
        image, truth = read_pair(pair, config.gamma, model.read_image)
        labels = model.segment(image, config.stage1_config.score_threshold, device=device)
        predictions.append(labels)
        baselines.append(otsu_watershed(read_pair(pair, config.gamma)[0]))  # read_image's scaling, either model
        truths.append(truth)
        if visualizer is not None and i < 4:
            visualizer.predictions(image, truth, labels, f"pipeline_{pair.name}")
    return {**score_images(predictions, truths), "baseline_otsu_watershed": score_images(baselines, truths),
            "images": [p.name for p in pairs]}  # fmt: skip


def true_box_masks(model, image: np.ndarray, true_boxes: np.ndarray, device) -> np.ndarray:
    """The masks the model draws from the true boxes, (K, h, w) bool: the published CellSAM as cellSAM runs it
    with given boxes (masks of low predicted IoU dropped), this folder's model on the window padded to SAM's
    input, each mask cut to its box (grown by 2 px) as its pipeline cuts it."""
    if model.architecture == "published":
        from cellsam.published import predict

        labels = predict(model, image / 255, true_boxes, device)[0]
        return np.array([labels == k for k in range(1, labels.max() + 1)]).reshape(-1, *image.shape[:2])
    sam, size = model.mask_sam, model.input_size
    padded = np.zeros((size, size, 3), np.float32)
    padded[: image.shape[0], : image.shape[1]] = image
    _, embedding = encode(sam, torch.from_numpy(padded.transpose(2, 0, 1))[None].to(device))
    boxes = torch.from_numpy(true_boxes).to(device)
    logits, _ = decode_masks(sam, embedding, boxes)
    masks = torch.nn.functional.interpolate(logits[:, None], size=(size, size), mode="bilinear")[:, 0] > 0
    masks &= box_region(boxes, size, 0.0, 2)  # each mask inside its box, as the pipeline keeps it
    return masks.cpu().numpy()[:, : image.shape[0], : image.shape[1]]


@torch.no_grad()
def stage_figures(model, pairs, config, device, visualizer: TrainingVisualizer, stage: int, name: str) -> Path:
    """Stage 1: CellFinder's kept boxes against the true ones (whole images); stage 2: SAM's masks from the true
    boxes (the first window of each image); on up to two images."""
    was_training = model.training
    model.eval()
    panels = []
    for pair in pairs[:2]:
        image, truth = read_pair(pair, config.gamma, model.read_image)
        if stage == 1:
            boxes, scores = detect_tiled(model, image, device=device)
            keep = model.kept_boxes(scores, config.stage1_config.score_threshold)
            panels.append((image, boxes_from_mask(truth)[1], boxes[keep].numpy(), pair.name))
        else:
            window = window_size(model)
            image, truth = image[:window, :window], truth[:window, :window]
            panels.append((image, true_box_masks(model, image, boxes_from_mask(truth)[1], device), truth, pair.name))
    model.train(was_training)
    return visualizer.boxes(panels, name) if stage == 1 else visualizer.masks(panels, name)


# ----------------------------------------------------------------------------------------------------------------
# The loop both stages share
# ----------------------------------------------------------------------------------------------------------------


def amp(device, enabled: bool = True):
    """Autocast on CUDA (bf16 where supported, else fp16 with fit's GradScaler) unless --no-mixed_precision."""
    if device.type != "cuda" or not enabled:
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def fit(stage: int, run_epoch, modules: dict, parameters, stage_config, fold_dir: Path, log, device,
        mixed_precision: bool = True, tracker: MetricsTracker | None = None, fold: int = 1, on_epoch=None,
        after_epoch=None) -> list[dict]:  # fmt: skip
    """AdamW, cosine annealing per epoch, early stopping on the validation loss (the training loss without a
    validation set), the best epoch's weights loaded at the end; checkpoints by CheckpointManager (only the first
    process writes), one metrics row per epoch into tracker. run_epoch(optimizer, scaler, epoch, train) ->
    metrics (None: no validation set). after_epoch(epoch): figures (--debug); on_epoch(fold, stage, epoch, loss):
    a caller's hook (a search reports to its pruner there). Returns the history, one row per epoch."""
    optimizer = torch.optim.AdamW(parameters, lr=stage_config.learning_rate, weight_decay=stage_config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(stage_config.total_epochs, 1))
    fp16 = device.type == "cuda" and mixed_precision and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    checkpoints, stopper, monitor = (
        CheckpointManager(fold_dir, stage),
        EarlyStopping(stage_config.patience),
        GPUMonitor(device),
    )
    start, history, best_weights = 0, [], None
    last = checkpoints.load_last()
    if last is not None:  # --resume
        for name, module in modules.items():
            if name in last["modules"]:  # runs before the prompt encoder was saved rebuild it from the seed
                module.load_state_dict(last["modules"][name])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        stopper.load_state_dict(last["state"])
        start, history = last["state"]["epoch"], [flat_row(h) for h in last["history"]]
        best_weights = checkpoints.load_best()
        log(f"  stage {stage}: resumed at epoch {start + 1}")
    for epoch in range(start, 0 if stopper.should_stop else stage_config.total_epochs):
        started = time.time()
        train_stats = run_epoch(optimizer, scaler, epoch, train=True)
        val_stats = run_epoch(None, None, epoch, train=False)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        loss = train_stats["loss"] if val_stats is None else val_stats["loss"]
        improved = stopper.step(loss)
        row = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in train_stats.items()},
               **{f"val_{k}": v for k, v in (val_stats or {}).items()}, "lr": lr,
               "seconds": time.time() - started}  # fmt: skip
        history.append(row)
        weights = {
            name: {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            for name, module in modules.items()
        }
        if improved:
            best_weights = weights
        if is_main():
            if improved:
                checkpoints.save_best(epoch + 1, weights)
            checkpoints.save_last({"modules": weights, "optimizer": optimizer.state_dict(), "scheduler":
                                   scheduler.state_dict(), "state": {"epoch": epoch + 1, **stopper.state_dict()},
                                   "history": history})  # fmt: skip
            if tracker is not None:
                tracker.update({k: v for k, v in row.items() if k != "epoch"}, epoch=epoch + 1, fold=fold)
                tracker.save_metrics()
        shown = val_stats or train_stats
        log(f"  stage {stage} epoch {epoch + 1}/{stage_config.total_epochs}  train loss {train_stats['loss']:.4f}  "
            f"val loss {shown['loss']:.4f}" + (f" (mask IoU {shown['mask_iou']:.3f})" if "mask_iou" in shown else "")
            + f"  {monitor.summary()}" + ("  best" if improved else ""))  # fmt: skip
        if after_epoch is not None:
            after_epoch(epoch + 1)
        if on_epoch is not None:
            on_epoch(fold, stage, epoch + 1, loss)
        if stopper.should_stop:
            log(f"  stage {stage}: early stopping, no lower validation loss for {stage_config.patience} epochs")
            break
    if best_weights is not None:
        for name, module in modules.items():
            module.load_state_dict(best_weights[name])
    return history


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


# ----------------------------------------------------------------------------------------------------------------
# One fold: stage 1, stage 2, figures, scores
# ----------------------------------------------------------------------------------------------------------------


def run_fold(config: ExperimentConfig, fold: int, train_pairs, val_pairs, test_pairs, root: Path, log, device,
             on_epoch=None) -> dict:  # fmt: skip
    """One fold: the model, its data, stage 1, stage 2, figures and scores (validation and test images)."""
    fold_dir = root / "models" / f"fold_{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed + fold)  # the same initial weights in every process
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rng = np.random.default_rng([config.seed, fold, rank])
    model = build_model(config, log if rank == 0 else lambda *_: None).to(device)
    published = model.architecture == "published"
    s1, s2 = config.stage1_config, config.stage2_config
    train_set, val_set, train_loader, val_loader, sampler = make_loaders(config, model, train_pairs, val_pairs, fold)
    log(f"fold {fold}: {len(train_pairs)} training and {len(val_pairs)} validation images"
        + (f", {len(test_pairs)} test images" if test_pairs else "")
        + f", {'published CellSAM' if published else 'shared-encoder CellSAM'}, SAM {config.sam_size} "
        f"({model.input_size} px)")  # fmt: skip
    results = {"fold": fold, "train_images": [p.name for p in train_pairs], "val_images": [p.name for p in val_pairs]}
    visualizer = TrainingVisualizer(root / "results" / f"fold_{fold}" / "visualizations")
    shown = val_pairs or train_pairs  # the images the figures show
    debug_log = log if config.debug and rank == 0 else None
    monitor = GPUMonitor(device)
    if config.preeval and val_set and rank == 0:  # the model as loaded, on the images that will score it after
        results["before_training"] = evaluate_pipeline(model, val_pairs, config, device)
        log(f"fold {fold}: before training F1 {results['before_training']['f1']:.3f} (validation images)")

    # stage 1: CellFinder (and, by stage1_type, its image encoder; all_backbones: the masks' encoder too)
    cell_class = s1.cell_class if s1.cell_class >= 0 else pick_cell_class(model, train_set, config, device, log)
    results["cell_class"] = cell_class
    criterion = SetCriterion(s1.ce_loss_weight, s1.bbox_loss_weight, s1.giou_loss_weight, s1.focal_alpha,
                             s1.focal_gamma, s1.one_to_many, cell_class)  # fmt: skip
    mining = (
        "weighted" if s2.online_hard_negative_mining_weighted else "plain" if s2.online_hard_negative_mining else "none"
    )
    mask_loss = MaskLoss(s2.focal_gamma, s2.focal_loss_weight, s2.dice_loss_weight, s2.boundary_loss_weight, mining,
                         s2.negative_ratio)  # fmt: skip
    joint = mask_loss if s1.stage1_type == "all_backbones" else None
    trained = model.freeze_for_stage1(s1.stage1_type)
    net1 = Stage1Net(model)
    ddp1 = distributed(net1, device)  # after freezing: DDP syncs the parameters that need gradients

    def epoch1(optimizer, scaler, epoch, train):
        if not train and val_loader is None:
            return None
        set_epoch(train_set, sampler, epoch)
        net, loader = (ddp1, train_loader) if train else (net1, val_loader)
        # validation draws the same cells every epoch, so early stopping compares like with like
        draws = rng if train else np.random.default_rng([config.seed, fold, rank, 1])
        return stage1_epoch(net, criterion, optimizer, scaler, loader, device, train, joint, s2, draws,
                            config.mixed_precision, step_logger(debug_log, 1, epoch, train, monitor))  # fmt: skip

    parameters = [p for module in trained.values() for p in module.parameters() if p.requires_grad]
    figures1 = (lambda e: stage_figures(model, shown, config, device, visualizer, 1, f"stage1_boxes_epoch_{e:03d}")
                ) if debug_log else None  # fmt: skip
    tracker1 = MetricsTracker(root / "metrics", "stage1_metrics") if rank == 0 else None
    history1 = fit(1, epoch1, trained, parameters, s1, fold_dir, log, device, config.mixed_precision,
                   tracker1, fold, on_epoch, figures1)  # fmt: skip

    # stage 2: the SAM that draws the masks, prompted by true boxes: its neck, mask decoder or both
    model.requires_grad_(False)
    parts, modules2 = model.stage2_parts(s2.train_parts)
    for part in parts:
        part.requires_grad_(True)
    net2 = Stage2Net(model, s2.train_parts)
    ddp2 = distributed(net2, device)

    def epoch2(optimizer, scaler, epoch, train):
        if not train and val_loader is None:
            return None
        set_epoch(train_set, sampler, 1000 + epoch)
        net, loader = (ddp2, train_loader) if train else (net2, val_loader)
        draws = rng if train else np.random.default_rng([config.seed, fold, rank, 2])
        return stage2_epoch(net, mask_loss, optimizer, scaler, loader, device, config, draws, train,
                            step_logger(debug_log, 2, epoch, train, monitor))  # fmt: skip

    parameters2 = [p for part in parts for p in part.parameters()]
    figures2 = (lambda e: stage_figures(model, shown, config, device, visualizer, 2, f"stage2_masks_epoch_{e:03d}")
                ) if debug_log else None  # fmt: skip
    tracker2 = MetricsTracker(root / "metrics", "stage2_metrics") if rank == 0 else None
    history2 = fit(2, epoch2, modules2, parameters2, s2, fold_dir, log, device, config.mixed_precision,
                   tracker2, fold, on_epoch, figures2)  # fmt: skip

    # outputs and scores: the first process alone
    if rank == 0:
        if published:  # the best epochs of both stages, in the layout cellSAM loads
            from cellsam.published import save_published

            log(f"fold {fold}: wrote {save_published(model, fold_dir / 'cellsam_finetuned.pt')}")
        if config.figures:
            stage_figures(model, shown, config, device, visualizer, 1, "stage1_boxes")
            stage_figures(model, shown, config, device, visualizer, 2, "stage2_masks")
            stages = {"stage 1 (CellFinder)": history1, "stage 2 (SAM masks)": history2}
            visualizer.loss_curves(stages)
            visualizer.loss_components(stages)
        for key, pairs, what in (("metrics", val_pairs, "validation"), ("test_metrics", test_pairs, "test")):
            if not pairs:
                continue
            drawn = visualizer if key == "metrics" and config.figures else None
            results[key] = evaluate_pipeline(model, pairs, config, device, drawn)
            m, b, before = results[key], results[key]["baseline_otsu_watershed"], results.get("before_training")
            log(f"fold {fold}, {len(pairs)} {what} images: F1 {m['f1']:.3f} (precision {m['precision']:.3f}, "
                f"recall {m['recall']:.3f}, PQ {m['pq']:.3f})"
                + (f", before training {before['f1']:.3f}" if before and key == "metrics" else "")
                + f"; Otsu + watershed F1 {b['f1']:.3f}, PQ {b['pq']:.3f}")  # fmt: skip
    return results


def make_loaders(config: ExperimentConfig, model, train_pairs, val_pairs, fold: int) -> tuple:
    """The training set (random crops, augmented) and validation set (every tile), their loaders; under torchrun
    each process takes its share of the training images, and of the validation tiles."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    published = model.architecture == "published"
    # the published CellSAM resizes an image that fits its window to its input size; this folder's model keeps the
    # pixel scale and crops
    data_args = {"reader": model.read_image, "resize_small": published, "window": model.window if published else None}
    size = model.input_size
    train_set = CellDataset(train_pairs, size, config.augmentation, config.gamma, config.seed, True,
                            config.stain_transform, **data_args)  # fmt: skip
    val_set = CellDataset(val_pairs, size, False, config.gamma, train=False, **data_args) if val_pairs else None
    loader_args = {"batch_size": config.batch_size, "collate_fn": collate, "num_workers": config.num_workers}
    sampler = DistributedSampler(train_set, seed=config.seed + fold) if world > 1 else None
    generator = torch.Generator().manual_seed(fold)
    train_loader = torch.utils.data.DataLoader(
        train_set, shuffle=sampler is None, sampler=sampler, generator=generator, **loader_args
    )
    val_loader = None
    if val_set is not None:
        val_loader = torch.utils.data.DataLoader(Subset(val_set, range(rank, len(val_set), world)), **loader_args)
    return train_set, val_set, train_loader, val_loader, sampler


def set_epoch(train_set, sampler, epoch: int) -> None:
    train_set.set_epoch(epoch)
    if sampler is not None:
        sampler.set_epoch(epoch)


def step_logger(log, stage: int, epoch: int, train: bool, monitor: GPUMonitor):
    """--debug: a line per training step with every loss term and the memory in use (None: no step lines)."""
    if log is None or not train:
        return None

    def log_step(i: int, n: int, terms: dict) -> None:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in terms.items())
        log(f"    stage {stage} epoch {epoch + 1} step {i}/{n}: {shown}  {monitor.summary()}")

    return log_step


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
        counts += (logits.sigmoid() > config.stage1_config.score_threshold).sum(0).cpu().float()
    if dist.is_initialized():  # every process trains the same column
        dist.broadcast(counts, 0)
    column = 0 if counts[0] > counts[1] else 1
    log(f"  stage 1: CellFinder's class column {column} learns cells ({int(counts[0])} and {int(counts[1])} "
        "queries above the threshold on the first training images)")  # fmt: skip
    return column


# ----------------------------------------------------------------------------------------------------------------
# The experiment: strategy, folds, outputs, aggregation
# ----------------------------------------------------------------------------------------------------------------


def aggregate(folds: list[dict]) -> dict:
    """Mean, standard deviation (n - 1) and 95 % confidence interval (Student's t) of each metric over folds:
    f1, precision, recall, pq on the validation images, baseline_* (Otsu + watershed on them), before_* (--preeval),
    test_* and test_baseline_* (--test_img_path)."""
    out = {}
    sources = (
        ("", lambda f: f.get("metrics")),
        ("baseline_", lambda f: (f.get("metrics") or {}).get("baseline_otsu_watershed")),
        ("before_", lambda f: f.get("before_training")),
        ("test_", lambda f: f.get("test_metrics")),
        ("test_baseline_", lambda f: (f.get("test_metrics") or {}).get("baseline_otsu_watershed")),
    )
    for key in ("f1", "precision", "recall", "pq"):
        for prefix, pick in sources:
            values = np.array([pick(f)[key] for f in folds if pick(f)], float)
            if not len(values):
                continue
            mean = float(values.mean())
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            half = float(stats.t.ppf(0.975, len(values) - 1) * std / np.sqrt(len(values))) if len(values) > 1 else 0.0
            out[prefix + key] = {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": len(values)}
    return out


class ExperimentRunner:
    """Runs an ExperimentConfig (after the CELLSAM_OVERRIDES environment variable, if set): its strategy's folds,
    each fold's two stages, the output tree. root: an existing experiment folder to carry on (--resume);
    on_epoch(fold, stage, epoch, loss): called after every epoch (a search's pruner)."""

    def __init__(self, config: ExperimentConfig, root: Path | None = None, on_epoch=None):
        self.config = copy.deepcopy(config).with_overrides().check()
        self.root, self.on_epoch = root, on_epoch

    def run(self) -> dict:
        return run_experiment(self.config, self.root, self.on_epoch)


def run_experiment(c: ExperimentConfig, root: Path | None = None, on_epoch=None) -> dict:
    # every input checked before anything is written: the files, a published checkpoint, enough images
    pairs = find_pairs(c.img_path, c.mask_path)
    test_pairs = find_pairs(c.test_img_path, c.test_mask_path) if c.test_img_path else []
    check_pairs(pairs + test_pairs)
    if c.cellsam_checkpoint:  # a checkpoint of another layout, cut short, or with keys missing or extra
        from cellsam.published import check_cellsam_checkpoint

        check_cellsam_checkpoint(c.cellsam_checkpoint, c.sam_size, c.allow_missing_keys)
    splits = strategy_for(c).splits(pairs, c.img_path)
    device = setup_device()
    root, log, close_log = open_experiment(c, root)
    world = dist.get_world_size() if dist.is_initialized() else 1
    log(f"CellSAM experiment {root} ({c.strategy}, {len(pairs)} images, device {device.type} x {world} process(es))")
    try:
        individual_path = root / "results" / "individual_results.json"
        done = json.loads(individual_path.read_text()) if individual_path.is_file() else []
        for fold, (train_pairs, val_pairs) in enumerate(splits, start=1):
            if any(r["fold"] == fold for r in done):
                log(f"fold {fold}: finished in an earlier run, kept")
                continue
            done.append(run_fold(c, fold, train_pairs, val_pairs, test_pairs, root, log, device, on_epoch))
            if is_main():
                write_json(individual_path, done)  # a finished fold survives a kill
            if dist.is_initialized():
                dist.barrier()
        aggregated = {"strategy": c.strategy, "folds": len(done), "metrics": aggregate(done) if is_main() else {},
                      "scored_on": "f1, precision, recall, pq: each fold's validation images, which also chose its "
                      "best epochs (optimistic); test_*: the test images (--test_img_path), which took no part in "
                      "training or model choice"}  # fmt: skip
        if is_main():
            write_json(root / "results" / "aggregated_results.json", aggregated)
        report_scores(aggregated["metrics"], log)
        log(f"wrote {root}")
    finally:
        close_log()
    return {"output_dir": str(root), **aggregated}


def open_experiment(c: ExperimentConfig, root: Path | None) -> tuple:
    """(the experiment folder: a new output_dir/output_name (_2, _3... if taken) or the given one, a log function
    writing to logs/experiment.log and the console, a function that closes the log). Under torchrun every process
    gets the folder the first one made; only the first one writes."""
    root = root or (new_experiment_dir(Path(c.output_dir), c.output_name) if is_main() else None)
    if dist.is_initialized():
        shared = [root]
        dist.broadcast_object_list(shared)
        root = shared[0]
    logger = logging.getLogger(f"cellsam.{root}")
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if is_main():
        write_json(root / "experiment_config.json", c.to_dict())
        (root / "logs").mkdir(parents=True, exist_ok=True)
        logger.addHandler(logging.FileHandler(root / "logs" / "experiment.log"))
        logger.addHandler(logging.StreamHandler(sys.stdout))

    def close():
        for handler in logger.handlers:
            handler.close()
        logger.handlers.clear()

    return root, logger.info, close


def report_scores(metrics: dict, log) -> None:
    if "test_f1" in metrics:
        f1, base = metrics["test_f1"], metrics["test_baseline_f1"]
        log(f"F1 at IoU 0.5 on the test images: {f1['mean']:.3f} +- {f1['std']:.3f} over {f1['n']} fold model(s); "
            f"Otsu + watershed {base['mean']:.3f}")  # fmt: skip
    if "f1" in metrics:
        f1, base, before = metrics["f1"], metrics["baseline_f1"], metrics.get("before_f1")
        log(f"F1 at IoU 0.5 on the validation images (they also chose each stage's best epoch): "
            f"{f1['mean']:.3f} +- {f1['std']:.3f} over {f1['n']} fold(s)"
            + (f" (before training {before['mean']:.3f})" if before else "")
            + f"; Otsu + watershed {base['mean']:.3f}")  # fmt: skip


def new_experiment_dir(parent: Path, name: str) -> Path:
    for attempt in range(1, 1000):
        folder = parent / (name if attempt == 1 else f"{name}_{attempt}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise SystemExit(f"could not create a new experiment folder in {parent}")


# ----------------------------------------------------------------------------------------------------------------
# The Python API and the command line
# ----------------------------------------------------------------------------------------------------------------


def finetune(img_path, mask_path, output_name, total_epochs_s1=500, total_epochs_s2=500, k_fold_training=False,
             **kwargs) -> dict:  # fmt: skip
    """Train both stages from Python: `finetune("data/images", "data/masks", "my_cells", 100, 100,
    k_fold_training=True, learning_rate_s2=5e-5, patience=10)`. A keyword is an ExperimentConfig field
    (strategy, debug, sam_size...), a field of one stage (stage1_type, dice_loss_weight...), or a field both stages
    have: NAME_s1 or NAME_s2 for one stage (learning_rate_s1, patience_s2, focal_gamma_s2...), the bare NAME for
    both (patience=10)."""
    config = ExperimentConfig(img_path=str(img_path), mask_path=str(mask_path), output_name=output_name,
                              strategy="k_fold" if k_fold_training else "train_val_split")  # fmt: skip
    config.stage1_config.total_epochs, config.stage2_config.total_epochs = total_epochs_s1, total_epochs_s2
    for name, value in kwargs.items():
        set_field(config, name, value)
    return ExperimentRunner(config).run()


def set_field(config: ExperimentConfig, name: str, value) -> None:
    """config.NAME, or a stage's field: NAME_s1 / NAME_s2, or a NAME only one stage has, or both stages' NAME."""
    if name in field_names(ExperimentConfig):
        setattr(config, name, value)
        return
    stages = {"_s1": [config.stage1_config], "_s2": [config.stage2_config]}.get(name[-3:])
    base = name[:-3] if stages else name
    stages = stages or [s for s in (config.stage1_config, config.stage2_config) if base in field_names(type(s))]
    if not stages or any(base not in field_names(type(s)) for s in stages):
        known = field_names(ExperimentConfig) + [flag_name(n, 1) for n in field_names(Stage1Config)]
        known += [flag_name(n, 2) for n in field_names(Stage2Config)]
        old = {f"{k}{suffix}": f"{v}{suffix}" for k, v in OLD_NAMES.items() for suffix in ("", "_s1", "_s2")}
        hint = [old[name]] if name in old else difflib.get_close_matches(name, known, 1)
        raise TypeError(f"finetune() got an unexpected keyword argument {name!r}"
                        + (f" (did you mean {hint[0]!r}?)" if hint else ""))  # fmt: skip
    for stage in stages:
        setattr(stage, base, value)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

SHARED = set(field_names(Stage1Config)) & set(field_names(Stage2Config))


def flag_name(field_name: str, stage: int | None) -> str:
    """Stage fields both stages have (total_epochs, learning_rate, ...) get a _s1 / _s2 suffix; the others keep
    their names."""
    return f"{field_name}_s{stage}" if stage and field_name in SHARED else field_name


def config_from_args(args) -> ExperimentConfig:
    values = vars(args)
    top = {f.name: values[f.name] for f in fields(ExperimentConfig) if f.name not in ("stage1_config", "stage2_config")}
    s1 = {f.name: values[flag_name(f.name, 1)] for f in fields(Stage1Config)}
    s2 = {f.name: values[flag_name(f.name, 2)] for f in fields(Stage2Config)}
    return ExperimentConfig(**top, stage1_config=Stage1Config(**s1), stage2_config=Stage2Config(**s2))


def set_up_demo(config: ExperimentConfig, given=()) -> None:
    """--demo: synthetic cells in OUTPUT_DIR/demo_data (training and test folders) and the DEMO settings, except
    the flags in `given` (the user's own, which win)."""
    data = write_demo_dataset(Path(config.output_dir) / "demo_data", n_test=6)
    config.img_path, config.mask_path = str(data / "images"), str(data / "masks")
    config.test_img_path, config.test_mask_path = str(data / "test" / "images"), str(data / "test" / "masks")
    config.output_name = config.output_name if "output_name" in given else "cellsam_demo"
    apply_demo_settings(config, given)


def apply_demo_settings(config: ExperimentConfig, given=()) -> None:
    """The DEMO settings on config, except the flags in `given`."""
    for key, value in DEMO.items():
        if isinstance(value, dict):
            stage = 1 if key == "stage1_config" else 2
            for name, v in value.items():
                if flag_name(name, stage) not in given:
                    setattr(getattr(config, key), name, v)
        elif key not in given:
            setattr(config, key, value)


def main(args) -> dict:
    if args.resume:
        root = Path(args.resume)
        if not (root / "experiment_config.json").is_file():
            raise SystemExit(f"--resume {root}: no experiment_config.json there (give output/<name>)")
        config = ExperimentConfig.from_dict(json.loads((root / "experiment_config.json").read_text()))
        return ExperimentRunner(config, root).run()
    config = config_from_args(args)
    if args.demo:
        set_up_demo(config, {a.lstrip("-").split("=")[0] for a in sys.argv[1:] if a.startswith("--")})
    return ExperimentRunner(config).run()


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python cellsam/train.py",
        usage="%(prog)s (--img_path DIR --mask_path DIR | --demo | --resume FOLDER) [options]",
        description=__doc__.split("\n\n")[0],
        epilog="Every option is a field of ExperimentConfig, Stage1Config or Stage2Config (cellsam/config.py); a "
        "field both stages have takes _s1 / _s2. See cellsam/README.md.",
        add_help=add_help,
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--demo", action="store_true", help="synthetic cells in OUTPUT_DIR/demo_data, vit_tiny, both stages"
    )
    run.add_argument(
        "--resume", metavar="FOLDER", help="an experiment folder output/<name>: carries on where it stopped"
    )
    add_config_flags(p)
    return p


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field, with its help text (the field's metadata) and default, in three groups."""
    groups = ((ExperimentConfig, None, "experiment"), (Stage1Config, 1, "stage 1: CellFinder, the boxes"),
              (Stage2Config, 2, "stage 2: SAM, the masks"))  # fmt: skip
    for cls, stage, title in groups:
        group = p.add_argument_group(title)
        defaults = cls()
        for f in fields(cls):
            if f.name in ("stage1_config", "stage2_config"):
                continue
            default, name = getattr(defaults, f.name), flag_name(f.name, stage)
            shown = "none" if default in ("", None) else default
            text = f.metadata["help"].replace("%", "%%") + f" (default: {shown})"
            if isinstance(default, bool):
                group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default, help=text)
            else:
                # a None default (str | None, int | None): the annotated type
                kind = type(default) if default is not None else int if str(f.type).startswith("int") else str
                metavar = {
                    int: "N",
                    float: "X",
                    str: "DIR" if name.endswith(("_path", "_dir")) else "FILE" if "checkpoint" in name else "TEXT",
                }[kind]
                group.add_argument(f"--{name}", type=kind, default=default, metavar=metavar, help=text)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
    if dist.is_initialized():
        dist.destroy_process_group()
