"""Each domain's training data pipeline, default model and training loss, built as its train.py builds them, for
benchmarks/run.py:

    from benchmarks.domains import DOMAINS, build

    bench = build("pannuke", Path("benchmarks/_work"), quick=True)
    loader = DataLoader(bench.dataset, bench.batch_size, collate_fn=bench.collate_fn)
    loss = bench.step_loss(bench.model, next(iter(loader)), "cpu")
    loss.backward()
    seconds_cold, seconds_warm = bench.cache_epochs()  # where the domain has a preprocessing cache

`build` writes the domain's synthetic demo data with the domain's own writer, in its real on-disk format, then
calls the functions train.py calls, with train.py's argparse defaults; quick=True uses train.py's --demo settings
(and its demo-sized model) on a smaller synthetic set. Nothing is downloaded: pretrained weights are off.
Where train.py does a step inline in main() rather than in a function, the few lines are repeated here and say so.

step_loss is forward + loss only (no clipping, optimizer, EMA) and runs in the caller's precision: train.py's
defaults train in fp32 on the CPU (retinopathy autocasts to bf16 there too), while on CUDA every domain autocasts
(bf16 where the GPU has it). run.py chooses the precision (its fp32 and bf16 variants), so step_loss
adds no autocast of its own; the losses take `.float()` logits, as in train.py.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

DOMAINS = ("pannuke", "stress_granules", "cellsam", "retinopathy", "hydra_lv")


@dataclass
class DomainBench:
    name: str
    dataset: torch.utils.data.Dataset  # the training dataset with its training augmentation, as train.py builds it
    collate_fn: Callable | None  # what train.py's DataLoader uses (None = default)
    batch_size: int  # train.py's default batch size (quick: its --demo batch size)
    model: torch.nn.Module  # train.py's default model (quick: its --demo model), on the CPU, in train mode
    step_loss: Callable  # step_loss(model, batch, device) -> scalar loss: forward + training loss of one batch
    cache_epochs: Callable | None  # () -> (seconds of epoch 1 with a cold cache, of epoch 2 with it warm)
    notes: str  # one line: model, input size, batch size, what is approximated


class EpochItems(torch.utils.data.Dataset):
    """One epoch of a dataset that train.py indexes through its sampler with keys such as (index, epoch seed):
    item j is dataset[keys[j]], so a plain DataLoader (shuffled or not) draws exactly the items of that epoch."""

    def __init__(self, dataset: torch.utils.data.Dataset, keys: list):
        self.dataset, self.keys = dataset, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, j: int):
        return self.dataset[self.keys[j]]


def quiet(*args) -> None:
    """The `log` argument of the domain functions: no progress lines in a benchmark."""


def one_pass(dataset: torch.utils.data.Dataset) -> None:
    for i in range(len(dataset)):
        dataset[i]


def timed_epochs(workdir: Path, prepare: Callable) -> tuple[float, float]:
    """prepare(cache_dir) fills a new, empty cache folder and returns the training dataset on it. Epoch 1: prepare
    and one pass over the dataset; epoch 2: one more pass, the cache warm. The folder is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="cache_", dir=workdir) as cache_dir:
        started = time.perf_counter()
        dataset = prepare(Path(cache_dir))
        one_pass(dataset)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        one_pass(dataset)
        return cold, time.perf_counter() - started


def as_device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


# ----------------------------------------------------------------------------------------------------------------
# The domains (each imports its own modules, so one domain's dependencies do not hold up the others)
# ----------------------------------------------------------------------------------------------------------------


def build_pannuke(workdir: Path, quick: bool) -> DomainBench:
    """PanNukeDataset of the training fold at the settings of the recipe's last epoch (all augmentation stages,
    crops of --image_size, boundary maps for the hybrid loss); compute_loss with MixUp as train_one_epoch."""
    from pannuke import train
    from pannuke.data import PanNukeDataset, load_fold, write_demo_dataset
    from pannuke.model import build_model

    root = write_demo_dataset(workdir / "data", (16, 2, 2) if quick else (128, 32, 32))
    flags = ["--data_dir", str(root), "--encoder_weights", "none", *(["--demo"] if quick else [])]
    args = train.parse_args(flags)
    cache = workdir / "cache"
    train_fold = load_fold(root, args.train_fold, cache, log=quiet)
    load_fold(root, args.val_fold, cache, log=quiet)  # train.py caches the validation fold before training too
    epoch = args.epochs - 1  # progressive resizing and augmentation have reached their full settings
    crop = train.crop_size_for(epoch, args)

    def training_set(fold) -> PanNukeDataset:
        dataset = PanNukeDataset(fold, train=True, boundary_maps=args.loss == "hybrid")
        dataset.configure(crop, train.aug_stage_for(epoch, args), seed=args.seed * 1000 + epoch)  # main()'s seed
        return dataset

    def prepare(cache_dir: Path) -> PanNukeDataset:
        fold = load_fold(root, args.train_fold, cache_dir, log=quiet)
        load_fold(root, args.val_fold, cache_dir, log=quiet)
        return training_set(fold)

    torch.manual_seed(args.seed)
    model = build_model({"encoder": args.encoder, "encoder_weights": args.encoder_weights, "dropout": args.dropout})
    criterion = train.build_loss(args, train_fold.class_pixels)
    if "boundary" in criterion.weights:
        criterion.weights["boundary"] = train.boundary_weight(epoch, args)
    rng = np.random.default_rng(args.seed * 1000 + epoch)  # MixUp draws, as train_one_epoch

    def step_loss(model, batch, device):
        device = as_device(device)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        soft_target = None
        if args.mixup_alpha > 0 and rng.random() < args.mixup_prob:
            batch, soft_target = train.mixup(batch, args.mixup_alpha, rng)
        outputs = model(batch["image"])
        loss, _ = train.compute_loss(criterion.to(device), args.dist_weight, outputs, batch, soft_target)
        return loss

    return DomainBench(
        name="pannuke",
        dataset=training_set(train_fold),
        collate_fn=None,
        batch_size=args.batch_size,
        model=model.train(),
        step_loss=step_loss,
        cache_epochs=lambda: timed_epochs(workdir, prepare),
        notes=f"AttentionUNet {args.encoder} (encoder_weights none), {crop} px crops, batch {args.batch_size}"
        f"{' (--demo)' if quick else ''}; recipe {args.recipe} at its last epoch: all augmentations, Dice + focal + "
        f"boundary ({criterion.weights.get('boundary', 0):g}) + distance MSE, MixUp p={args.mixup_prob:g}; "
        f"{len(train_fold)} synthetic tiles",
    )


def build_stress_granules(workdir: Path, quick: bool) -> DomainBench:
    """CropDataset over the training split's cached features, one epoch of BalancedEpochSampler's keys (epoch 0);
    U-Net; weighted BCE + Focal Tversky + Dice."""
    from stress_granules import train
    from stress_granules.data import (
        BalancedEpochSampler,
        CropDataset,
        feature_channels,
        granule_balance_weights,
        write_demo_dataset,
    )
    from stress_granules.model import UNet

    root = write_demo_dataset(workdir / "data", *((10, (256, 256)) if quick else ()))
    flags = ["--images", str(root / "images"), "--masks", str(root / "masks"), *(["--demo"] if quick else [])]
    args = train.parse_args(flags)
    train_pairs, val_pairs = train.split_pairs(args, quiet)

    def prepare(cache_dir: Path) -> EpochItems:
        samples = train.load_samples(train_pairs, args, cache_dir, quiet)
        train.load_samples(val_pairs, args, cache_dir, quiet)  # train.py caches the validation images too
        dataset = CropDataset(samples, args.image_size, args.crops_per_image, args.preset, args.augment)
        # main() builds the sampler inline; one process (rank 0 of 1), epoch 0
        sampler = BalancedEpochSampler(granule_balance_weights(samples, args.crops_per_image), args.seed)
        sampler.set_epoch(0)
        return EpochItems(dataset, list(sampler))

    dataset = prepare(workdir / "cache")
    torch.manual_seed(args.seed)
    model = UNet(in_channels=feature_channels(args.features), base_channels=args.base_channels, dropout=args.dropout)
    criterion = train.build_loss(args)

    def step_loss(model, batch, device):
        device = as_device(device)
        images, masks = batch["image"].to(device, non_blocking=True), batch["mask"].to(device, non_blocking=True)
        logits = model(images)
        loss, _ = criterion.to(device)(logits.float(), masks)
        return loss

    return DomainBench(
        name="stress_granules",
        dataset=dataset,
        collate_fn=None,
        batch_size=args.batch_size,
        model=model.train(),
        step_loss=step_loss,
        cache_epochs=lambda: timed_epochs(workdir, prepare),
        notes=f"UNet base {args.base_channels}{' (--demo)' if quick else ''}, {feature_channels(args.features)} "
        f"input channels ({args.features}), {args.image_size} px crops, batch {args.batch_size}"
        f"{' (--demo)' if quick else ''}; preset {args.preset}: {len(dataset)} crops per epoch from "
        f"{len(train_pairs)} synthetic images; BCE + Focal Tversky + Dice; epoch 1 includes load_samples' crop maps",
    )


def build_cellsam(workdir: Path, quick: bool) -> DomainBench:
    """Stage 1 of fold 1 (train_val_split): CellDataset with augmentation; SAM's image encoder + CellFinder
    (Stage1Net) with stage1_type's trainable parts; SetCriterion on boxes from the batch, as stage1_epoch."""
    from cellsam import train
    from cellsam.data import CellDataset, collate, find_pairs, write_demo_dataset, xyxy_to_cxcywh
    from cellsam.model import SetCriterion

    root = write_demo_dataset(workdir / "data", n_images=6 if quick else 12)
    # vit_tiny instead of the default vit_b (1024 px input, 86 M parameters): too heavy for a 2-core CPU
    flags = ["--img_path", str(root / "images"), "--mask_path", str(root / "masks"), "--sam_size", "vit_tiny"]
    config = train.config_from_args(train.get_args_parser().parse_args(flags))
    if quick:
        train.apply_demo(config)  # train.py --demo's settings
    train_pairs, _ = train.ExperimentRunner(config).splits(find_pairs(config.img_path, config.mask_path))[0]

    torch.manual_seed(config.seed + 1)  # run_fold's seed for fold 1
    two_stage = train.build_model(config.check())  # vit_tiny: this folder's shared-encoder CellSAM
    size, finder = two_stage.input_size, two_stage.finder
    s1 = config.stage1
    dataset = CellDataset(
        train_pairs, size, config.augmentation, config.gamma, config.seed, True, config.stain_transform
    )
    dataset.set_epoch(0)
    criterion = SetCriterion(
        s1.ce_loss_weight, s1.bbox_loss_weight, s1.giou_loss_weight, s1.focal_alpha, s1.focal_gamma, s1.one_to_many
    )
    two_stage.freeze_for_stage1(s1.stage1_type)  # stage 1 trains CellFinder and, by stage1_type, the encoder
    model = train.Stage1Net(two_stage)
    sam_note = "--demo" if quick else "instead of the default vit_b: too heavy for a 2-core CPU"

    def step_loss(model, batch, device):
        device = as_device(device)
        images = batch["image"].to(device)
        side = images.shape[-1]
        targets = [xyxy_to_cxcywh(boxes, side, side).to(device) for boxes in batch["boxes"]]
        loss, _ = criterion(model(images), targets)
        return loss

    return DomainBench(
        name="cellsam",
        dataset=dataset,
        collate_fn=collate,
        batch_size=config.batch_size,
        model=model.train(),
        step_loss=step_loss,
        cache_epochs=None,  # images are read once, when CellDataset is built
        notes=f"SAM {config.sam_size} ({sam_note}) + CellFinder "
        f"({'--demo' if quick else 'Stage1Config defaults'}: hidden {s1.hidden}, {s1.encoder_layers}+"
        f"{s1.decoder_layers} layers, {finder.num_queries} queries), stage1_type {s1.stage1_type}, {size} px crops, "
        f"batch {config.batch_size}; stage 1 SetCriterion; {len(train_pairs)} synthetic training images",
    )


def build_retinopathy(workdir: Path, quick: bool) -> DomainBench:
    """FundusDataset of the training split on the preprocessing cache, train.py's augmentation (advanced unless
    --no-advanced-aug); the classifier in its last stage (the whole network trains); focal loss with class weights."""
    from retinopathy import train
    from retinopathy.data import (
        FundusDataset,
        cache_settings,
        prepare_images,
        read_labels,
        split_records,
        write_demo_dataset,
    )
    from retinopathy.model import build_classifier, set_backbone_trainable

    root = write_demo_dataset(workdir / "data", n_images=40 if quick else 240)
    flags = ["--labels-csv", str(root / "train.csv"), "--img-dir", str(root / "train_images"), "--no-pretrained"]
    args = train.parse_args(flags + (["--demo"] if quick else []))
    settings = cache_settings(args)
    records = read_labels(args.labels_csv, args.img_dir, args.num_classes, args.skip_bad_rows, quiet)
    records = prepare_images(records, settings, workdir / "cache", args.skip_bad_rows, quiet, show=False)
    train_records = split_records(records, args.val_split, args.test_split, args.random_seed)["train"]
    plan = train.stage_plan(args)
    stage = plan[-1]  # the full-network stage: most of the epochs
    first_epoch = sum(s["epochs"] for s in plan[:-1])

    augment = "advanced" if args.advanced_aug else "flips"  # main() chooses it inline

    def training_set(cache_dir: Path) -> FundusDataset:
        dataset = FundusDataset(train_records, settings, cache_dir, augment=augment)
        dataset.set_epoch_seed(args.random_seed * 1000 + first_epoch)
        return dataset

    def prepare(cache_dir: Path) -> FundusDataset:
        prepare_images(records, settings, cache_dir, args.skip_bad_rows, quiet, show=False)
        return training_set(cache_dir)

    weights = train.class_weights([r.diagnosis for r in train_records], args.num_classes)
    torch.manual_seed(args.random_seed)
    model = build_classifier(args.model_name, args.num_classes, args.pretrained)
    set_backbone_trainable(model, stage["backbone"])
    criterion = train.build_loss(args, weights)

    def step_loss(model, batch, device):
        device = as_device(device)
        images, labels = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        logits = model(images)
        return criterion.to(device)(logits.float(), labels)

    return DomainBench(
        name="retinopathy",
        dataset=training_set(workdir / "cache"),
        collate_fn=None,
        batch_size=args.batch_size,
        model=model.train(),
        step_loss=step_loss,
        cache_epochs=lambda: timed_epochs(workdir, prepare),
        notes=f"{args.model_name}{' (--demo)' if quick else ''} without ImageNet weights (default: pretrained), "
        f"{args.image_size} px, batch {args.batch_size}{' (--demo)' if quick else ''}; {stage['name']} (whole "
        f"network), loss {args.loss}, augmentation {augment}; "
        f"{len(train_records)} synthetic training photos",
    )


def build_hydra_lv(workdir: Path, quick: bool, shape: tuple[int, int, int] | None = None) -> DomainBench:
    """PatchDataset of the training volumes (epoch 0's random patches, augmented, targets made on the fly); the
    config's model; HydraLoss inside the valid mask."""
    from hydra_lv import train
    from hydra_lv.data import DEFAULT_CONFIG, PatchDataset, find_volumes, load_config, write_demo_volumes
    from hydra_lv.model import HydraLoss, build_model

    # The demo's training volumes vol1, vol2 (vol3, its validation volume, is not needed). The demo's 24 x 160 x 160
    # is smaller than the default 32 x 128 x 128 patch with its margin: the full size writes volumes that hold one.
    shape = shape or ((16, 96, 96) if quick else (48, 256, 256))
    root = write_demo_volumes(workdir / "data", 2, shape)
    settings = {
        **(train.DEMO if quick else {}),
        "data.train_image": f"{root}/vol[12]_im.h5",
        "data.train_label": f"{root}/vol[12]_vesicle_ins.h5",
        "data.train_mask": f"{root}/vol[12]_mask.h5",
    }
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in settings.items()]
    cfg = load_config(DEFAULT_CONFIG, overrides)
    train.check_config(cfg)
    data, seed = cfg["data"], int(cfg["seed"])
    dataset = PatchDataset(
        find_volumes(data, "train"), data["patch_size"], data["pad_size"], data["resolution"],
        data["iterations_per_epoch"], data["augmentation"], seed=seed,
    )  # fmt: skip
    dataset.set_epoch_seed(seed * 1000)  # epoch 0: the seed EpochSampler pairs with every index

    torch.manual_seed(seed)
    m = cfg["model"]
    model = build_model(m["architecture"], m["in_channels"], m["out_channels"], m["filters"])
    criterion = HydraLoss(m["loss_weights"])
    accumulate = max(1, int(cfg["optimization"]["accumulate_grad_batches"]))

    def step_loss(model, batch, device):
        device = as_device(device)
        image, target, weight = (batch[k].to(device, non_blocking=True) for k in ("image", "target", "weight"))
        loss, _ = criterion(model(image), target, weight)
        return loss / accumulate  # what train_one_epoch backpropagates

    batch_size = cfg["system"]["training"]["batch_size"]
    return DomainBench(
        name="hydra_lv",
        dataset=dataset,
        collate_fn=None,
        batch_size=batch_size,
        model=model.train(),
        step_loss=step_loss,
        cache_epochs=None,  # patches are read from the HDF5 volumes on every draw
        notes=f"{m['architecture']} filters {m['filters']}{' (--demo)' if quick else ''}, patch "
        f"{'x'.join(map(str, data['patch_size']))}, batch {batch_size}{' (--demo)' if quick else ''}; "
        f"{len(dataset)} patches per epoch from 2 synthetic volumes of {'x'.join(map(str, dataset.volumes[0].shape))}",
    )


BUILDERS = {
    "pannuke": build_pannuke,
    "stress_granules": build_stress_granules,
    "cellsam": build_cellsam,
    "retinopathy": build_retinopathy,
    "hydra_lv": build_hydra_lv,
}


def build(name: str, workdir: Path, quick: bool = False) -> DomainBench:
    """Writes the domain's synthetic demo dataset (its own write_demo_dataset / demo writer, in its real on-disk
    format) under workdir/name, and returns the DomainBench. The quick and the full size each have a folder of
    their own there (quick/, full/: data and cache), so neither leaves files in the other's data; a second build
    of the same size reuses the data and the cache."""
    if name not in BUILDERS:
        raise ValueError(f"unknown domain {name!r}; choose one of {', '.join(DOMAINS)}")
    folder = (Path(workdir) / name / ("quick" if quick else "full")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return BUILDERS[name](folder, quick)
