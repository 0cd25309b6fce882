"""Train a U-Net to segment stress granules in fluorescence images.

    python stress_granules/train.py --demo                                  # synthetic cells, about 2 minutes on a CPU
    python stress_granules/train.py --images DATA/images --masks DATA/masks  # the robust preset
    python stress_granules/train.py --images DIR --masks DIR --preset improved --epochs 100
    python stress_granules/train.py --resume metrics/robust_gpu_20260101_120000
    torchrun --nproc_per_node=2 stress_granules/train.py --images DIR --masks DIR

Images and masks pair by basename (8/16-bit TIFF or PNG, any size). Unless --val_images/--val_masks are given,
--val_fraction of the images (at least one) is held out for validation, chosen with --seed.

Presets (a flag given on the command line wins over the preset):
    robust    multi-scale CLAHE (clip 2, 4, 8) + edge channel; full augmentation; 200 epochs, patience 30;
              5 crops per image and epoch; best model by granule-level F1 (objects matched at IoU 0.5)
    improved  single-scale CLAHE + edge channel; light augmentation; 75 epochs, patience 15; 3 crops; by Dice
Both: weighted BCE (pos_weight 10) + Focal Tversky + Dice; AdamW; cosine annealing with warm restarts (stepped
per batch); AMP on CUDA; crops drawn by strategy (granule 30 %, granule edge 20 %, background 15 %, mixed 20 %,
random 15 %) from a sampler that balances images by granule content.

Each run writes metrics/<preset>_<gpu|cpu|mps>_<YYYYmmdd_HHMMSS>/: config.json, best_model.pth, last.pth
(resume), checkpoint_epoch_N.pth (every --save_every epochs), training_history.json, evaluation_report.json
(validation scores of the best model beside an Otsu-threshold baseline), training_curves.png,
validation_predictions.png, and <preset>_stress_granule_model.pth (a copy of the best model; --model_path).
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
from skimage.filters import threshold_otsu
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.losses import CombinedLoss, DiceLoss, FocalTverskyLoss, WeightedBCELoss
from common.preprocessing import percentile_normalize
from stress_granules.data import (
    BalancedEpochSampler,
    CropDataset,
    feature_channels,
    granule_balance_weights,
    load_features,
    make_sample,
    new_folder,
    pair_files,
    plot_history,
    plot_predictions,
    read_image,
    read_mask,
    write_demo_dataset,
)
from stress_granules.model import (
    ARCHITECTURE,
    GranuleScores,
    UNet,
    granules_from_probability,
    load_checkpoint,
    pick_device,
    predict_probability,
)

DOMAIN = "stress_granules"
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
DEMO = {"epochs": 24, "image_size": 128, "base_channels": 16, "batch_size": 8, "lr": 2e-3, "restart_epochs": 24}


# ----------------------------------------------------------------------------------------------------------------
# One epoch of training, one pass of validation
# ----------------------------------------------------------------------------------------------------------------


def train_one_epoch(model, criterion, optimizer, scheduler, scaler, loader, device, epoch, args, state):
    """One pass over the crops; the scheduler steps per batch (fractional epochs for warm restarts)."""
    model.train()
    sums, count = {}, 0
    steps = len(loader)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not is_main(), leave=False, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        images, masks = batch["image"].to(device, non_blocking=True), batch["mask"].to(device, non_blocking=True)
        with amp_context(device, args):
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
def validate(model, samples, device, args) -> dict:
    """Whole validation images by tiled inference: pixel scores and granule-level scores (IoU 0.5), summed over
    images (and over ranks: each rank takes every world_size-th image)."""
    model.eval()
    scores = GranuleScores(device, args.min_size)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    with amp_context(device, args):
        for sample in samples[rank::world]:
            probability = predict_probability(model, sample.features, args.image_size, args.image_size // 4)
            scores.update(granules_from_probability(probability, args.threshold, args.min_size), sample.mask)
    scores.all_reduce()
    return scores.compute()


def otsu_baseline(image_paths: list[Path], samples, args) -> dict:
    """The classical baseline on the same validation images: Otsu's threshold on the percentile-normalised
    image, objects of at least --min_size pixels."""
    scores = GranuleScores("cpu", args.min_size)
    for path, sample in zip(image_paths, samples, strict=True):
        normalized = percentile_normalize(read_image(path), 1.0, 99.8)
        binary = (normalized > threshold_otsu(normalized)).astype(np.float32)
        scores.update(granules_from_probability(binary, 0.5, args.min_size), sample.mask)
    return scores.compute()


# ----------------------------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------------------------


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


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def amp_dtype(device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.float16 if device.type == "mps" else torch.bfloat16


def amp_context(device, args):
    """bf16 autocast where supported, fp16 (with the GradScaler) elsewhere; off unless on."""
    return torch.autocast(device.type, dtype=amp_dtype(device)) if args.use_mixed_precision else nullcontext()


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


def load_samples(pairs, args, cache_dir: Path, log) -> list:
    samples = []
    for image_path, mask_path in pairs:
        feature_path = load_features(image_path, args.features, cache_dir)
        mask = read_mask(mask_path, np.load(feature_path, mmap_mode="r").shape[1:], image_path)
        samples.append(make_sample(image_path.stem, feature_path, mask, args.image_size))
    log(f"{len(samples)} images, {sum(int(s.mask.any()) for s in samples)} with granules")
    return samples


def split_pairs(args, log) -> tuple[list, list]:
    pairs = pair_files(Path(args.images), Path(args.masks), args.skip_unpaired, log)
    if args.val_images:
        return pairs, pair_files(Path(args.val_images), Path(args.val_masks), args.skip_unpaired, log)
    if len(pairs) < 2:
        raise SystemExit(f"{args.images} holds one image: give at least two, or --val_images and --val_masks")
    order = np.random.default_rng(args.seed).permutation(len(pairs))
    n_val = min(len(pairs) - 1, max(1, round(args.val_fraction * len(pairs))))
    return [pairs[i] for i in sorted(order[n_val:])], [pairs[i] for i in sorted(order[:n_val])]


def resolve_args(args, device) -> argparse.Namespace:
    """Fill the options left unset (None) from --demo and the preset, and check them."""
    if args.demo:
        for key, value in DEMO.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    defaults = {"image_size": 256, "batch_size": 4, "lr": 1e-4, "base_channels": 32, "restart_epochs": 10}
    for key, value in {**defaults, **PRESETS[args.preset]}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.use_mixed_precision is None:
        args.use_mixed_precision = device.type == "cuda"
    if args.channels_last is None:  # faster convolutions on the CPU (benchmarks/RESULTS.md) and CUDA; MPS unmeasured
        args.channels_last = device.type in ("cpu", "cuda")
    if args.image_size % 16:
        raise SystemExit(f"--image_size {args.image_size} must be a multiple of 16")
    for key in ("save_every", "crops_per_image", "batch_size", "restart_epochs"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key} {getattr(args, key)} must be at least 1")
    if args.scheduler not in SCHEDULERS:
        raise SystemExit(f"--scheduler {args.scheduler}: choose one of {', '.join(SCHEDULERS)}")
    if args.epochs < 1:
        raise SystemExit(f"--epochs {args.epochs}: train for at least one epoch")
    if not args.demo and not (args.images and args.masks):
        raise SystemExit("give --images and --masks (folders of images and masks paired by basename) or --demo")
    if bool(args.val_images) != bool(args.val_masks):
        raise SystemExit("give --val_images and --val_masks together")
    return args


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """Atomic: a temp file, then a rename, so a kill never leaves half a checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def main(args):
    device = setup_device()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", handlers=[logging.StreamHandler(sys.stdout)], force=True
    )
    log = logging.info if is_main() else (lambda *a: None)
    resume = None
    if args.resume:
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
            raise SystemExit(f"--resume {path}: not a stress_granules training checkpoint (last.pth of a run)")
        # The run continues with its own settings; --epochs and --early_stopping_patience may extend it.
        defaults = vars(get_args_parser().parse_args([]))
        extendable = ("epochs", "early_stopping_patience")
        ignored = [
            k for k, v in vars(args).items() if k not in ("resume", "num_workers", *extendable) and v != defaults.get(k)
        ]
        if ignored:
            log(f"--resume continues with the run's stored settings; ignoring --{', --'.join(ignored)}")
        stored = argparse.Namespace(**resume["args"])
        for key in extendable:
            if getattr(args, key) is not None:
                setattr(stored, key, getattr(args, key))
        stored.resume, stored.num_workers = str(path), args.num_workers
        args = stored
        if resume["epoch"] >= args.epochs or resume["patience"] >= args.early_stopping_patience:
            log(f"{path.parent} finished already (epoch {resume['epoch']} of {args.epochs}); nothing to resume")
            return path.parent
    else:
        args = resolve_args(args, device)
    torch.manual_seed(args.seed)

    # Data first: bad input stops the run before any folder is created.
    if args.demo and args.images is None:
        root = Path(args.output_dir) / "demo_data" / "v2_16_images"
        if is_main():
            write_demo_dataset(root)
        if dist.is_initialized():
            dist.barrier()
        args.images, args.masks = str(root / "images"), str(root / "masks")
    args.output_dir = str(Path(args.output_dir).resolve())
    args.cache_dir = str(Path(args.cache_dir or Path(args.output_dir) / "cache").resolve())
    for key in ("images", "masks", "val_images", "val_masks"):
        if getattr(args, key):
            setattr(args, key, str(Path(getattr(args, key)).resolve()))
    train_pairs, val_pairs = split_pairs(args, log)
    if is_main():  # rank 0 computes the feature cache, the others read it
        train_samples = load_samples(train_pairs, args, Path(args.cache_dir), log)
        val_samples = load_samples(val_pairs, args, Path(args.cache_dir), log)
    if dist.is_initialized():
        dist.barrier()
        if not is_main():
            train_samples = load_samples(train_pairs, args, Path(args.cache_dir), log)
            val_samples = load_samples(val_pairs, args, Path(args.cache_dir), log)
    if not any(s.mask.any() for s in train_samples):
        raise SystemExit(f"no training mask in {args.masks} contains a granule: nothing to learn (all background)")
    if not any(s.mask.any() for s in val_samples):
        raise SystemExit(
            "no validation mask contains a granule, so no model can be selected: give --val_images "
            "and --val_masks, or another --seed for the random split"
        )

    run_dir = None
    if resume is not None:
        run_dir = Path(args.resume).parent
    elif is_main():
        device_name = "gpu" if device.type == "cuda" else device.type
        run_dir = new_folder(Path(args.output_dir), f"{args.preset}_{device_name}")
        args.run_dir = str(run_dir)
        write_json(run_dir / "config.json", vars(args))
    if is_main():
        logging.getLogger().addHandler(logging.FileHandler(run_dir / "train.log"))
        log(
            f"run folder {run_dir} on {device} ({world} process(es)); {len(train_samples)} training and "
            f"{len(val_samples)} validation images"
        )

    model_args = {
        "in_channels": feature_channels(args.features),
        "base_channels": args.base_channels,
        "dropout": args.dropout,
    }
    model = UNet(**model_args).to(device)
    if getattr(args, "channels_last", False):  # runs stored before the flag resume without it
        model = model.to(memory_format=torch.channels_last)
    if dist.is_initialized():
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = build_loss(args).to(device)
    train_set = CropDataset(train_samples, args.image_size, args.crops_per_image, args.preset, args.augment)
    weights = granule_balance_weights(train_samples, args.crops_per_image)
    sampler = BalancedEpochSampler(weights, args.seed, rank, world)
    per_rank = len(sampler)
    # persistent workers: the dataset goes to each worker once per run, not once per epoch
    loader = DataLoader(
        train_set,
        args.batch_size,
        sampler=sampler,
        num_workers=args.num_workers,
        persistent_workers=args.num_workers > 0,
        generator=torch.Generator(),  # its own: creating the iterator must not consume the global RNG (dropout)
        pin_memory=device.type == "cuda",
        drop_last=per_rank > args.batch_size,  # keeps BatchNorm away from a last batch of one
    )
    optimizer = torch.optim.AdamW(unwrap(model).parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # Stepped per batch with fractional epochs. CosineAnnealingWarmRestarts (SGDR, Loshchilov & Hutter 2017):
    # cosine from lr to lr * min_lr_factor over restart_epochs, then again over a period restart_mult times
    # longer. CosineAnnealingLR: one cosine over all epochs.
    if args.scheduler == "CosineAnnealingWarmRestarts":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=args.restart_epochs, T_mult=args.restart_mult, eta_min=args.lr * args.min_lr_factor
        )
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=args.epochs, eta_min=args.lr * args.min_lr_factor
        )
    use_fp16 = args.use_mixed_precision and amp_dtype(device) == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_fp16)

    start_epoch, best, patience, history = 0, -math.inf, 0, []
    state = {"nan_steps": 0}
    if resume is not None:
        unwrap(model).load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        start_epoch, best, patience, history = resume["epoch"], resume["best"], resume["patience"], resume["history"]
        log(f"resumed from {args.resume} at epoch {start_epoch + 1}")

    def checkpoint(**extra) -> dict:
        return {
            "domain": DOMAIN,
            "arch": ARCHITECTURE,
            "model_args": model_args,
            "args": vars(args),
            "model": unwrap(model).state_dict(),
            **extra,
        }

    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        # Everything random in an epoch derives from (seed, epoch), so a resumed run repeats it exactly.
        torch.manual_seed(args.seed * 1000 + epoch + 100_003 * rank)  # dropout; the crops follow the sampler
        sampler.set_epoch(epoch)
        train_stats = train_one_epoch(
            model, criterion, optimizer, scheduler, scaler, loader, device, epoch, args, state
        )
        if dist.is_initialized():  # BatchNorm statistics differ a little between ranks: validate rank 0's
            for buffer in unwrap(model).buffers():
                dist.broadcast(buffer, 0)
        val_stats = validate(unwrap(model), val_samples, device, args)
        score = val_stats["object"]["f1"] if args.selection_metric == "f1" else val_stats["pixel"]["dice"]
        score = -math.inf if math.isnan(score) else score
        improved = score > best + args.min_delta or best == -math.inf  # the first epoch always gives a best
        best, patience = (score, 0) if improved else (best, patience + 1)
        history.append(
            {
                "epoch": epoch + 1,
                "lr": optimizer.param_groups[0]["lr"],
                "train": train_stats,
                "val": val_stats,
                "seconds": time.time() - started,
            }
        )
        if is_main():
            log(
                f"epoch {epoch + 1}/{args.epochs}  loss {train_stats.get('loss', float('nan')):.4f}  "
                f"val Dice {val_stats['pixel']['dice']:.4f}  granule F1 {val_stats['object']['f1']:.4f}"
                f"{'  (best)' if improved else ''}  lr {history[-1]['lr']:.2e}  {history[-1]['seconds']:.0f}s"
            )
            if improved:
                save_checkpoint(
                    run_dir / "best_model.pth",
                    checkpoint(epoch=epoch + 1, val=val_stats, metric={args.selection_metric: score}),
                )
            state_dict = checkpoint(
                epoch=epoch + 1,
                best=best,
                patience=patience,
                history=history,
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(),
            )
            save_checkpoint(run_dir / "last.pth", state_dict)
            if (epoch + 1) % args.save_every == 0:
                save_checkpoint(run_dir / f"checkpoint_epoch_{epoch + 1}.pth", state_dict)
            write_json(run_dir / "training_history.json", history)
            plot_history(history, run_dir / "training_curves.png")
        if patience >= args.early_stopping_patience:
            log(f"early stopping: no better validation {args.selection_metric} for {patience} epochs")
            break

    # The final report is rank 0's alone: leave the process group first, so validate() scores every image itself.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if run_dir is not None and rank == 0:
        best_model, best_checkpoint = load_checkpoint(run_dir / "best_model.pth", device)
        report = {
            "selection_metric": args.selection_metric,
            "best_epoch": best_checkpoint["epoch"],
            "validation_images": [str(p) for p, _ in val_pairs],
            "model": validate(best_model, val_samples, device, args),
            "otsu_baseline": otsu_baseline([p for p, _ in val_pairs], val_samples, args),
        }
        write_json(run_dir / "evaluation_report.json", report)
        rows = []
        for sample in val_samples[:4]:
            probability = predict_probability(best_model, sample.features, args.image_size, args.image_size // 4)
            rows.append(
                {
                    "name": sample.name,
                    "image": np.asarray(sample.features[0], np.float32),
                    "mask": sample.mask,
                    "probability": probability,
                    "labels": granules_from_probability(probability, args.threshold, args.min_size),
                }
            )
        plot_predictions(rows, run_dir / "validation_predictions.png")
        model_path = Path(args.model_path) if args.model_path else run_dir / f"{args.preset}_stress_granule_model.pth"
        model_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "best_model.pth", model_path.with_suffix(".tmp"))
        os.replace(model_path.with_suffix(".tmp"), model_path)
        log(
            f"validation granule F1 {report['model']['object']['f1']:.4f} (Otsu baseline "
            f"{report['otsu_baseline']['object']['f1']:.4f}), Dice {report['model']['pixel']['dice']:.4f} (Otsu "
            f"{report['otsu_baseline']['pixel']['dice']:.4f}); best model copied to {model_path}"
        )
        log(f"next: python stress_granules/evaluate.py {run_dir} --images NEW_IMAGES")
    return run_dir


def get_args_parser() -> argparse.ArgumentParser:
    """Options left at None are filled from --demo and --preset."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--images", help="folder of images (8/16-bit TIFF or PNG)")
    add("--masks", help="folder of masks with the same basenames (0 = background, >0 = granule)")
    add("--val_images", "--val-images", help="validation images (default: --val_fraction of --images)")
    add("--val_masks", "--val-masks", help="validation masks for --val_images")
    add("--val_fraction", "--val-fraction", type=float, default=0.2, help="share of images held out (0.2)")
    add(
        "--skip_unpaired",
        "--skip-unpaired",
        action="store_true",
        help="skip images without a mask (and masks without an image) instead of stopping",
    )
    add("--demo", action="store_true", help="write synthetic 16-bit cell images into OUTPUT_DIR/demo_data and train")
    add("--preset", choices=sorted(PRESETS), default="robust", help="robust (default) or improved, see above")
    add("--epochs", type=int, help="epochs (robust 200, improved 75; --demo 24)")
    add(
        "--early_stopping_patience",
        "--early-stopping-patience",
        "--patience",
        type=int,
        help="epochs without a better validation score before stopping (robust 30, improved 15)",
    )
    add("--min_delta", "--min-delta", type=float, default=0.0, help="smallest gain that counts as better (0)")
    add(
        "--selection_metric",
        "--selection-metric",
        choices=["f1", "dice"],
        help="best model by granule F1 (robust) or pixel Dice (improved)",
    )
    add("--crops_per_image", "--crops-per-image", type=int, help="crops per image and epoch (robust 5, improved 3)")
    add("--augment", action=argparse.BooleanOptionalAction, default=True, help="augmentations of the preset (on)")
    add(
        "--features",
        choices=["multiscale", "clahe", "raw"],
        help="input channels: CLAHE x3 + edge (robust), CLAHE + edge (improved), or the normalised image alone",
    )
    add("--scheduler", default="CosineAnnealingWarmRestarts", help=f"{' or '.join(SCHEDULERS)}; steps per batch")
    add("--image_size", "--image-size", type=int, help="crop size, multiple of 16 (256; --demo 128)")
    add("--batch_size", "--batch-size", type=int, help="crops per batch and process (4)")
    add("--lr", type=float, help="learning rate (1e-4)")
    add("--weight_decay", "--weight-decay", type=float, default=1e-4, help="AdamW weight decay (1e-4)")
    add("--restart_epochs", "--restart-epochs", type=int, help="epochs of the first cosine cycle (10)")
    add("--restart_mult", "--restart-mult", type=int, default=2, help="each cycle this many times longer (2)")
    add("--min_lr_factor", "--min-lr-factor", type=float, default=0.01, help="lowest lr = lr * this (0.01)")
    add("--base_channels", "--base-channels", type=int, help="U-Net width of the first level (32; --demo 16)")
    add("--dropout", type=float, default=0.1, help="dropout at the U-Net bottleneck (0.1)")
    add("--pos_weight", "--pos-weight", type=float, default=10.0, help="BCE weight of granule pixels (10)")
    add("--bce_weight", "--bce-weight", type=float, default=1.0, help="weight of the BCE term (1)")
    add("--focal_tversky_weight", "--focal-tversky-weight", type=float, default=1.0, help="Focal Tversky weight (1)")
    add("--dice_weight", "--dice-weight", type=float, default=1.0, help="weight of the Dice term (1)")
    add("--grad_clip_val", "--grad-clip-val", type=float, default=1.0, help="L2 gradient clipping, 0 = off (1)")
    add(
        "--use_mixed_precision",
        "--use-mixed-precision",
        action=argparse.BooleanOptionalAction,
        help="autocast (bf16, or fp16 + GradScaler); default: on for CUDA only",
    )
    add(
        "--channels_last",
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="channels-last memory format for the convolutions; default: on for CPU and CUDA",
    )
    add("--threshold", type=float, default=0.5, help="granule probability threshold (0.5)")
    add("--min_size", "--min-size", type=int, default=15, help="smallest granule in pixels (15)")
    add("--output_dir", "--output-dir", default="metrics", help="each run gets a new folder in here (metrics)")
    add("--model_path", "--model-path", help="where the copy of the best model goes (default: inside the run folder)")
    add("--cache_dir", "--cache-dir", help="feature cache (default OUTPUT_DIR/cache)")
    add("--save_every", "--save-every", type=int, default=10, help="keep checkpoint_epoch_N.pth every N epochs (10)")
    add("--resume", help="a run folder or its last.pth: continue that run")
    add("--seed", type=int, default=42, help="random seed (42)")
    add("--num_workers", "--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="loader workers")
    add("--max_nan_steps", "--max-nan-steps", type=int, default=5, help="stop after this many NaN losses in a row")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
