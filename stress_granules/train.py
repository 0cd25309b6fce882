"""Train a U-Net to segment stress granules in fluorescence images.

    python stress_granules/train.py --demo                                  # synthetic cells, about 3 minutes on a CPU
    python stress_granules/train.py                                         # data/stress_granules/{images,masks}
    python stress_granules/train.py --images DATA/images --masks DATA/masks  # the robust preset
    python stress_granules/train.py --images DIR --masks DIR --channel 1 --z_projection max   # hyperstacks
    python stress_granules/train.py --images DIR --masks DIR --preset improved --epochs 100
    python stress_granules/train.py --resume metrics/robust_gpu_20260101_120000
    torchrun --nproc_per_node=2 stress_granules/train.py --images DIR --masks DIR
    tensorboard --logdir metrics/

Images and masks pair by basename (8/16-bit TIFF or PNG, ImageJ hyperstacks and OME-TIFFs with --channel and
--z_projection, any size); a mask is a label image (one id per granule) or binary. --test_fraction of the images
is held out for the final report and --val_fraction (unless --val_images/--val_masks are given) for validation,
which picks the model; both are drawn with --seed, separately from the control images (empty masks) and the rest.

Presets (a flag given on the command line wins over the preset):
    robust    multi-scale CLAHE (clip 2, 4, 8) + edge channel; full augmentation; 200 epochs, patience 30;
              5 crops per image and epoch; best model by granule-level F1 (objects matched at IoU 0.5)
    improved  single-scale CLAHE + edge channel; light augmentation; 75 epochs, patience 15; 3 crops; by Dice
Both: weighted BCE (pos_weight 10) + Focal Tversky + Dice; AdamW; cosine annealing with warm restarts (stepped
per batch); AMP on CUDA; crops drawn by strategy (granule 30 %, granule edge 20 %, background 15 %, mixed 20 %,
random 15 %) from a sampler that balances images by granule content. Normalisation: 1st..99.8th percentile,
stretched by at least the training images' median range (--min_dynamic_range), so controls stay dim. Granules:
probability > --threshold, touching ones split by a watershed on the distance map, at least --min_size pixels.
--demo: a small synthetic set (stressed cells and unstressed controls) and a small network.

Each run writes metrics/<preset>_<gpu|cpu|mps>_<YYYYmmdd_HHMMSS>/: config.json, split.json (the training and
validation images), best_model.pth, last.pth (resume), checkpoint_epoch_N.pth (every --save_every epochs),
training_history.json, training_curves.png, train.log, tensorboard/ (losses, learning rate, validation scores and
predictions per epoch) and, at the end, from evaluate.py --run_report: evaluation_report.json (the best model's
scores on the held-out test images, beside an Otsu-threshold baseline, with false granules per control image) and
test_predictions.png; then a copy of the best model, <preset>_stress_granule_model.pth, in the working directory
(--model_path puts it elsewhere; each run replaces that copy, its own best_model.pth stays).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import json
import logging
import math
import os
import shutil
import time
import warnings
from contextlib import nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.losses import CombinedLoss, DiceLoss, FocalTverskyLoss, WeightedBCELoss
from stress_granules.data import (
    BalancedEpochSampler,
    CropDataset,
    HelpFormatter,
    Preprocess,
    dynamic_range_floor,
    feature_channels,
    granule_balance_weights,
    load_samples,
    new_folder,
    plot_history,
    read_mask,
    split_from_file,
    split_pairs,
    write_demo_dataset,
    write_json,
)
from stress_granules.model import (
    DOMAIN,
    GranuleScores,
    UNet,
    checkpoint_dict,
    granules_from_probability,
    pick_device,
    predict_probability,
)

PRESETS = {
    "robust": {
        "features": "multiscale",
        "epochs": 200,
        "early_stopping_patience": 30,
        "crops_per_image": 5,
        "selection_metric": "f1",
    },
    "improved": {
        "features": "clahe",
        "epochs": 75,
        "early_stopping_patience": 15,
        "crops_per_image": 3,
        "selection_metric": "dice",
    },
}
SCHEDULERS = ("CosineAnnealingWarmRestarts", "CosineAnnealingLR")  # from torch.optim.lr_scheduler, by name
# --demo: small synthetic set and a small network, about two minutes on two CPU cores
DEMO = {"epochs": 40, "image_size": 128, "base_channels": 16, "batch_size": 8, "lr": 2e-3, "restart_epochs": 40,
        "test_fraction": 0.2, "images": None, "masks": None}  # fmt: skip
# Settings added after the first runs, with the values those runs had: a resumed older run keeps its behaviour.
LEGACY = {"test_fraction": 0.0, "min_dynamic_range": 0.0, "split_touching": False, "channel": None,
          "z_projection": None}  # fmt: skip
SHOWN_IMAGES = 3  # validation images logged to TensorBoard each epoch (image | truth | prediction)


# ----------------------------------------------------------------------------------------------------------------
# One epoch of training, one pass of validation
# ----------------------------------------------------------------------------------------------------------------


def train_one_epoch(model, criterion, optimizer, scheduler, scaler, ctx, loader, device, epoch, args, state):
    """One pass over the crops; the scheduler steps per batch (fractional epochs for warm restarts)."""
    model.train()
    sums, count = {}, 0
    steps = len(loader)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not is_main(), leave=False, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        images, masks = batch["image"].to(device, non_blocking=True), batch["mask"].to(device, non_blocking=True)
        with ctx:
            logits = model(images)
        loss, terms = criterion(logits.float(), masks)

        # A NaN/inf loss skips the step on every rank; too many in a row stop the run (last.pth stays intact).
        finite = torch.isfinite(loss.detach()).float()
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        optimizer.zero_grad(set_to_none=True)
        if finite.item():
            state["nan_steps"] = 0
            scaler.scale(loss).backward()
            if args.grad_clip_val > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_val)
            scaler.step(optimizer)
            scaler.update()
            count += 1
            for name, value in {"loss": loss.detach(), **terms}.items():
                sums[name] = sums.get(name, 0.0) + float(value)
        else:
            state["nan_steps"] += 1
            logging.warning("non-finite loss at epoch %d: step skipped", epoch + 1)
            if state["nan_steps"] >= args.max_nan_steps:
                raise SystemExit(
                    f"the training loss was NaN or infinite for {state['nan_steps']} steps in a row (epoch "
                    f"{epoch + 1}); stopping. Try a lower --lr or check the images. The last good epoch is in "
                    f"last.pth (--resume)."
                )
        with warnings.catch_warnings():  # a skipped step still advances the schedule, on purpose
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step(epoch + (step + 1) / steps)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    means = {k: v / max(count, 1) for k, v in sums.items()}
    if dist.is_initialized():
        keys = sorted(means)
        values = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(values)
        means = dict(zip(keys, (values / dist.get_world_size()).tolist(), strict=True))
    return means


@torch.no_grad()
def validate(model, samples, ctx, device, args) -> tuple[dict, list]:
    """Whole validation images by tiled inference: pixel scores, granule-level scores (IoU 0.5) and false granules
    per control image, summed over images (and over ranks: each rank takes every world_size-th image); and the
    first SHOWN_IMAGES of this rank as (name, image, truth, prediction) for TensorBoard."""
    model.eval()
    scores, shown = GranuleScores(device), []
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    for sample in tqdm(samples[rank::world], desc="validation", disable=not is_main(), leave=False):
        probability = predict_probability(model, sample.features, args.image_size, args.image_size // 4, ctx=ctx)
        labels = granules_from_probability(probability, args.threshold, args.min_size, args.split_touching)
        scores.update(labels, sample.mask)
        if len(shown) < SHOWN_IMAGES:
            shown.append((sample.name, np.asarray(sample.features[0], np.float32), sample.mask > 0, labels > 0))
    scores.all_reduce()
    return scores.compute(), shown


# ----------------------------------------------------------------------------------------------------------------
# Set-up
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


def build_loss(args) -> CombinedLoss:
    """Weighted BCE (pos_weight: granules are a few percent of the pixels) + Focal Tversky (recall of small,
    dim granules) + Dice (overlap)."""
    return CombinedLoss(
        {
            "bce": (WeightedBCELoss(pos_weight=args.pos_weight), args.bce_weight),
            "focal_tversky": (FocalTverskyLoss(), args.focal_tversky_weight),
            "dice": (DiceLoss(), args.dice_weight),
        }
    )


# ----------------------------------------------------------------------------------------------------------------
# The phases of main, in the order main runs them
# ----------------------------------------------------------------------------------------------------------------


def resume_or_start(args, log) -> tuple[argparse.Namespace, dict | None]:
    """A new run: its checked arguments and no checkpoint. --resume: the run's last.pth and its stored arguments
    (they win; the flags given with --resume are named and ignored, except --num_workers, and --epochs and
    --early_stopping_patience, which may extend the run)."""
    if not args.resume:
        return check_args(args), None
    path = Path(args.resume)
    path = path / "last.pth" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"--resume {args.resume}: no last.pth there")
    if path.name != "last.pth":
        raise SystemExit(
            f"--resume {path}: resume from a run's last.pth (continuing from an older checkpoint "
            f"would overwrite the later files of that run)"
        )
    resume = torch.load(path, map_location="cpu", weights_only=True)
    if resume.get("domain") != DOMAIN or "optimizer" not in resume:
        raise SystemExit(f"--resume {path}: not a {DOMAIN} training checkpoint (last.pth of a run)")
    given = given_flags(args)
    extendable = ("epochs", "early_stopping_patience")
    ignored = [k for k in given if k not in extendable]
    if ignored:
        log(f"--resume continues with the run's stored settings; ignoring --{', --'.join(ignored)}")
    stored = argparse.Namespace(**{**LEGACY, **resume["args"]})
    for key in extendable:
        if key in given:
            setattr(stored, key, getattr(args, key))
    stored.resume, stored.num_workers = str(path), args.num_workers
    return stored, resume


def given_flags(args) -> list[str]:
    """The flags of a --resume command line that differ from what parse_args gives for its --preset and --demo
    (a value equal to that default cannot be told from an absent flag)."""
    selectors = ["--preset", args.preset, *(["--demo"] if args.demo else [])]
    plain, reference = vars(parse_args([])), vars(parse_args(selectors))
    changed = [k for k, v in vars(args).items() if k not in ("resume", "num_workers") and v != reference.get(k)]
    return [k for k in ("preset", "demo") if vars(args)[k] != plain[k]] + changed


def load_data(args, log) -> tuple[dict, list, list]:
    """The image/mask pairs (the demo's synthetic set written first), their train/validation/test split, the
    normalisation floor from the training images, and the samples with cached features of training and validation,
    rank 0 first (the others then read the cache). Bad input stops the run here, before any folder is made."""
    if args.demo and args.images is None:
        root = Path(args.output_dir) / "demo_data" / "v3_26_images"
        if is_main():
            write_demo_dataset(root)
        if dist.is_initialized():
            dist.barrier()
        args.images, args.masks = str(root / "images"), str(root / "masks")
    for key, flag in (("images", "--images"), ("masks", "--masks")):
        if not Path(getattr(args, key)).is_dir():
            raise SystemExit(
                f"{getattr(args, key)}: no such folder ({flag}). Put your {key} there, give {flag} DIR, or try --demo"
            )
    args.output_dir = str(Path(args.output_dir).resolve())
    args.cache_dir = str(Path(args.cache_dir or Path(args.output_dir) / "cache").resolve())
    for key in ("images", "masks", "val_images", "val_masks"):
        if getattr(args, key):
            setattr(args, key, str(Path(getattr(args, key)).resolve()))

    def prepare():
        recorded = Path(args.resume).parent / "split.json" if args.resume else None
        if recorded is not None and recorded.is_file():  # a resumed run keeps its images
            train_pairs, val_pairs, test_pairs, has_granules = split_from_file(recorded, args, log)
        else:
            train_pairs, val_pairs, test_pairs, has_granules = split_pairs(args, log)
        if not any(has_granules[p] for p, _ in train_pairs):
            raise SystemExit(f"no training mask in {args.masks} contains a granule: nothing to learn (all background)")
        if not any(has_granules[p] for p, _ in val_pairs):
            raise SystemExit(
                "no validation mask contains a granule, so no model can be selected: give --val_images "
                "and --val_masks, or another --seed for the random split"
            )
        if args.min_dynamic_range is None:  # auto: from the training images (see data.FLOOR_SHARE); kept in args
            prep = Preprocess.from_args({**vars(args), "min_dynamic_range": 0.0})
            args.min_dynamic_range = dynamic_range_floor(train_pairs, has_granules, prep, Path(args.cache_dir))
        samples = [load_samples(pairs, args, Path(args.cache_dir), log) for pairs in (train_pairs, val_pairs)]
        # CLAHE's tiles are a share of the image: evaluate.py gives blocks of large images tiles of this size
        args.train_image_shape = [int(np.median([sample.mask.shape[i] for sample in samples[0]])) for i in (0, 1)]
        prep = Preprocess.from_args(args)
        for image_path, mask_path in test_pairs:  # read now: a bad test image stops the run before it trains
            read_mask(mask_path, prep.read(image_path).shape, image_path)
        return {"train": train_pairs, "val": val_pairs, "test": test_pairs}, *samples

    if is_main():  # rank 0 computes the feature cache, the others read it
        prepared = prepare()
    if dist.is_initialized():
        dist.barrier()
        if not is_main():
            prepared = prepare()
    return prepared


def start_run(args, resume, device, splits: dict) -> Path | None:
    """The run folder (rank 0; a resumed run keeps its own) with config.json and split.json, and train.log."""
    if resume is not None:
        run_dir = Path(args.resume).parent
    elif is_main():
        device_name = "gpu" if device.type == "cuda" else device.type
        run_dir = new_folder(Path(args.output_dir), f"{args.preset}_{device_name}")
        args.run_dir = str(run_dir)
        write_json(run_dir / "config.json", vars(args))
        split = {name: [str(p) for p, _ in pairs] for name, pairs in splits.items()}
        write_json(run_dir / "split.json", split)  # evaluate.py and visualize.py score exactly these images
    else:
        return None
    if is_main():
        logging.getLogger().addHandler(logging.FileHandler(run_dir / "train.log"))
    return run_dir


def build_model(args, device) -> tuple[torch.nn.Module, dict]:
    """The U-Net (channels-last, SyncBatchNorm and DDP where they apply) and its constructor arguments."""
    model_args = {"in_channels": feature_channels(args.features), "base_channels": args.base_channels}
    model_args["dropout"] = args.dropout
    model = UNet(**model_args).to(device)
    if getattr(args, "channels_last", False):  # runs stored before the flag resume without it
        model = model.to(memory_format=torch.channels_last)
    if dist.is_initialized():
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, model_args


def make_loader(train_samples, args, device) -> tuple[DataLoader, BalancedEpochSampler]:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    train_set = CropDataset(train_samples, args.image_size, args.crops_per_image, args.preset, args.augment)
    weights = granule_balance_weights(train_samples, args.crops_per_image)
    sampler = BalancedEpochSampler(weights, args.seed, rank, world)
    # persistent workers: the dataset goes to each worker once per run, not once per epoch
    loader = DataLoader(
        train_set,
        args.batch_size,
        sampler=sampler,
        num_workers=args.num_workers,
        persistent_workers=args.num_workers > 0,
        generator=torch.Generator(),  # its own: creating the iterator must not consume the global RNG (dropout)
        pin_memory=device.type == "cuda",
        drop_last=len(sampler) > args.batch_size,  # keeps BatchNorm away from a last batch of one
    )
    return loader, sampler


def make_scheduler(optimizer, args):
    """Stepped per batch with fractional epochs. CosineAnnealingWarmRestarts (SGDR, Loshchilov & Hutter 2017):
    cosine from lr to lr * min_lr_factor over restart_epochs, then again over a period restart_mult times longer.
    CosineAnnealingLR: one cosine over all epochs."""
    if args.scheduler == "CosineAnnealingWarmRestarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=args.restart_epochs, T_mult=args.restart_mult, eta_min=args.lr * args.min_lr_factor
        )
    return torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=args.epochs, eta_min=args.lr * args.min_lr_factor
    )


def log_banner(log, args, device, run_dir, splits) -> None:
    world = dist.get_world_size() if dist.is_initialized() else 1
    log(
        f"run folder {run_dir} on {device} ({world} process(es)); {len(splits['train'])} training, "
        f"{len(splits['val'])} validation and {len(splits['test'])} test images (held out for the final report)"
    )
    log(f"normalisation: 1st..99.8th percentile, stretched by at least {args.min_dynamic_range:g} (--min_dynamic_range)"
        f"; granules: probability > {args.threshold:g}, at least {args.min_size} px, touching ones "
        f"{'split' if args.split_touching else 'not split'}")  # fmt: skip
    log(f"preset {args.preset}: features {args.features}, {args.crops_per_image} crops of {args.image_size} px per "
        f"image, batch {args.batch_size}, lr {args.lr:g}, best model by {args.selection_metric}, mixed precision "
        f"{args.use_mixed_precision}")  # fmt: skip


def select(state: dict, val_stats: dict, args) -> bool:
    """The selection metric of this epoch against the best so far; updates best and the patience counter."""
    score = val_stats["object"]["f1"] if args.selection_metric == "f1" else val_stats["pixel"]["dice"]
    score = -math.inf if math.isnan(score) else score
    improved = score > state["best"] + args.min_delta or state["best"] == -math.inf  # the first epoch gives a best
    state["best"], state["patience"] = (score, 0) if improved else (state["best"], state["patience"] + 1)
    return improved


def save_epoch(run_dir, model, model_args, args, state, optimizer, scheduler, scaler, val_stats, improved) -> None:
    """best_model.pth (by --selection_metric), last.pth, checkpoint_epoch_N.pth, the history and its figure."""
    epoch = state["epoch"]
    if improved:
        metric = {args.selection_metric: state["best"]}
        best = checkpoint_dict(args, model_args, unwrap(model).state_dict(), epoch=epoch, val=val_stats, metric=metric)
        save_checkpoint(run_dir / "best_model.pth", best)
    progress = {k: state[k] for k in ("epoch", "best", "patience", "history")}
    optim = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}
    last = checkpoint_dict(args, model_args, unwrap(model).state_dict(), **progress, **optim)
    save_checkpoint(run_dir / "last.pth", last)
    if epoch % args.save_every == 0:
        save_checkpoint(run_dir / f"checkpoint_epoch_{epoch}.pth", last)
    write_json(run_dir / "training_history.json", state["history"])
    plot_history(state["history"], run_dir / "training_curves.png")


def log_tensorboard(writer: SummaryWriter, entry: dict, shown: list) -> None:
    """Every loss term, the learning rate, the validation scores (granule counts left out) and the shown
    validation images as image | truth | prediction, at step = epoch."""
    step = entry["epoch"]
    for name, value in entry["train"].items():
        writer.add_scalar(f"train/{name}", value, step)
    writer.add_scalar("lr", entry["lr"], step)
    for group, prefix in (("pixel", "pixel_"), ("object", "granule_")):
        for name, value in entry["val"][group].items():
            if name not in ("tp", "fp", "fn"):
                writer.add_scalar(f"val/{prefix}{name}", value, step)
    if entry["val"]["controls"]["images"]:
        per_image = entry["val"]["controls"]["false_granules_per_control_image"]
        writer.add_scalar("val/false_granules_per_control_image", per_image, step)
    for name, image, truth, prediction in shown:
        gap = np.ones((image.shape[0], 4), np.float32)
        panel = np.concatenate([np.clip(image, 0, 1), gap, truth, gap, prediction], axis=1).astype(np.float32)
        writer.add_image(f"val/{name}", panel, step, dataformats="HW")
    writer.flush()


def final_report(run_dir: Path, args, log) -> None:
    """evaluate.py --run_report scores the best model on the held-out test images (the validation images when
    --test_fraction is 0, and the report says so) beside Otsu's threshold and draws them; then the copy of the
    best model, where the design document puts it: <preset>_stress_granule_model.pth in the working directory."""
    from stress_granules import evaluate  # imported here: evaluate imports this module

    flags = [str(run_dir), "--run_report"]  # threshold, sizes and tiles: the run's own, from the checkpoint
    flags.append("--use_mixed_precision" if args.use_mixed_precision else "--no-use_mixed_precision")
    evaluate.main(evaluate.parse_args(flags))
    report = json.loads((run_dir / "evaluation_report.json").read_text())
    model_path = Path(args.model_path or f"{args.preset}_stress_granule_model.pth").resolve()
    replaced = model_path.is_file()
    model_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "best_model.pth", model_path.with_suffix(".tmp"))
    os.replace(model_path.with_suffix(".tmp"), model_path)
    model, otsu = report["model"], report["otsu_baseline"]
    controls = ""
    if model["controls"]["images"]:
        controls = (
            f"; false granules per control image {model['controls']['false_granules_per_control_image']:.2f} "
            f"(Otsu {otsu['controls']['false_granules_per_control_image']:.2f})"
        )
    log(
        f"{report['split']} images ({report['note']}): granule F1 {model['object']['f1']:.4f} (Otsu baseline "
        f"{otsu['object']['f1']:.4f}), Dice {model['pixel']['dice']:.4f} (Otsu {otsu['pixel']['dice']:.4f}){controls}"
    )
    log(f"best model copied to {model_path}{' (replacing the earlier copy)' if replaced else ''}")
    log(f"next: python stress_granules/evaluate.py {run_dir} --images NEW_IMAGES")


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def main(args):
    device = setup_device()
    rank = dist.get_rank() if dist.is_initialized() else 0
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", handlers=[logging.StreamHandler(sys.stdout)], force=True
    )
    log = logging.info if is_main() else (lambda *a: None)
    args, resume = resume_or_start(args, log)
    if resume is not None and (resume["epoch"] >= args.epochs or resume["patience"] >= args.early_stopping_patience):
        log(
            f"{Path(args.resume).parent} finished already (epoch {resume['epoch']} of {args.epochs}); nothing to resume"
        )
        return Path(args.resume).parent
    torch.manual_seed(args.seed)
    ctx, scaler = mixed_precision(device, args.use_mixed_precision)

    splits, train_samples, val_samples = load_data(args, log)
    run_dir = start_run(args, resume, device, splits)
    if is_main():
        log_banner(log, args, device, run_dir, splits)
    model, model_args = build_model(args, device)
    criterion = build_loss(args).to(device)
    loader, sampler = make_loader(train_samples, args, device)
    optimizer = torch.optim.AdamW(unwrap(model).parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = make_scheduler(optimizer, args)

    state = {"epoch": 0, "best": -math.inf, "patience": 0, "history": [], "nan_steps": 0}
    if resume is not None:
        unwrap(model).load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        state.update({k: resume[k] for k in ("epoch", "best", "patience", "history")})
        log(f"resumed from {args.resume} at epoch {state['epoch'] + 1}")
    writer = None
    if is_main():  # a resumed run appends to its own folder, dropping what the killed run logged after last.pth
        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=state["epoch"] + 1)

    for epoch in range(state["epoch"], args.epochs):
        started = time.time()
        # Everything random in an epoch derives from (seed, epoch), so a resumed run repeats it exactly.
        torch.manual_seed(args.seed * 1000 + epoch + 100_003 * rank)  # dropout; the crops follow the sampler
        sampler.set_epoch(epoch)
        train_stats = train_one_epoch(
            model, criterion, optimizer, scheduler, scaler, ctx, loader, device, epoch, args, state
        )
        if dist.is_initialized():  # BatchNorm statistics differ a little between ranks: validate rank 0's
            for buffer in unwrap(model).buffers():
                dist.broadcast(buffer, 0)
        val_stats, shown = validate(unwrap(model), val_samples, ctx, device, args)
        improved = select(state, val_stats, args)
        lr, seconds = optimizer.param_groups[0]["lr"], time.time() - started
        entry = {"epoch": epoch + 1, "lr": lr, "train": train_stats, "val": val_stats, "seconds": seconds}
        state["history"].append(entry)
        state["epoch"] = epoch + 1
        if is_main():
            controls = val_stats["controls"]
            false_granules = (
                f"  false granules per control image {controls['false_granules_per_control_image']:.2f}"
                if controls["images"]
                else ""
            )
            log(
                f"epoch {epoch + 1}/{args.epochs}  loss {train_stats.get('loss', float('nan')):.4f}  "
                f"val Dice {val_stats['pixel']['dice']:.4f}  granule F1 {val_stats['object']['f1']:.4f}"
                f"{false_granules}{'  (best)' if improved else ''}  lr {lr:.2e}  {seconds:.0f}s"
            )
            save_epoch(run_dir, model, model_args, args, state, optimizer, scheduler, scaler, val_stats, improved)
            log_tensorboard(writer, entry, shown)
        if state["patience"] >= args.early_stopping_patience:
            log(f"early stopping: no better validation {args.selection_metric} for {state['patience']} epochs")
            break

    if writer is not None:
        writer.close()
    # The final report is rank 0's alone: leave the process group first, so evaluate.py scores every image itself.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if run_dir is not None and rank == 0:
        final_report(run_dir, args, log)
    return run_dir


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, add_help=add_help)
    add = p.add_argument
    flag = argparse.BooleanOptionalAction
    add("--images", default="data/stress_granules/images", help="folder of images (8/16-bit TIFF or PNG)")
    add(
        "--masks",
        default="data/stress_granules/masks",
        help="folder of masks with the same basenames: label images (one id per granule) or binary (>0 = granule)",
    )
    add("--val_images", "--val-images", help="validation images; without them --val_fraction of --images")
    add("--val_masks", "--val-masks", help="validation masks for --val_images")
    add("--val_fraction", "--val-fraction", type=float, default=0.2, help="share of images held out for validation")
    add(
        "--test_fraction",
        "--test-fraction",
        type=float,
        default=0.1,
        help="share of images held out from training and model selection, scored by the final report",
    )
    add("--channel", type=int, help="the granule channel of multi-channel files (ImageJ/OME), from 0 (Fiji's C1)")
    add("--z_projection", "--z-projection", choices=["max", "mean"], help="flatten z-stacks by this projection")
    add(
        "--min_dynamic_range",
        "--min-dynamic-range",
        type=float,
        help="smallest percentile stretch in image units, so controls stay dim; without it, the median stretch "
        "of the training images with granules; 0: each image by its own percentiles",
    )
    add("--skip_unpaired", "--skip-unpaired", action="store_true",
        help="skip images without a mask (and masks without an image) instead of stopping")  # fmt: skip
    add("--demo", action="store_true", help="write synthetic 16-bit cell images into OUTPUT_DIR/demo_data and train")
    add("--preset", choices=sorted(PRESETS), default="robust", help="sets --epochs, --features and the rest, see above")
    add("--epochs", type=int, help="epochs")
    add("--early_stopping_patience", "--early-stopping-patience", "--patience", type=int,
        help="epochs without a better validation score before stopping")  # fmt: skip
    add("--min_delta", "--min-delta", type=float, default=0.0, help="smallest gain that counts as better")
    add("--selection_metric", "--selection-metric", choices=["f1", "dice"],
        help="best model by granule F1 or pixel Dice")  # fmt: skip
    add("--crops_per_image", "--crops-per-image", type=int, help="crops per image and epoch")
    add("--augment", action=flag, default=True, help="the augmentations of the preset")
    add("--features", choices=["multiscale", "clahe", "raw"],
        help="input channels: CLAHE x3 + edge, CLAHE + edge, or the normalised image alone")  # fmt: skip
    add("--scheduler", default="CosineAnnealingWarmRestarts", help=f"{' or '.join(SCHEDULERS)}; steps per batch")
    add("--image_size", "--image-size", type=int, default=256, help="crop size, multiple of 16")
    add("--batch_size", "--batch-size", type=int, default=4, help="crops per batch and process")
    add("--lr", type=float, default=1e-4, help="learning rate")
    add("--weight_decay", "--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    add("--restart_epochs", "--restart-epochs", type=int, default=10, help="epochs of the first cosine cycle")
    add("--restart_mult", "--restart-mult", type=int, default=2, help="each cycle this many times longer")
    add("--min_lr_factor", "--min-lr-factor", type=float, default=0.01, help="lowest lr = lr * this")
    add("--base_channels", "--base-channels", type=int, default=32, help="U-Net width of the first level")
    add("--dropout", type=float, default=0.1, help="dropout at the U-Net bottleneck")
    add("--pos_weight", "--pos-weight", type=float, default=10.0, help="BCE weight of granule pixels")
    add("--bce_weight", "--bce-weight", type=float, default=1.0, help="weight of the BCE term")
    add("--focal_tversky_weight", "--focal-tversky-weight", type=float, default=1.0, help="Focal Tversky weight")
    add("--dice_weight", "--dice-weight", type=float, default=1.0, help="weight of the Dice term")
    add("--grad_clip_val", "--grad-clip-val", type=float, default=1.0, help="L2 gradient clipping, 0 = off")
    add("--use_mixed_precision", action=flag, help="autocast (bf16, or fp16 + GradScaler); on for CUDA")
    add("--channels_last", action=flag, help="channels-last memory format for the convolutions; on for CPU and CUDA")
    for name in ("use_mixed_precision", "channels_last"):  # the - spelling: a hidden twin, off the usage line
        add(f"--{name.replace('_', '-')}", dest=name, action=flag, help=argparse.SUPPRESS)
    add("--threshold", type=float, default=0.5, help="granule probability threshold")
    add("--min_size", "--min-size", type=int, default=15, help="smallest predicted granule in pixels")
    add("--split_touching", action=flag, default=True, help="split touching granules (watershed on the distance map)")
    add("--split-touching", dest="split_touching", action=flag, help=argparse.SUPPRESS)  # hidden twin
    add("--output_dir", "--output-dir", default="metrics", help="each run gets a new folder in here")
    add(
        "--model_path",
        "--model-path",
        help="where the copy of the best model goes; without it, <preset>_stress_granule_model.pth here",
    )
    add("--cache_dir", "--cache-dir", help="feature cache; without it OUTPUT_DIR/cache")
    add("--save_every", "--save-every", type=int, default=10, help="keep checkpoint_epoch_N.pth every N epochs")
    add("--resume", help="a run folder or its last.pth: continue that run")
    add("--seed", type=int, default=42, help="random seed")
    add("--num_workers", "--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="loader workers")
    add("--max_nan_steps", "--max-nan-steps", type=int, default=5, help="stop after this many NaN losses in a row")
    # the robust preset's values (parse_args sets the chosen preset's), and the CPU's: fp32, channels-last
    p.set_defaults(**PRESETS["robust"], use_mixed_precision=False, channels_last=True)
    return p


def check_args(args) -> argparse.Namespace:
    if args.image_size % 16:
        raise SystemExit(f"--image_size {args.image_size} must be a multiple of 16")
    for key in ("save_every", "crops_per_image", "batch_size", "restart_epochs"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key} {getattr(args, key)} must be at least 1")
    if args.scheduler not in SCHEDULERS:
        raise SystemExit(f"--scheduler {args.scheduler}: choose one of {', '.join(SCHEDULERS)}")
    if args.epochs < 1:
        raise SystemExit(f"--epochs {args.epochs}: train for at least one epoch")
    if not 0 <= args.test_fraction < 1 or not 0 < args.val_fraction < 1:
        raise SystemExit(f"--val_fraction {args.val_fraction} and --test_fraction {args.test_fraction}: shares in 0..1")
    if bool(args.val_images) != bool(args.val_masks):
        raise SystemExit("give --val_images and --val_masks together")
    return args


def parse_args(argv=None) -> argparse.Namespace:
    """timm's pattern: --preset and --demo are read first and set the parser's defaults, so --help shows what a run
    will use. AMP is on for CUDA (the CPU and MPS train in fp32 unless --use_mixed_precision is given); channels-last
    convolutions are faster on the CPU (benchmarks/RESULTS.md) and CUDA, MPS is unmeasured."""
    chosen, _ = get_args_parser(add_help=False).parse_known_args(argv)
    device = pick_device()
    parser = get_args_parser()
    devices = {"use_mixed_precision": device.type == "cuda", "channels_last": device.type in ("cpu", "cuda")}
    parser.set_defaults(**{**PRESETS[chosen.preset], **devices, **(DEMO if chosen.demo else {})})
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
