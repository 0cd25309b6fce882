"""cellsam/train.py: each strategy on tiny data, the output tree exactly, resume, the Python API, the command
line, aggregation, bad inputs."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
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
    stage1 = Stage1Config(total_epochs=1, hidden=32, heads=2, encoder_layers=1, decoder_layers=2, anchor_grid=4,
                          patterns=1)  # fmt: skip
    stage2 = Stage2Config(total_epochs=1, max_prompts=4, train_parts=settings.pop("train_parts", "neck"))
    base = {"img_path": str(data / "images"), "mask_path": str(data / "masks"), "output_dir": str(out)}
    base.update({"sam_size": "vit_tiny", "batch_size": 2, "num_workers": 0, "output_name": "exp"})
    base.update(settings)
    return ExperimentConfig(**base, stage1_config=stage1, stage2_config=stage2)


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
    assert [(r["fold"], r["epoch"]) for r in stage1] == [(1, 1), (2, 1)] and np.isfinite(stage1[0]["train_giou"])
    config = json.loads((root / "experiment_config.json").read_text())
    assert config["strategy"] == "k_fold" and config["stage1_config"]["anchor_grid"] == 4
    figures = {f.split("/")[-1] for f in files if f.startswith("results/fold_1/visualizations/")}
    assert {"stage1_boxes.png", "stage2_masks.png", "loss_curves.png", "loss_components.png"} <= figures
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
    argv += ["--strategy", "full_dataset", "--total_epochs_s1", "1", "--total_epochs_s2", "1", "--sam_size", "vit_tiny"]
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


def test_search_space_settings_and_errors():
    from cellsam import HyperparameterSpace
    from cellsam.search import apply

    space = HyperparameterSpace(stage1_learning_rates=[1e-4, 1e-3], gammas=[1.0, 0.8, 1.2], augmentation_flags=[True],
                                extra={"dice_loss_weight": [1.0, 2.0]})  # fmt: skip
    choices = space.choices()
    assert choices["learning_rate_s1"] == [1e-4, 1e-3] and choices["focal_gamma_s2"] == [2.0, 3.0]
    assert space.size() == 2 * 2 * 2 * 3 * 1 * 2
    config = apply(ExperimentConfig(), {"learning_rate_s1": 1e-3, "focal_gamma_s2": 3.0, "gamma": 0.8,
                                        "dice_loss_weight": 2.0})  # fmt: skip
    s1, s2 = config.stage1_config, config.stage2_config
    assert (s1.learning_rate, s2.focal_gamma, s1.focal_gamma, config.gamma, s2.dice_loss_weight) == (
        1e-3, 3.0, 2.0, 0.8, 2.0)  # fmt: skip
    assert ExperimentConfig().stage1_config.learning_rate == 1e-4  # the base is not changed
    with pytest.raises(SystemExit, match="search space: learning_rate_s2 has no values"):
        HyperparameterSpace(stage2_learning_rates=[]).choices()
    with pytest.raises(SystemExit, match="search space: no setting named 'dice_weight'"):
        HyperparameterSpace(extra={"dice_weight": [1.0]}).choices()


def test_grid_search_runs_every_combination_once_and_records_a_failure(tmp_path, data):
    """A 2 x 2 grid on two worker processes: each combination exactly once; the trials with an impossible input
    gamma are recorded as failed with their error, the others finish, the best is kept."""
    import pandas as pd

    from cellsam import HyperparameterOptimizer, HyperparameterSpace

    space = HyperparameterSpace(stage1_learning_rates=[1e-3], stage2_learning_rates=[1e-3], focal_gammas=[2.0],
                                gammas=[1.0, -1.0], augmentation_flags=[False, True])  # fmt: skip
    base = tiny_config(data, tmp_path / "unused")
    table = HyperparameterOptimizer(base, space, tmp_path / "search", max_parallel=2).run_grid_search()
    combos = sorted(zip(table["gamma"], table["augmentation"], strict=True))
    assert combos == [(-1.0, False), (-1.0, True), (1.0, False), (1.0, True)]
    states = dict(zip(table["gamma"].astype(str) + table["augmentation"].astype(str), table["state"], strict=True))
    assert states == {"1.0False": "complete", "1.0True": "complete", "-1.0False": "fail", "-1.0True": "fail"}
    assert set(table.loc[table["state"] == "fail", "error"]) == {
        "SystemExit: --gamma -1.0: the input gamma correction must be positive"
    }
    rows = pd.read_csv(tmp_path / "search" / "search_results.csv")  # appended as each trial ended
    assert sorted(rows["trial"]) == [0, 1, 2, 3] and (rows["study"] == "cellsam_grid").all()
    saved = json.loads((tmp_path / "search" / "best_config.json").read_text())
    assert saved["values"]["gamma"] == 1.0 and saved["config"]["stage1_config"]["learning_rate"] == 1e-3
    assert (tmp_path / "search" / "search.db").is_file()
    finished = table.loc[table["state"] == "complete", "folder"]
    assert all((Path(f) / "results" / "aggregated_results.json").is_file() for f in finished)
    from cellsam import visualize as cellsam_visualize

    figure = cellsam_visualize.main(
        cellsam_visualize.get_args_parser().parse_args(["summary", str(tmp_path / "search")])
    )
    assert figure.is_file() and figure.parent == tmp_path / "search" / "figures"
    # the same grid again on the same folder: the study is complete, nothing runs twice
    again = HyperparameterOptimizer(base, space, tmp_path / "search", max_parallel=1).run_grid_search()
    assert len(again) == 4


def test_search_killed_and_resumed_from_the_command_line(tmp_path, data):
    """python cellsam/search.py killed after 2 of 4 random trials, in the third; the same command again resumes the
    SQLite study, runs the cut-off trial again and ends with 4 finished trials, in folders of their own."""
    import os
    import signal
    import subprocess
    import time

    import pandas as pd

    argv = ["--img_path", str(data / "images"), "--mask_path", str(data / "masks"), "--output_dir", str(tmp_path)]
    argv += ["--output_name", "cli", "--sam_size", "vit_tiny", "--num_workers", "0", "--total_epochs_s1", "1"]
    argv += ["--total_epochs_s2", "1", "--hidden", "32", "--heads", "2", "--encoder_layers", "1"]
    argv += ["--decoder_layers", "1", "--anchor_grid", "4", "--max_prompts", "4", "--no-figures"]
    space = {
        "stage1_learning_rates": [1e-3, 3e-4, 1e-4, 3e-5],
        "gammas": [1.0, 0.9, 1.1],
        "augmentation_flags": [False],
    }
    (tmp_path / "space.json").write_text(json.dumps(space))
    argv += ["--sampler", "random", "--n_trials", "4", "--search_space", str(tmp_path / "space.json")]
    command = [sys.executable, str(REPO / "cellsam" / "search.py"), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = tmp_path / "cli_search" / "search_results.csv"
    first = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        third = tmp_path / "cli_search" / "trials" / "random" / "trial_002"
        if results.is_file() and len(results.read_text().splitlines()) >= 3 and third.is_dir():
            break  # 2 trials finished (the header and 2 rows), the third under way
        time.sleep(0.2)
    assert first.poll() is None, first.stderr.read().decode()[-2000:]
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert len(pd.read_csv(results)) == 2
    again = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 of 4 trials finished" in again.stdout
    rows = pd.read_csv(results)
    complete = rows[rows["state"] == "complete"]
    assert len(complete) == 4 and complete["trial"].is_unique and complete["folder"].is_unique
    import optuna

    study = optuna.load_study(study_name="cellsam_random", storage=f"sqlite:///{tmp_path / 'cli_search' / 'search.db'}")
    cut_off = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert [t.number for t in cut_off] == [2] and "error" not in cut_off[0].user_attrs
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == 2]
    assert len(retried) == 1 and retried[0].params == cut_off[0].params and retried[0].state.name == "COMPLETE"
    assert all((Path(f) / "results" / "aggregated_results.json").is_file() for f in complete["folder"])


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
    # for Fiji / napari and QuPath: each label image's ids are the rows of its CSV and the features of its GeoJSON
    from shapely.geometry import shape

    from cellsam.evaluate import read_pixel_size

    for name in held_out:
        labels = tifffile.imread(out / "labels" / f"{name}.tif")
        ids = np.unique(labels[labels > 0]).tolist()
        assert pd.read_csv(out / "cells" / f"{name}.csv")["cell_id"].tolist() == ids
        features = json.loads((out / "geojson" / f"{name}.geojson").read_text())["features"]
        assert [f["properties"]["label_id"] for f in features] == ids
        assert all(shape(f["geometry"]).is_valid and shape(f["geometry"]).area > 0 for f in features)
    assert read_pixel_size(out / "labels" / f"{held_out[0]}.tif") is None  # PNG images: no pixel size to keep
    scaled = cellsam_evaluate.main(cellsam_evaluate.get_args_parser().parse_args(
        [str(root), "--images", str(data / "images"), "--pixel_size", "0.65"]))  # fmt: skip
    one = sorted((scaled / "labels").glob("*.tif"))[0]
    assert read_pixel_size(one) == pytest.approx(0.65, rel=1e-5)
    assert "area_um2" in pd.read_csv(scaled / "cells" / f"{one.stem}.csv").columns
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
        assert config.strategy == "k_fold" and config.k_folds == 5 and config.stage1_config.total_epochs == 50
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
    argv += ["--output_name", "ddp", "--sam_size", "vit_tiny", "--num_workers", "0", "--total_epochs_s1", "2"]
    argv += [
        "--total_epochs_s2",
        "1",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--encoder_layers",
        "1",
        "--decoder_layers",
        "1",
    ]
    argv += ["--anchor_grid", "4", "--patterns", "1", "--max_prompts", "4", "--train_parts", "both"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(REPO / "cellsam" / "train.py"), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]  # one experiment folder, made by the first process
    root = tmp_path / "ddp"
    assert "x 2 process(es)" in (root / "logs" / "experiment.log").read_text()
    history = json.loads((root / "metrics" / "stage1_metrics.json").read_text())
    assert len(history) == 2 and all(np.isfinite(h["val_loss"]) for h in history)
    folds = json.loads((root / "results" / "individual_results.json").read_text())
    assert len(folds) == 1 and 0 <= folds[0]["metrics"]["f1"] <= 1


def test_demo_flag_writes_the_real_layout_and_keeps_given_flags(tmp_path, monkeypatch):
    """--demo --debug: synthetic images and masks in the folder layout users bring, the demo's settings where
    the command line gave none, the user's where it did."""
    argv = ["--demo", "--debug", "--output_dir", str(tmp_path), "--total_epochs_s1", "2", "--total_epochs_s2", "1"]
    argv += ["--anchor_grid", "4"]
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    result = cellsam_train.main(cellsam_train.get_args_parser().parse_args(argv))
    root = Path(result["output_dir"])
    assert root == tmp_path / "cellsam_demo"
    images = sorted(p.name for p in (tmp_path / "demo_data" / "images").iterdir())
    masks = sorted(p.name for p in (tmp_path / "demo_data" / "masks").iterdir())
    assert images[0] == "img_0001.tif" and masks[0] == "img_0001.png" and len(images) == len(masks) == 12
    config = json.loads((root / "experiment_config.json").read_text())
    assert config["sam_size"] == "vit_tiny" and config["stage1_config"]["stage1_type"] == "image_encoder"  # the demo's
    assert config["stage1_config"]["anchor_grid"] == 4 and config["stage2_config"]["total_epochs"] == 1  # the user's
    assert config["test_img_path"] == str(tmp_path / "demo_data" / "test" / "images")
    log = (root / "logs" / "experiment.log").read_text()
    assert "stage 1 epoch 2 step 1/" in log and "process memory" in log  # --debug: every step, with memory
    assert "on the test images" in log
    figures = {p.name for p in (root / "results" / "fold_1" / "visualizations").iterdir()}
    assert {"stage1_boxes_epoch_001.png", "stage1_boxes_epoch_002.png", "stage2_masks_epoch_001.png"} <= figures
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


def test_the_demo_learns_and_beats_otsu_watershed_on_test_images(tmp_path):
    """The demo's settings on fewer synthetic fields (real-looking fluorescence: uneven illumination, brightness
    varying six-fold, touching cells without a gap, out-of-focus cells, shot and read noise) and fewer epochs:
    on test images that took no part in training or model choice, the pipeline's F1 at IoU 0.5 beats Otsu +
    watershed, and each stage learned: CellFinder's box AP50 and SAM's mask IoU from the true boxes are above
    those of the same model untrained."""
    from cellsam.data import boxes_from_mask, find_pairs
    from cellsam.evaluate import box_average_precision, load_fold
    from cellsam.model import detect_tiled

    data = write_demo_dataset(tmp_path / "data", n_images=8, n_test=4)
    config = ExperimentConfig(img_path=str(data / "images"), mask_path=str(data / "masks"), output_dir=str(tmp_path),
                              test_img_path=str(data / "test" / "images"), test_mask_path=str(data / "test" / "masks"),
                              figures=False)  # fmt: skip
    cellsam_train.apply_demo_settings(config)
    config.stage1_config.total_epochs, config.stage2_config.total_epochs = 25, 6
    result = cellsam_train.ExperimentRunner(config).run()
    test = json.loads((Path(result["output_dir"]) / "results" / "individual_results.json").read_text())[0]
    test = test["test_metrics"]
    assert test["images"] == ["img_0001", "img_0002", "img_0003", "img_0004"]

    trained, run_config = load_fold(Path(result["output_dir"]), 1, "cpu")
    torch.manual_seed(run_config.seed + 1)  # fold 1's initial weights
    untrained = cellsam_train.build_model(run_config).eval()
    pairs = find_pairs(data / "test" / "images", data / "test" / "masks")

    def stage_scores(model) -> tuple[float, float]:
        detections, ious = [], []
        for pair in pairs:
            image, truth = cellsam_train.read_pair(pair, 1.0, model.read_image)
            true_boxes = boxes_from_mask(truth)[1]
            boxes, scores = detect_tiled(model, image)
            detections.append((boxes, scores, torch.from_numpy(true_boxes)))
            masks = cellsam_train.true_box_masks(model, image, true_boxes, "cpu")
            for cell, mask in zip(np.unique(truth)[1:], masks, strict=True):
                ious.append(((truth == cell) & mask).sum() / ((truth == cell) | mask).sum())
        return box_average_precision(detections, 0.5), float(np.mean(ious))

    (ap_trained, iou_trained), (ap_untrained, iou_untrained) = stage_scores(trained), stage_scores(untrained)
    print(
        f"test F1 {test['f1']:.3f}, Otsu + watershed {test['baseline_otsu_watershed']['f1']:.3f}; box AP50 "
        f"{ap_trained:.3f} (untrained {ap_untrained:.3f}); mask IoU {iou_trained:.3f} (untrained {iou_untrained:.3f})"
    )
    assert test["f1"] > test["baseline_otsu_watershed"]["f1"] + 0.02, test
    assert ap_trained > ap_untrained + 0.2 and ap_trained > 0.3, (ap_trained, ap_untrained)
    assert iou_trained > iou_untrained + 0.15 and iou_trained > 0.5, (iou_trained, iou_untrained)


def test_median_pruning_stops_trials_whose_validation_loss_lags(tmp_path, data, monkeypatch):
    """--prune: each epoch's validation loss reaches Optuna's median pruner; a trial worse than the median of the
    earlier ones at the same epoch stops there and is recorded as pruned (training replaced by a stand-in whose
    loss is its stage-1 learning rate)."""
    import pandas as pd

    from cellsam import HyperparameterOptimizer, HyperparameterSpace, search

    epochs_run = []

    class StandIn:
        def __init__(self, config, root, on_epoch):
            self.config, self.on_epoch = config, on_epoch

        def run(self):
            lr = self.config.stage1_config.learning_rate
            for epoch in range(1, 6):
                epochs_run.append(lr)
                self.on_epoch(1, 1, epoch, lr)  # a larger learning rate: a larger loss at every epoch
            return {"metrics": {"f1": {"mean": 1 - lr}}}

    monkeypatch.setattr(
        search, "ExperimentRunner", lambda config, root=None, on_epoch=None: StandIn(config, root, on_epoch)
    )
    space = HyperparameterSpace(stage1_learning_rates=[0.1, 0.2, 0.3, 0.4, 0.9], stage2_learning_rates=[1e-4],
                                focal_gammas=[2.0], gammas=[1.0], augmentation_flags=[False])  # fmt: skip
    base = tiny_config(data, tmp_path / "unused")
    optimizer = HyperparameterOptimizer(base, space, tmp_path / "search", prune=True)
    table = optimizer.run_grid_search()  # the seeded grid order runs 0.9 last, after the pruner's 4 startup trials
    states = dict(zip(table["learning_rate_s1"], table["state"], strict=True))
    assert states == {0.1: "complete", 0.2: "complete", 0.3: "complete", 0.4: "complete", 0.9: "pruned"}
    assert epochs_run.count(0.9) == 3  # stopped at the first epoch after the pruner's warm-up
    assert (pd.read_csv(tmp_path / "search" / "search_results.csv")["state"] == "pruned").sum() == 1


def test_a_grid_point_given_to_two_workers_runs_once():
    """GridSampler can hand the same last point to two workers that ask at once; the later trial stands down."""
    import optuna

    from cellsam.search import count_started, grid_point_taken, trials_before

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study()
    first, second = study.ask(), study.ask()
    for trial in (first, second):
        study._storage.set_trial_system_attr(trial._trial_id, "grid_id", 0)
    assert not grid_point_taken(study, first.number) and grid_point_taken(study, second.number)
    second.set_user_attr("duplicate", True)
    study.tell(second, state=optuna.trial.TrialState.PRUNED)
    assert count_started(study) == 1  # the stood-down trial does not count towards n_trials
    study.tell(first, state=optuna.trial.TrialState.FAIL)  # cut off by a kill (no error): the point runs again
    third = study.ask()
    study._storage.set_trial_system_attr(third._trial_id, "grid_id", 0)
    assert not grid_point_taken(study, third.number)
    assert trials_before(study, third.number) == 0  # neither the stood-down nor the cut-off trial counts
    extra = study.ask()  # a worker asked for one more while `third` ran: with n_trials 1 it stands down
    assert trials_before(study, extra.number) == 1
