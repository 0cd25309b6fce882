"""Train a 3D network to segment large vesicles in anisotropic EM volumes (binary, boundary, distance).

    python hydra_lv/train.py --demo                                   # synthetic EM volumes, about 3 min on a CPU
    python hydra_lv/train.py --config hydra_lv/hydra-lv.yaml system.training.batch_size=8
    python hydra_lv/train.py data.patch_size=[24,96,96] model.architecture=unet3d experiment_name=lv_unet
    python hydra_lv/train.py --resume outputs/hydra_lv_rsunet               # after a kill: carries on exactly
    python hydra_lv/train.py --mode test --checkpoint outputs/hydra_lv_rsunet/checkpoints/best.ckpt
    torchrun --nproc_per_node=4 hydra_lv/train.py system.training.num_gpus=4   # four GPUs, DDP

Settings come from --config (default hydra_lv/hydra-lv.yaml); every `dotted.key=value` after the flags overrides
one (values read as YAML). Training draws data.iterations_per_epoch random patches per epoch where the valid mask
is set, augments them (flips, 90-degree rotations, z flip, intensity, misalignment, missing sections, motion blur,
elastic) and makes the targets from the instance labels on the fly. Loss: model.loss_weights x (Dice + BCE on
binary, Dice + BCE on boundary, MSE on tanh(distance)), inside the valid mask. AdamW, ReduceLROnPlateau on the
validation loss (stepped per epoch), gradient clipping and accumulation, bf16 autocast where the GPU has it.
Stops when the training loss falls below optimization.early_stopping.loss_threshold, or after
optimization.early_stopping.patience epochs without a better validation loss.

Each run writes outputs/<experiment_name>/ (outputs/<experiment_name>_2/ ... if that holds an earlier run):
config.yaml (the merged settings), checkpoints/last.ckpt (resume) and best.ckpt (lowest validation loss),
metrics.csv, train.log, and TensorBoard scalars and image slices in tensorboard/ when TensorBoard is installed.
After training, test mode runs on data.test_* (or the validation volumes): see hydra_lv/evaluate.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import csv
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
from tqdm import tqdm

from hydra_lv.data import (
    DEFAULT_CONFIG,
    DataError,
    PatchDataset,
    apply_overrides,
    find_volumes,
    load_config,
    new_folder,
    write_demo_volumes,
)
from hydra_lv.model import HydraLoss, amp_dtype, build_model, in_plane_multiple, use_channels_last

# --demo: small volumes, a small network and short epochs, about three minutes on two CPU cores
DEMO = {
    "experiment_name": "hydra_lv_demo",
    "model.filters": [8, 16, 32],
    "model.input_size": [16, 64, 64],
    "model.output_size": [16, 64, 64],
    "data.patch_size": [16, 64, 64],
    "data.pad_size": [2, 8, 8],
    "data.iterations_per_epoch": 32,
    "data.val_patches": 8,
    "system.training.batch_size": 4,
    "system.training.num_workers": 2,
    "system.inference.batch_size": 4,
    "optimization.max_epochs": 30,
    "optimization.optimizer.lr": 3e-3,
    "optimization.scheduler.patience": 4,
}


# ----------------------------------------------------------------------------------------------------------------
# One epoch of training, one pass of validation
# ----------------------------------------------------------------------------------------------------------------


def train_one_epoch(model, criterion, optimizer, scaler, loader, device, cfg, label) -> dict:
    """Gradient accumulation over optimization.accumulate_grad_batches batches, clipping at gradient_clip_val."""
    model.train()
    accumulate = max(1, int(cfg["optimization"]["accumulate_grad_batches"]))
    clip = cfg["optimization"]["gradient_clip_val"]
    sums, count = {}, 0
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=label, disable=not is_main(), leave=False, dynamic_ncols=True)
    for step, batch in enumerate(bar, start=1):
        image, target, weight = (batch[k].to(device, non_blocking=True) for k in ("image", "target", "weight"))
        with amp_context(device, cfg):
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
def validate(model, criterion, loader, device, cfg) -> dict:
    model.eval()
    sums, count = {}, 0
    for batch in loader:
        image, target, weight = (batch[k].to(device) for k in ("image", "target", "weight"))
        with amp_context(device, cfg):
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


def profile_dataloader(loader, model, criterion, optimizer, device, cfg, batches: int = 10) -> dict:
    """Batches per second of the loader alone, then of loader + model step: the smaller one limits training."""
    model.train()

    def rate(step) -> float:
        iterator = iter(loader)
        step(next(iterator))  # workers start and warm up outside the timing
        started, n = time.perf_counter(), 0
        for batch in iterator:
            step(batch)
            n += 1
            if n == batches:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - started)

    def train_step(batch):
        image, target, weight = (batch[k].to(device) for k in ("image", "target", "weight"))
        with amp_context(device, cfg):
            output = model(image)
        loss, _ = criterion(output, target, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    loader_only = rate(lambda batch: None)
    with_model = rate(train_step)
    limit = "the data loader" if loader_only < 1.5 * with_model else "the model step"
    return {"loader_batches_per_s": loader_only, "loader_and_step_batches_per_s": with_model, "limited_by": limit}


# ----------------------------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------------------------


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup_device() -> torch.device:
    """CUDA, Apple MPS or CPU; under torchrun one process per GPU (NCCL) or per CPU process (gloo)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=1))
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return pick_device()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def amp_context(device, cfg):
    dtype = amp_dtype(device, cfg)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    columns = list(history[0])
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def check_config(cfg: dict) -> None:
    patch, filters = cfg["data"]["patch_size"], cfg["model"]["filters"]
    if len(patch) != 3 or len(cfg["data"]["pad_size"]) != 3:
        raise DataError(f"data.patch_size={patch} and data.pad_size must have three entries (z, y, x)")
    multiple = in_plane_multiple(filters)
    for key, size in (("data.patch_size", patch), ("model.input_size", cfg["model"]["input_size"])):
        if len(size) != 3 or size[1] % multiple or size[2] % multiple:
            raise DataError(
                f"{key}={size}: three sizes (z, y, x), y and x multiples of {multiple} for {len(filters)} levels "
                f"(model.filters={filters})"
            )
    if cfg["model"]["output_size"] != cfg["model"]["input_size"]:
        raise DataError(
            f"model.output_size={cfg['model']['output_size']} must equal model.input_size="
            f"{cfg['model']['input_size']}: the networks keep the size of their input"
        )
    if not 0 <= cfg["inference"]["overlap"] < 1:
        raise DataError(f"inference.overlap={cfg['inference']['overlap']}: must be at least 0 and below 1")
    if len(cfg["model"]["loss_weights"]) != 3:
        raise DataError(f"model.loss_weights={cfg['model']['loss_weights']}: give three (binary, boundary, distance)")


def tensorboard_writer(run_dir: Path, log):
    """A SummaryWriter when TensorBoard is installed; otherwise None (metrics.csv has everything)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("TensorBoard is not installed: scalars go to metrics.csv only (pip install tensorboard for both)")
        return None
    return SummaryWriter(run_dir / "tensorboard")


@torch.no_grad()
def log_slices(writer, model, batch, device, cfg, epoch) -> None:
    """The middle z-section of the first validation patch: input, the three predictions, the ground truth."""
    model.eval()
    with amp_context(device, cfg):
        output = model(batch["image"][:1].to(device)).float().cpu()
    z = output.shape[2] // 2
    predictions = [
        torch.sigmoid(output[0, 0, z]),
        torch.sigmoid(output[0, 1, z]),
        (torch.tanh(output[0, 2, z]) + 1) / 2,
    ]
    for name, image in zip(("binary", "boundary", "distance"), predictions, strict=True):
        writer.add_image(f"prediction/{name}", image[None], epoch)
    writer.add_image("input", batch["image"][0, :, z], epoch)
    writer.add_image("ground_truth/binary", batch["target"][0, :1, z], epoch)


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def main(args):
    if args.mode == "test":
        from hydra_lv import evaluate

        if not args.checkpoint:
            raise SystemExit("--mode test needs --checkpoint outputs/<experiment_name>/checkpoints/best.ckpt")
        test_args = ["--checkpoint", args.checkpoint, *args.overrides] + (
            ["--fast-dev-run"] if args.fast_dev_run else []
        )
        return evaluate.main(evaluate.get_args_parser().parse_args(test_args))

    device = setup_device()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    logging.basicConfig(
        level=logging.INFO, format="%(message)s", handlers=[logging.StreamHandler(sys.stdout)], force=True
    )
    log = logging.info if is_main() else (lambda *a: None)

    resume = None
    if args.resume:
        path = Path(args.resume)
        path = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
        if not path.is_file():
            raise SystemExit(f"--resume {args.resume}: no last.ckpt there (give a run folder or its last.ckpt)")
        resume = torch.load(path, map_location="cpu", weights_only=True)
        if resume.get("domain") != "hydra_lv" or "optimizer" not in resume:
            raise SystemExit(f"--resume {path}: not a hydra_lv training checkpoint (last.ckpt of a run)")
        cfg = apply_overrides(resume["config"], args.overrides, "the run's config")  # e.g. more epochs
        if args.overrides and is_main():
            print(f"resume with {' '.join(args.overrides)}")
        run_dir = path.parent.parent
    else:
        cfg = load_config(args.config, [])
        overrides = list(args.overrides)
        if args.demo:
            root = (Path(args.output_root) / "demo_data").resolve()
            if is_main():
                write_demo_volumes(root)
            if dist.is_initialized():
                dist.barrier()
            given = {item.split("=", 1)[0] for item in overrides}
            demo = {
                **DEMO,
                "data.train_image": f"{root}/vol[12]_im.h5",
                "data.train_label": f"{root}/vol[12]_vesicle_ins.h5",
            }
            demo.update({"data.train_mask": f"{root}/vol[12]_mask.h5"})
            for split in ("val", "test"):
                demo.update({f"data.{split}_{kind}": f"{root}/vol3_{suffix}.h5" for kind, suffix in
                             (("image", "im"), ("label", "vesicle_ins"), ("mask", "mask"))})  # fmt: skip
            overrides = [
                f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in demo.items() if k not in given
            ] + overrides
        cfg = load_config(args.config, overrides)
        if args.fast_dev_run:
            batch = cfg["system"]["training"]["batch_size"]
            cfg["data"]["iterations_per_epoch"] = cfg["data"]["val_patches"] = batch
            cfg["optimization"]["max_epochs"] = 1
        run_dir = None
        # globs relative to this folder become absolute: test mode and resume may run from anywhere
        for key, value in cfg["data"].items():
            if key.split("_")[0] in ("train", "val", "test") and isinstance(value, str) and value:
                cfg["data"][key] = os.path.abspath(value)
    check_config(cfg)
    if cfg["system"]["training"]["num_gpus"] > 1 and world == 1 and is_main():
        log(
            f"system.training.num_gpus={cfg['system']['training']['num_gpus']} but one process runs: launch "
            f"torchrun --nproc_per_node={cfg['system']['training']['num_gpus']} hydra_lv/train.py ... for DDP"
        )

    data = cfg["data"]
    train_volumes = find_volumes(data, "train")
    if not train_volumes:
        raise DataError("data.train_image is not set: give a glob of training volumes (or use --demo)")
    val_volumes = find_volumes(data, "val") or train_volumes
    patch, pad, resolution = data["patch_size"], data["pad_size"], data["resolution"]
    seed = int(cfg["seed"])
    train_set = PatchDataset(
        train_volumes, patch, pad, resolution, data["iterations_per_epoch"], data["augmentation"], seed=seed
    )
    val_set = PatchDataset(val_volumes, patch, pad, resolution, data["val_patches"], fixed=True, seed=seed + 1)
    # every rank validates at least one patch (wrapping round a small set); DDP ranks must all reach the reduce
    val_set = Subset(val_set, [i % len(val_set) for i in range(rank, max(len(val_set), world), world)])

    torch.manual_seed(seed)
    model = build_model(
        cfg["model"]["architecture"], cfg["model"]["in_channels"], cfg["model"]["out_channels"], cfg["model"]["filters"]
    ).to(device)
    if use_channels_last(device, cfg):
        model = model.to(memory_format=torch.channels_last_3d)
    if dist.is_initialized() and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    criterion = HydraLoss(cfg["model"]["loss_weights"]).to(device)
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
    scaler = torch.amp.GradScaler(
        device.type, enabled=amp_dtype(device, cfg) == torch.float16 and device.type == "cuda"
    )
    ddp_model = model
    if dist.is_initialized():
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    training = cfg["system"]["training"]
    workers = min(int(training["num_workers"]), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 4)
    sampler = EpochSampler(len(train_set), rank, world)
    loader_args = {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0}
    # every item draws its own random patch from (epoch seed, index): nothing to shuffle (see EpochSampler)
    train_loader = DataLoader(train_set, training["batch_size"], sampler=sampler, **loader_args)
    val_loader = DataLoader(val_set, training["batch_size"], **{**loader_args, "persistent_workers": False})

    if args.profile_dataloader:
        result = profile_dataloader(train_loader, ddp_model, criterion, optimizer, device, cfg)
        log(
            f"loader alone: {result['loader_batches_per_s']:.2f} batches/s ({workers} workers); loader + model step: "
            f"{result['loader_and_step_batches_per_s']:.2f} batches/s on {device.type}; training is limited by "
            f"{result['limited_by']}"
        )
        if dist.is_initialized():
            dist.destroy_process_group()
        return result

    state = {"epoch": 0, "best": math.inf, "patience": 0, "history": []}
    if resume is not None:
        model.load_state_dict(resume["model"])
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
        gpu = (
            f"{torch.cuda.get_device_name(device)}, "
            f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB"
            if device.type == "cuda"
            else device.type
        )
        log("=" * 72)
        log(
            f"hydra_lv training  run folder {run_dir}"
            + (f"  (resumed at epoch {state['epoch'] + 1})" if resume else "")
        )
        log(
            f"model {cfg['model']['architecture']} filters {cfg['model']['filters']}  patch {patch}  batch "
            f"{training['batch_size']} x {world} process(es)  device {gpu}  "
            f"precision {amp_dtype(device, cfg) or 'fp32'}"
        )
        log(
            f"train: {', '.join(v.name + str(list(v.shape)) for v in train_volumes)}; "
            f"validation: {', '.join(v.name for v in val_volumes)}"
            + (" (fixed patches of the training volumes)" if val_volumes is train_volumes else "")
        )
        log("=" * 72)
    writer = tensorboard_writer(run_dir, log) if is_main() else None
    stop = optimization["early_stopping"]

    for epoch in range(state["epoch"], int(optimization["max_epochs"])):
        started = time.time()
        epoch_seed = seed * 1000 + epoch
        torch.manual_seed(epoch_seed + 100_003 * rank)
        sampler.set_epoch_seed(epoch_seed)
        label = f"epoch {epoch + 1}/{optimization['max_epochs']}"
        train_stats = train_one_epoch(ddp_model, criterion, optimizer, scaler, train_loader, device, cfg, label)
        val_stats = validate(model, criterion, val_loader, device, cfg)
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
            checkpoint = {
                "domain": "hydra_lv",
                "config": cfg,
                "model": model.state_dict(),
                "epoch": epoch + 1,
                "val": val_stats,
            }
            if improved:
                save_checkpoint(run_dir / "checkpoints" / "best.ckpt", checkpoint)
                log(f"  saved best.ckpt (val loss {val_stats['loss']:.4f})")
            last = {
                **checkpoint,
                **state,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
            }
            save_checkpoint(run_dir / "checkpoints" / "last.ckpt", last)
            write_metrics_csv(run_dir / "metrics.csv", state["history"])
            if writer is not None:
                for key, value in row.items():
                    writer.add_scalar(key.replace("_", "/", 1), value, epoch + 1)
                log_slices(writer, model, next(iter(val_loader)), device, cfg, epoch + 1)
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
        if args.test_after or args.fast_dev_run:
            from hydra_lv import evaluate

            test_args = evaluate.get_args_parser().parse_args(
                ["--checkpoint", str(run_dir / "checkpoints" / "best.ckpt")]
                + (["--fast-dev-run"] if args.fast_dev_run else [])
            )
            evaluate.main(test_args)
    return run_dir


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of an epoch as (index, epoch seed) keys. The seed travels with each index, so persistent
    loader workers (which hold their own copy of the dataset) draw exactly the patches of this epoch, and a resumed
    run repeats an interrupted epoch. Every rank gets the same number of patches (DDP steps in lockstep)."""

    def __init__(self, length: int, rank: int = 0, world: int = 1):
        self.per_rank, self.rank, self.world, self.seed = math.ceil(length / world), rank, world, 0

    def set_epoch_seed(self, seed: int) -> None:
        self.seed = seed

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        return iter([(self.rank + k * self.world, self.seed) for k in range(self.per_rank)])


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("overrides", nargs="*", help="dotted.key=value settings over the config, e.g. system.training.batch_size=8")
    add("--config", default=str(DEFAULT_CONFIG), help="YAML defaults [hydra_lv/hydra-lv.yaml]")
    add("--mode", choices=["train", "test"], default="train", help="train, or test a --checkpoint [train]")
    add("--checkpoint", help="test mode: a best.ckpt or last.ckpt")
    add("--demo", action="store_true", help="write synthetic EM volumes into OUTPUT_ROOT/demo_data, train and test")
    add("--resume", help="a run folder (outputs/<experiment_name>) or its checkpoints/last.ckpt")
    add(
        "--fast-dev-run",
        "--fast_dev_run",
        dest="fast_dev_run",
        action="store_true",
        help="one batch of train, val and test",
    )
    add(
        "--profile-dataloader",
        "--profile_dataloader",
        dest="profile_dataloader",
        action="store_true",
        help="batches/s of the loader alone and with the model step, then exit",
    )
    add(
        "--output-root",
        "--output_root",
        dest="output_root",
        default="outputs",
        help="runs go to OUTPUT_ROOT/<experiment_name> [outputs]",
    )
    add(
        "--test-after",
        "--test_after",
        dest="test_after",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run test mode with best.ckpt after training [on]",
    )
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
