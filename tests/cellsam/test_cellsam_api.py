"""The design document's classes as the training code uses them (strategies, GPUMonitor, MetricsTracker,
EarlyStopping, CheckpointManager), its names and defaults, finetune's keywords reaching each stage, the command
line's help, and the silent bugs of issue 16 (validation on every tile, box AP on every tile, the query cap)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cellsam.config import ExperimentConfig, Stage1Config, Stage2Config


def test_names_and_defaults_are_the_documents():
    s1, s2 = Stage1Config(), Stage2Config()
    assert (s1.stage1_type, s1.total_epochs, s1.learning_rate, s1.patience) == ("cellfinder", 500, 1e-4, 15)
    assert (s1.ce_loss_weight, s1.bbox_loss_weight, s1.giou_loss_weight) == (1, 5, 2)
    assert (s2.total_epochs, s2.learning_rate, s2.patience, s2.focal_loss_weight, s2.focal_gamma) == (
        500, 1e-4, 15, 1.0, 2.0)  # fmt: skip
    assert (s2.dice_loss_weight, s2.boundary_loss_weight) == (1.0, 1.0)
    assert not s2.online_hard_negative_mining and not s2.online_hard_negative_mining_weighted
    config = ExperimentConfig(img_path="i", mask_path="m", output_name="o", strategy="k_fold", k_folds=5,
                              stage1_config=s1, stage2_config=s2, batch_size=2, debug=True, augmentation=True,
                              stain_transform=True, gamma=2.4, preeval=True)  # fmt: skip
    assert config.stage1_config is s1 and config.gamma == 2.4


def test_a_config_of_an_earlier_version_still_reads():
    old = {"img_path": "i", "mask_path": "m", "stage1": {"epochs": 7, "lr": 3e-4, "ce_loss_weight": 2.0},
           "stage2": {"epochs": 9, "lr": 2e-5, "hard_negative_mining": "weighted"}}  # fmt: skip
    config = ExperimentConfig.from_dict(old)
    assert (config.stage1_config.total_epochs, config.stage1_config.learning_rate) == (7, 3e-4)
    assert (config.stage2_config.total_epochs, config.stage2_config.learning_rate) == (9, 2e-5)
    assert (
        config.stage2_config.online_hard_negative_mining_weighted
        and not config.stage2_config.online_hard_negative_mining
    )
    assert config.architecture == "shared_encoder"  # written before the published layout existed
    assert ExperimentConfig.from_dict(config.to_dict()) == config


def test_finetune_keywords_reach_the_stage_they_name(monkeypatch):
    """finetune(..., lr=..., patience=..., focal_gamma=...) once set stage 1 only; stage 2 could not be set."""
    from cellsam import train

    seen = []
    monkeypatch.setattr(train, "run_experiment", lambda config, root=None, on_epoch=None: seen.append(config) or {})
    train.finetune("i", "m", "o", 10, 20, learning_rate_s2=5e-5, focal_gamma_s2=3.0, patience=7, dice_loss_weight=2.0,
                   stage1_type="all_backbones", strategy="full_dataset")  # fmt: skip
    c = seen[0]
    assert (c.stage1_config.total_epochs, c.stage2_config.total_epochs, c.strategy) == (10, 20, "full_dataset")
    assert (c.stage2_config.learning_rate, c.stage1_config.learning_rate) == (5e-5, 1e-4)
    assert (c.stage2_config.focal_gamma, c.stage1_config.focal_gamma) == (3.0, 2.0)
    assert c.stage1_config.patience == c.stage2_config.patience == 7  # both stages have it: the bare name sets both
    assert c.stage2_config.dice_loss_weight == 2.0 and c.stage1_config.stage1_type == "all_backbones"
    train.finetune("i", "m", "o", k_fold_training=True)
    assert seen[1].strategy == "k_fold" and seen[1].stage1_config.total_epochs == 500
    with pytest.raises(TypeError, match="unexpected keyword argument 'lr_s2' \\(did you mean 'learning_rate_s2'"):
        train.finetune("i", "m", "o", lr_s2=1e-4)


def test_overrides_from_the_environment(monkeypatch):
    from cellsam import train

    monkeypatch.setenv("CELLSAM_OVERRIDES", json.dumps({"sam_size": "vit_tiny", "stage2_config": {"total_epochs": 2}}))
    runner = train.ExperimentRunner(ExperimentConfig(img_path="i", mask_path="m"))
    assert runner.config.sam_size == "vit_tiny" and runner.config.stage2_config.total_epochs == 2
    monkeypatch.delenv("CELLSAM_OVERRIDES")
    with pytest.raises(SystemExit, match="give --test_img_path and --test_mask_path together"):
        train.ExperimentRunner(ExperimentConfig(img_path="i", mask_path="m", test_img_path="t"))
    monkeypatch.setenv("CELLSAM_OVERRIDES", json.dumps({"epochs": 2}))
    with pytest.raises(SystemExit, match="CELLSAM_OVERRIDES: epochs is not a field of ExperimentConfig"):
        train.ExperimentRunner(ExperimentConfig(img_path="i", mask_path="m"))


def test_every_flag_has_help_and_its_default():
    from cellsam import train

    parser = train.get_args_parser()
    text = parser.format_help()
    assert text.startswith("usage: python cellsam/train.py (--img_path DIR --mask_path DIR | --demo | --resume")
    for flag in ("--total_epochs_s1", "--learning_rate_s2", "--patience_s2", "--focal_gamma_s2",
                 "--online_hard_negative_mining", "--ce_loss_weight", "--test_img_path"):  # fmt: skip
        assert flag in text
    for action in parser._actions:
        if action.dest not in ("help", "demo", "resume"):
            assert action.help and "(default: " in action.help and len(action.help) > 25, action.dest
    args = parser.parse_args(["--img_path", "i", "--mask_path", "m", "--learning_rate_s2", "5e-5", "--patience_s1",
                              "3", "--online_hard_negative_mining"])  # fmt: skip
    config = train.config_from_args(args)
    assert config.stage2_config.learning_rate == 5e-5 and config.stage1_config.patience == 3
    assert config.stage2_config.online_hard_negative_mining and config.stage2_config.patience == 15


def test_strategies_split_as_documented():
    from cellsam import FullDatasetStrategy, KFoldStrategy, TrainValSplitStrategy

    pairs = list(range(10))
    folds = KFoldStrategy(5, seed=0).splits(pairs)
    assert len(folds) == 5 and sorted(i for _, val in folds for i in val) == pairs
    assert all(set(train).isdisjoint(val) and len(val) == 2 for train, val in folds)
    [(train, val)] = TrainValSplitStrategy(0.2, seed=0).splits(pairs)
    assert len(val) == 2 and sorted(train + val) == pairs
    assert FullDatasetStrategy().splits(pairs) == [(pairs, [])]
    with pytest.raises(SystemExit, match="--k_folds 5 needs at least 5 images .* holds 3"):
        KFoldStrategy(5).splits([1, 2, 3], "data/images")


def test_early_stopping_checkpoints_metrics_and_memory(tmp_path, capsys):
    from cellsam import CheckpointManager, EarlyStopping, GPUMonitor, MetricsTracker

    stopper = EarlyStopping(patience=2)
    assert [stopper.step(x) for x in (1.0, 0.5, 0.7, 0.5)] == [True, True, False, False] and stopper.should_stop
    again = EarlyStopping(2)
    again.load_state_dict(stopper.state_dict())
    assert (again.best, again.bad_epochs, again.should_stop) == (0.5, 2, True)
    assert math.isinf(EarlyStopping(3).best)

    checkpoints = CheckpointManager(tmp_path / "fold_1", stage=2)
    weights = {"neck": {"w": torch.arange(3.0)}}
    checkpoints.save_best(4, weights)
    checkpoints.save_last({"modules": weights, "state": {"epoch": 4}})
    assert torch.equal(checkpoints.load_best()["neck"]["w"], torch.arange(3.0))
    assert checkpoints.load_last()["state"]["epoch"] == 4 and not list((tmp_path / "fold_1").glob("*.tmp"))
    assert CheckpointManager(tmp_path / "none", 1).load_last() is None

    tracker = MetricsTracker(tmp_path / "metrics", "stage1_metrics")
    tracker.update({"train_loss": 1.0}, epoch=1, fold=1)
    tracker.update({"train_loss": 0.9}, epoch=1, fold=2)
    tracker.update({"train_loss": 0.8}, epoch=1, fold=1)  # a resumed run repeats epoch 1 of fold 1: replaced
    tracker.save_metrics()
    resumed = MetricsTracker(tmp_path / "metrics", "stage1_metrics")
    assert resumed.history(fold=1) == [{"fold": 1, "epoch": 1, "train_loss": 0.8}] and len(resumed.rows) == 2

    GPUMonitor("cpu").print_memory_summary("Training Start")
    line = capsys.readouterr().out
    assert line.startswith("[Training Start] process memory (no GPU) ") and "GiB resident" in line
    assert 0 < GPUMonitor("cpu").memory()["rss"] < 64


def test_validation_covers_every_tile_of_each_image(tmp_path):
    """Validation once scored the central crop of each image only; now its tiles cover every cell pixel."""
    import tifffile
    from PIL import Image

    from cellsam.data import CellDataset, find_pairs, synthetic_cells

    image, mask = synthetic_cells(300, 60, np.random.default_rng(1))
    image, mask = image[:, :200], mask[:, :200]  # 300 x 200
    for kind in ("images", "masks"):
        (tmp_path / kind).mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", image)
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    dataset = CellDataset(find_pairs(tmp_path / "images", tmp_path / "masks"), 128, train=False)
    assert len(dataset) == 3 * 2
    seen = np.zeros(mask.shape, bool)
    for k, (_, (y0, x0)) in enumerate(dataset.index):
        sample = dataset[k]
        h, w = min(128, 300 - y0), min(128, 200 - x0)
        assert sample["image"].shape == (3, 128, 128)
        seen[y0 : y0 + h, x0 : x0 + w] = True
    assert seen[mask > 0].all()


def test_box_ap_counts_every_tile_of_a_large_image():
    """evaluate.py once scored CellFinder's boxes on the top-left tile only. A model that finds every cell of any
    tile must score box AP 1 on the whole image, each cell once."""
    from cellsam.data import boxes_from_mask, synthetic_cells
    from cellsam.evaluate import box_average_precision
    from cellsam.model import detect_tiled

    _, mask = synthetic_cells(400, 90, np.random.default_rng(2))

    class Perfect:  # finds exactly the cells whose box lies in the tile it is shown
        architecture, input_size, window = "shared_encoder", 128, None

        def __init__(self):
            self.calls = 0

        def detect(self, tile, device="cpu"):
            y0, x0 = self.origins[self.calls]
            self.calls += 1
            _, boxes = boxes_from_mask(mask[y0 : y0 + 128, x0 : x0 + 128])
            return torch.from_numpy(boxes), torch.ones(len(boxes)), (128, 128)

    from cellsam.data import tile_grid

    model = Perfect()
    model.origins = [(y0, x0) for y0, x0, _, _ in tile_grid(400, 400, 128, 64)]
    image = np.zeros((400, 400, 3), np.float32)
    boxes, scores = detect_tiled(model, image, overlap=64)
    assert model.calls == len(model.origins) == 36
    truth = torch.from_numpy(boxes_from_mask(mask)[1])
    ap = box_average_precision([(boxes, scores, truth)], 0.5)
    assert ap > 0.95  # cells cut by a tile's edge are found whole in the neighbouring tile's core
    top_left = torch.from_numpy(boxes_from_mask(mask[:128, :128])[1])  # what the top-left tile alone gave
    assert box_average_precision([(top_left, torch.ones(len(top_left)), truth)], 0.5) < 0.2


def test_default_cellfinder_finds_more_cells_than_a_dense_field_holds():
    """The default once capped detections at 432 queries per window (12 x 12 anchors x 3 patterns)."""
    from cellsam.model import build_cellfinder, build_sam, encode

    s1 = Stage1Config()
    assert s1.anchor_grid**2 * s1.patterns >= 1000
    sam = build_sam("vit_tiny")
    finder = build_cellfinder(sam, Stage1Config(hidden=32, heads=2, encoder_layers=1, decoder_layers=1))
    with torch.no_grad():
        out = finder(encode(sam, torch.zeros(1, 3, 256, 256))[0])
    assert out["boxes"].shape[1] == 1024


def test_search_does_not_import_train_back():
    """search.py calls the training entry point; train.py knows nothing of the search."""
    source = (Path(__file__).resolve().parents[2] / "cellsam" / "train.py").read_text()
    assert "search" not in "".join(line for line in source.splitlines() if line.lstrip().startswith(("import", "from")))
    assert "--search" not in source
