"""Train a 3D network to segment large vesicles in anisotropic EM volumes (binary, boundary, distance).

    python hydra_lv/train.py --demo                                   # synthetic EM volumes, about 3 min on a CPU
    python hydra_lv/train.py --config hydra_lv/hydra-lv.yaml system.training.batch_size=8
    python hydra_lv/train.py data.patch_size=[24,96,96] model.architecture=unet3d experiment_name=lv_unet
    python hydra_lv/train.py --resume outputs/hydra_lv_rsunet               # after a kill: carries on exactly
    python hydra_lv/train.py --mode test --checkpoint outputs/hydra_lv_rsunet/checkpoints/best.ckpt
    torchrun --nproc_per_node=4 hydra_lv/train.py system.training.num_gpus=4   # four GPUs, DDP
    tensorboard --logdir outputs/

Settings come from --config (the YAML file hydra_lv/hydra-lv.yaml unless given; --help lists its keys and values); every
`dotted.key=value`, before, between or after the flags, overrides one (values read as YAML); --demo sets its own values
between the two. Training draws data.iterations_per_epoch random patches per epoch where the valid mask is set, augments
them (flips, 90-degree rotations, z flip, intensity, misalignment, missing sections, motion blur, elastic) and makes the
targets from the instance labels on the fly. Loss: model.loss_weights x (Dice + BCE on binary, Dice + BCE on boundary,
MSE on tanh(distance)), inside the valid mask. AdamW, ReduceLROnPlateau on the validation loss (stepped per epoch),
gradient clipping and accumulation, mixed precision by optimization.precision (auto: bf16 autocast where the GPU has it,
fp16 with a loss scaler on others, fp32 on the CPU). Stops when the training loss falls below
optimization.early_stopping.loss_threshold, or after optimization.early_stopping.patience epochs without a better
validation loss. Without validation volumes, held-out regions of the training volumes (data.val_fraction) validate.
--tune-decoding N then tunes decoding.* on the validation volumes with Optuna.

Each run writes outputs/<experiment_name>/ (outputs/<experiment_name>_2/ ... if that holds an earlier run):
config.yaml (the merged settings), checkpoints/last.ckpt (resume) and best.ckpt (lowest validation loss),
metrics.csv, train.log, and TensorBoard scalars and images in tensorboard/. After training (and with --mode test)
hydra_lv/evaluate.py tests the best checkpoint on data.test_* (else the validation volumes or regions, and says so).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import itertools
import logging
import math
import os
import time
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from hydra_lv.data import (
    DEFAULT_CONFIG,
    DOMAIN,
    DataError,
    EpochSampler,
    HelpFormatter,
    PatchDataset,
    apply_overrides,
    as_overrides,
    check_splits_disjoint,
    describe_config,
    find_volumes,
    held_out_regions,
    load_config,
    new_folder,
    write_demo_volumes,
    write_metrics_csv,
)
from hydra_lv.model import (
    HydraLoss,
    load_weights,
    model_from_config,
    pick_device,
    precision_setting,
    size_multiples,
    use_channels_last,
)

# --demo: small volumes, a small network and short epochs, about three minutes on two CPU cores
DEMO = {
    "experiment_name": f"{DOMAIN}_demo",
    "model.filters": [8, 16, 32],
    "model.input_size": [16, 64, 64],
    "model.output_size": [16, 64, 64],
    "data.patch_size": [16, 64, 64],
    "data.pad_size": [2, 8, 8],
    "data.iterations_per_epoch": 32,
    "data.val_patches": 8,
    "system.training.batch_size": 4,
    "system.training.num_gpus": 1,
    "system.training.num_workers": 2,
    "system.inference.batch_size": 4,
    "optimization.max_epochs": 30,
    "optimization.optimizer.lr": 3e-3,
    "optimization.scheduler.patience": 4,
}
# the seed document's TensorBoard names, beside train/<term>
SEED_TAGS = {"loss": "train_loss_total_epoch", "binary": "train_loss_0", "boundary": "train_loss_1",
             "distance": "train_loss_2"}  # fmt: skip


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


# ----------------------------------------------------------------------------------------------------------------
# One epoch of training, one pass of validation
# ----------------------------------------------------------------------------------------------------------------


def train_one_epoch(model, criterion, optimizer, scaler, ctx, loader, device, cfg, label) -> dict:
    """Gradient accumulation over optimization.accumulate_grad_batches batches, clipping at gradient_clip_val."""
    model.train()
    accumulate = max(1, int(cfg["optimization"]["accumulate_grad_batches"]))
    clip = cfg["optimization"]["gradient_clip_val"]
    sums, count = {}, 0
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=label, disable=not is_main(), leave=False, dynamic_ncols=True)
    for step, batch in enumerate(bar, start=1):
        image, target, weight = (batch[k].to(device, non_blocking=True) for k in ("image", "target", "weight"))
        with ctx:
            output = model(image)
        loss, terms = criterion(output, target, weight)
        finite = torch.isfinite(loss.detach()).float()
        if dist.is_initialized():  # every rank stops together, none waits for the others forever
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite:
            raise SystemExit(f"{label}: the training loss is not finite ({terms}); lower optimization.optimizer.lr")
        scaler.scale(loss / accumulate).backward()
        if step % accumulate == 0 or step == len(loader):
            if clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        count += 1
        for name, value in {"loss": loss.item(), **terms}.items():
            sums[name] = sums.get(name, 0.0) + value
        bar.set_postfix(loss=f"{sums['loss'] / count:.4f}")
    return reduce_means(sums, count, device)


@torch.no_grad()
def validate(model, criterion, ctx, loader, device) -> dict:
    model.eval()
    sums, count = {}, 0
    for batch in tqdm(loader, desc="validation", disable=not is_main(), leave=False, dynamic_ncols=True):
        image, target, weight = (batch[k].to(device) for k in ("image", "target", "weight"))
        with ctx:
            output = model(image)
        loss, terms = criterion(output, target, weight)
        count += 1
        for name, value in {"loss": loss.item(), **terms}.items():
            sums[name] = sums.get(name, 0.0) + value
    return reduce_means(sums, count, device)


def reduce_means(sums: dict, count: int, device) -> dict:
    """Means over every batch of every rank (a rank with no batch adds zeros)."""
    names = ["loss", "binary", "boundary", "distance"]
    sums = {n: sums.get(n, 0.0) for n in names}
    values = torch.tensor([sums[n] for n in names] + [count], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(values)
    return {n: float(values[i] / values[-1]) for i, n in enumerate(names)}


class FirstBatches:
    """The first n batches of a loader, with their count as length (train_one_epoch steps by it)."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, min(n, len(loader))

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n)


def profile_dataloader(loader, train_step, device, batches: int = 10) -> dict:
    """Batches per second of the loader alone, then of the loader with train_one_epoch's real step: the smaller
    one limits training."""

    def rate(run) -> float:
        run(FirstBatches(loader, 1))  # workers start and warm up outside the timing
        part = FirstBatches(loader, batches)
        started = time.perf_counter()
        run(part)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(part) / (time.perf_counter() - started)

    loader_only = rate(lambda part: sum(1 for _ in part))
    with_model = rate(train_step)
    limit = "the data loader" if loader_only < 1.5 * with_model else "the model step"
    return {"loader_batches_per_s": loader_only, "loader_and_step_batches_per_s": with_model, "limited_by": limit}


# ----------------------------------------------------------------------------------------------------------------
# The phases of main, in order
# ----------------------------------------------------------------------------------------------------------------


def check_config(cfg: dict) -> None:
    patch, filters = cfg["data"]["patch_size"], cfg["model"]["filters"]
    if len(patch) != 3 or len(cfg["data"]["pad_size"]) != 3:
        raise DataError(f"data.patch_size={patch} and data.pad_size must have three entries (z, y, x)")
    multiples = size_multiples(cfg)
    levels = f"{len(filters)} levels (model.filters={filters})"
    if cfg["model"]["architecture"] == "mednext":
        levels = f"the 4 levels of mednext at data.resolution={cfg['data']['resolution']}"
    for key, size in (("data.patch_size", patch), ("model.input_size", cfg["model"]["input_size"])):
        if len(size) != 3 or any(n % m for n, m in zip(size, multiples, strict=True)):
            raise DataError(f"{key}={size}: three sizes (z, y, x), multiples of {list(multiples)} for {levels}")
    if cfg["model"]["output_size"] != cfg["model"]["input_size"]:
        raise DataError(
            f"model.output_size={cfg['model']['output_size']} must equal model.input_size="
            f"{cfg['model']['input_size']}: the networks keep the size of their input"
        )
    if not 0 <= cfg["inference"]["overlap"] < 1:
        raise DataError(f"inference.overlap={cfg['inference']['overlap']}: must be at least 0 and below 1")
    if len(cfg["model"]["loss_weights"]) != 3:
        raise DataError(f"model.loss_weights={cfg['model']['loss_weights']}: give three (binary, boundary, distance)")
    precision_setting(torch.device("cpu"), cfg["optimization"]["precision"])  # a known value


def test_mode(checkpoint: str | Path, overrides=(), fast_dev_run: bool = False) -> Path:
    """hydra_lv/evaluate.py on a checkpoint: segment and score the test volumes."""
    from hydra_lv import evaluate  # imported here: evaluate imports this module

    flags = ["--checkpoint", str(checkpoint), *overrides] + (["--fast-dev-run"] if fast_dev_run else [])
    return evaluate.main(evaluate.parse_args(flags))


def load_settings(args, log) -> tuple[dict, dict | None, Path | None]:
    """(config, the resumed checkpoint or None, its run folder or None). Resuming, the run's stored config wins
    (dotted overrides may change it, e.g. more epochs); otherwise the YAML file, --demo's values, the overrides."""
    if args.resume:
        path = Path(args.resume)
        path = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
        if not path.is_file():
            raise SystemExit(f"--resume {args.resume}: no last.ckpt there (give a run folder or its last.ckpt)")
        resume = torch.load(path, map_location="cpu", weights_only=True)
        if resume.get("domain") != DOMAIN or "optimizer" not in resume:
            raise SystemExit(f"--resume {path}: not a {DOMAIN} training checkpoint (last.ckpt of a run)")
        given = {"--config": args.config != shown_path(DEFAULT_CONFIG), "--demo": args.demo,
                 "--fast-dev-run": args.fast_dev_run}  # fmt: skip
        ignored = [flag for flag, on in given.items() if on]
        if ignored:
            log(f"--resume: the run's stored settings win; ignored {', '.join(ignored)}")
        if args.overrides:
            log(f"resume with {' '.join(args.overrides)}")
        return apply_overrides(resume["config"], args.overrides, "the run's config"), resume, path.parent.parent
    if args.demo:
        if is_main():
            write_demo_volumes(Path(args.output_root) / "demo_data")
        if dist.is_initialized():
            dist.barrier()
    cfg = load_config(args.config, as_overrides(args.preset) + list(args.overrides))
    if args.fast_dev_run:
        batch = cfg["system"]["training"]["batch_size"]
        cfg["data"]["iterations_per_epoch"] = cfg["data"]["val_patches"] = batch
        cfg["optimization"]["max_epochs"] = 1
        # its own folder: the document's next command, --mode test --checkpoint outputs/<experiment_name>/..., must
        # find the real run, not this check
        cfg["experiment_name"] = f"{cfg['experiment_name']}_fast_dev_run"
    # globs relative to this folder become absolute: test mode and resume may run from anywhere
    for key, value in cfg["data"].items():
        if key.split("_")[0] in ("train", "val", "test") and isinstance(value, str) and value:
            cfg["data"][key] = os.path.abspath(value)
    return cfg, None, None


def load_data(cfg: dict, rank: int, world: int):
    """(training patches, validation patches, training volumes, validation volumes)."""
    data = cfg["data"]
    check_splits_disjoint(data)
    train_volumes = find_volumes(data, "train")
    if not train_volumes:
        raise DataError("data.train_image is not set: give a glob of training volumes (or use --demo)")
    val_volumes = find_volumes(data, "val")
    if not val_volumes:  # held-out regions of the training volumes, which training never samples
        train_volumes, val_volumes = held_out_regions(train_volumes, data["patch_size"], data.get("val_fraction", 0.2))
    patch, pad, resolution = data["patch_size"], data["pad_size"], data["resolution"]
    seed = int(cfg["seed"])
    train_set = PatchDataset(
        train_volumes, patch, pad, resolution, data["iterations_per_epoch"], data["augmentation"], seed=seed
    )
    val_set = PatchDataset(val_volumes, patch, pad, resolution, data["val_patches"], fixed=True, seed=seed + 1)
    # every rank validates at least one patch (wrapping round a small set); DDP ranks must all reach the reduce
    val_set = Subset(val_set, [i % len(val_set) for i in range(rank, max(len(val_set), world), world)])
    return train_set, val_set, train_volumes, val_volumes


def make_loaders(train_set, val_set, cfg: dict, device, rank: int, world: int):
    """(training loader, validation loader, the training sampler, worker count)."""
    training = cfg["system"]["training"]
    workers = min(int(training["num_workers"]), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 4)
    sampler = EpochSampler(len(train_set), rank, world)
    loader_args = {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0}
    # every item draws its own random patch from (epoch seed, index): nothing to shuffle (see EpochSampler)
    train_loader = DataLoader(train_set, training["batch_size"], sampler=sampler, **loader_args)
    val_loader = DataLoader(val_set, training["batch_size"], **{**loader_args, "persistent_workers": False})
    return train_loader, val_loader, sampler, workers


def make_model(cfg: dict, device):
    """(the network, the same in DDP when torchrun runs several processes)."""
    torch.manual_seed(int(cfg["seed"]))
    model = model_from_config(cfg).to(device)
    if use_channels_last(device, cfg):
        model = model.to(memory_format=torch.channels_last_3d)
    if dist.is_initialized() and cfg["model"].get("rsunet_norm") == "sync_batch":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over every GPU
    if not dist.is_initialized():
        return model, model
    return model, DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def make_optimizer(model, cfg: dict):
    optimization = cfg["optimization"]
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=float(optimization["optimizer"]["lr"]),
        weight_decay=float(optimization["optimizer"]["weight_decay"]),
    )
    # ReduceLROnPlateau on the validation loss, stepped once per epoch
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=optimization["scheduler"]["factor"], patience=optimization["scheduler"]["patience"],
        min_lr=float(optimization["scheduler"]["min_lr"]),
    )  # fmt: skip
    return optimizer, scheduler


def resume_or_start(resume, model, optimizer, scheduler, scaler, cfg: dict, args, run_dir) -> tuple[dict, Path]:
    """The training state (epoch, best, patience, history) and the run folder: the resumed run's, or a new one
    holding config.yaml (rank 0 alone writes)."""
    state = {"epoch": 0, "best": math.inf, "patience": 0, "history": []}
    if resume is not None:
        load_weights(model, resume["model"], args.resume)
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        state = {k: resume[k] for k in state}
    elif is_main():
        run_dir = new_folder(Path(args.output_root), cfg["experiment_name"])
        (run_dir / "checkpoints").mkdir()
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    if is_main():
        logging.getLogger().addHandler(logging.FileHandler(run_dir / "train.log"))
    return state, run_dir


def log_banner(log, run_dir, state, resumed, cfg, device, world, ctx, train_volumes, val_volumes) -> None:
    gpu = (
        f"{torch.cuda.get_device_name(device)}, {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB"
        if device.type == "cuda"
        else device.type
    )
    precision = str(ctx.fast_dtype).removeprefix("torch.") if isinstance(ctx, torch.autocast) else "fp32"
    log("=" * 72)
    log(f"{DOMAIN} training  run folder {run_dir}" + (f"  (resumed at epoch {state['epoch'] + 1})" if resumed else ""))
    log(
        f"model {cfg['model']['architecture']} filters {cfg['model']['filters']}  patch {cfg['data']['patch_size']}  "
        f"batch {cfg['system']['training']['batch_size']} x {world} process(es)  device {gpu}  precision {precision}"
    )
    log(
        f"train: {', '.join(v.name + str(list(v.shape)) + v.region for v in train_volumes)}; "
        f"validation: {', '.join(v.name + v.region for v in val_volumes)}"
        + (" (held-out regions of the training volumes, never trained on)" if val_volumes[0].bounds else "")
    )
    log("=" * 72)
    if cfg["system"]["training"]["num_gpus"] > 1 and world == 1:
        log(
            f"system.training.num_gpus={cfg['system']['training']['num_gpus']} but one process runs: launch "
            f"torchrun --nproc_per_node={cfg['system']['training']['num_gpus']} {DOMAIN}/train.py ... for DDP"
        )


def save_epoch(run_dir: Path, cfg, model, optimizer, scheduler, scaler, state, val_stats, improved, log) -> None:
    """best.ckpt when the validation loss improved, last.ckpt (resume) and metrics.csv every epoch."""
    checkpoint = {"domain": DOMAIN, "config": cfg, "model": model.state_dict(), "epoch": state["epoch"],
                  "val": val_stats}  # fmt: skip
    if improved:
        save_checkpoint(run_dir / "checkpoints" / "best.ckpt", checkpoint)
        log(f"  saved best.ckpt (val loss {val_stats['loss']:.4f})")
    last = {**checkpoint, **state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict()}  # fmt: skip
    save_checkpoint(run_dir / "checkpoints" / "last.ckpt", last)
    write_metrics_csv(run_dir / "metrics.csv", state["history"])


@torch.no_grad()
def log_tensorboard(writer, row: dict, model, ctx, batch, device) -> None:
    """The epoch's row of metrics.csv (train/<term>, val/<term>, lr, seconds) and the seed document's names
    (train_loss_total_epoch, train_loss_0..2), then the middle z-section of up to three validation patches, each an
    image: input | binary truth, prediction | boundary truth, prediction | distance truth, prediction."""
    epoch = row["epoch"]
    for key, value in row.items():
        if key != "epoch":
            writer.add_scalar(key.replace("_", "/", 1), value, epoch)
    for term, tag in SEED_TAGS.items():
        writer.add_scalar(tag, row[f"train_{term}"], epoch)
    model.eval()
    image, target = batch["image"][:3], batch["target"][:3]
    with ctx:
        output = model(image.to(device)).float().cpu()
    z = output.shape[2] // 2
    shown = [torch.sigmoid(output[:, 0, z]), torch.sigmoid(output[:, 1, z]), (torch.tanh(output[:, 2, z]) + 1) / 2]
    truth = [target[:, 0, z], target[:, 1, z], (target[:, 2, z] + 1) / 2]
    columns = [image[:, 0, z]] + [m for pair in zip(truth, shown, strict=True) for m in pair]
    writer.add_images("val/predictions", torch.cat(columns, dim=-1)[:, None].clamp(0, 1), epoch)


def main(args):
    if args.mode == "test":
        if not args.checkpoint:
            raise SystemExit("--mode test needs --checkpoint outputs/<experiment_name>/checkpoints/best.ckpt")
        return test_mode(args.checkpoint, args.overrides, args.fast_dev_run)

    device = setup_device()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    logging.basicConfig(
        level=logging.INFO, format="%(message)s", handlers=[logging.StreamHandler(sys.stdout)], force=True
    )
    log = logging.info if is_main() else (lambda *a: None)
    cfg, resume, run_dir = load_settings(args, log)
    check_config(cfg)
    ctx, scaler = mixed_precision(device, *precision_setting(device, cfg["optimization"]["precision"]))

    train_set, val_set, train_volumes, val_volumes = load_data(cfg, rank, world)
    train_loader, val_loader, sampler, workers = make_loaders(train_set, val_set, cfg, device, rank, world)
    model, ddp_model = make_model(cfg, device)
    criterion = HydraLoss(cfg["model"]["loss_weights"]).to(device)
    optimizer, scheduler = make_optimizer(model, cfg)

    if args.profile_dataloader:  # the real training step, on the first batches
        step = lambda part: train_one_epoch(ddp_model, criterion, optimizer, scaler, ctx, part, device, cfg, "profile")  # noqa: E731
        result = profile_dataloader(train_loader, step, device)
        log(
            f"loader alone: {result['loader_batches_per_s']:.2f} batches/s ({workers} workers); loader + model step: "
            f"{result['loader_and_step_batches_per_s']:.2f} batches/s on {device.type}; training is limited by "
            f"{result['limited_by']}"
        )
        if dist.is_initialized():
            dist.destroy_process_group()
        return result

    state, run_dir = resume_or_start(resume, model, optimizer, scheduler, scaler, cfg, args, run_dir)
    writer = None
    if is_main():
        log_banner(log, run_dir, state, resume is not None, cfg, device, world, ctx, train_volumes, val_volumes)
        # a resumed run appends to its own events, dropping what the killed run logged after its last.ckpt
        writer = SummaryWriter(run_dir / "tensorboard", purge_step=state["epoch"] + 1)
    optimization, seed = cfg["optimization"], int(cfg["seed"])
    stop = optimization["early_stopping"]

    for epoch in range(state["epoch"], int(optimization["max_epochs"])):
        started = time.time()
        epoch_seed = seed * 1000 + epoch
        torch.manual_seed(epoch_seed + 100_003 * rank)
        sampler.set_epoch_seed(epoch_seed)
        label = f"epoch {epoch + 1}/{optimization['max_epochs']}"
        train_stats = train_one_epoch(ddp_model, criterion, optimizer, scaler, ctx, train_loader, device, cfg, label)
        val_stats = validate(model, criterion, ctx, val_loader, device)
        scheduler.step(val_stats["loss"])
        improved = val_stats["loss"] < state["best"]
        state["best"] = min(state["best"], val_stats["loss"])
        state["patience"] = 0 if improved else state["patience"] + 1
        state["epoch"] = epoch + 1
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - started, 2)}
        row.update({f"train_{k}": v for k, v in train_stats.items()})
        row.update({f"val_{k}": v for k, v in val_stats.items()})
        state["history"].append(row)
        if is_main():
            log(
                f"{label}  train loss {train_stats['loss']:.4f}  val loss {val_stats['loss']:.4f} (binary "
                f"{val_stats['binary']:.3f}, boundary {val_stats['boundary']:.3f}, distance "
                f"{val_stats['distance']:.3f})  lr {row['lr']:.1e}  {row['seconds']:.0f}s"
            )
            save_epoch(run_dir, cfg, model, optimizer, scheduler, scaler, state, val_stats, improved, log)
            log_tensorboard(writer, row, model, ctx, next(iter(val_loader)), device)
        if train_stats["loss"] < stop["loss_threshold"]:
            log(f"early stopping: training loss {train_stats['loss']:.4f} < {stop['loss_threshold']}")
            break
        if state["patience"] >= stop["patience"]:
            log(f"early stopping: no better validation loss for {stop['patience']} epochs")
            break
    if writer is not None:
        writer.close()
    if dist.is_initialized():
        dist.destroy_process_group()  # test mode runs on rank 0 alone, after the others have left
    if rank == 0:
        log(f"best validation loss {state['best']:.4f}; {run_dir}")
        if args.tune_decoding and not args.fast_dev_run:  # decoding.* on the validation volumes, into the config
            from hydra_lv import evaluate  # imported here: evaluate imports this module

            evaluate.tune_decoding(run_dir / "checkpoints" / "best.ckpt", args.tune_decoding)
        if args.test_after or args.fast_dev_run:
            test_mode(run_dir / "checkpoints" / "best.ckpt", fast_dev_run=args.fast_dev_run)
    return run_dir


def shown_path(path: Path) -> str:
    """The path from the working folder when it is below it (short in --help), else the absolute one."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)
    return str(path) if relative.startswith("..") else relative


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter, add_help=add_help,
        epilog=describe_config(DEFAULT_CONFIG, {}),
    )  # fmt: skip
    add = p.add_argument
    add("overrides", nargs="*", help="dotted.key=value settings over the config, e.g. system.training.batch_size=8")
    add(
        "--config",
        default=shown_path(DEFAULT_CONFIG),
        help="the YAML file of settings (its keys and values: below)",
    )
    add("--mode", choices=["train", "test"], default="train", help="train, or test a --checkpoint with evaluate.py")
    add("--checkpoint", help="test mode: a best.ckpt or last.ckpt")
    add("--demo", action="store_true", help="write synthetic EM volumes into OUTPUT_ROOT/demo_data, train and test")
    add("--resume", help="a run folder (outputs/<experiment_name>) or its checkpoints/last.ckpt")
    add("--fast-dev-run", "--fast_dev_run", dest="fast_dev_run", action="store_true",
        help="one batch of train, val and test")  # fmt: skip
    add("--profile-dataloader", "--profile_dataloader", dest="profile_dataloader", action="store_true",
        help="batches/s of the loader alone and with the real training step, then exit")  # fmt: skip
    add("--output-root", "--output_root", dest="output_root", default="outputs",
        help="the folder of run folders")  # fmt: skip
    add("--tune-decoding", "--tune_decoding", dest="tune_decoding", type=int, default=0, metavar="N",
        help="after training, tune decoding.* in N Optuna trials on the validation volumes (adapted Rand error); "
             "test mode then uses them (--demo: 20)")  # fmt: skip
    add("--test-after", dest="test_after", action=argparse.BooleanOptionalAction, default=True,
        help="test best.ckpt with evaluate.py after training")  # fmt: skip
    # the _ spelling as a hidden action: the usage line would list a BooleanOptionalAction's every name
    add("--test_after", dest="test_after", action=argparse.BooleanOptionalAction, default=True, help=argparse.SUPPRESS)
    p.set_defaults(preset={})  # the settings --demo puts between the YAML file and the dotted overrides
    return p


def demo_settings(output_root: str) -> dict:
    """DEMO with the synthetic volumes under OUTPUT_ROOT/demo_data: vol1-2 train, vol3 validates (chooses the
    model), vol4 is held out for the test."""
    root = (Path(output_root) / "demo_data").resolve()
    settings = dict(DEMO)
    for split, volumes in (("train", "vol[12]"), ("val", "vol3"), ("test", "vol4")):
        for kind, suffix in (("image", "im"), ("label", "vesicle_ins"), ("mask", "mask")):
            settings[f"data.{split}_{kind}"] = f"{root}/{volumes}_{suffix}.h5"
    return settings


def parse_args(argv=None) -> argparse.Namespace:
    """timm's pattern: read --demo, --config and --output-root first, set the demo's settings as the parser's
    defaults (--help lists the config with them), then parse for real, overrides anywhere among the flags."""
    chosen, _ = get_args_parser(add_help=False).parse_known_args(argv)
    parser = get_args_parser()
    preset = demo_settings(chosen.output_root) if chosen.demo else {}
    parser.set_defaults(preset=preset, **({"tune_decoding": 20} if chosen.demo else {}))
    parser.epilog = describe_config(chosen.config, preset, " with --demo's values" if chosen.demo else "")
    return parser.parse_intermixed_args(argv)  # dotted overrides before, between or after the flags


if __name__ == "__main__":
    main(parse_args())
