"""Settings of a CellSAM experiment: ExperimentConfig with a Stage1Config and a Stage2Config. Every field is a
command-line flag of train.py of the same name, and `to_dict` / `from_dict` write and read
experiment_config.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

STRATEGIES = ("k_fold", "train_val_split", "full_dataset")
ARCHITECTURES = ("auto", "published", "shared_encoder")
STAGE1_TYPES = ("cellfinder", "image_encoder", "all_backbones")
STAGE2_PARTS = ("neck", "mask_decoder", "both")
HARD_NEGATIVE_MINING = ("none", "plain", "weighted")


@dataclass
class Stage1Config:
    """CellFinder: the DETR-style box detector on the image encoder's features."""

    epochs: int = 50
    lr: float = 1e-4
    weight_decay: float = 1e-4
    stage1_type: str = "cellfinder"  # cellfinder (encoder frozen) | image_encoder | all_backbones (encoder + neck)
    ce_loss_weight: float = 2.0
    bbox_loss_weight: float = 5.0
    giou_loss_weight: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    hidden: int = 256
    heads: int = 8
    encoder_layers: int = 6
    decoder_layers: int = 6
    anchor_grid: int = 12  # queries = anchor_grid^2 x patterns
    patterns: int = 3
    dropout: float = 0.1  # in CellFinder's transformer layers (attention and feed-forward)
    one_to_many: int = 1  # > 1: earlier decoder layers match each cell this many times (hybrid matching)
    score_threshold: float = 0.4  # a query is a cell above this probability (evaluation, stage-2 prompts)
    # published CellFinder: its score column that learns "cell" (-1: the one the loaded model already uses)
    cell_class: int = -1
    patience: int = 10


@dataclass
class Stage2Config:
    """SAM prompted by ground-truth boxes (jittered): the neck (the paper's choice), the mask decoder, or both."""

    epochs: int = 30
    lr: float = 1e-4
    weight_decay: float = 1e-4
    train_parts: str = "neck"  # neck | mask_decoder | both
    focal_gamma: float = 2.0
    focal_loss_weight: float = 20.0  # SAM's 20 : 1 focal : Dice
    dice_loss_weight: float = 1.0
    boundary_loss_weight: float = 0.0
    hard_negative_mining: str = "none"  # none | plain | weighted (online, on the BCE term)
    negative_ratio: float = 3.0  # hard negatives kept per positive pixel
    box_jitter: float = 0.1  # box corners move by up to this share of the box side
    loss_margin: float = 0.5  # the mask loss counts pixels in the prompt box grown by this share of its side
    max_prompts: int = 32  # cells per image and step
    patience: int = 10


@dataclass
class ExperimentConfig:
    img_path: str = ""
    mask_path: str = ""
    output_name: str = "cellsam"
    output_dir: str = "output"
    strategy: str = "train_val_split"  # k_fold | train_val_split | full_dataset
    k_folds: int = 5
    val_fraction: float = 0.2
    batch_size: int = 2
    # published: the published CellSAM's layout (vit_b; vit_tiny for tests), from --cellsam_checkpoint (a released
    # cellsam_general.pt or a fine-tuned one) or --sam_checkpoint; shared_encoder: this folder's CellFinder on the
    # encoder of the SAM that draws the masks (any size); auto: published for vit_b, shared_encoder otherwise
    architecture: str = "auto"
    sam_size: str = "vit_b"
    sam_checkpoint: str | None = None
    cellsam_checkpoint: str | None = None
    allow_missing_keys: bool = False  # a --cellsam_checkpoint without some published keys loads what it has
    # published: images larger than this many px are cut into windows (training: random crops) resized to 1024 px;
    # smaller ones are resized whole (None: 1024; cellSAM's wsi.py: 512)
    window: int | None = None
    debug: bool = False  # a few images and epochs, to check a set-up
    augmentation: bool = True
    stain_transform: bool = False  # H&E stain jitter (for H&E images)
    gamma: float = 1.0  # input gamma correction
    preeval: bool = False  # evaluate before training
    seed: int = 42
    num_workers: int = 2
    mixed_precision: bool = True  # on CUDA: bf16 where supported, else fp16 with a GradScaler
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ExperimentConfig:
        data = dict(data)
        data.setdefault("architecture", "shared_encoder")  # experiments written before the published layout
        stage1 = Stage1Config(**data.pop("stage1", {}))
        stage2 = Stage2Config(**data.pop("stage2", {}))
        return cls(**data, stage1=stage1, stage2=stage2)

    def check(self) -> ExperimentConfig:
        """Clear errors for values that cannot work."""
        choices = [
            ("strategy", self.strategy, STRATEGIES),
            ("architecture", self.architecture, ARCHITECTURES),
            ("stage1_type", self.stage1.stage1_type, STAGE1_TYPES),
            ("train_parts", self.stage2.train_parts, STAGE2_PARTS),
            ("hard_negative_mining", self.stage2.hard_negative_mining, HARD_NEGATIVE_MINING),
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
        if not self.img_path or not self.mask_path:
            raise SystemExit("give --img_path and --mask_path (image and instance-mask folders), or --demo")
        return self


def field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]
