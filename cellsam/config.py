"""Settings of a CellSAM experiment, with the names and defaults of the design document: an ExperimentConfig that
holds a Stage1Config (CellFinder, the box detector) and a Stage2Config (SAM, the masks).

    from cellsam import ExperimentConfig, Stage1Config, Stage2Config
    config = ExperimentConfig(img_path="data/images", mask_path="data/masks", output_name="my_cells",
                              stage1_config=Stage1Config(total_epochs=200),
                              stage2_config=Stage2Config(learning_rate=5e-5))

Every field is a command-line flag of train.py of the same name; a field both stages have takes _s1 / _s2
(--total_epochs_s1, --learning_rate_s2, --patience_s2, --focal_gamma_s2, ...). Each field's help text is its
metadata["help"], which --help prints. `to_dict` / `from_dict` write and read experiment_config.json (from_dict
also reads the files of earlier versions, whose names were epochs, lr, stage1, stage2, hard_negative_mining).

Quick checks (the tests, a smoke run of a copied notebook): the environment variable CELLSAM_OVERRIDES, a JSON
object of fields, is applied to every experiment when it runs, e.g.
    CELLSAM_OVERRIDES='{"sam_size": "vit_tiny", "stage1_config": {"total_epochs": 1},
                        "stage2_config": {"total_epochs": 1}}'
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

STRATEGIES = ("k_fold", "train_val_split", "full_dataset")
ARCHITECTURES = ("auto", "published", "shared_encoder")
STAGE1_TYPES = ("cellfinder", "image_encoder", "all_backbones")
STAGE2_PARTS = ("neck", "mask_decoder", "both")
OVERRIDES = "CELLSAM_OVERRIDES"


def setting(default, help: str):  # noqa: A002 - argparse's word
    """A dataclass field with its command-line help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class Stage1Config:
    """Stage 1, CellFinder: the DETR-style box detector, trained on Hungarian-matched boxes."""

    stage1_type: str = setting(
        "cellfinder",
        "what stage 1 trains: cellfinder (the detector, image encoders frozen), image_encoder (also CellFinder's "
        "image encoder), all_backbones (also the encoder of the SAM that draws the masks, from the mask loss of "
        "true-box prompts)",
    )
    total_epochs: int = setting(500, "stage 1 epochs at most (early stopping may end it sooner)")
    learning_rate: float = setting(1e-4, "AdamW learning rate, annealed to 0 by a cosine over total_epochs")
    patience: int = setting(15, "early stopping: epochs without a lower validation loss before stage 1 stops")
    ce_loss_weight: float = setting(1.0, "weight of the classification (sigmoid focal) loss")
    bbox_loss_weight: float = setting(5.0, "weight of the L1 loss on box centre, width and height")
    giou_loss_weight: float = setting(2.0, "weight of the generalised-IoU box loss")
    weight_decay: float = setting(1e-4, "AdamW weight decay")
    focal_alpha: float = setting(0.25, "focal loss alpha of the classification loss")
    focal_gamma: float = setting(2.0, "focal loss gamma of the classification loss")
    hidden: int = setting(256, "shared_encoder CellFinder: transformer width")
    heads: int = setting(8, "shared_encoder CellFinder: attention heads")
    encoder_layers: int = setting(6, "shared_encoder CellFinder: transformer encoder layers")
    decoder_layers: int = setting(6, "shared_encoder CellFinder: transformer decoder layers")
    anchor_grid: int = setting(
        32, "shared_encoder CellFinder: anchor points per side; queries = anchor_grid^2 x patterns, the most "
        "cells it finds in one window"
    )  # fmt: skip
    patterns: int = setting(1, "shared_encoder CellFinder: queries per anchor point")
    dropout: float = setting(0.1, "dropout in CellFinder's transformer layers")
    one_to_many: int = setting(1, "> 1: earlier decoder layers match each cell this many times (hybrid matching)")
    score_threshold: float = setting(0.4, "a box is a cell above this score (evaluation, the pipeline)")
    cell_class: int = setting(
        -1, "published CellFinder: its score column that learns 'cell' (-1: the one the loaded model already uses)"
    )


@dataclass
class Stage2Config:
    """Stage 2, SAM prompted by the true boxes (jittered): the neck (the paper's choice), mask decoder or both."""

    total_epochs: int = setting(500, "stage 2 epochs at most (early stopping may end it sooner)")
    learning_rate: float = setting(1e-4, "AdamW learning rate, annealed to 0 by a cosine over total_epochs")
    patience: int = setting(15, "early stopping: epochs without a lower validation loss before stage 2 stops")
    focal_loss_weight: float = setting(1.0, "weight of the per-pixel sigmoid focal loss (SAM's paper: 20)")
    focal_gamma: float = setting(2.0, "focal loss gamma: higher puts more weight on hard pixels")
    dice_loss_weight: float = setting(1.0, "weight of the Dice loss")
    boundary_loss_weight: float = setting(
        1.0, "weight of the boundary loss (Kervadec et al. 2019: probabilities x signed distance to the outline)"
    )
    online_hard_negative_mining: bool = setting(
        False, "online hard negative mining: the focal term keeps every cell pixel and only the hardest background "
        "pixels (negative_ratio per cell pixel)"
    )  # fmt: skip
    online_hard_negative_mining_weighted: bool = setting(
        False, "weighted hard negative mining: every background pixel weighted by its loss over the mean one"
    )
    negative_ratio: float = setting(3.0, "hard negative mining: background pixels kept per cell pixel")
    weight_decay: float = setting(1e-4, "AdamW weight decay")
    train_parts: str = setting("neck", "what stage 2 trains: neck (the paper's choice), mask_decoder or both")
    box_jitter: float = setting(0.1, "training prompts: each box corner moves by up to this share of its side")
    loss_margin: float = setting(0.5, "the mask loss counts the pixels of the prompt box grown by this share")
    max_prompts: int = setting(32, "cells prompted per image and step")


@dataclass
class ExperimentConfig:
    img_path: str = setting("", "folder of images (PNG, TIFF or .npy; grey, 2-channel or RGB; 8/16-bit or float)")
    mask_path: str = setting("", "folder of instance masks, paired with the images by file name (0 = background)")
    output_name: str = setting("cellsam", "experiment name: output_dir/output_name (_2, _3... if it exists)")
    strategy: str = setting(
        "train_val_split", "k_fold (k models, mean and 95 % CI), train_val_split (val_fraction held out) or "
        "full_dataset (no validation: trains total_epochs)"
    )  # fmt: skip
    k_folds: int = setting(5, "k_fold: number of folds")
    stage1_config: Stage1Config = field(default_factory=Stage1Config)
    stage2_config: Stage2Config = field(default_factory=Stage2Config)
    batch_size: int = setting(2, "images per step (per process under torchrun)")
    debug: bool = setting(
        False, "memory and every loss term at each step, step-by-step progress, box and mask figures each epoch"
    )
    augmentation: bool = setting(True, "flips, 90-degree rotations, scale/shift, brightness/contrast, blur")
    stain_transform: bool = setting(False, "H&E stain jitter (for H&E images)")
    gamma: float = setting(1.0, "input gamma correction (intensity ** gamma on 0..1 images)")
    preeval: bool = setting(False, "score the model as loaded on the validation images before training")
    figures: bool = setting(
        True, "after each fold: stage 1 boxes, stage 2 masks, loss curves and components, the pipeline's label images"
    )
    output_dir: str = setting("output", "parent folder of experiments")
    val_fraction: float = setting(0.2, "train_val_split: share of the images held out for validation")
    test_img_path: str | None = setting(
        None, "folder of test images that take no part in training or model choice: the score to report"
    )
    test_mask_path: str | None = setting(None, "their instance masks")
    architecture: str = setting(
        "auto", "published (cellSAM's own layout, vit_b or vit_tiny), shared_encoder (this folder's CellFinder on "
        "the encoder of the SAM that draws the masks, any size), auto (published for vit_b)"
    )  # fmt: skip
    sam_size: str = setting("vit_b", "vit_b, vit_l, vit_h, or vit_tiny (a small SAM for CPU demos and tests)")
    sam_checkpoint: str | None = setting(None, "an official SAM file (sam_vit_b_01ec64.pth...) to start from")
    cellsam_checkpoint: str | None = setting(
        None, "a published CellSAM file to start from (cellsam_general.pt, or a fold's cellsam_finetuned.pt)"
    )
    allow_missing_keys: bool = setting(False, "a cellsam_checkpoint without some published keys loads what it has")
    window: int | None = setting(
        None, "published: images larger than this many px are cut into windows resized to 1024 px (None: 1024; "
        "cellSAM's whole-slide pipeline: 512)"
    )  # fmt: skip
    seed: int = setting(42, "seed of the splits, initial weights, augmentation and prompt draws")
    num_workers: int = setting(2, "DataLoader worker processes")
    mixed_precision: bool = setting(True, "on CUDA: bf16 autocast where supported, else fp16 with a GradScaler")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ExperimentConfig:
        """From to_dict's output, or an experiment_config.json of an earlier version."""
        data = dict(data)
        data.setdefault("architecture", "shared_encoder")  # experiments written before the published layout
        stage1 = _renamed(data.pop("stage1_config", data.pop("stage1", {})))
        stage2 = _renamed(data.pop("stage2_config", data.pop("stage2", {})))
        data.pop("debug_images", None)
        return cls(**data, stage1_config=Stage1Config(**stage1), stage2_config=Stage2Config(**stage2))

    def with_overrides(self) -> ExperimentConfig:
        """The fields in the environment variable CELLSAM_OVERRIDES (a JSON object) set on this config."""
        text = os.environ.get(OVERRIDES)
        if not text:
            return self
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise SystemExit(f"{OVERRIDES}: not a JSON object ({error})") from None
        for name, value in values.items():
            if name in ("stage1_config", "stage2_config"):
                for key, v in value.items():
                    check_field(type(getattr(self, name)), key, OVERRIDES)
                    setattr(getattr(self, name), key, v)
            else:
                check_field(ExperimentConfig, name, OVERRIDES)
                setattr(self, name, value)
        return self

    def check(self) -> ExperimentConfig:
        """Clear errors for values that cannot work."""
        s1, s2 = self.stage1_config, self.stage2_config
        choices = [
            ("strategy", self.strategy, STRATEGIES),
            ("architecture", self.architecture, ARCHITECTURES),
            ("stage1_type", s1.stage1_type, STAGE1_TYPES),
            ("train_parts", s2.train_parts, STAGE2_PARTS),
        ]
        for name, value, allowed in choices:
            if value not in allowed:
                raise SystemExit(f"--{name} {value}: choose one of {', '.join(allowed)}")
        if self.architecture == "auto":
            self.architecture = "published" if self.sam_size == "vit_b" or self.cellsam_checkpoint else "shared_encoder"
        if self.architecture == "published" and self.sam_size not in ("vit_b", "vit_tiny"):
            raise SystemExit(
                f"--sam_size {self.sam_size}: the published CellSAM is vit_b; pass --architecture shared_encoder "
                "to train this folder's CellFinder on a vit_l or vit_h SAM"
            )
        if self.cellsam_checkpoint and self.architecture != "published":
            raise SystemExit(
                "--cellsam_checkpoint holds the published CellSAM: drop --architecture shared_encoder (or pass "
                "--architecture published)"
            )
        if self.strategy == "k_fold" and self.k_folds < 2:
            raise SystemExit(f"--k_folds {self.k_folds}: k-fold training needs at least 2 folds")
        if self.gamma <= 0:
            raise SystemExit(f"--gamma {self.gamma}: the input gamma correction must be positive")
        if not 0 < self.val_fraction < 1:
            raise SystemExit(f"--val_fraction {self.val_fraction}: must lie between 0 and 1")
        for name, stage in (("s1", s1), ("s2", s2)):
            if stage.total_epochs < 1 or stage.learning_rate <= 0 or stage.patience < 1:
                raise SystemExit(
                    f"--total_epochs_{name} {stage.total_epochs}, --learning_rate_{name} {stage.learning_rate}, "
                    f"--patience_{name} {stage.patience}: each must be positive"
                )
        if not self.img_path or not self.mask_path:
            raise SystemExit("give --img_path and --mask_path (image and instance-mask folders), or --demo")
        if bool(self.test_img_path) != bool(self.test_mask_path):
            raise SystemExit("give --test_img_path and --test_mask_path together (test images and their masks)")
        return self


# names of earlier versions of experiment_config.json
OLD_NAMES = {"epochs": "total_epochs", "lr": "learning_rate"}


def _renamed(stage: dict) -> dict:
    stage = {OLD_NAMES.get(k, k): v for k, v in stage.items()}
    mining = stage.pop("hard_negative_mining", None)
    if mining is not None:
        stage["online_hard_negative_mining"] = mining == "plain"
        stage["online_hard_negative_mining_weighted"] = mining == "weighted"
    return stage


def field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def check_field(cls, name: str, where: str) -> None:
    if name not in field_names(cls):
        raise SystemExit(f"{where}: {name} is not a field of {cls.__name__} ({', '.join(field_names(cls))})")
