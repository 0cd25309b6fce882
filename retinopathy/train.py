"""Train a 5-grade diabetic-retinopathy classifier on APTOS-style fundus photographs.

    python retinopathy/train.py --demo                                       # synthetic fundi, a few min on a CPU
    python retinopathy/train.py --labels-csv DATA/train.csv --img-dir DATA/train_images \\
        --save-dir ml/models/efficientnet_b3_focal --model-name efficientnet_b3 --loss focal
    python retinopathy/train.py --resume ml/models/efficientnet_b3_focal
    torchrun --nproc_per_node=2 retinopathy/train.py --labels-csv DATA/train.csv --img-dir DATA/train_images

Two stages (--two-stage): stage 1 trains only the new head for --epochs-stage1 epochs at --lr-stage1 with the
pretrained backbone frozen; stage 2 trains everything for --epochs-stage2 epochs at --lr-stage2. Each stage: AdamW
and cosine annealing (stepped per batch). The loss is cross entropy, class-weighted cross entropy or focal loss
(per-class weights from the training split as alpha). The best model is chosen by validation quadratic weighted
kappa (the APTOS metric); accuracy is reported too. --demo trains a small ResNet from scratch, in one stage, on
synthetic photos (add -h to see the values it runs with). Medical preprocessing, advanced augmentation and
mixed precision are on unless --no-medical-preprocess, --no-advanced-aug or --no-mixed-precision; mixed precision
autocasts training: bf16 on GPUs that have it and on CPUs with bf16 instructions (AVX512-BF16 or AMX), fp16 with a
GradScaler on older GPUs and Apple MPS. On a CPU without bf16 instructions training stays fp32 and the banner says
so: bf16 is emulated there (measured 11x slower per step on an AVX2 CPU, benchmarks/RESULTS.md). Validation and
evaluate.py score in fp32, so their numbers agree.

The photos are split three ways, stratified by grade (and by patient with --patient-column): a held-out test split
(--test-split), the validation split that chooses the model (--val-split), and the rest for training. At the end
the best model is scored on the test split (evaluate.py, in --save-dir/evaluation/); that is the number to report.

The run's files go straight into --save-dir (one run per folder; a folder that holds a run is never overwritten):
config.json, split.json, best_model.pth (best stage-2 validation QWK), best_stage1.pth, last.pth (resume),
checkpoint_epoch_N.pth (every --save-freq epochs), training_history.json, train.log, and tensorboard/
(`tensorboard --logdir ml/models`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import json
import logging
import logging.handlers
import math
import os
import time
from contextlib import nullcontext
from datetime import timedelta
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.losses import FocalLoss
from common.metrics import quadratic_weighted_kappa
from retinopathy import evaluate
from retinopathy.data import (
    FundusDataset,
    HelpFormatter,
    cache_settings,
    prepare_images,
    read_labels,
    split_records,
    write_demo_dataset,
    write_json,
)
from retinopathy.model import MODELS, build_classifier, pick_device, set_backbone_trainable
from retinopathy.visualize import prediction_images

DOMAIN = "retinopathy"
# --demo: a small synthetic set and a small network from scratch, a few minutes on two CPU cores
DEMO = {
    "save_dir": f"ml/models/{DOMAIN}_demo",
    "model_name": "resnet18",
    "pretrained": False,
    "image_size": 128,
    "epochs_stage1": 0,
    "epochs_stage2": 12,
    "lr_stage2": 1e-3,
    "batch_size": 16,
    "two_stage": False,
}
RULE = "=" * 80
RUN_FILES = ("config.json", "last.pth", "best_model.pth", "training_history.json")  # a folder with one holds a run


# ----------------------------------------------------------------------------------------------------------------
# One epoch of training, one pass of validation
# ----------------------------------------------------------------------------------------------------------------


def train_one_epoch(model, criterion, optimizer, scheduler, scaler, ctx, loader, device, label):
    """One pass over the training split; the scheduler steps per batch. Returns loss and accuracy."""
    model.train()
    for module in model.modules():  # stage 1: the frozen backbone's BatchNorm statistics stay as pretrained
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples
    bar = tqdm(loader, desc=label, disable=not is_main(), leave=False, dynamic_ncols=True)
    for batch in bar:
        images, labels = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        with ctx:
            logits = model(images)
        loss = criterion(logits.float(), labels)
        finite = torch.isfinite(loss.detach()).float()
        if dist.is_initialized():  # every rank stops together, none waits for the others forever
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite:
            raise SystemExit(f"{label}: the training loss is not finite; lower the learning rate or check the images")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = len(labels)
        totals += torch.tensor([loss.item() * n, (logits.argmax(1) == labels).sum().item(), n], dtype=torch.float64)
        lr = optimizer.param_groups[0]["lr"]
        bar.set_postfix_str(f"loss: {totals[0] / totals[2]:.4f} | acc: {totals[1] / totals[2]:.2%} | lr: {lr:.1e}")
    if dist.is_initialized():
        totals = totals.to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    return {"loss": float(totals[0] / totals[2]), "accuracy": float(totals[1] / totals[2])}


@torch.no_grad()
def validate(model, criterion, loader, device, num_classes: int, label: str = "validation") -> dict:
    """Loss, accuracy and quadratic weighted kappa over the validation split (gathered from every rank), in fp32
    whatever the training precision: the model is chosen by the numbers evaluate.py (fp32) gives again."""
    model.eval()
    labels, predictions, loss_sum = [], [], 0.0
    bar = tqdm(loader, desc=label, disable=not is_main(), leave=False, dynamic_ncols=True)
    for batch in bar:
        logits = model(batch["image"].to(device)).float()
        target = batch["label"].to(device)
        loss_sum += criterion(logits, target).item() * len(target)
        labels += target.tolist()
        predictions += logits.argmax(1).tolist()
        correct = sum(int(a == b) for a, b in zip(labels, predictions, strict=True))
        bar.set_postfix_str(f"loss: {loss_sum / len(labels):.4f} | acc: {correct / len(labels):.2%}")
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (labels, predictions, loss_sum))
        labels = [v for part in gathered for v in part[0]]
        predictions = [v for part in gathered for v in part[1]]
        loss_sum = sum(part[2] for part in gathered)
    labels, predictions = np.array(labels), np.array(predictions)
    return {
        "images": len(labels),
        "loss": loss_sum / len(labels),
        "accuracy": float((labels == predictions).mean()),
        "qwk": quadratic_weighted_kappa(labels, predictions, num_classes=num_classes),
    }


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


def readable_console() -> None:
    """The log's emoji on a console that cannot show them (a Windows code page, or output redirected to a file
    there) turn into '?' instead of stopping the run."""
    for stream in (sys.stdout, sys.stderr):
        try:
            "🏥✅🔒".encode(getattr(stream, "encoding", None) or "ascii")
        except (UnicodeEncodeError, LookupError):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="replace")


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


def emulated_bf16(device: torch.device) -> bool:
    """True on a CPU without bf16 instructions, where bf16 autocast is emulated: a ResNet-18 step took 11x as long
    as in fp32 on an AVX2 EPYC (the demo: 17 min instead of a few), so --mixed-precision, on by default, keeps fp32."""
    if device.type != "cpu":
        return False
    native = (
        getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return not any(native)


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """Atomic: write a temp file, then rename over the old one, so a kill never leaves half a checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def class_weights(labels: list[int], num_classes: int) -> torch.Tensor:
    """scikit-learn's "balanced" weights n / (num_classes_present * count_c); a grade absent from the split gets
    the largest weight of the others."""
    present = np.unique(labels)
    weights = np.zeros(num_classes)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    weights[weights == 0] = weights.max()
    return torch.tensor(weights, dtype=torch.float32)


def build_loss(args, weights: torch.Tensor) -> nn.Module:
    if args.loss == "ce":
        return nn.CrossEntropyLoss()
    if args.loss == "weighted_ce":
        return nn.CrossEntropyLoss(weight=weights)
    return FocalLoss(gamma=args.focal_gamma, alpha=weights.tolist())


def stage_plan(args) -> list[dict]:
    """The stages to run: (name, epochs, lr, backbone trainable)."""
    plan = []
    if args.two_stage and args.epochs_stage1 > 0:
        plan.append({"name": "stage1", "epochs": args.epochs_stage1, "lr": args.lr_stage1, "backbone": False})
    plan.append({"name": "stage2", "epochs": args.epochs_stage2, "lr": args.lr_stage2, "backbone": True})
    return plan


def make_optimizer(model, stage, args, steps_per_epoch):
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=stage["lr"], weight_decay=args.weight_decay)
    # cosine from lr to lr / 100 over the stage, stepped per batch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(stage["epochs"] * steps_per_epoch, 1), eta_min=stage["lr"] / 100
    )
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------------------------
# The phases of main, in the order main runs them
# ----------------------------------------------------------------------------------------------------------------


def holds_run(folder: Path) -> list[str]:
    """The files of a training run in folder (empty: no run there)."""
    return [name for name in RUN_FILES if (Path(folder) / name).is_file()]


def claim_save_dir(args) -> None:
    """A new run's files go straight into --save-dir, so a folder that holds a run is never written over: training
    stops before it reads a photo. --demo moves on to <save-dir>_2, _3, ... instead (each demo its own folder)."""
    save_dir = Path(args.save_dir)
    if args.demo:
        base, k = save_dir, 1
        while holds_run(save_dir):
            k += 1
            save_dir = base.with_name(f"{base.name}_{k}")
        args.save_dir = str(save_dir)
        return
    found = holds_run(save_dir)
    if found:
        raise SystemExit(
            f"--save-dir {save_dir} already holds a training run ({', '.join(found)}); nothing was changed.\n"
            f"  to carry on with that run:  --resume {save_dir}\n"
            f"  to train a new one:         --save-dir {save_dir.with_name(save_dir.name + '_2')}  (any folder "
            "without a run)"
        )


def resume_or_start(args, log) -> tuple[argparse.Namespace, dict | None]:
    """--resume: the interrupted run's stored arguments win (a flag given with it is ignored, and said so, except
    --num-workers); otherwise the arguments as given, checked, and a --save-dir that holds no run."""
    if not args.resume:
        args = check_args(args)
        claim_save_dir(args)
        return args, None
    path = Path(args.resume)
    path = path / "last.pth" if path.is_dir() else path
    if path.name != "last.pth" or not path.is_file():
        raise SystemExit(f"--resume {args.resume}: give a run folder or its last.pth")
    resume = torch.load(path, map_location="cpu", weights_only=True)
    if resume.get("domain") != DOMAIN or "optimizer" not in resume:
        raise SystemExit(f"--resume {path}: not a {DOMAIN} training checkpoint (last.pth of a run)")
    plain = vars(parse_args([]))
    ignored = [k for k, v in vars(args).items() if k not in ("resume", "num_workers") and v != plain.get(k)]
    if ignored:
        flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
        log(f"--resume: the run's stored settings win; ignoring {flags}")
    # runs from before these settings were stored: today's device default for channels-last; no test split and no
    # patient column, as they trained
    before = {"channels_last": plain["channels_last"], "test_split": 0.0, "patient_column": None}
    stored = argparse.Namespace(**{**before, **resume["args"]})
    stored.resume, stored.num_workers = str(path), args.num_workers
    return stored, resume


def load_data(args, log) -> tuple[dict, dict, list[str], int]:
    """The labelled photos (the demo's synthetic set written first), each decoded, checked and cached once, rank 0
    first (the others then find the cache filled); their train / validation / test split (split_records).
    Returns (split, cache settings, what --skip-bad-rows left out, photos in the CSV)."""
    log("\n📂 Loading dataset...")
    if args.demo and args.labels_csv is None:
        root = Path(args.save_dir).parent / "demo_data" / "v1_240"  # shared by the demos beside it
        if is_main():
            write_demo_dataset(root)
        if dist.is_initialized():
            dist.barrier()
        args.labels_csv, args.img_dir = str(root / "train.csv"), str(root / "train_images")
    args.labels_csv, args.img_dir = str(Path(args.labels_csv).resolve()), str(Path(args.img_dir).resolve())
    args.save_dir = str(Path(args.save_dir).resolve())
    args.cache_dir = str(Path(args.cache_dir or Path(args.save_dir) / "cache").resolve())
    skipped = []  # what --skip-bad-rows left out, said in the log
    records = read_labels(args.labels_csv, args.img_dir, args.num_classes, args.skip_bad_rows, skipped.append,
                          args.patient_column)  # fmt: skip
    listed = len(records)
    settings = cache_settings(args)
    if is_main():
        records = prepare_images(records, settings, Path(args.cache_dir), args.skip_bad_rows, skipped.append)
    if dist.is_initialized():
        dist.barrier()
        if not is_main():
            records = prepare_images(records, settings, Path(args.cache_dir), args.skip_bad_rows, print, show=False)
    return split_records(records, args.val_split, args.test_split, args.random_seed), settings, skipped, listed


class Loaders(NamedTuple):
    train_set: FundusDataset
    train: DataLoader
    val: DataLoader
    sampler: DistributedSampler | None
    generator: torch.Generator  # the shuffling order, reseeded each epoch


def make_loaders(train_records, val_records, settings, args, device) -> Loaders:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    augment = "advanced" if args.advanced_aug else "flips"
    train_set = FundusDataset(train_records, settings, Path(args.cache_dir), augment=augment)
    val_set = FundusDataset(val_records[rank::world], settings, Path(args.cache_dir))
    generator = torch.Generator()
    sampler = DistributedSampler(train_set, seed=args.random_seed, drop_last=True) if dist.is_initialized() else None
    # more workers than cores only adds start-up time; each worker reads small cached PNGs
    workers = min(args.num_workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 4)
    loader_args = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    train_loader = DataLoader(
        train_set,
        args.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        drop_last=len(train_set) // world > args.batch_size,
        **loader_args,
    )
    return Loaders(train_set, train_loader, DataLoader(val_set, args.batch_size, **loader_args), sampler, generator)


def build_model(args, device) -> nn.Module:
    torch.manual_seed(args.random_seed)  # the new head (and, without --pretrained, the backbone) starts the same
    model = build_classifier(args.model_name, args.num_classes, args.pretrained).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.is_initialized() and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def start_run(args, resume, split, early) -> Path | None:
    """The run folder, --save-dir itself (rank 0; a resumed run keeps its own), with config.json and split.json,
    and train.log, which starts with what was logged before the folder was known (`early`)."""
    if resume is not None:
        run_dir = Path(args.resume).parent
    elif is_main():
        run_dir = Path(args.save_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        args.run_dir = str(run_dir)
        write_json(run_dir / "config.json", vars(args))
        # evaluate.py and visualize.py score exactly these photos; "test" is held out from training and selection
        ids = {part: [r.id_code for r in records] for part, records in split.items()}
        write_json(run_dir / "split.json", {**ids, "patient_column": args.patient_column})
    else:
        return None
    if is_main():
        file = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        early.setTarget(file)
        early.close()  # flushes into the file
        logging.getLogger().removeHandler(early)
        logging.getLogger().addHandler(file)
    return run_dir


def log_banner(log, args, device, ctx) -> None:
    """The settings and the device, as the training guide's "Understanding Training Output" shows them."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    precision = str(ctx.fast_dtype).removeprefix("torch.") if isinstance(ctx, torch.autocast) else "fp32"
    log(RULE)
    log("🏥 DIABETIC RETINOPATHY - INDUSTRIAL TRAINING PIPELINE")
    log(RULE)
    log(f"Model: {args.model_name} (ImageNet weights: {args.pretrained})")
    log(f"Loss: {args.loss}")
    log(f"Two-stage training: {args.two_stage}")
    log(f"Advanced augmentation: {args.advanced_aug}")
    log(f"Medical preprocessing: {args.medical_preprocess}" + (" + Ben Graham" if args.ben_graham else ""))
    note = f" ({precision} training)" if args.mixed_precision else ""
    if args.mixed_precision and emulated_bf16(device):
        note = " (fp32 training: this CPU has no bf16 instructions, and emulated bf16 runs about 11x slower)"
    log(f"Mixed precision: {args.mixed_precision}{note}")
    log(f"Image size: {args.image_size} px, batch size: {args.batch_size} x {world} process(es)")
    log(f"Save dir: {Path(args.resume).parent if args.resume else args.save_dir}")
    log(RULE)
    log(f"\n🖥️  Device: {device.type}")
    if device.type == "cuda":
        log(f"   GPU: {torch.cuda.get_device_name(device)}")
        log(f"   Memory: {torch.cuda.get_device_properties(device).total_memory / 1e9:.2f} GB")
    if args.two_stage and args.epochs_stage1 > 0 and not args.pretrained:
        log("note: stage 1 trains the head on a frozen *random* backbone (--no-pretrained); --no-two-stage skips it")


def log_data(log, args, split, listed, skipped, weights) -> None:
    """Total samples and the class distribution, the three splits, the class weights."""
    everything = [r for part in split.values() for r in part]
    counts = np.bincount([r.diagnosis for r in everything], minlength=args.num_classes)
    log(f"   Total samples: {len(everything)} (of {listed} rows in {args.labels_csv})")
    for message in skipped:
        log(f"   {message}")
    log("   Class distribution:")
    for grade, count in enumerate(counts):
        log(f"      Class {grade}: {count} samples ({count / len(everything):.1%})")
    by = f", each patient ({args.patient_column}) in one split" if args.patient_column else ""
    log(f"   Split (stratified by grade{by}): train {len(split['train'])} | validation {len(split['val'])} "
        f"(chooses the model) | test {len(split['test'])} (held out, reported at the end)")  # fmt: skip
    log("\n⚖️  Class weights computed:")
    for grade, weight in enumerate(weights.tolist()):
        log(f"   Class {grade}: {weight:.4f}")


def checkpoint(model, args, **extra) -> dict:
    return {
        "domain": DOMAIN,
        # pretrained False: evaluate.py and visualize.py rebuild the network and load these weights, no download
        "model_args": {"name": args.model_name, "num_classes": args.num_classes, "pretrained": False},
        "args": vars(args),
        "model": unwrap(model).state_dict(),
        **extra,
    }


def log_tensorboard(writer, step, lr, train_stats, val_stats, model, ctx, val_set, device) -> None:
    for name, value in train_stats.items():
        writer.add_scalar(f"train/{name}", value, step)
    writer.add_scalar("lr", lr, step)
    for name in ("loss", "accuracy", "qwk"):
        writer.add_scalar(f"val/{name}", val_stats[name], step)
    writer.add_images("val/predictions", prediction_images(unwrap(model), ctx, val_set, device), step)
    writer.flush()


def save_epoch(run_dir, model, args, state, optimizer, scheduler, scaler, val_stats, stage_best, stage, log):
    """best_model.pth (the best stage-2 validation QWK) or best_stage1.pth when this epoch is its stage's best,
    last.pth, checkpoint_epoch_N.pth, the history."""
    epoch = state["history"][-1]["epoch"]
    if stage_best:
        name = "best_model.pth" if stage["backbone"] else "best_stage1.pth"
        save_checkpoint(run_dir / name, checkpoint(model, args, epoch=epoch, val=val_stats))
        which = "Best model" if stage["backbone"] else "Best Stage 1 model"
        log(f"✅ {which} saved: Val QWK = {val_stats['qwk']:.4f} (Val Acc = {val_stats['accuracy']:.2%})")
    optimizers = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    last = checkpoint(model, args, **state, **optimizers, scaler=scaler.state_dict())
    save_checkpoint(run_dir / "last.pth", last)
    if epoch % args.save_freq == 0:
        save_checkpoint(run_dir / f"checkpoint_epoch_{epoch}.pth", last)
    write_json(run_dir / "training_history.json", state["history"])


def log_stage(log, stage, args) -> None:
    title = {
        False: "🔒 STAGE 1: Training classifier only (backbone frozen)",
        True: "🔓 STAGE 2: Fine-tuning entire model (all layers unfrozen)"
        + ("" if args.two_stage and args.epochs_stage1 > 0 else " - one stage, no frozen-backbone stage before it"),
    }[stage["backbone"]]
    log(f"\n{RULE}\n{title}\n{RULE}")
    log(f"{stage['epochs']} epochs, AdamW at lr {stage['lr']:.1e}, cosine annealing")


def run_stage(stage_index, plan, model, criterion, scaler, ctx, loaders, state, resume, args, device, out, log):
    """One stage: its trainable part, its optimizer and schedule (restored when the run resumes inside it), then
    its epochs until the last or early stopping. `out`: (run folder, TensorBoard writer), None off rank 0.
    Returns whether training stopped early."""
    stage = plan[stage_index]
    rank = dist.get_rank() if dist.is_initialized() else 0
    set_backbone_trainable(model, stage["backbone"])
    optimizer, scheduler = make_optimizer(model, stage, args, len(loaders.train))
    # DDP registers the parameters that need gradients when it wraps the model: wrap once per stage
    ddp_model = model
    if dist.is_initialized():
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    first_epoch = 0
    if resume is not None and stage_index == resume["stage"]:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        first_epoch = resume["epoch"]
    else:
        state["patience"], state["best_stage"] = 0, -math.inf
    log_stage(log, stage, args)
    number = 2 if stage["backbone"] else 1
    for epoch in range(first_epoch, stage["epochs"]):
        started = time.time()
        global_epoch = sum(s["epochs"] for s in plan[:stage_index]) + epoch
        # Everything random in an epoch derives from (seed, global epoch), so a resumed run repeats it exactly.
        epoch_seed = args.random_seed * 1000 + global_epoch
        torch.manual_seed(epoch_seed + 100_003 * rank)
        loaders.generator.manual_seed(epoch_seed)
        loaders.train_set.set_epoch_seed(epoch_seed + 100_003 * rank)
        if loaders.sampler is not None:
            loaders.sampler.set_epoch(global_epoch)
        label = f"Stage {number} - Epoch {epoch + 1}/{stage['epochs']}"
        train_stats = train_one_epoch(
            ddp_model, criterion, optimizer, scheduler, scaler, ctx, loaders.train, device, f"{label} [Train]"
        )
        val_stats = validate(model, criterion, loaders.val, device, args.num_classes, f"{label} [Val]")
        score = -math.inf if math.isnan(val_stats["qwk"]) else val_stats["qwk"]
        stage_best = score > state["best_stage"] or state["best_stage"] == -math.inf
        state["patience"] = 0 if stage_best else state["patience"] + 1
        state["best_stage"] = max(state["best_stage"], score)
        if stage["backbone"]:  # the run's best: the best stage-2 model, best_model.pth
            state["best"] = max(state["best"], score)
        state["epoch"] = epoch + 1
        lr = scheduler.get_last_lr()[0]
        seconds = time.time() - started
        state["history"].append({"epoch": global_epoch + 1, "stage": stage["name"], "lr": lr, "train": train_stats,
                                 "val": val_stats, "seconds": seconds})  # fmt: skip
        if out is not None:
            log(f"{label}  ({seconds:.0f}s, lr {lr:.1e})")
            log(f"   Train Loss: {train_stats['loss']:.4f} | Train Acc: {train_stats['accuracy']:.2%}")
            log(f"   Val Loss:   {val_stats['loss']:.4f} | Val Acc:   {val_stats['accuracy']:.2%} | "
                f"Val QWK: {val_stats['qwk']:.4f}")  # fmt: skip
            log_tensorboard(out[1], global_epoch + 1, lr, train_stats, val_stats, model, ctx, loaders.val.dataset,
                            device)  # fmt: skip
            save_epoch(out[0], model, args, state, optimizer, scheduler, scaler, val_stats, stage_best, stage, log)
        if stage["backbone"] and state["patience"] >= args.patience:
            log(f"early stopping: no better validation QWK for {args.patience} epochs")
            return True
    return False


def report_on_test_split(run_dir: Path, args, log) -> Path | None:
    """The best model scored on the held-out test split by evaluate.py (metrics.json, report, figures in
    run/evaluation/): the run's number to report, from photos that neither trained nor chose the model."""
    if not json.loads((run_dir / "split.json").read_text())["test"]:
        log(
            "no held-out test split (--test-split 0): no score is reported; the validation QWK above chose the "
            "model and overstates it. Score photos it never saw: evaluate.py --labels-csv ... --img-dir ..."
        )
        return None
    out = evaluate.main(evaluate.parse_args(["--model-path", str(run_dir / "best_model.pth"),
                                             "--num-workers", str(args.num_workers)]))  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    referable = metrics.get("referable_dr") or {}
    log(f"\n📋 Held-out test split, {metrics['images']} photos that neither trained nor chose the model:")
    log(f"   QWK {metrics['qwk']:.4f} | accuracy {metrics['accuracy']:.2%} | macro F1 {metrics['macro_f1']:.4f}")
    if referable:
        log(f"   referable DR (grade >= 2): sensitivity {evaluate.with_ci(referable, 'sensitivity')}, specificity "
            f"{evaluate.with_ci(referable, 'specificity')}, AUC {evaluate.with_ci(referable, 'auc')}")  # fmt: skip
    log(f"   report: {out}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def main(args):
    device = setup_device()
    readable_console()
    logging.basicConfig(
        level=logging.INFO, format="%(message)s", handlers=[logging.StreamHandler(sys.stdout)], force=True
    )
    log = logging.info if is_main() else (lambda *a: None)
    early = logging.handlers.MemoryHandler(100_000, flushLevel=logging.CRITICAL + 1)  # until train.log exists
    logging.getLogger().addHandler(early)
    args, resume = resume_or_start(args, log)
    ctx, scaler = mixed_precision(device, args.mixed_precision and not emulated_bf16(device))
    if is_main():
        log_banner(log, args, device, ctx)

    split, settings, skipped, listed = load_data(args, log)
    weights = class_weights([r.diagnosis for r in split["train"]], args.num_classes)
    if is_main():
        log_data(log, args, split, listed, skipped, weights)
    model = build_model(args, device)  # may need a download: before the run's files are written
    run_dir = start_run(args, resume, split, early)
    loaders = make_loaders(split["train"], split["val"], settings, args, device)
    criterion = build_loss(args, weights).to(device)

    plan = stage_plan(args)
    state = {"stage": 0, "epoch": 0, "best": -math.inf, "best_stage": -math.inf, "patience": 0, "history": []}
    if resume is not None:
        model.load_state_dict(resume["model"])
        if resume["scaler"]:  # empty when the scaler was off (fp32 or bf16) in the interrupted run
            scaler.load_state_dict(resume["scaler"])
        state = {k: resume[k] for k in state}
        log(f"resumed from {args.resume}: {plan[state['stage']]['name']}, epoch {state['epoch'] + 1}")
    out = None
    if is_main():  # a resumed run appends to its own folder, dropping what the killed run logged after last.pth
        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=len(state["history"]) + 1)
        out = (run_dir, writer)

    for stage_index in range(state["stage"], len(plan)):
        stopped = run_stage(stage_index, plan, model, criterion, scaler, ctx, loaders, state, resume, args, device,
                            out, log)  # fmt: skip
        state["stage"], state["epoch"] = stage_index + 1, 0
        if stopped:
            break

    main_rank = is_main()
    if dist.is_initialized():
        dist.destroy_process_group()
    if main_rank:
        writer.close()
        stage2 = [h for h in state["history"] if h["stage"] == "stage2"]
        best = max(stage2, key=lambda h: -math.inf if math.isnan(h["val"]["qwk"]) else h["val"]["qwk"])
        total = sum(stage["epochs"] for stage in plan)
        log(f"\n{RULE}\n✅ Training completed! ({len(state['history'])} of {total} epochs)")
        log(f"   Best Validation QWK: {best['val']['qwk']:.4f} (Val Acc {best['val']['accuracy']:.2%}, epoch "
            f"{best['epoch']}; the validation split chose this model)")  # fmt: skip
        log(f"   Models saved to: {run_dir}")
        log(f"   Training history: {run_dir / 'training_history.json'}\n{RULE}")
        report_on_test_split(run_dir, args, log)
    return run_dir


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, add_help=add_help)
    add = p.add_argument
    flag = argparse.BooleanOptionalAction
    add("--labels-csv", "--labels_csv", dest="labels_csv", help="CSV with id_code,diagnosis")
    add("--img-dir", "--img_dir", dest="img_dir", help="folder of <id_code>.png/.jpg/.jpeg")
    add("--save-dir", "--save_dir", dest="save_dir", default="ml/models",
        help="the run's files go straight in here; a folder that holds a run is never overwritten")  # fmt: skip
    add("--cache-dir", "--cache_dir", dest="cache_dir", help="preprocessed photos; without it SAVE_DIR/cache")
    add("--demo", action="store_true", help="synthetic photos (in demo_data beside SAVE_DIR), a small network")
    add("--model-name", "--model_name", dest="model_name", choices=MODELS, default="resnet50", help="backbone")
    add("--num-classes", "--num_classes", dest="num_classes", type=int, default=5, help="grades")
    add("--pretrained", action=flag, default=True, help="ImageNet weights")
    add("--two-stage", dest="two_stage", action=flag, default=True, help="frozen backbone first")
    add("--two_stage", dest="two_stage", action=flag, help=argparse.SUPPRESS)  # the other spelling, kept out of sight
    add("--epochs-stage1", "--epochs_stage1", dest="epochs_stage1", type=int, default=5, help="head-only epochs")
    add("--epochs-stage2", "--epochs_stage2", dest="epochs_stage2", type=int, default=25, help="all-layer epochs")
    add("--lr-stage1", "--lr_stage1", dest="lr_stage1", type=float, default=1e-3, help="stage 1 learning rate")
    add("--lr-stage2", "--lr_stage2", dest="lr_stage2", type=float, default=1e-4, help="stage 2 learning rate")
    add("--weight-decay", "--weight_decay", dest="weight_decay", type=float, default=1e-4, help="AdamW's")
    add("--loss", choices=["ce", "weighted_ce", "focal"], default="focal", help="training loss")
    add("--focal-gamma", "--focal_gamma", dest="focal_gamma", type=float, default=2.0, help="focusing power")
    add("--advanced-aug", dest="advanced_aug", action=flag, default=True,
        help="16 albumentations techniques (data.build_augmentation); --no-advanced-aug: flips only")  # fmt: skip
    add("--advanced_aug", dest="advanced_aug", action=flag, help=argparse.SUPPRESS)
    add("--medical-preprocess", dest="medical_preprocess", action=flag, default=True,
        help="black-border and circle crop, then CLAHE")  # fmt: skip
    add("--medical_preprocess", dest="medical_preprocess", action=flag, help=argparse.SUPPRESS)
    add("--ben-graham", "--ben_graham", dest="ben_graham", action="store_true", help="Ben Graham's local average")
    add("--image-size", "--image_size", dest="image_size", type=int, default=224, help="input size in pixels")
    add("--mixed-precision", dest="mixed_precision", action=flag, default=True,
        help="autocast in training: bf16 (recent GPUs, CPUs with bf16 instructions; fp32 on other CPUs), "
             "or fp16 with a GradScaler")  # fmt: skip
    add("--mixed_precision", dest="mixed_precision", action=flag, help=argparse.SUPPRESS)
    add("--channels-last", dest="channels_last", action=flag, help="channels-last convolutions (on for CPU, CUDA)")
    add("--channels_last", dest="channels_last", action=flag, help=argparse.SUPPRESS)
    add("--batch-size", "--batch_size", dest="batch_size", type=int, default=32, help="images per batch, process")
    add("--num-workers", "--num_workers", dest="num_workers", type=int, default=4, help="loader workers")
    add("--patience", type=int, default=10, help="stage-2 epochs without a better QWK")
    add("--save-freq", "--save_freq", dest="save_freq", type=int, default=5, help="checkpoint every N epochs")
    add("--val-split", "--val_split", dest="val_split", type=float, default=0.2,
        help="share of the photos that validates (chooses the model)")  # fmt: skip
    add("--test-split", "--test_split", dest="test_split", type=float, default=0.1,
        help="share held out for the final, reported score; 0: none")  # fmt: skip
    add("--patient-column", "--patient_column", dest="patient_column",
        help="CSV column naming each photo's patient: one patient's photos (both eyes) stay in one split")  # fmt: skip
    add("--random-seed", "--random_seed", dest="random_seed", type=int, default=42, help="split, init, order")
    add("--skip-bad-rows", "--skip_bad_rows", dest="skip_bad_rows", action="store_true",
        help="skip CSV rows with a bad grade or no image (the count is reported)")  # fmt: skip
    add("--resume", help="a run folder or its last.pth")
    return p


def check_args(args) -> argparse.Namespace:
    if not args.demo and not (args.labels_csv and args.img_dir):
        raise SystemExit("give --labels-csv and --img-dir (APTOS train.csv and its image folder), or --demo")
    for key in ("epochs_stage2", "batch_size", "save_freq", "image_size"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} {getattr(args, key)} must be at least 1")
    if not 0 < args.val_split < 1 or not 0 <= args.test_split < 1 or args.val_split + args.test_split >= 1:
        raise SystemExit(f"--val-split {args.val_split} and --test-split {args.test_split}: shares between 0 and "
                         "1 (the test split may be 0), together below 1, so photos are left to train on")  # fmt: skip
    return args


def parse_args(argv=None) -> argparse.Namespace:
    """timm's pattern: --demo is read first and sets the parser's defaults, so --demo --help shows its values.
    channels-last convolutions are faster on the CPU and CUDA (benchmarks/RESULTS.md); MPS is unmeasured."""
    chosen, _ = get_args_parser(add_help=False).parse_known_args(argv)
    parser = get_args_parser()
    parser.set_defaults(channels_last=pick_device().type in ("cpu", "cuda"), **(DEMO if chosen.demo else {}))
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
