"""Train an Attention U-Net (ResNet34 encoder) for 6-class nucleus segmentation on PanNuke.

    python pannuke/train.py --demo                                   # synthetic folds, 2-3 minutes on 2 CPU cores
    python pannuke/train.py --data_dir DATA --epochs 60 --batch_size 16 --use_mixed_precision
    python pannuke/train.py --data_dir DATA --recipe backup          # Adam, warm-up + cosine, weighted Dice, fp32
    python pannuke/train_backup.py --lr 2e-4 --epochs 50 --batch_size 16   # the same recipe, data in data/pannuke
    python pannuke/train.py --resume runs/pannuke/<run>              # continue a run exactly where it stopped
    torchrun --nproc_per_node=4 pannuke/train.py --data_dir DATA --epochs 60 --use_mixed_precision
    tensorboard --logdir runs/pannuke                                # losses, lr, validation Dice, predictions

DATA (data/pannuke unless --data_dir is given) holds PanNuke's "Fold 1", "Fold 2", "Fold 3" folders (or fold1/
fold2/ fold3/ with images.npy, masks.npy and types.npy, which may be missing); train on --train_fold, validate on
--val_fold (early stopping and best.pth), and test on --test_fold with evaluate.py. Each run writes
runs/pannuke/<timestamp>_<recipe>/: config.json, last.pth (resume), best.pth (by validation mPQ, --selection_metric),
swa.pth (--use_swa), training_history.json, train.log, curves.png, final_report.json and tensorboard/.

Recipes (each sets the defaults listed below; a flag given on the command line wins over the recipe):
    sota    AdamW; OneCycleLR; EMA of the weights (validated and saved as best); Dice + focal + boundary loss
            (boundary weight ramped up, Kervadec et al.); MixUp; progressive augmentation and crop sizes
            (128 px up to --image_size in steps of 32 over the first half; the colour stage jitters the H&E stains
            in HED space); AMP on CUDA; TTA (8 flips and turns) in validation; optional SWA (--use_swa: from
            --swa_start_epoch on SWALR, the per-batch schedule stopped; early stopping before it starts SWA early).
    backup  Adam; linear warm-up + cosine to lr * min_lr_factor; frequency-weighted Dice (1 / sqrt of the
            class's pixel share, at most 5x the background's weight); fp32; no MixUp, EMA or SWA.
Both also regress the distance-to-boundary map that splits touching nuclei (see model.py). --demo writes small
synthetic folds and trains briefly on them: `train.py --demo -h` lists its values.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import logging
import math
import os
import time
import warnings
from contextlib import nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.losses import BoundaryLoss, CombinedLoss, DiceLoss, FocalLoss, FrequencyWeightedDiceLoss
from common.metrics import ConfusionMatrix, pannuke_aggregate, pannuke_tile_pq
from pannuke.data import (
    AUG_STAGES,
    CLASS_NAMES,
    DEFAULT_DATA_DIR,
    DEMO_VERSION,
    NUM_CLASSES,
    HelpFormatter,
    PanNukeDataset,
    load_fold,
    new_folder,
    write_demo_dataset,
    write_json,
)
from pannuke.model import (
    DOMAIN,
    build_model,
    checkpoint_dict,
    ema_average,
    instances_from_outputs,
    pannuke_masks,
    pick_device,
    predict,
)
from pannuke.visualize import plot_curves, prediction_strips

RECIPES = {
    "sota": {
        "optimizer": "adamw",
        "scheduler": "onecycle",
        "use_ema": True,
        "use_mixed_precision": True,  # on CUDA; see parse_args
        "mixup_alpha": 0.2,
        "progressive_aug": True,
        "progressive_resize": True,
        "tta": True,
        "loss": "hybrid",
    },
    "backup": {
        "optimizer": "adam",
        "scheduler": "cosine",
        "use_ema": False,
        "use_mixed_precision": False,
        "mixup_alpha": 0.0,
        "progressive_aug": False,
        "progressive_resize": False,
        "tta": False,
        "loss": "weighted_dice",
    },
}
# --demo: a small synthetic fold set and settings that finish in two to three minutes on two CPU cores
DEMO = {"epochs": 8, "batch_size": 8, "image_size": 128, "tta": False, "encoder_weights": "none", "lr": 2e-3,
        "data_dir": None}  # fmt: skip
OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


# ----------------------------------------------------------------------------------------------------------------
# One epoch of training, one pass of validation
# ----------------------------------------------------------------------------------------------------------------


def compute_loss(criterion, dist_weight, outputs, batch, soft_target=None):
    """Segmentation terms of `criterion` on the class logits, plus MSE of the distance map (weight dist_weight)."""
    target = batch["semantic"] if soft_target is None else soft_target
    extra = {"dist_map": batch["sdf"]} if "sdf" in batch else {}
    total, terms = criterion(outputs["seg"], target, **extra)
    dist_loss = F.mse_loss(outputs["dist"].float().sigmoid(), batch["dist"])
    terms["dist"] = dist_loss.detach()
    return total + dist_weight * dist_loss, terms


def mixup(batch: dict, alpha: float, rng: np.random.Generator) -> tuple[dict, torch.Tensor]:
    """MixUp (Zhang et al. 2018) of a batch with a shuffled copy of itself: images, one-hot targets, distance and
    boundary maps are all mixed with the same lambda ~ Beta(alpha, alpha)."""
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(batch["image"].shape[0])).to(batch["image"].device)
    onehot = F.one_hot(batch["semantic"], NUM_CLASSES).permute(0, 3, 1, 2).float()
    mixed = dict(batch)
    for key in ("image", "dist", "sdf"):
        if key in batch:
            mixed[key] = lam * batch[key] + (1 - lam) * batch[key][perm]
    return mixed, lam * onehot + (1 - lam) * onehot[perm]


def train_one_epoch(model, ema, criterion, optimizer, scheduler, scaler, ctx, loader, device, epoch, args, state):
    """One pass over the training fold; the scheduler steps per batch (None in the SWA phase, where SWALR steps
    per epoch). Returns the mean loss and its terms."""
    model.train()
    rng = np.random.default_rng(args.seed * 1000 + epoch)  # MixUp draws, reproducible per epoch
    sums, count = {}, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not is_main(), leave=False, dynamic_ncols=True)
    for batch in bar:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        soft_target = None
        if args.mixup_alpha > 0 and rng.random() < args.mixup_prob:
            batch, soft_target = mixup(batch, args.mixup_alpha, rng)
        with ctx:
            outputs = model(batch["image"])
        loss, terms = compute_loss(criterion, args.dist_weight, outputs, batch, soft_target)

        # A NaN/inf loss skips the step on every rank; too many in a row stop the run (last.pth stays intact).
        finite = torch.isfinite(loss.detach()).float()
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        optimizer.zero_grad(set_to_none=True)
        if not finite.item():
            state["nan_steps"] += 1
            if state["nan_steps"] >= args.max_nan_steps:
                raise SystemExit(
                    f"the training loss was NaN or infinite for {state['nan_steps']} steps in a row (epoch "
                    f"{epoch + 1}); stopping. Try a lower --lr, --grad_clip_val, or check the data. The last good "
                    f"epoch is in last.pth (--resume)."
                )
            logging.warning("non-finite loss at epoch %d: step skipped", epoch + 1)
            with warnings.catch_warnings():  # the schedule advances over the skipped step on purpose
                warnings.simplefilter("ignore", UserWarning)
                if scheduler is not None:
                    scheduler.step()
            continue
        state["nan_steps"] = 0
        scaler.scale(loss).backward()
        if args.grad_clip_val > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_val)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(unwrap(model))

        count += 1
        for name, value in {"loss": loss.detach(), **terms}.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    means = {k: v / max(count, 1) for k, v in sums.items()}
    if dist.is_initialized():
        values = torch.tensor([means.get(k, 0.0) for k in sorted(means)], dtype=torch.float64, device=device)
        dist.all_reduce(values)
        means = dict(zip(sorted(means), (values / dist.get_world_size()).tolist(), strict=True))
    return means


@torch.no_grad()
def validate(model, criterion, loader, device, args, ctx):
    """Validation loss, per-class Dice (a confusion matrix reduced over ranks) and PanNuke's bPQ and mPQ: each
    tile's output decoded into nuclei as evaluate.py decodes it, scored per tile and averaged per tissue
    (common.metrics, the PanNuke protocol). With tta, on TTA-averaged probabilities; the loss takes their log."""
    model.eval()
    fold = loader.dataset.fold
    matrix = ConfusionMatrix(NUM_CLASSES, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum, count) on the CPU: MPS has no float64
    pq = torch.zeros(2, len(fold), 6, dtype=torch.float64)  # (value, scored) per tile: 5 class PQs, binary PQ
    for batch in tqdm(loader, desc="validation", disable=not is_main(), leave=False, dynamic_ncols=True):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        probs, distance = predict(model, batch["image"], tta=args.tta, ctx=ctx)
        outputs = {"seg": probs.clamp_min(1e-8).log(), "dist": torch.logit(distance, eps=1e-6)}
        loss, _ = compute_loss(criterion, args.dist_weight, outputs, batch)
        loss_sum += torch.tensor([loss.item() * len(probs), len(probs)], dtype=torch.float64)
        matrix.update(probs.argmax(1), batch["semantic"])
        probs, distance = probs.float().cpu().numpy(), distance[:, 0].float().cpu().numpy()
        for i, index in enumerate(batch["index"].tolist()):
            predicted = pannuke_masks(*instances_from_outputs(probs[i], distance[i]))
            class_pq, binary_pq = pannuke_tile_pq(fold.class_masks(index), predicted)
            scores = torch.from_numpy(np.append(class_pq, binary_pq))
            pq[0, index], pq[1, index] = scores.nan_to_num(0.0), (~scores.isnan()).double()
    matrix.all_reduce()
    if dist.is_initialized():  # each tile was scored by one rank
        loss_sum, pq = loss_sum.to(device), pq.to(device)
        dist.all_reduce(loss_sum)
        dist.all_reduce(pq)
    pq = torch.where(pq[1] > 0, pq[0], torch.nan).cpu().numpy()  # NaN: class absent from the tile (PanNuke's rule)
    panoptic = pannuke_aggregate(pq[:, :5], pq[:, 5], fold.types)
    scores = matrix.compute()
    return {
        "loss": float(loss_sum[0] / loss_sum[1].clamp_min(1)),
        "dice": dict(zip(CLASS_NAMES, scores["dice"], strict=True)),
        "mean_dice": scores["mean_dice"],
        "fg_mean_dice": scores["fg_mean_dice"],
        "mpq": panoptic["mpq"],
        "bpq": panoptic["bpq"],
        "pixels": scores["num_pixels"],
    }


def selection_score(val_stats: dict, args) -> float:
    """The number best.pth and early stopping follow: validation mPQ (PanNuke's metric), bPQ or foreground Dice;
    a NaN (no nucleus in the validation fold) counts as the worst score."""
    score = val_stats["fg_mean_dice" if args.selection_metric == "dice" else args.selection_metric]
    return -math.inf if math.isnan(score) else score


# ----------------------------------------------------------------------------------------------------------------
# Set-up: devices, DDP, mixed precision, loss, schedules, progressive training
# ----------------------------------------------------------------------------------------------------------------


def setup_device() -> torch.device:
    """CUDA, Apple MPS or CPU; under torchrun one process per GPU (NCCL) or per CPU process (gloo)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        # an hour, not NCCL's 10 minutes: the other ranks wait while rank 0 builds a cache on first use
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=1))
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return pick_device()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def mixed_precision(device: torch.device, enabled: bool, dtype: torch.dtype | None = None):
    """nanoGPT's set-up, made once in main and passed to every loop: one autocast context (nullcontext when off)
    and one GradScaler, which scales only fp16 losses. dtype None: bf16 on the CPU and on GPUs that have it; fp16
    with the scaler on older GPUs and on Apple MPS (not measured here: fp16 is the type MPS autocast has long had)."""
    if dtype is None:
        bf16 = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
        dtype = torch.bfloat16 if bf16 else torch.float16
    ctx = torch.autocast(device.type, dtype=dtype) if enabled else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=enabled and dtype == torch.float16)
    return ctx, scaler


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """Atomic: write a temp file, then rename over the old one, so a kill never leaves half a checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def build_loss(args, class_pixels: np.ndarray, validation: bool = False):
    """The training loss, or (validation=True) the same without the boundary term, whose signed distance maps
    would cost more than the validation forward pass itself."""
    if args.loss == "hybrid":
        terms = {"dice": (DiceLoss(), 1.0), "focal": (FocalLoss(gamma=2.0), 1.0)}
        if not validation:
            terms["boundary"] = (BoundaryLoss(), 0.0)  # ramped up per epoch, see boundary_weight()
        return CombinedLoss(terms)
    # Square-root inverse frequency, capped at 5x the background's weight: plain 1 / frequency gave the rare
    # Dead class 0.76-0.80 of the weight, so every batch without a dead nucleus pushed Dead towards zero.
    weighted = FrequencyWeightedDiceLoss(class_counts=class_pixels, power=0.5, max_ratio=5.0)
    return CombinedLoss({"dice": (weighted, 1.0)})


def boundary_weight(epoch: int, args) -> float:
    """Kervadec et al.'s schedule: the boundary term starts at 0.01 and gains 0.01 per epoch while the region
    (Dice) term leads, here capped at --boundary_weight (its distances are in pixels, so it is large)."""
    return min(args.boundary_weight, 0.01 * (epoch + 1))


def build_scheduler(optimizer, args, steps_per_epoch: int):
    """Both step once per batch."""
    total = args.epochs * steps_per_epoch
    if args.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=args.lr,
            total_steps=total,
            pct_start=min(0.3, max(args.warmup_epochs, 1) / args.epochs),
            final_div_factor=1 / args.min_lr_factor / 25,
        )
    warmup = min(args.warmup_epochs * steps_per_epoch, total - 1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(total - warmup, 1), eta_min=args.lr * args.min_lr_factor
    )
    if warmup == 0:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def start_plan(args) -> dict:
    """The epochs a run will train: all of --epochs, SWA's phase (0-based first epoch) from --swa_start_epoch.
    Early stopping may end the run sooner or start SWA's phase sooner (stop_early); last.pth keeps the plan."""
    return {"end": args.epochs, "swa_from": args.swa_start_epoch - 1 if args.use_swa else None, "stopped_early": None}


def start_swa_phase(optimizer, args, plan: dict, state=None) -> SWALR:
    """From SWA's first epoch the per-batch schedule stops and SWALR takes the learning rate from where that
    schedule left it to --swa_lr (cosine, over --swa_anneal_epochs), then holds it, as Izmailov et al. do;
    early stopping pauses, SWA averages every epoch up to the plan's end."""
    swa_scheduler = SWALR(optimizer, swa_lr=args.swa_lr, anneal_epochs=args.swa_anneal_epochs, anneal_strategy="cos")
    if state is not None:  # a resumed run in its SWA phase
        swa_scheduler.load_state_dict(state)
    else:
        logging.info(
            "SWA phase, epochs %d-%d: lr %.2e -> %.2e over %d epochs (SWALR), then constant; weights averaged every "
            "epoch; early stopping paused",
            plan["swa_from"] + 1, plan["end"], optimizer.param_groups[0]["lr"], args.swa_lr, args.swa_anneal_epochs,
        )  # fmt: skip
    return swa_scheduler


def stop_early(plan: dict, epoch: int, args, optimizer, patience: int) -> dict:
    """No better validation score for --early_stopping_patience epochs. Without SWA the run ends here, and the
    log says how much of the learning-rate schedule did not run; with --use_swa its phase starts now instead (the
    epochs it had planned, so swa.pth is always written), unless it has started already."""
    done = (epoch + 1) / args.epochs  # the per-batch schedule spans all --epochs
    record = {"epoch": epoch + 1, "of": args.epochs, "lr": optimizer.param_groups[0]["lr"], "schedule_done": done}
    plan = {**plan, "stopped_early": record}
    reason = f"early stopping at epoch {epoch + 1} of {args.epochs}: no better validation {args.selection_metric} "
    reason += (
        f"for {patience} epochs; the {args.scheduler} schedule ran {done:.0%} of its steps (lr now {record['lr']:.2e})"
    )
    if plan["swa_from"] is None:
        logging.warning("%s; the rest of it does not run", reason)
        return {**plan, "end": epoch + 1}
    swa_epochs = args.epochs - args.swa_start_epoch + 1
    logging.warning("%s; SWA's %d epochs start now instead of at epoch %d", reason, swa_epochs, args.swa_start_epoch)
    return {**plan, "swa_from": epoch + 1, "end": epoch + 1 + swa_epochs}


def crop_size_for(epoch: int, args) -> int:
    """Progressive resizing: random crops grow from 128 px to --image_size in steps of 32 px (128, 160, 192, 224
    for 256), each step an equal share of the first half of the epochs, then --image_size. Crops (not
    downscaling) keep nuclei at the scanner's magnification, so the model sees one scale throughout."""
    smaller = list(range(min(128, args.image_size), args.image_size, 32))
    half = args.epochs // 2
    if not args.progressive_resize or not smaller or epoch >= half:
        return args.image_size
    return smaller[epoch * len(smaller) // half]


def aug_stage_for(epoch: int, args) -> int:
    """Progressive augmentation: geometric from the start, then colour, noise and distortions, each switched on
    at an equal share of the epochs. Without it, all of them from the first epoch."""
    if not args.progressive_aug:
        return len(AUG_STAGES) - 1
    return min(len(AUG_STAGES) - 1, epoch * len(AUG_STAGES) // max(args.epochs, 1))


# ----------------------------------------------------------------------------------------------------------------
# The phases of main, in the order it calls them
# ----------------------------------------------------------------------------------------------------------------


def setup_logging(run_dir: Path | None) -> None:
    handlers = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=handlers, force=True)


def resume_or_start(args) -> tuple[argparse.Namespace, dict | None]:
    """A new run: its checked arguments and no checkpoint. --resume: the run's last.pth, and the run's stored
    arguments (they win; flags given with --resume are named and ignored, except the worker count)."""
    if not args.resume:
        return check_args(args), None
    path = Path(args.resume)
    path = path / "last.pth" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"--resume {args.resume}: no last.pth there")
    resume = torch.load(path, map_location="cpu", weights_only=True)
    if resume.get("domain") != DOMAIN or "optimizer" not in resume:
        raise SystemExit(f"--resume {path}: not a pannuke training checkpoint (last.pth of a pannuke run)")
    ignored = ignored_flags(args)
    if ignored and is_main():
        logging.warning("--resume continues with the run's stored settings; ignoring --%s", ", --".join(ignored))
    before = {"selection_metric": "dice", "swa_lr": resume["args"]["lr"] / 4, "swa_anneal_epochs": 2}
    stored = argparse.Namespace(**{**before, **resume["args"]})  # runs from before these flags
    stored.resume, stored.num_workers = str(path), args.num_workers
    return stored, resume


def ignored_flags(args) -> list[str]:
    """The flags of a --resume command line that differ from what parse_args gives for its recipe and --demo."""
    selectors = ["--recipe", args.recipe, *(["--demo"] if args.demo else [])]
    plain, reference = vars(parse_args([])), {**vars(parse_args(selectors)), **derived_defaults(args)}
    given = [k for k, v in vars(args).items() if k not in ("resume", "num_workers") and v != reference.get(k)]
    return [k for k in ("recipe", "demo") if vars(args)[k] != plain[k]] + given


def already_finished(resume: dict, args) -> bool:
    done = resume["epoch"] >= stored_plan(resume, args)["end"]
    if done:
        logging.info(f"{args.resume} finished already (epoch {resume['epoch']} of {args.epochs}); nothing to resume")
    return done


def load_data(args):
    """The training and validation folds, checked, and cached by rank 0 (the others wait, then read the cache);
    --demo first writes its synthetic folds. Paths become absolute, so evaluate.py finds the data from anywhere."""
    if args.demo and args.data_dir is None:
        tiles = (args.demo_tiles, *(2 * [max(2, args.demo_tiles // 4)]))
        # one folder per demo size, so a later demo never rewrites the data an earlier run was trained on
        args.data_dir = str(Path(args.output_dir) / "demo_data" / "v{}_tiles_{}_{}_{}".format(DEMO_VERSION, *tiles))
        if is_main():
            write_demo_dataset(args.data_dir, tiles)
        if dist.is_initialized():
            dist.barrier()
    args.data_dir, args.output_dir = str(Path(args.data_dir).resolve()), str(Path(args.output_dir).resolve())
    args.cache_dir = str(Path(args.cache_dir).resolve())
    if is_main():  # rank 0 builds the cache, the others read it
        train_fold = load_fold(args.data_dir, args.train_fold, args.cache_dir, log=logging.info)
        val_fold = load_fold(args.data_dir, args.val_fold, args.cache_dir, log=logging.info)
    if dist.is_initialized():
        dist.barrier()
        if not is_main():
            train_fold = load_fold(args.data_dir, args.train_fold, args.cache_dir)
            val_fold = load_fold(args.data_dir, args.val_fold, args.cache_dir)
    tile_size = min(train_fold.images.shape[1:3])
    if args.image_size > tile_size:
        raise SystemExit(
            f"--image_size {args.image_size} is larger than the tiles of {train_fold.files.images} ({tile_size} px)"
        )
    return train_fold, val_fold


def create_model(args, device):
    """The network, and the constructor arguments stored with it (evaluate.py rebuilds it from them and loads
    the trained weights, so it never downloads the encoder's ImageNet weights)."""
    model_args = {"encoder": args.encoder, "encoder_weights": args.encoder_weights, "dropout": args.dropout}
    model = build_model(model_args).to(device)
    if getattr(args, "channels_last", False):  # runs stored before the flag resume without it
        model = model.to(memory_format=torch.channels_last)
    return model, {**model_args, "encoder_weights": "none"}


def start_run(args, resume, device) -> Path | None:
    """The run folder (a new one, or the resumed run's) with its train.log and config.json; None on ranks > 0."""
    run_dir = None
    if resume is not None:
        run_dir = Path(args.resume).parent
    elif is_main():
        run_dir = new_folder(Path(args.output_dir), args.recipe)
    setup_logging(run_dir if is_main() else None)
    if is_main():
        processes = dist.get_world_size() if dist.is_initialized() else 1
        logging.info("run folder %s on %s (%d process(es))", run_dir, device, processes)
        if resume is None:
            write_json(run_dir / "config.json", vars(args))
    return run_dir


def average_and_distribute(model, args, device):
    """EMA and SWA copies of the weights (each where asked), then the model wrapped for DDP under torchrun."""
    ema = AveragedModel(model, multi_avg_fn=ema_average(args.ema_decay), use_buffers=True) if args.use_ema else None
    swa = AveragedModel(model) if args.use_swa else None
    if dist.is_initialized():
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, ema, swa


def make_loaders(args, train_fold, val_fold, device):
    train_set = PanNukeDataset(train_fold, train=True, boundary_maps=args.loss == "hybrid")
    val_set = PanNukeDataset(val_fold)
    generator = torch.Generator()
    sampler = None
    if dist.is_initialized():
        sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed, drop_last=True)
        # each rank validates every world_size-th tile: no padding, so no tile counts twice
        val_set = PanNukeDataset(val_fold, indices=range(dist.get_rank(), len(val_fold), dist.get_world_size()))
    common = {"num_workers": args.num_workers, "pin_memory": device.type == "cuda"}
    # drop_last keeps BatchNorm away from a batch of one; a fold smaller than one batch is still one batch.
    drop_last = len(train_set) // (dist.get_world_size() if dist.is_initialized() else 1) > args.batch_size
    train_loader = DataLoader(
        train_set,
        args.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        drop_last=drop_last if sampler is None else False,
        **common,
    )
    val_loader = DataLoader(val_set, args.batch_size, shuffle=False, **common)
    return train_set, train_loader, val_loader, generator


def stored_plan(resume: dict, args) -> dict:
    """The plan in last.pth; runs from before it had one ended at --epochs, or where early stopping hit."""
    if "plan" in resume:
        return resume["plan"]
    stopped = resume["patience"] >= args.early_stopping_patience
    return {**start_plan(args), "end": resume["epoch"] if stopped else args.epochs}


def restore(resume: dict | None, parts: dict, args) -> tuple[int, float, int, list, dict]:
    """Load the states of a resumed run into parts (model, optimizer, scheduler, scaler, ema, swa and, in SWA's
    phase, its SWALR); returns the epoch to start from, the best score, the patience counter, the history and the
    plan of epochs."""
    if resume is None:
        return 0, -math.inf, 0, [], start_plan(args)
    for name, part in parts.items():
        if part is not None:
            (unwrap(part) if name == "model" else part).load_state_dict(resume[name])
    plan = stored_plan(resume, args)
    if resume.get("swa_scheduler") is not None:
        parts["swa_scheduler"] = start_swa_phase(parts["optimizer"], args, plan, resume["swa_scheduler"])
    logging.info("resumed from %s at epoch %d", args.resume, resume["epoch"] + 1)
    return resume["epoch"], resume["best"], resume["patience"], resume["history"], plan


def configure_epoch(epoch, args, rank, train_set, train_loader, generator, criterion) -> None:
    """Everything random in an epoch derives from (seed, epoch, rank), so a resumed run repeats it exactly; the
    crop size, augmentation stage and boundary-loss weight follow the epoch."""
    epoch_seed = args.seed * 1000 + epoch + 100_003 * rank
    torch.manual_seed(epoch_seed)
    generator.manual_seed(epoch_seed)  # shuffling
    train_set.configure(crop_size_for(epoch, args), aug_stage_for(epoch, args), seed=epoch_seed)
    if isinstance(train_loader.sampler, DistributedSampler):
        train_loader.sampler.set_epoch(epoch)
    if "boundary" in criterion.weights:
        criterion.weights["boundary"] = boundary_weight(epoch, args)


def log_epoch(record: dict, args, improved: bool) -> None:
    loss, val, best = record["train"].get("loss", math.nan), record["val"], "  (best)" if improved else ""
    line = f"epoch {record['epoch']}/{args.epochs}  train loss {loss:.4f}  val loss {val['loss']:.4f}  val Dice"
    line += f" (fg mean) {val['fg_mean_dice']:.4f}  bPQ {val['bpq']:.4f}  mPQ {val['mpq']:.4f}{best}"
    share = record["val_seconds"] / max(record["seconds"], 1e-9)
    logging.info(f"{line}  lr {record['lr']:.2e}  {record['seconds']:.0f}s ({share:.0%} validation)")


def save_epoch(run_dir: Path, args, model_args: dict, parts: dict, evaluated, history, best, patience, improved, plan):
    """best.pth (the validated weights, when they improved), last.pth (everything --resume needs), the history
    and its curves."""
    record = history[-1]
    if improved:
        metric = {args.selection_metric: best}
        weights = evaluated.state_dict()
        save_checkpoint(
            run_dir / "best.pth",
            checkpoint_dict(args, model_args, weights, epoch=record["epoch"], metric=metric, val=record["val"]),
        )
    states = {name: part.state_dict() if part is not None else None for name, part in parts.items() if name != "model"}
    last = checkpoint_dict(args, model_args, unwrap(parts["model"]).state_dict(), epoch=record["epoch"], **states)
    save_checkpoint(
        run_dir / "last.pth", {**last, "best": best, "patience": patience, "history": history, "plan": plan}
    )
    write_json(run_dir / "training_history.json", history)
    plot_curves(history, run_dir / "curves.png")


def log_tensorboard(writer: SummaryWriter, record: dict, strips: np.ndarray) -> None:
    """One epoch of the history: every training loss term, the learning rate, every validation metric, and a
    few validation tiles with their predictions."""
    step = record["epoch"]
    for name, value in record["train"].items():
        writer.add_scalar(f"train/{name}", value, step)
    writer.add_scalar("lr", record["lr"], step)
    for name in ("loss", "mean_dice", "fg_mean_dice", "bpq", "mpq"):
        writer.add_scalar(f"val/{name}", record["val"][name], step)
    for name, value in record["val"]["dice"].items():
        writer.add_scalar(f"val/dice_{name}", value, step)
    writer.add_scalar("time/val_share", record["val_seconds"] / max(record["seconds"], 1e-9), step)
    writer.add_images("val/image_truth_prediction", strips, step, dataformats="NHWC")
    writer.flush()


def finish_swa(swa, train_loader, val_loader, val_criterion, device, args, ctx, run_dir, model_args, epochs: int):
    """SWA's weights get BatchNorm statistics of their own (one pass over the training data), are validated, and
    saved as swa.pth. Returns their validation score (--selection_metric)."""
    update_bn((batch["image"] for batch in train_loader), swa, device=device)
    if dist.is_initialized():  # each rank saw its own shard: average the statistics so all ranks agree
        for name, buffer in swa.module.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                dist.all_reduce(buffer)
                buffer /= dist.get_world_size()
    stats = validate(swa.module, val_criterion, val_loader, device, args, ctx)
    if is_main():
        logging.info(
            "SWA (%d epochs averaged): val Dice (fg mean) %.4f, bPQ %.4f, mPQ %.4f",
            swa.n_averaged.item(), stats["fg_mean_dice"], stats["bpq"], stats["mpq"],
        )  # fmt: skip
        metric = {args.selection_metric: selection_score(stats, args)}
        weights = swa.module.state_dict()
        save_checkpoint(
            run_dir / "swa.pth", checkpoint_dict(args, model_args, weights, epoch=epochs, metric=metric, val=stats)
        )
    return selection_score(stats, args)


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def main(args):
    device = setup_device()
    rank = dist.get_rank() if dist.is_initialized() else 0
    setup_logging(None)
    args, resume = resume_or_start(args)
    if resume is not None and already_finished(resume, args):
        return Path(args.resume).parent
    ctx, scaler = mixed_precision(device, args.use_mixed_precision)
    torch.manual_seed(args.seed)

    # Data first: a bad fold stops the run before any folder is created. The network next (ImageNet weights may
    # need a download that can fail), then the run folder.
    train_fold, val_fold = load_data(args)
    model, model_args = create_model(args, device)
    run_dir = start_run(args, resume, device)
    model, ema, swa = average_and_distribute(model, args, device)

    criterion = build_loss(args, train_fold.class_pixels).to(device)
    val_criterion = build_loss(args, train_fold.class_pixels, validation=True).to(device)
    train_set, train_loader, val_loader, generator = make_loaders(args, train_fold, val_fold, device)
    optimizer = OPTIMIZERS[args.optimizer](unwrap(model).parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = build_scheduler(optimizer, args, len(train_loader))
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "ema": ema, "swa": swa,
             "swa_scheduler": None}  # fmt: skip
    start_epoch, best, patience, history, plan = restore(resume, parts, args)
    # a resumed run appends to its own events, dropping what the killed run logged after its last.pth
    writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_epoch + 1) if is_main() else None
    state = {"nan_steps": 0}

    epoch = start_epoch
    while epoch < plan["end"]:  # --epochs, unless early stopping ends the run or brings SWA's phase forward
        started = time.time()
        in_swa = plan["swa_from"] is not None and epoch >= plan["swa_from"]
        if in_swa and parts["swa_scheduler"] is None:
            parts["swa_scheduler"] = start_swa_phase(optimizer, args, plan)
        configure_epoch(epoch, args, rank, train_set, train_loader, generator, criterion)
        batch_scheduler = None if in_swa else scheduler
        train_stats = train_one_epoch(
            model, ema, criterion, optimizer, batch_scheduler, scaler, ctx, train_loader, device, epoch, args, state
        )
        evaluated = ema.module if ema is not None else unwrap(model)
        if dist.is_initialized():  # BatchNorm statistics differ a little between ranks: validate rank 0's
            for buffer in evaluated.buffers():
                dist.broadcast(buffer, 0)
        val_started = time.time()
        val_stats = validate(evaluated, val_criterion, val_loader, device, args, ctx)
        val_seconds = time.time() - val_started
        if in_swa:
            swa.update_parameters(unwrap(model))
            parts["swa_scheduler"].step()

        score = selection_score(val_stats, args)
        improved = score > best + args.min_delta or (best == -math.inf and not history)  # epoch 1 is a best
        best, patience = (score, 0) if improved else (best, patience + 1)
        history.append(
            {
                "epoch": epoch + 1,
                "lr": optimizer.param_groups[0]["lr"],
                "phase": "swa" if in_swa else "train",
                "crop_size": train_set.crop_size,
                "aug_stage": AUG_STAGES[train_set.stage],
                "train": train_stats,
                "val": val_stats,
                "seconds": time.time() - started,
                "val_seconds": val_seconds,  # validation's part of it: inference, decoding nuclei, scoring
            }
        )
        if is_main():
            log_epoch(history[-1], args, improved)
        if patience >= args.early_stopping_patience and not in_swa and plan["stopped_early"] is None:
            plan = stop_early(plan, epoch, args, optimizer, patience)
        if is_main():
            save_epoch(run_dir, args, model_args, parts, evaluated, history, best, patience, improved, plan)
            log_tensorboard(writer, history[-1], prediction_strips(evaluated, val_fold, device, ctx))
        epoch += 1

    chosen = next((h for h in history if selection_score(h["val"], args) == best), None)
    report = {
        "selection_metric": args.selection_metric,
        "best": best,
        "epochs_run": len(history),
        "stopped_early": plan["stopped_early"],  # None: the whole schedule ran
        "run_dir": str(run_dir),
        # these scores chose the model; evaluate.py scores the held-out --test_fold
        "scored_on": f"validation fold {args.val_fold} (the tiles that chose best.pth)",
        "tissue_averaged": val_fold.files.types.is_file(),  # False: no types.npy, mPQ and bPQ are means over tiles
    }
    if chosen is not None:  # the scores of the epoch best.pth holds
        report["best_epoch"] = chosen["epoch"]
        report.update({f"best_{k}": chosen["val"][k] for k in ("fg_mean_dice", "bpq", "mpq")})
    if swa is not None and swa.n_averaged.item() > 0:
        swa_score = finish_swa(
            swa, train_loader, val_loader, val_criterion, device, args, ctx, run_dir, model_args, len(history)
        )
        report[f"swa_{args.selection_metric}"] = swa_score
        report["swa_epochs"] = [plan["swa_from"] + 1, plan["end"]]
    elif swa is not None:  # not reached by the plan; said so rather than left out silently
        logging.warning("--use_swa: no epoch was averaged, so no swa.pth")
    if is_main():
        writer.close()
        write_json(run_dir / "final_report.json", report)
        logging.info(
            "best.pth holds epoch %s: validation mPQ %.4f, bPQ %.4f, Dice (fg mean) %.4f (chosen by %s); run folder %s",
            report.get("best_epoch"), report.get("best_mpq", math.nan), report.get("best_bpq", math.nan),
            report.get("best_fg_mean_dice", math.nan), args.selection_metric, run_dir,
        )  # fmt: skip
        logging.info("next: python pannuke/evaluate.py %s", run_dir)
    if dist.is_initialized():
        dist.destroy_process_group()
    return run_dir


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def check_args(args) -> argparse.Namespace:
    if args.epochs < 1:
        raise SystemExit(f"--epochs {args.epochs}: train for at least one epoch")
    if args.use_swa and not 1 <= args.swa_start_epoch <= args.epochs:
        raise SystemExit(f"--swa_start_epoch {args.swa_start_epoch} is outside 1..--epochs ({args.epochs})")
    if args.image_size % 32:
        raise SystemExit(f"--image_size {args.image_size} must be a multiple of 32")
    if not args.demo and not Path(args.data_dir or "").is_dir():
        raise SystemExit(
            f"--data_dir {args.data_dir}: no such folder; put PanNuke's Fold 1/2/3 there, give --data_dir DIR "
            "(the folder that holds them), or try --demo"
        )
    if len({args.train_fold, args.val_fold}) < 2:
        raise SystemExit(f"--train_fold and --val_fold must differ (both {args.train_fold})")
    return args


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Every default here is the sota recipe's on real data; parse_args lets --recipe and --demo change them."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, add_help=add_help)
    add = p.add_argument

    def switch(name: str, help: str) -> None:
        """An on/off flag, --name and --no-name. Its - spelling is a hidden twin: the usage line would list all
        four names of one BooleanOptionalAction."""
        add(name, action=argparse.BooleanOptionalAction, default=False, help=help)
        if "_" in name:
            add(name.replace("_", "-"), dest=name[2:], action=argparse.BooleanOptionalAction, help=argparse.SUPPRESS)

    add("--data_dir", "--data-dir", default=DEFAULT_DATA_DIR, help="folder with PanNuke's Fold 1/2/3 (or fold1/2/3)")
    add("--demo", action="store_true", help="write synthetic PanNuke folds into OUTPUT_DIR/demo_data and train on them")
    add("--demo_tiles", "--demo-tiles", type=int, default=128, help="--demo: synthetic tiles in fold 1; folds 2 "
        "and 3 get a quarter of that")  # fmt: skip
    add("--output_dir", "--output-dir", default="runs/pannuke", help="a new folder per run in here")
    add("--cache_dir", "--cache-dir", help="preprocessed fold cache; follows --output_dir unless given")
    add("--resume", help="a run folder or its last.pth: continue that run where it stopped")
    add("--train_fold", "--train-fold", type=int, default=1, help="fold to train on")
    add("--val_fold", "--val-fold", type=int, default=2, help="fold to validate on")
    add("--test_fold", "--test-fold", type=int, default=3, help="fold evaluate.py scores unless told otherwise")
    add("--recipe", choices=sorted(RECIPES), default="sota", help="the settings the flags below start from, see above")
    add("--encoder", choices=["resnet18", "resnet34", "resnet50"], default="resnet34", help="ResNet encoder")
    add("--encoder_weights", "--encoder-weights", default="imagenet", help="imagenet, none, or a .pth path")
    add("--dropout", type=float, default=0.1, help="dropout in the decoder")
    add("--epochs", type=int, default=20, help="epochs")
    add("--batch_size", "--batch-size", type=int, default=16, help="tiles per batch and process")
    add("--image_size", "--image-size", type=int, default=256, help="training crop in px, multiple of 32")
    add("--lr", type=float, default=1e-3, help="peak learning rate")
    add("--weight_decay", "--weight-decay", type=float, default=1e-4, help="weight decay")
    add("--optimizer", choices=sorted(OPTIMIZERS), help="optimizer")
    add("--scheduler", choices=["onecycle", "cosine"], help="onecycle, or cosine: linear warm-up + cosine; both "
        "step per batch")  # fmt: skip
    add("--warmup_epochs", "--warmup-epochs", type=int, default=5, help="warm-up epochs")
    add("--min_lr_factor", "--min-lr-factor", type=float, default=0.01, help="final lr = lr * this")
    add("--early_stopping_patience", "--early-stopping-patience", type=int, default=10, help="stop after this "
        "many epochs without a better validation score")  # fmt: skip
    add("--selection_metric", "--selection-metric", choices=["mpq", "bpq", "dice"], default="mpq",
        help="the validation score that picks best.pth and drives early stopping: PanNuke's mPQ, bPQ, or the mean "
        "foreground Dice")  # fmt: skip
    add("--min_delta", "--min-delta", type=float, default=0.0, help="smallest gain of that score that counts")
    add("--grad_clip_val", "--grad-clip-val", type=float, default=1.0, help="L2 gradient clipping, 0 = off")
    switch("--use_mixed_precision", "autocast (bf16, or fp16 + GradScaler); the recipe's AMP is on for CUDA only, "
           "on the CPU (bf16) and MPS only when given")  # fmt: skip
    switch("--channels_last", "channels-last memory format for the convolutions; on for CPU and CUDA")
    switch("--use_ema", "EMA of the weights, validated and saved")
    add("--ema_decay", "--ema-decay", type=float, default=0.999, help="EMA decay")
    add("--use_swa", "--use-swa", action="store_true", help="stochastic weight averaging, saved as swa.pth")
    add(
        "--swa_start_epoch",
        "--swa-start-epoch",
        type=int,
        help="first epoch of SWA's phase (SWALR, weights "
        "averaged per epoch, no early stopping; brought forward if early stopping hits before it); unless given, 75%% "
        "of --epochs",
    )
    add(
        "--swa_lr",
        "--swa-lr",
        type=float,
        help="SWA's constant learning rate; unless given, a quarter of --lr "
        "(about where OneCycle is at 75%% of the epochs)",
    )
    add("--swa_anneal_epochs", "--swa-anneal-epochs", type=int, default=2, help="epochs SWALR takes from the "
        "schedule's learning rate to --swa_lr")  # fmt: skip
    add("--loss", choices=["hybrid", "weighted_dice"], help="hybrid: Dice + focal + boundary; weighted_dice: "
        "Dice weighted by 1 / sqrt(class frequency)")  # fmt: skip
    add("--boundary_weight", "--boundary-weight", type=float, default=0.1, help="largest boundary-loss weight")
    add("--dist_weight", "--dist-weight", type=float, default=1.0, help="weight of the distance-map loss")
    add("--mixup_alpha", "--mixup-alpha", type=float, help="MixUp Beta(alpha, alpha); 0 = off")
    add("--mixup_prob", "--mixup-prob", type=float, default=0.5, help="share of batches mixed")
    switch("--progressive_aug", "augmentations switched on by epoch")
    switch("--progressive_resize", "crops grow from 128 px to --image_size, 32 px a step, over the first half")
    switch("--tta", "test-time augmentation in validation: the 8 flips and quarter turns")
    add("--seed", type=int, default=42, help="random seed")
    add("--num_workers", "--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="loader workers")
    add("--max_nan_steps", "--max-nan-steps", type=int, default=5, help="stop after this many NaN losses in a row")
    return p


def derived_defaults(args) -> dict:
    """Defaults that follow other values: the fold cache sits in --output_dir, SWA averages the last quarter at a
    quarter of the peak learning rate."""
    return {
        "cache_dir": str(Path(args.output_dir) / "cache"),
        "swa_start_epoch": max(1, int(0.75 * args.epochs)),
        "swa_lr": args.lr / 4,
    }


def parse_args(argv=None) -> argparse.Namespace:
    """timm's pattern: read --recipe and --demo first, make the recipe's and the demo's values the parser's
    defaults (then those that follow from them), and parse for real, so --help shows what a run will use."""
    first = get_args_parser(add_help=False)
    chosen, _ = first.parse_known_args(argv)  # the selectors: --recipe, --demo
    device = pick_device()
    defaults = {
        **RECIPES[chosen.recipe],
        # the recipe's AMP is for CUDA: CPU and MPS train in fp32 unless --use_mixed_precision is given
        "use_mixed_precision": RECIPES[chosen.recipe]["use_mixed_precision"] and device.type == "cuda",
        # faster convolutions on the CPU (benchmarks/RESULTS.md) and CUDA; MPS unmeasured
        "channels_last": device.type in ("cpu", "cuda"),
        **(DEMO if chosen.demo else {}),
    }
    first.set_defaults(**defaults)
    defaults.update(derived_defaults(first.parse_known_args(argv)[0]))
    parser = get_args_parser()
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
