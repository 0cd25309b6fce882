"""Train a 5-grade diabetic-retinopathy classifier on APTOS-style fundus photographs.

    python retinopathy/train.py --demo                                       # synthetic fundi, about 2 min on a CPU
    python retinopathy/train.py --labels-csv DATA/train.csv --img-dir DATA/train_images \\
        --model-name efficientnet_b3 --loss focal --medical-preprocess --advanced-aug --mixed-precision
    python retinopathy/train.py --resume ml/models/<run>
    torchrun --nproc_per_node=2 retinopathy/train.py --labels-csv DATA/train.csv --img-dir DATA/train_images

Two stages (--two-stage): stage 1 trains only the new head for --epochs-stage1 epochs at --lr-stage1 with the
pretrained backbone frozen; stage 2 trains everything for --epochs-stage2 epochs at --lr-stage2. Each stage: AdamW
and cosine annealing (stepped per batch). The loss is cross entropy, class-weighted cross entropy or focal loss
(per-class weights from the training split as alpha). The best model is chosen by validation quadratic weighted
kappa (the APTOS metric); accuracy is reported too. --demo trains a small ResNet from scratch, in one stage, on
synthetic photos (add -h to see the values it runs with). --mixed-precision autocasts: bf16 on the CPU and on
GPUs that have it, fp16 with a GradScaler on older GPUs and Apple MPS.

Each run writes --save-dir/retinopathy_<model-name>_<YYYYmmdd_HHMMSS>/: config.json, split.json, best_model.pth,
best_stage1.pth, last.pth (resume), checkpoint_epoch_N.pth (every --save-freq epochs), training_history.json,
train.log, and tensorboard/ (`tensorboard --logdir ml/models`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import logging
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
from retinopathy.data import (
    GRADES,
    FundusDataset,
    HelpFormatter,
    cache_settings,
    new_folder,
    prepare_images,
    read_labels,
    stratified_split,
    write_demo_dataset,
    write_json,
)
from retinopathy.model import MODELS, build_classifier, pick_device, set_backbone_trainable
from retinopathy.visualize import prediction_images

DOMAIN = "retinopathy"
# --demo: a small synthetic set and a small network from scratch, about two minutes on two CPU cores
DEMO = {
    "model_name": "resnet18",
    "pretrained": False,
    "image_size": 128,
    "epochs_stage1": 0,
    "epochs_stage2": 12,
    "lr_stage2": 1e-3,
    "batch_size": 16,
    "two_stage": False,
}


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
        bar.set_postfix(
            loss=f"{totals[0] / totals[2]:.4f}",
            acc=f"{totals[1] / totals[2]:.3f}",
            lr=f"{optimizer.param_groups[0]['lr']:.1e}",
        )
    if dist.is_initialized():
        totals = totals.to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    return {"loss": float(totals[0] / totals[2]), "accuracy": float(totals[1] / totals[2])}


@torch.no_grad()
def validate(model, criterion, ctx, loader, device, num_classes: int) -> dict:
    """Loss, accuracy and quadratic weighted kappa over the validation split (gathered from every rank)."""
    model.eval()
    labels, predictions, loss_sum = [], [], 0.0
    for batch in tqdm(loader, desc="validation", disable=not is_main(), leave=False, dynamic_ncols=True):
        with ctx:
            logits = model(batch["image"].to(device)).float()
        target = batch["label"].to(device)
        loss_sum += criterion(logits, target).item() * len(target)
        labels += target.tolist()
        predictions += logits.argmax(1).tolist()
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


def resume_or_start(args, log) -> tuple[argparse.Namespace, dict | None]:
    """--resume: the interrupted run's stored arguments win (a flag given with it is ignored, and said so, except
    --num-workers); otherwise the arguments as given, checked."""
    if not args.resume:
        return check_args(args), None
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
    # runs from before --channels-last was stored take today's device default
    stored = argparse.Namespace(**{"channels_last": plain["channels_last"], **resume["args"]})
    stored.resume, stored.num_workers = str(path), args.num_workers
    return stored, resume


def load_data(args) -> tuple[list, list, dict, list[str]]:
    """The labelled photos (the demo's synthetic set written first), each decoded, checked and cached once, rank 0
    first (the others then find the cache filled); their stratified train/validation split."""
    if args.demo and args.labels_csv is None:
        root = Path(args.save_dir) / "demo_data" / "v1_240"
        if is_main():
            write_demo_dataset(root)
        if dist.is_initialized():
            dist.barrier()
        args.labels_csv, args.img_dir = str(root / "train.csv"), str(root / "train_images")
    args.labels_csv, args.img_dir = str(Path(args.labels_csv).resolve()), str(Path(args.img_dir).resolve())
    args.save_dir = str(Path(args.save_dir).resolve())
    args.cache_dir = str(Path(args.cache_dir or Path(args.save_dir) / "cache").resolve())
    skipped = []  # what --skip-bad-rows left out, said in the banner (and so in train.log)
    records = read_labels(args.labels_csv, args.img_dir, args.num_classes, args.skip_bad_rows, skipped.append)
    settings = cache_settings(args)
    if is_main():
        records = prepare_images(records, settings, Path(args.cache_dir), args.skip_bad_rows, skipped.append)
    if dist.is_initialized():
        dist.barrier()
        if not is_main():
            records = prepare_images(records, settings, Path(args.cache_dir), args.skip_bad_rows, print, show=False)
    train_records, val_records = stratified_split(records, args.val_split, args.random_seed)
    return train_records, val_records, settings, skipped


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


def start_run(args, resume, train_records, val_records) -> Path | None:
    """The run folder (rank 0; a resumed run keeps its own) with config.json and split.json, and train.log."""
    if resume is not None:
        run_dir = Path(args.resume).parent
    elif is_main():
        run_dir = new_folder(Path(args.save_dir), f"{DOMAIN}_{args.model_name}")
        args.run_dir = str(run_dir)
        write_json(run_dir / "config.json", vars(args))
        split = {"train": [r.id_code for r in train_records], "val": [r.id_code for r in val_records]}
        write_json(run_dir / "split.json", split)  # evaluate.py and visualize.py score exactly these photos
    else:
        return None
    if is_main():
        logging.getLogger().addHandler(logging.FileHandler(run_dir / "train.log"))
    return run_dir


def log_banner(log, args, device, run_dir, train_records, val_records, skipped, weights) -> None:
    world = dist.get_world_size() if dist.is_initialized() else 1
    gpu = (
        f"{torch.cuda.get_device_name(device)}, {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB"
        if device.type == "cuda"
        else device.type
    )
    log("=" * 72)
    log(f"{DOMAIN} training  run folder {run_dir}")
    log(
        f"model {args.model_name} (pretrained: {args.pretrained})  image {args.image_size}px  batch "
        f"{args.batch_size} x {world} process(es)  loss {args.loss}  device {gpu}"
    )
    log(
        f"preprocessing: medical {args.medical_preprocess}, Ben Graham {args.ben_graham}, advanced aug "
        f"{args.advanced_aug}, mixed precision {args.mixed_precision}"
    )
    log(f"data: {len(train_records) + len(val_records)} photos from {args.labels_csv}")
    for message in skipped:
        log(f"  {message}")
    if args.two_stage and args.epochs_stage1 > 0 and not args.pretrained:
        log("note: stage 1 trains the head on a frozen *random* backbone (--no-pretrained); --no-two-stage skips it")
    log("=" * 72)
    train_counts = np.bincount([r.diagnosis for r in train_records], minlength=args.num_classes)
    val_counts = np.bincount([r.diagnosis for r in val_records], minlength=args.num_classes)
    for grade, name in enumerate(GRADES[: args.num_classes]):
        log(
            f"  grade {grade} {name:<17} train {train_counts[grade]:>5}  val {val_counts[grade]:>5}  class "
            f"weight {weights[grade]:.3f}"
        )


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


def save_epoch(run_dir, model, args, state, optimizer, scheduler, scaler, val_stats, improved, stage1_best, log):
    """best_model.pth (best QWK of the run), best_stage1.pth, last.pth, checkpoint_epoch_N.pth, the history."""
    epoch = state["history"][-1]["epoch"]
    if improved:
        save_checkpoint(run_dir / "best_model.pth", checkpoint(model, args, epoch=epoch, val=val_stats))
        log(f"  saved best model (QWK {state['best']:.4f})")
    if stage1_best:
        save_checkpoint(run_dir / "best_stage1.pth", checkpoint(model, args, epoch=epoch, val=val_stats))
    optimizers = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    last = checkpoint(model, args, **state, **optimizers, scaler=scaler.state_dict())
    save_checkpoint(run_dir / "last.pth", last)
    if epoch % args.save_freq == 0:
        save_checkpoint(run_dir / f"checkpoint_epoch_{epoch}.pth", last)
    write_json(run_dir / "training_history.json", state["history"])


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
    log(f"{stage['name']}: {stage['epochs']} epochs at lr {stage['lr']:.1e}, backbone "
        f"{'trainable' if stage['backbone'] else 'frozen'}")  # fmt: skip
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
        label = f"{stage['name']} epoch {epoch + 1}/{stage['epochs']}"
        train_stats = train_one_epoch(
            ddp_model, criterion, optimizer, scheduler, scaler, ctx, loaders.train, device, label
        )
        val_stats = validate(model, criterion, ctx, loaders.val, device, args.num_classes)
        score = -math.inf if math.isnan(val_stats["qwk"]) else val_stats["qwk"]
        improved = score > state["best"] or state["best"] == -math.inf
        improved_stage = score > state["best_stage"] or state["best_stage"] == -math.inf
        state["patience"] = 0 if improved_stage else state["patience"] + 1
        state["best"], state["best_stage"] = max(state["best"], score), max(state["best_stage"], score)
        state["epoch"] = epoch + 1
        lr = scheduler.get_last_lr()[0]
        seconds = time.time() - started
        state["history"].append({"epoch": global_epoch + 1, "stage": stage["name"], "lr": lr, "train": train_stats,
                                 "val": val_stats, "seconds": seconds})  # fmt: skip
        if out is not None:
            log(
                f"{label}  train loss {train_stats['loss']:.4f} acc {train_stats['accuracy']:.3f}  val loss "
                f"{val_stats['loss']:.4f} acc {val_stats['accuracy']:.3f} QWK {val_stats['qwk']:.4f}  {seconds:.0f}s"
            )
            stage1_best = improved_stage and stage["name"] == "stage1"
            log_tensorboard(out[1], global_epoch + 1, lr, train_stats, val_stats, model, ctx, loaders.val.dataset,
                            device)  # fmt: skip
            save_epoch(out[0], model, args, state, optimizer, scheduler, scaler, val_stats, improved, stage1_best, log)
        if stage["backbone"] and state["patience"] >= args.patience:
            log(f"early stopping: no better validation QWK for {args.patience} epochs")
            return True
    return False


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def main(args):
    device = setup_device()
    logging.basicConfig(
        level=logging.INFO, format="%(message)s", handlers=[logging.StreamHandler(sys.stdout)], force=True
    )
    log = logging.info if is_main() else (lambda *a: None)
    args, resume = resume_or_start(args, log)
    ctx, scaler = mixed_precision(device, args.mixed_precision)

    train_records, val_records, settings, skipped = load_data(args)
    weights = class_weights([r.diagnosis for r in train_records], args.num_classes)
    model = build_model(args, device)  # may need a download: before the run folder is made
    run_dir = start_run(args, resume, train_records, val_records)
    if is_main():
        log_banner(log, args, device, run_dir, train_records, val_records, skipped, weights)
    loaders = make_loaders(train_records, val_records, settings, args, device)
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

    if is_main():
        total = sum(stage["epochs"] for stage in plan)
        log(f"best validation QWK {state['best']:.4f} over {len(state['history'])} of {total} epochs; {run_dir}")
        writer.close()
    if dist.is_initialized():
        dist.destroy_process_group()
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
    add("--save-dir", "--save_dir", dest="save_dir", default="ml/models", help="each run gets a folder in here")
    add("--cache-dir", "--cache_dir", dest="cache_dir", help="preprocessed photos; without it SAVE_DIR/cache")
    add("--demo", action="store_true", help="synthetic photos into SAVE_DIR/demo_data, a small network")
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
    add("--advanced-aug", "--advanced_aug", dest="advanced_aug", action="store_true", help="full augmentation")
    add("--medical-preprocess", "--medical_preprocess", dest="medical_preprocess", action="store_true",
        help="black-border and circle crop, then CLAHE")  # fmt: skip
    add("--ben-graham", "--ben_graham", dest="ben_graham", action="store_true", help="Ben Graham's local average")
    add("--image-size", "--image_size", dest="image_size", type=int, default=224, help="input size in pixels")
    add("--mixed-precision", "--mixed_precision", dest="mixed_precision", action="store_true",
        help="autocast: bf16, or fp16 with a GradScaler")  # fmt: skip
    add("--channels-last", dest="channels_last", action=flag, help="channels-last convolutions (on for CPU, CUDA)")
    add("--channels_last", dest="channels_last", action=flag, help=argparse.SUPPRESS)
    add("--batch-size", "--batch_size", dest="batch_size", type=int, default=32, help="images per batch, process")
    add("--num-workers", "--num_workers", dest="num_workers", type=int, default=4, help="loader workers")
    add("--patience", type=int, default=10, help="stage-2 epochs without a better QWK")
    add("--save-freq", "--save_freq", dest="save_freq", type=int, default=5, help="checkpoint every N epochs")
    add("--val-split", "--val_split", dest="val_split", type=float, default=0.2, help="validation share")
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
    if not 0 < args.val_split < 1:
        raise SystemExit(f"--val-split {args.val_split} must lie between 0 and 1")
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
