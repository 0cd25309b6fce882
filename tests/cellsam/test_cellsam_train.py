"""cellsam/train.py: each strategy on tiny data, the output tree exactly, resume, the Python API, the command
line, aggregation, bad inputs."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import cellsam.train as cellsam_train
from cellsam.config import ExperimentConfig, Stage1Config, Stage2Config
from cellsam.data import write_demo_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("cells") / "data", n_images=6, size=128)


def tiny_config(data: Path, out: Path, **settings) -> ExperimentConfig:
    stage1 = Stage1Config(epochs=1, hidden=32, heads=2, encoder_layers=1, decoder_layers=2, anchor_grid=4, patterns=1)
    stage2 = Stage2Config(epochs=1, max_prompts=4, train_parts=settings.pop("train_parts", "neck"))
    base = {"img_path": str(data / "images"), "mask_path": str(data / "masks"), "output_dir": str(out)}
    base.update({"sam_size": "vit_tiny", "batch_size": 2, "num_workers": 0, "output_name": "exp"})
    base.update(settings)
    return ExperimentConfig(**base, stage1=stage1, stage2=stage2)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_k_fold_writes_exactly_the_documented_tree(tmp_path, data):
    result = cellsam_train.ExperimentRunner(tiny_config(data, tmp_path, strategy="k_fold", k_folds=2)).run()
    root = tmp_path / "exp"
    assert Path(result["output_dir"]) == root
    files = tree(root)
    expected = {"experiment_config.json", "logs/experiment.log", "metrics/stage1_metrics.json"}
    expected |= {"results/individual_results.json", "results/aggregated_results.json", "metrics/stage2_metrics.json"}
    for fold in (1, 2):
        expected |= {
            f"models/fold_{fold}/{name}"
            for name in ("best_model_s1.pth", "best_model_s2.pth", "last_s1.pth", "last_s2.pth")
        }
    assert expected <= files
    assert {f for f in files if not f.startswith("results/fold_")} == expected
    assert any(f.startswith("results/fold_1/visualizations/") and f.endswith(".png") for f in files)
    folds = json.loads((root / "results" / "individual_results.json").read_text())
    assert [f["fold"] for f in folds] == [1, 2]
    assert sorted(folds[0]["val_images"] + folds[1]["val_images"]) == [f"img_{i:04d}" for i in range(1, 7)]
    aggregated = json.loads((root / "results" / "aggregated_results.json").read_text())["metrics"]
    f1 = [f["metrics"]["f1"] for f in folds]
    half = stats.t.ppf(0.975, 1) * np.std(f1, ddof=1) / np.sqrt(2)
    assert aggregated["f1"]["mean"] == pytest.approx(np.mean(f1)) and aggregated["f1"]["n"] == 2
    assert aggregated["f1"]["ci95"] == pytest.approx([np.mean(f1) - half, np.mean(f1) + half])
    assert 0 < aggregated["baseline_f1"]["mean"] <= 1  # Otsu + watershed finds the synthetic cells
    stage1 = json.loads((root / "metrics" / "stage1_metrics.json").read_text())
    assert set(stage1) == {"fold_1", "fold_2"} and np.isfinite(stage1["fold_1"][0]["train"]["giou"])
    config = json.loads((root / "experiment_config.json").read_text())
    assert config["strategy"] == "k_fold" and config["stage1"]["anchor_grid"] == 4
    # the same name again: a new folder, the first untouched
    again = cellsam_train.ExperimentRunner(tiny_config(data, tmp_path, strategy="full_dataset")).run()
    assert Path(again["output_dir"]) == tmp_path / "exp_2" and tree(root) == files


@pytest.mark.parametrize("strategy", ["train_val_split", "full_dataset"])
def test_other_strategies(tmp_path, data, strategy):
    result = cellsam_train.ExperimentRunner(tiny_config(data, tmp_path, strategy=strategy, train_parts="both")).run()
    folds = json.loads((Path(result["output_dir"]) / "results" / "individual_results.json").read_text())
    assert len(folds) == 1
    if strategy == "full_dataset":  # no validation: nothing to score
        assert folds[0]["val_images"] == [] and "metrics" not in folds[0] and result["metrics"] == {}
    else:
        assert len(folds[0]["val_images"]) == 2 and 0 <= folds[0]["metrics"]["f1"] <= 1


def test_resume_keeps_finished_folds_and_carries_on(tmp_path, data, monkeypatch):
    original, calls = cellsam_train.run_fold, []

    def killed_in_fold_two(*args, **kwargs):
        calls.append(args[1])
        if args[1] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(cellsam_train, "run_fold", killed_in_fold_two)
    with pytest.raises(KeyboardInterrupt):
        cellsam_train.ExperimentRunner(tiny_config(data, tmp_path, strategy="k_fold", k_folds=2)).run()
    monkeypatch.setattr(cellsam_train, "run_fold", original)
    root = tmp_path / "exp"
    first = (root / "models" / "fold_1" / "best_model_s2.pth").stat().st_mtime_ns
    result = cellsam_train.main(cellsam_train.get_args_parser().parse_args(["--resume", str(root)]))
    assert result["folds"] == 2 and (root / "models" / "fold_2" / "best_model_s2.pth").is_file()
    assert (root / "models" / "fold_1" / "best_model_s2.pth").stat().st_mtime_ns == first  # fold 1 not redone
    assert "fold 1: finished in an earlier run, kept" in (root / "logs" / "experiment.log").read_text()


def test_finetune_api_and_command_line_agree(tmp_path, data):
    from cellsam import train

    result = train.finetune(data / "images", data / "masks", "api", total_epochs_s1=1, total_epochs_s2=1,
                            strategy="full_dataset", output_dir=str(tmp_path), sam_size="vit_tiny", num_workers=0,
                            hidden=32, heads=2, encoder_layers=1, decoder_layers=1, anchor_grid=4, patterns=1,
                            max_prompts=4)  # fmt: skip
    saved = json.loads((Path(result["output_dir"]) / "experiment_config.json").read_text())
    argv = ["--img_path", str(data / "images"), "--mask_path", str(data / "masks"), "--output_name", "api"]
    argv += ["--strategy", "full_dataset", "--epochs_s1", "1", "--epochs_s2", "1", "--sam_size", "vit_tiny"]
    argv += ["--num_workers", "0", "--hidden", "32", "--heads", "2", "--encoder_layers", "1", "--decoder_layers", "1"]
    argv += ["--anchor_grid", "4", "--patterns", "1", "--max_prompts", "4", "--output_dir", str(tmp_path)]
    config = cellsam_train.config_from_args(cellsam_train.get_args_parser().parse_args(argv))
    assert config.check().to_dict() == saved  # "auto" architecture resolved, as the experiment keeps it
    assert ExperimentConfig.from_dict(saved) == config


def test_bad_inputs_give_clear_errors(tmp_path, data):
    with pytest.raises(SystemExit, match="--strategy cross: choose one of k_fold, train_val_split, full_dataset"):
        cellsam_train.ExperimentRunner(tiny_config(data, tmp_path, strategy="cross")).run()
    with pytest.raises(SystemExit, match="--k_folds 1: k-fold training needs at least 2 folds"):
        cellsam_train.ExperimentRunner(tiny_config(data, tmp_path, strategy="k_fold", k_folds=1)).run()
    with pytest.raises(SystemExit, match="give --img_path and --mask_path"):
        cellsam_train.main(cellsam_train.get_args_parser().parse_args([]))
    with pytest.raises(SystemExit, match="no experiment_config.json"):
        cellsam_train.main(cellsam_train.get_args_parser().parse_args(["--resume", str(tmp_path)]))
    with pytest.raises(SystemExit, match="mask_path .*: no such folder"):
        cellsam_train.ExperimentRunner(tiny_config(data, tmp_path, mask_path=str(tmp_path / "none"))).run()
    assert not (tmp_path / "exp").exists()  # nothing written for a run that could not start


# ----------------------------------------------------------------------------------------------------------------
# Hyperparameter search
# ----------------------------------------------------------------------------------------------------------------


def test_search_space_grid_sampling_and_errors():
    from cellsam import HyperparameterSpace
    from cellsam.search import apply

    space = HyperparameterSpace(lr_s1=[1e-4, 1e-3], gamma=[1.0, 0.8, 1.2], augmentation=[True])
    grid = space.grid()
    assert len(grid) == 2 * 3 * 3 * 3 * 3 * 1 * 1 and grid[0]["lr_s1"] == 1e-4
    config = apply(ExperimentConfig(), {"lr_s1": 1e-3, "focal_gamma_s2": 3.0, "gamma": 0.8})
    assert (config.stage1.lr, config.stage2.focal_gamma, config.gamma) == (1e-3, 3.0, 0.8)
    assert ExperimentConfig().stage1.lr == 1e-4  # the base is not changed
    with pytest.raises(SystemExit, match="search space: lr_s2 has no values"):
        HyperparameterSpace(lr_s2=[]).check()


def test_two_trials_in_parallel_one_failing(tmp_path, data):
    """A grid of two trials on two worker processes; the trial with an impossible input gamma is recorded as
    failed, the other finishes and is the best."""
    from cellsam import HyperparameterOptimizer, HyperparameterSpace

    space = HyperparameterSpace(lr_s1=[1e-3], lr_s2=[1e-3], focal_gamma_s1=[2.0], focal_gamma_s2=[2.0],
                                gamma=[1.0, -1.0], augmentation=[False], stain_transform=[False])  # fmt: skip
    base = tiny_config(data, tmp_path / "unused")
    table = HyperparameterOptimizer(base, space, tmp_path / "search", max_parallel=2).run_grid_search()
    assert table["status"].tolist() == ["finished", "failed"] and table["gamma"].tolist() == [1.0, -1.0]
    assert table["error"][1] == "SystemExit: --gamma -1.0: the input gamma correction must be positive"
    saved = json.loads((tmp_path / "search" / "best_config.json").read_text())
    assert saved["trial"] == 1 and saved["values"]["gamma"] == 1.0 and saved["config"]["stage1"]["lr"] == 1e-3
    assert (tmp_path / "search" / "trials" / "trial_001" / "results" / "aggregated_results.json").is_file()
    assert (tmp_path / "search" / "trials" / "trial_002" / "error.txt").is_file()
    with pytest.raises(SystemExit, match="holds an earlier search"):
        HyperparameterOptimizer(base, space, tmp_path / "search").run_grid_search()


def test_random_search_from_the_command_line(tmp_path, data):
    argv = ["--img_path", str(data / "images"), "--mask_path", str(data / "masks"), "--output_dir", str(tmp_path)]
    argv += ["--output_name", "cli", "--sam_size", "vit_tiny", "--num_workers", "0", "--epochs_s1", "1"]
    argv += ["--epochs_s2", "1", "--hidden", "32", "--heads", "2", "--encoder_layers", "1", "--decoder_layers", "1"]
    argv += ["--anchor_grid", "4", "--patterns", "1", "--max_prompts", "4"]
    (tmp_path / "space.json").write_text(json.dumps({"lr_s1": [1e-3, 3e-4], "lr_s2": [1e-3], "gamma": [1.0]}))
    argv += [
        "--search",
        "random",
        "--n_trials",
        "2",
        "--max_parallel",
        "2",
        "--search_space",
        str(tmp_path / "space.json"),
    ]
    result = cellsam_train.main(cellsam_train.get_args_parser().parse_args(argv))
    folder = Path(result["output_dir"])
    assert folder == tmp_path / "cli_search" and result["trials"] == 2
    table = (folder / "search_results.csv").read_text().splitlines()
    assert len(table) == 3 and all(",finished," in row for row in table[1:])
    assert (folder / "best_config.json").is_file()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation, figures, Windows wrappers
# ----------------------------------------------------------------------------------------------------------------


def test_evaluate_rescored_from_its_label_images_and_figures(tmp_path, data):
    import tifffile

    from cellsam import evaluate as cellsam_evaluate
    from cellsam import visualize as cellsam_visualize
    from cellsam.data import read_mask
    from common.metrics import match_instances

    result = cellsam_train.ExperimentRunner(tiny_config(data, tmp_path, strategy="train_val_split")).run()
    root = Path(result["output_dir"])
    # the model evaluate.py rebuilds is the trained one, the untrained prompt encoder's random features included
    # (they were once left out, and evaluate.py scored F1 0.02 where training had scored 0.34)
    saved = torch.load(root / "models" / "fold_1" / "best_model_s2.pth", weights_only=True)["modules"]
    torch.manual_seed(12345)
    model, _ = cellsam_evaluate.load_fold(root, 1, "cpu")
    for name, value in model.mask_sam.prompt_encoder.state_dict().items():
        assert torch.equal(value, saved["prompt_encoder"][name]), name
    out = cellsam_evaluate.main(cellsam_evaluate.get_args_parser().parse_args([str(root)]))
    report = json.loads((out / "report.json").read_text())
    held_out = json.loads((root / "results" / "individual_results.json").read_text())[0]["val_images"]
    assert report["images"] == len(held_out) == 2 and sorted(p.stem for p in (out / "labels").iterdir()) == sorted(
        held_out
    )
    f1 = []
    for name in held_out:
        labels = tifffile.imread(out / "labels" / f"{name}.tif")
        f1.append(match_instances(read_mask(data / "masks" / f"{name}.png"), labels, 0.5).f1)
    assert report["f1"] == pytest.approx(np.nanmean(f1)) and 0 <= report["box_ap_50"] <= 1
    assert 0 < report["baseline_otsu_watershed"]["f1"] <= 1
    # no masks: label images only
    bare = cellsam_evaluate.main(
        cellsam_evaluate.get_args_parser().parse_args([str(root), "--images", str(data / "images")])
    )
    assert len(list((bare / "labels").glob("*.tif"))) == 6 and not (bare / "report.json").exists()
    figures = [cellsam_visualize.main(cellsam_visualize.get_args_parser().parse_args([kind, str(root), "--n", "1"]))
               for kind in ("boxes", "masks", "curves", "summary")]  # fmt: skip
    assert len(set(figures)) == 4 and all(p.is_file() and p.parent == root / "figures" for p in figures)


@pytest.mark.parametrize("name", ["train.bat", "evaluate.bat"])
def test_windows_wrappers_use_flags_that_exist(name):
    import shlex

    from cellsam import evaluate as cellsam_evaluate

    script = name.replace(".bat", ".py")
    lines = [line for line in (REPO / "cellsam" / name).read_text().splitlines() if f"cellsam\\{script}" in line]
    assert len(lines) == 1
    words = shlex.split(lines[0].split(f"cellsam\\{script}", 1)[1].replace("\\", "/"))
    words = [w for w in words if w != "%*"]
    parser = (cellsam_train if name == "train.bat" else cellsam_evaluate).get_args_parser()
    args = parser.parse_args(words)
    if name == "train.bat":
        config = cellsam_train.config_from_args(args)
        assert config.strategy == "k_fold" and config.k_folds == 5 and config.stage1.epochs == 50
    else:
        assert args.experiment == "%EXPERIMENT%" and args.fold == 1


def test_an_empty_mask_is_named(tmp_path, data):
    import shutil

    from PIL import Image

    shutil.copytree(data, tmp_path / "copy")
    Image.fromarray(np.zeros((128, 128), np.uint16)).save(tmp_path / "copy" / "masks" / "img_0003.png")
    with pytest.raises(SystemExit, match=r"img_0003.png: the mask holds no cell"):
        cellsam_train.ExperimentRunner(tiny_config(tmp_path / "copy", tmp_path / "out")).run()
    assert not (tmp_path / "out").exists()  # stopped before writing anything


def test_torchrun_two_cpu_processes(tmp_path, data):
    import os
    import subprocess
    import sys

    argv = ["--img_path", str(data / "images"), "--mask_path", str(data / "masks"), "--output_dir", str(tmp_path)]
    argv += ["--output_name", "ddp", "--sam_size", "vit_tiny", "--num_workers", "0", "--epochs_s1", "2"]
    argv += ["--epochs_s2", "1", "--hidden", "32", "--heads", "2", "--encoder_layers", "1", "--decoder_layers", "1"]
    argv += ["--anchor_grid", "4", "--patterns", "1", "--max_prompts", "4", "--train_parts", "both"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(REPO / "cellsam" / "train.py"), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]  # one experiment folder, made by the first process
    root = tmp_path / "ddp"
    assert "x 2 process(es)" in (root / "logs" / "experiment.log").read_text()
    history = json.loads((root / "metrics" / "stage1_metrics.json").read_text())["fold_1"]
    assert len(history) == 2 and all(np.isfinite(h["val"]["loss"]) for h in history)
    folds = json.loads((root / "results" / "individual_results.json").read_text())
    assert len(folds) == 1 and 0 <= folds[0]["metrics"]["f1"] <= 1


def test_demo_flag_writes_the_real_layout_and_keeps_given_flags(tmp_path, monkeypatch):
    """--demo --debug: synthetic images and masks in the folder layout users bring, the demo's settings where
    the command line gave none, the user's where it did."""
    argv = ["--demo", "--debug", "--output_dir", str(tmp_path), "--epochs_s2", "1", "--anchor_grid", "4"]
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    result = cellsam_train.main(cellsam_train.get_args_parser().parse_args(argv))
    root = Path(result["output_dir"])
    assert root == tmp_path / "cellsam_demo"
    images = sorted(p.name for p in (tmp_path / "demo_data" / "images").iterdir())
    masks = sorted(p.name for p in (tmp_path / "demo_data" / "masks").iterdir())
    assert images[0] == "img_0001.tif" and masks[0] == "img_0001.png" and len(images) == len(masks) == 12
    config = json.loads((root / "experiment_config.json").read_text())
    assert config["sam_size"] == "vit_tiny" and config["stage1"]["stage1_type"] == "image_encoder"  # the demo's
    assert config["stage1"]["anchor_grid"] == 4 and config["stage2"]["epochs"] == 1  # the user's
    assert json.loads((root / "results" / "aggregated_results.json").read_text())["folds"] == 1


def test_augmentation_keeps_the_images_intensities(data):
    """albumentations takes float images as 0..1; fed 0..255, its brightness/contrast clipped half the training
    images flat. Every augmented sample must keep cells brighter than background, within the 0..255 range."""
    from cellsam.data import CellDataset, find_pairs

    dataset = CellDataset(find_pairs(data / "images", data / "masks"), 128, augment=True, seed=0)
    plain = CellDataset(find_pairs(data / "images", data / "masks"), 128, augment=False, train=False)
    reference = np.mean([s["image"].max().item() for s in plain])
    for epoch in range(6):
        dataset.set_epoch(epoch)
        for sample in dataset:
            image, cells = sample["image"][0], sample["mask"] > 0
            assert 0 <= image.min() and image.max() <= 255
            assert image.max() > 0.6 * reference
            assert image[cells].mean() > 2 * image[~cells].mean() + 10
