"""pannuke/: data loading, targets, post-processing, the training loop (both recipes, resume, torchrun),
evaluation, figures, Windows wrappers and bad inputs, on tiny synthetic folds."""

import argparse
import json
import os
import shlex
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from common.metrics import pannuke_panoptic_quality
from pannuke import evaluate as pannuke_evaluate
from pannuke import train as pannuke_train
from pannuke import visualize as pannuke_visualize
from pannuke.data import (
    NpyRows,
    distance_target,
    find_fold,
    load_fold,
    normalize_image,
    open_fold,
    semantic_and_instances,
    synthetic_tile,
    write_demo_dataset,
)
from pannuke.model import AttentionUNet, instances_from_outputs, pannuke_masks, predict, predict_tiled

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--encoder",
    "resnet18",
    "--encoder_weights",
    "none",
    "--image_size",
    "64",
    "--batch_size",
    "4",
    "--num_workers",
    "0",
    "--epochs",
    "1",
    "--no-tta",  # validation on each tile once; sota_run validates with TTA
]


def train(tmp_path: Path, data: Path, *extra: str) -> Path:
    argv = ["--data_dir", str(data), "--output_dir", str(tmp_path / "runs"), *TINY, *extra]
    return pannuke_train.main(pannuke_train.parse_args(argv))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("pannuke") / "data", tiles=(12, 6, 6))


@pytest.fixture(scope="module")
def sota_run(tmp_path_factory, data) -> Path:
    tmp = tmp_path_factory.mktemp("sota")
    return train(tmp, data, "--use_swa", "--swa_start_epoch", "1", "--mixup_prob", "1", "--tta")


RESUMED = ["--epochs", "2", "--mixup_prob", "1", "--seed", "7"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, data) -> Path:
    """Two epochs without a break, for the resume test to repeat (with either worker count)."""
    return train(tmp_path_factory.mktemp("full"), data, *RESUMED, "--num_workers", "0")


# ----------------------------------------------------------------------------------------------------------------
# Data and targets
# ----------------------------------------------------------------------------------------------------------------


def test_semantic_target_and_merged_instances_follow_pannuke():
    masks = np.zeros((8, 8, 6))
    masks[1:3, 1:3, 0] = 7  # Neoplastic id 7
    masks[2:4, 2:4, 2] = 7  # Connective id 7: same id in another channel, overlaps at (2, 2)
    masks[5:7, 5:7, 4] = 3  # Epithelial
    masks[..., 5] = (masks[..., :5].sum(-1) == 0).astype(float)
    semantic, instances = semantic_and_instances(masks)
    assert semantic[1, 1] == 1 and semantic[3, 3] == 3 and semantic[5, 5] == 5 and semantic[0, 0] == 0
    assert semantic[2, 2] == 3  # a later channel wins, as PanNuke-metrics' binarize
    assert len(np.unique(instances)) == 4  # background + three nuclei with distinct ids
    assert instances[1, 1] != instances[3, 3]


def test_a_tile_without_background_keeps_all_its_nuclei():
    masks = np.zeros((4, 4, 6))
    masks[:, :2, 0], masks[:, 2:, 1] = 5, 9
    semantic, instances = semantic_and_instances(masks)
    assert sorted(np.unique(instances).tolist()) == [1, 2]
    assert (semantic[:, :2] == 1).all() and (semantic[:, 2:] == 2).all()


def test_progressive_crops_and_augmentation_stages():
    args = argparse.Namespace(epochs=10, image_size=256, progressive_resize=True, progressive_aug=True)
    assert [pannuke_train.crop_size_for(e, args) for e in (0, 4, 5, 9)] == [128, 128, 256, 256]
    assert [pannuke_train.aug_stage_for(e, args) for e in (0, 2, 3, 5, 8, 9)] == [0, 0, 1, 2, 3, 3]
    args.progressive_resize = args.progressive_aug = False
    assert pannuke_train.crop_size_for(0, args) == 256 and pannuke_train.aug_stage_for(0, args) == 3


def test_distance_target_peaks_at_centres_and_separates_touching_nuclei():
    instances = np.zeros((9, 14), np.int32)
    instances[2:7, 2:7] = 1
    instances[2:7, 7:12] = 2  # touches nucleus 1
    target = distance_target(instances)
    assert target[0, 0] == 0 and target.max() == pytest.approx(1.0)
    assert target[4, 4] == pytest.approx(1.0) and target[4, 9] == pytest.approx(1.0)
    assert target[4, 6] < 0.5 and target[4, 7] < 0.5  # the shared border is low: two peaks
    assert target[2, 2] == pytest.approx(1 / 3)  # edge pixel: distance 1 of maximum 3


def test_both_layouts_load_and_float64_tiles_match_uint8(tmp_path):
    rng = np.random.default_rng(1)
    tiles = [synthetic_tile(rng, 64) for _ in range(3)]
    images = np.stack([t[0] for t in tiles])
    flat = tmp_path / "flat" / "fold1"
    flat.mkdir(parents=True)
    np.save(flat / "images.npy", images.astype(np.float64))  # PanNuke's float64 holding 0..255
    np.save(flat / "masks.npy", np.stack([t[1] for t in tiles]).astype(np.float64))
    np.save(flat / "types.npy", np.array(["Breast", "Colon", "Lung"]))
    official = write_demo_dataset(tmp_path / "official", tiles=(3, 2, 2), size=64, seed=5)
    assert find_fold(official, 1).images == official / "Fold 1" / "images" / "fold1" / "images.npy"
    fold = load_fold(tmp_path / "flat", 1, tmp_path / "cache")
    assert fold.images.dtype == np.uint8 and fold.images.shape == (3, 64, 64, 3)
    flat8 = tmp_path / "flat8" / "fold1"
    flat8.mkdir(parents=True)
    for name in ("masks", "types"):
        (flat8 / f"{name}.npy").write_bytes((flat / f"{name}.npy").read_bytes())
    np.save(flat8 / "images.npy", images)
    fold8 = load_fold(tmp_path / "flat8", 1, tmp_path / "cache")
    np.testing.assert_array_equal(fold.images, fold8.images)
    np.testing.assert_array_equal(fold.semantic, fold8.semantic)
    assert isinstance(open_fold(find_fold(tmp_path / "flat", 1))[0], np.memmap)  # never loaded whole


# ----------------------------------------------------------------------------------------------------------------
# Model and post-processing
# ----------------------------------------------------------------------------------------------------------------


def test_instances_split_touching_nuclei_and_take_majority_class():
    yy, xx = np.mgrid[:40, :60]
    disc_a = (yy - 20) ** 2 + (xx - 20) ** 2 <= 81
    disc_b = (yy - 20) ** 2 + (xx - 36) ** 2 <= 81  # overlaps disc_a: one blob in the foreground
    probs = np.zeros((6, 40, 60), np.float32)
    probs[0] = 1
    probs[:, disc_a | disc_b] = 0
    probs[1, disc_a] = 1  # Neoplastic
    probs[5, disc_b & ~disc_a] = 1  # Epithelial
    probs[5, disc_b & disc_a & (xx > 28)] = 1
    probs[1, disc_b & disc_a & (xx > 28)] = 0
    dist = np.maximum(
        np.clip(1 - np.sqrt((yy - 20) ** 2 + (xx - 20) ** 2) / 9, 0, 1),
        np.clip(1 - np.sqrt((yy - 20) ** 2 + (xx - 36) ** 2) / 9, 0, 1),
    ).astype(np.float32)
    instances, classes = instances_from_outputs(probs, dist)
    assert instances.max() == 2
    assert sorted(classes.tolist()) == [1, 5]
    assert instances[20, 20] != instances[20, 36]
    masks = pannuke_masks(instances, classes)
    assert masks.shape == (40, 60, 6)
    assert (masks[..., 0] > 0).sum() == (instances == instances[20, 20]).sum()
    assert masks[0, 0, 5] == 1 and masks[20, 20, 5] == 0


def test_instances_on_a_tile_without_background_and_around_a_lumen():
    probs = np.zeros((6, 20, 20), np.float32)
    probs[2, :, :10] = 1  # the whole tile is nucleus: two nuclei, no background pixel
    probs[3, :, 10:] = 1
    dist = np.zeros((20, 20), np.float32)
    dist[8:12, 3:7], dist[8:12, 13:17] = 1, 1
    instances, classes = instances_from_outputs(probs, dist)
    assert instances.min() == 1 and instances.max() == 2 and sorted(classes.tolist()) == [2, 3]

    yy, xx = np.mgrid[:60, :60]
    radius = np.sqrt((yy - 30) ** 2 + (xx - 30) ** 2)
    ring = (radius > 18) & (radius < 24)  # nuclei around a gland lumen of about 1,000 px
    probs = np.zeros((6, 60, 60), np.float32)
    probs[0], probs[5] = ~ring, ring
    instances, classes = instances_from_outputs(probs, np.where(ring, 1.0, 0.0).astype(np.float32))
    assert instances[30, 30] == 0 and (instances > 0).sum() == ring.sum()  # the lumen is not filled
    assert set(classes.tolist()) == {5}
    disc = radius < 8
    pale = disc & (radius < 2)  # a nucleus with a pale centre of 13 px: filled
    probs = np.zeros((6, 60, 60), np.float32)
    probs[0], probs[1] = ~(disc & ~pale), disc & ~pale
    instances, classes = instances_from_outputs(probs, np.where(disc, 1.0, 0.0).astype(np.float32))
    assert (instances > 0).sum() == disc.sum() and classes.tolist() == [1]


def test_fold_pickles_as_paths_for_spawned_workers(data, tmp_path):
    import pickle

    fold = load_fold(data, 1, tmp_path / "cache")
    assert fold.images.shape[0] == 12  # opened
    copy = pickle.loads(pickle.dumps(fold))
    assert len(pickle.dumps(fold)) < 20_000  # the arrays (2.4 MB of images) stay on disk
    np.testing.assert_array_equal(copy.instances[3], fold.instances[3])


def test_npy_rows_reads_what_numpy_reads_without_a_memory_map(tmp_path):
    """Tiles come from plain file reads (the process's resident memory stays flat, benchmarks/RESULTS.md); every
    kind of index reads what np.load does, in both .npy header versions; a cut file and Fortran order are named."""
    import pickle

    array = np.random.default_rng(0).integers(-(2**30), 2**30, (7, 5, 4, 3)).astype(np.int32)
    np.save(tmp_path / "a.npy", array)
    with open(tmp_path / "v2.npy", "wb") as f:  # version 2.0 header
        np.lib.format.write_array(f, array, version=(2, 0))
    for path in (tmp_path / "a.npy", tmp_path / "v2.npy"):
        rows = NpyRows(path)
        assert rows.shape == array.shape and rows.dtype == array.dtype and len(rows) == 7
        np.testing.assert_array_equal(rows[3], array[3])
        np.testing.assert_array_equal(rows[-1], array[-1])
        np.testing.assert_array_equal(rows[2:5], array[2:5])
        np.testing.assert_array_equal(rows[5:], array[5:])
        np.testing.assert_array_equal(rows[::2], array[::2])
        np.testing.assert_array_equal(np.asarray(rows), array)
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(rows))[6], array[6])
        with pytest.raises(IndexError):
            rows[7]
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[: len(data) - 10])
    with pytest.raises(SystemExit, match=r"cut.npy: the file ends before row 7 of 7"):
        NpyRows(tmp_path / "cut.npy")[4:]
    np.save(tmp_path / "fortran.npy", np.asfortranarray(array))
    with pytest.raises(SystemExit, match=r"fortran.npy: expected a C-ordered numeric array"):
        NpyRows(tmp_path / "fortran.npy")


class Pointwise(torch.nn.Module):
    """A per-pixel model: tiled prediction must equal whole-image prediction exactly (up to float error)."""

    def __init__(self):
        super().__init__()
        self.seg, self.dist = torch.nn.Conv2d(3, 6, 1), torch.nn.Conv2d(3, 1, 1)

    def forward(self, x):
        return {"seg": self.seg(x), "dist": self.dist(x)}


def test_tiled_prediction_blends_to_the_whole_image_prediction():
    torch.manual_seed(0)
    model, image = Pointwise().eval(), torch.randn(1, 3, 150, 333)
    probs, dist = predict(model, image)
    tiled_probs, tiled_dist = predict_tiled(model, image, tile=64, overlap=16, zscore_tiles=False)
    assert tiled_probs.shape == (1, 6, 150, 333)
    torch.testing.assert_close(tiled_probs, probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiled_dist, dist, atol=1e-5, rtol=1e-5)
    tta_probs, _ = predict(model, image, tta=True)
    # zscore_tiles: each tile normalised as a training tile is (pannuke/data.py normalize_image)
    rgb = np.random.default_rng(0).integers(0, 256, (256, 256, 3)).astype(np.uint8)
    tiled, _ = predict_tiled(model, torch.from_numpy(rgb).permute(2, 0, 1)[None].float(), tile=256)
    direct, _ = predict(model, torch.from_numpy(normalize_image(rgb))[None])
    torch.testing.assert_close(tiled, direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tta_probs, probs, atol=1e-5, rtol=1e-5)  # flips commute with a pointwise model


def test_encoder_weights_from_a_file_and_a_clear_offline_message(tmp_path, monkeypatch):
    import torchvision

    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = AttentionUNet("resnet18", encoder_weights=str(tmp_path / "resnet18.pth"))
    torch.testing.assert_close(model.stem[0].weight, reference.conv1.weight)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(SystemExit, match="--encoder_weights none"):
        AttentionUNet("resnet18", encoder_weights="imagenet")
    with pytest.raises(SystemExit, match="no such file"):
        AttentionUNet("resnet18", encoder_weights=str(tmp_path / "missing.pth"))


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def test_sota_epoch_writes_a_complete_run(sota_run):
    for name in (
        "config.json",
        "last.pth",
        "best.pth",
        "swa.pth",
        "training_history.json",
        "train.log",
        "curves.png",
        "final_report.json",
    ):
        assert (sota_run / name).is_file(), name
    history = json.loads((sota_run / "training_history.json").read_text())
    assert len(history) == 1
    assert set(history[0]["train"]) == {"loss", "dice", "focal", "boundary", "dist"}
    assert np.isfinite(history[0]["train"]["loss"])
    last = torch.load(sota_run / "last.pth", weights_only=True)
    assert last["domain"] == "pannuke" and last["epoch"] == 1 and last["ema"] is not None
    assert last["args"]["optimizer"] == "adamw" and last["args"]["scheduler"] == "onecycle"
    best = torch.load(sota_run / "best.pth", weights_only=True)
    # best.pth holds the EMA weights that were validated
    ema_weights = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    torch.testing.assert_close(best["model"]["seg_head.weight"], ema_weights["seg_head.weight"])
    assert json.loads((sota_run / "config.json").read_text())["recipe"] == "sota"

    # TensorBoard: every loss term, the learning rate, every validation metric and prediction strips, as logged
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(sota_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    record = history[0]
    expected = {f"train/{name}": value for name, value in record["train"].items()}
    expected["lr"] = record["lr"]
    expected |= {f"val/{name}": record["val"][name] for name in ("loss", "mean_dice", "fg_mean_dice")}
    expected |= {f"val/dice_{name}": value for name, value in record["val"]["dice"].items()}
    assert set(ea.Tags()["scalars"]) == set(expected)
    for tag, value in expected.items():
        (event,) = ea.Scalars(tag)
        assert event.step == 1 and event.value == pytest.approx(value, rel=1e-6, abs=1e-12), tag
    (image,) = ea.Images("val/image_truth_prediction")
    assert (image.height, image.width) == (256, 3 * 3 * 256)  # three tiles, each image | truth | prediction


def test_backup_recipe_epoch(tmp_path, data):
    run = train(tmp_path, data, "--recipe", "backup")
    last = torch.load(run / "last.pth", weights_only=True)
    assert last["args"]["optimizer"] == "adam" and last["args"]["loss"] == "weighted_dice"
    assert last["ema"] is None and last["args"]["use_mixed_precision"] is False
    assert last["args"]["mixup_alpha"] == 0.0
    history = json.loads((run / "training_history.json").read_text())
    assert set(history[0]["train"]) == {"loss", "dice", "dist"}
    assert "optimizer" in last and "_milestones" in last["scheduler"]  # warm-up then cosine


def test_demo_learns_then_evaluate_and_visualize_need_only_the_run_folder(tmp_path, monkeypatch):
    """The README's main job: `--demo` (its real settings; augmentations are seeded per tile, so loading in this
    process changes no number), then the two other scripts given only the run folder.
    In this process, so the three scripts' imports are paid once; test_torchrun_two_cpu_processes runs train.py as
    a script, and tests/test_domains.py a copied folder's."""
    monkeypatch.chdir(tmp_path)
    pannuke_train.main(pannuke_train.parse_args(["--demo", "--num_workers", "0"]))  # same numbers, 20% sooner here
    (run,) = (tmp_path / "runs" / "pannuke").glob("*_sota")
    history = json.loads((run / "training_history.json").read_text())
    config = json.loads((run / "config.json").read_text())
    fold = load_fold(config["data_dir"], config["val_fold"], config["cache_dir"])
    frequency = fold.class_pixels / fold.class_pixels.sum()
    chance = float(frequency[1:].mean())  # Dice of guessing each pixel's class from the class frequencies
    best = max(h["val"]["fg_mean_dice"] for h in history)
    assert best > max(0.25, 10 * chance), (best, chance)  # measured: 0.37 against a chance level of 0.01

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # not the folder the run was started from
    pannuke_evaluate.main(pannuke_evaluate.parse_args([str(run)]))
    (report,) = run.glob("evaluation/*_fold3/evaluation_report.json")
    assert json.loads(report.read_text())["bpq"] > 0.2  # measured: 0.39
    pannuke_visualize.main(pannuke_visualize.parse_args([str(run)]))  # `visualize.py RUN` draws its predictions
    assert list((run / "figures").glob("predictions_fold3_*.png"))


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_after_interruption_repeats_the_next_epoch_exactly(
    tmp_path, data, two_epochs, monkeypatch, capsys, workers
):
    """Killed in its second epoch and resumed, a run ends as the run without a break (with 0 or 1 loader workers:
    augmentations are seeded per tile, so the worker count does not change them)."""
    extra = [*RESUMED, "--num_workers", str(workers)]
    full = two_epochs
    expected = json.loads((full / "training_history.json").read_text())

    original, calls = pannuke_train.train_one_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second epoch
        return original(*args, **kwargs)

    monkeypatch.setattr(pannuke_train, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", data, *extra)
    monkeypatch.setattr(pannuke_train, "train_one_epoch", original)
    (cut,) = (tmp_path / "cut" / "runs").glob("*_sota")
    assert len(json.loads((cut / "training_history.json").read_text())) == 1
    pannuke_train.main(pannuke_train.parse_args(["--resume", str(cut), "--num_workers", str(workers)]))
    resumed = json.loads((cut / "training_history.json").read_text())
    assert len(resumed) == 2
    assert resumed[1]["train"]["loss"] == pytest.approx(expected[1]["train"]["loss"], rel=1e-6)
    assert resumed[1]["val"]["fg_mean_dice"] == pytest.approx(expected[1]["val"]["fg_mean_dice"], rel=1e-6)
    last, full_last = (torch.load(r / "last.pth", weights_only=True) for r in (cut, full))
    assert (last["best"], last["patience"]) == (full_last["best"], full_last["patience"])
    best_mtime = (cut / "best.pth").stat().st_mtime_ns
    capsys.readouterr()
    pannuke_train.main(pannuke_train.parse_args(["--resume", str(cut), "--lr", "0.5"]))  # finished: no-op
    assert "ignoring --lr" in capsys.readouterr().out  # the stored settings win, and the user is told
    assert json.loads((cut / "training_history.json").read_text()) == resumed
    assert (cut / "best.pth").stat().st_mtime_ns == best_mtime


def test_torchrun_two_cpu_processes(tmp_path, data):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "pannuke" / "train.py"),
        "--data_dir",
        str(data),
        "--output_dir",
        str(tmp_path / "runs"),
        *TINY,
        "--batch_size",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "runs").glob("*_sota"))
    assert len(runs) == 1  # only rank 0 writes
    history = json.loads((runs[0] / "training_history.json").read_text())
    assert len(history) == 1 and np.isfinite(history[0]["train"]["loss"])
    assert history[0]["val"]["pixels"] == 6 * 256 * 256  # both ranks' halves of the validation fold, no padding
    assert "2 process(es)" in (runs[0] / "train.log").read_text()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and figures
# ----------------------------------------------------------------------------------------------------------------


def test_saved_masks_rescored_by_common_metrics_equal_the_report(sota_run, data, monkeypatch):
    """With a model that predicts the ground truth, PQ is near 1; the saved masks.npy re-scored by
    common.metrics from the files on disk gives the numbers of the report."""
    files = find_fold(data, 3)
    fold = load_fold(data, 3, json.loads((sota_run / "config.json").read_text())["cache_dir"])

    def oracle(model, images, tta=False, ctx=None):
        # the loader is not shuffled: batches come in fold order
        start = oracle.seen
        oracle.seen += len(images)
        semantic = torch.from_numpy(np.array(fold.semantic[start : oracle.seen])).long()
        probs = torch.nn.functional.one_hot(semantic, 6).permute(0, 3, 1, 2).float()
        dist = np.stack([distance_target(np.asarray(fold.instances[i])) for i in range(start, oracle.seen)])
        return probs, torch.from_numpy(dist)[:, None]

    oracle.seen = 0
    monkeypatch.setattr(pannuke_evaluate, "predict", oracle)
    out = pannuke_evaluate.main(pannuke_evaluate.parse_args([str(sota_run), "--save_predictions"]))
    report = json.loads((out / "evaluation_report.json").read_text())
    assert report["fold"] == 3 and report["tiles"] == 6 and Path(report["predictions"]) == out / "masks.npy"
    assert report["fg_mean_dice"] == pytest.approx(1.0) and report["binary_dice"] == pytest.approx(1.0)
    assert report["bpq"] > 0.85 and report["mpq"] > 0.85 and report["aji"] > 0.85  # the decoder loses a little
    predicted = np.load(out / "masks.npy")
    assert predicted.shape == (6, 256, 256, 6)
    assert ((predicted[..., :5] > 0).any(-1) == (predicted[..., 5] == 0)).all()  # channel 5 is background
    rescored = pannuke_panoptic_quality(np.load(files.masks), predicted, np.load(files.types))
    for key in ("mpq", "bpq"):
        assert rescored[key] == pytest.approx(report[key])
    for name, value in rescored["pq_per_class"].items():
        assert value == pytest.approx(report["pq_per_class"][name], nan_ok=True)
    assert (out / "per_tissue.csv").read_text().startswith("tissue,tiles,mpq,bpq,aji")


def test_evaluate_segments_a_folder_of_images_of_any_size(sota_run, tmp_path):
    import cv2
    import tifffile

    images = tmp_path / "slides"
    images.mkdir()
    rng = np.random.default_rng(0)
    tile, _ = synthetic_tile(rng, 256)
    cv2.imwrite(str(images / "wide.png"), np.concatenate([tile, tile], 1)[:200, :300, ::-1])
    tifffile.imwrite(images / "small.tif", tile[:100, :120])
    out = pannuke_evaluate.main(pannuke_evaluate.parse_args([str(sota_run), "--images", str(images)]))
    assert tifffile.imread(out / "wide_instances.tif").shape == (200, 300)
    assert cv2.imread(str(out / "small_overlay.png")).shape == (100, 120, 3)
    assert (out / "nuclei.csv").read_text().splitlines()[0].startswith("image,nuclei,Neoplastic")
    (images / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="broken.png"):
        pannuke_evaluate.main(pannuke_evaluate.parse_args([str(sota_run), "--images", str(images)]))


def test_visualize_predictions_dataset_and_compare(sota_run, tmp_path):
    parse = pannuke_visualize.parse_args
    figure = pannuke_visualize.main(parse(["predictions", "--runs_dir", str(sota_run.parent), "--n", "2"]))
    assert figure.parent == sota_run / "figures" and figure.stat().st_size > 10_000
    assert pannuke_visualize.main(parse(["dataset", str(sota_run)])).is_file()
    figure = pannuke_visualize.main(parse(["compare", str(sota_run), str(sota_run), "--output_dir", str(tmp_path)]))
    again = pannuke_visualize.main(parse(["compare", str(sota_run), "--output_dir", str(tmp_path)]))
    assert figure.is_file() and again.parent != figure.parent  # a second comparison never overwrites the first
    assert "best_fg_mean_dice" in (figure.parent / "compare_table.csv").read_text()


# ----------------------------------------------------------------------------------------------------------------
# Windows wrappers and bad input
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["train.bat", "train_advanced.bat", "train_backup.bat", "demo.bat"])
def test_windows_wrappers_use_flags_that_exist(name):
    lines = [line for line in (REPO / "pannuke" / name).read_text().splitlines() if "pannuke\\train.py" in line]
    assert len(lines) == 1
    words = shlex.split(lines[0].split("pannuke\\train.py", 1)[1])
    words = [w for w in words if w != "%*"]
    words = [w.replace("%DATA%", "data") for w in words]
    args = pannuke_train.parse_args(words)  # exits on an unknown flag
    assert args.data_dir or args.demo


def test_bad_inputs_give_clear_errors_and_touch_no_earlier_run(tmp_path, data, sota_run):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in sota_run.iterdir())
    runs_before = sorted(p.name for p in sota_run.parent.iterdir())

    def fold_copy(name: str) -> Path:
        root = tmp_path / name
        for fold in (1, 2, 3):
            files = find_fold(data, fold)
            target = root / f"fold{fold}"
            target.mkdir(parents=True)
            for kind in ("images", "masks", "types"):
                (target / f"{kind}.npy").write_bytes(getattr(files, kind).read_bytes())
        return root

    def run(*argv):
        return pannuke_train.main(pannuke_train.parse_args([*argv, "--output_dir", str(sota_run.parent), *TINY]))

    missing = fold_copy("missing")
    for path in (missing / "fold2").iterdir():
        path.unlink()
    (missing / "fold2").rmdir()
    with pytest.raises(SystemExit, match="fold 2 not found"):
        run("--data_dir", str(missing))
    with pytest.raises(SystemExit, match="no such folder"):
        run("--data_dir", str(tmp_path / "nowhere"))

    rgba = fold_copy("rgba")
    images = np.load(rgba / "fold1" / "images.npy")
    np.save(rgba / "fold1" / "images.npy", np.concatenate([images, images[..., :1]], -1))
    with pytest.raises(SystemExit, match=r"fold1/images.npy has shape \(12, 256, 256, 4\); expected \(N, H, W, 3\)"):
        run("--data_dir", str(rgba))

    five = fold_copy("five")
    np.save(five / "fold1" / "masks.npy", np.load(five / "fold1" / "masks.npy")[..., :5])
    with pytest.raises(SystemExit, match=r"masks.npy has shape \(12, 256, 256, 5\)"):
        run("--data_dir", str(five))

    short = fold_copy("short")
    np.save(short / "fold1" / "types.npy", np.load(short / "fold1" / "types.npy")[:3])
    with pytest.raises(SystemExit, match="names 3 tissues for 12 tiles"):
        run("--data_dir", str(short))

    counts = fold_copy("counts")
    np.save(counts / "fold1" / "masks.npy", np.load(counts / "fold1" / "masks.npy")[:10])
    with pytest.raises(SystemExit, match=r"masks.npy has shape \(10, 256, 256, 6\), but .*images.npy has \(12,"):
        run("--data_dir", str(counts))

    rank3 = fold_copy("rank3")
    np.save(rank3 / "fold1" / "images.npy", np.load(rank3 / "fold1" / "images.npy")[..., 0])
    with pytest.raises(SystemExit, match=r"images.npy has shape \(12, 256, 256\); expected \(N, H, W, 3\)"):
        run("--data_dir", str(rank3))

    odd = fold_copy("odd")
    for kind in ("images", "masks"):
        np.save(odd / "fold1" / f"{kind}.npy", np.load(odd / "fold1" / f"{kind}.npy")[:, :100, :100])
    with pytest.raises(SystemExit, match="must be multiples of 32"):
        run("--data_dir", str(odd))

    nan_tile = fold_copy("nan_tile")
    images = np.load(nan_tile / "fold1" / "images.npy").astype(np.float64)
    images[4, 10, 10, 1] = np.nan
    np.save(nan_tile / "fold1" / "images.npy", images)
    with pytest.raises(SystemExit, match="images.npy: tile 4 contains NaN"):
        run("--data_dir", str(nan_tile))

    with pytest.raises(SystemExit, match="--swa_start_epoch 5 is outside"):
        run("--data_dir", str(data), "--use_swa", "--swa_start_epoch", "5")

    checkpoint = torch.load(sota_run / "best.pth", weights_only=True)
    torch.save({**checkpoint, "domain": "retinopathy"}, tmp_path / "other_domain.pth")
    torch.save({**checkpoint, "arch": "unet"}, tmp_path / "other_arch.pth")
    for name, message in (("other_domain.pth", "not a pannuke checkpoint"), ("other_arch.pth", "'unet' network")):
        with pytest.raises(SystemExit, match=message):
            pannuke_evaluate.main(pannuke_evaluate.parse_args([str(tmp_path / name)]))
        with pytest.raises(SystemExit, match=message):
            pannuke_visualize.main(pannuke_visualize.parse_args(["predictions", str(tmp_path / name)]))
    with pytest.raises(SystemExit, match="not a pannuke training checkpoint"):
        run("--resume", str(tmp_path / "other_domain.pth"))

    assert sorted((p.name, p.stat().st_mtime_ns) for p in sota_run.iterdir()) == before
    assert sorted(p.name for p in sota_run.parent.iterdir()) == runs_before  # no new, half-made run folder


def test_nan_loss_skips_steps_then_stops_with_a_message(tmp_path, data, monkeypatch):
    original = pannuke_train.compute_loss

    def nan_loss(*args, **kwargs):
        loss, terms = original(*args, **kwargs)
        return loss * float("nan"), terms

    monkeypatch.setattr(pannuke_train, "compute_loss", nan_loss)
    with pytest.raises(SystemExit, match="NaN or infinite for 2 steps in a row"):
        train(tmp_path, data, "--max_nan_steps", "2")


def test_cpu_mixed_precision_and_cosine_schedule_on_request(tmp_path, data, monkeypatch):
    made = []

    def spy(device, enabled, dtype=None):
        made.append(enabled)
        return original(device, enabled, dtype)

    original = pannuke_train.mixed_precision
    monkeypatch.setattr(pannuke_train, "mixed_precision", spy)
    forward, dtypes = AttentionUNet.forward, []

    def recording(self, x):
        dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return forward(self, x)

    monkeypatch.setattr(AttentionUNet, "forward", recording)
    run = train(tmp_path, data, "--use_mixed_precision", "--scheduler", "cosine", "--warmup_epochs", "1")
    last = torch.load(run / "last.pth", weights_only=True)
    assert last["args"]["use_mixed_precision"] is True and made == [True]
    assert set(dtypes) == {torch.bfloat16}  # every forward pass, training and validation, in bf16 autocast
    assert last["args"]["scheduler"] == "cosine" and "_milestones" in last["scheduler"]  # warm-up, then cosine
    history = json.loads((run / "training_history.json").read_text())
    assert np.isfinite(history[0]["train"]["loss"]) and np.isfinite(history[0]["val"]["loss"])


def test_recipe_demo_and_device_set_the_defaults_that_help_shows(monkeypatch, capsys):
    backup = pannuke_train.parse_args(["--recipe", "backup"])
    assert (backup.optimizer, backup.scheduler, backup.loss) == ("adam", "cosine", "weighted_dice")
    assert not backup.use_ema and not backup.tta
    assert pannuke_train.parse_args(["--recipe", "backup", "--optimizer", "adamw"]).optimizer == "adamw"  # flag wins
    demo = pannuke_train.parse_args(["--demo", "--epochs", "8", "--output_dir", "out"])
    assert (demo.epochs, demo.batch_size, demo.tta, demo.encoder_weights) == (8, 8, False, "none")
    assert demo.swa_start_epoch == 6 and demo.cache_dir == str(Path("out") / "cache")  # follow --epochs, --output_dir
    with pytest.raises(SystemExit):
        pannuke_train.parse_args(["--recipe", "backup", "--demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "optimizer (default: adam)" in text and "epochs (default: 5)" in text and "(default: weighted_dice)" in text
    monkeypatch.setattr(pannuke_train, "pick_device", lambda: torch.device("cuda"))
    assert pannuke_train.parse_args([]).use_mixed_precision is True  # the sota recipe's AMP is for CUDA
    assert pannuke_train.parse_args(["--recipe", "backup"]).use_mixed_precision is False
    monkeypatch.setattr(pannuke_train, "pick_device", lambda: torch.device("mps"))
    assert not pannuke_train.parse_args([]).use_mixed_precision and not pannuke_train.parse_args([]).channels_last
    assert pannuke_train.parse_args(["--use-mixed-precision"]).use_mixed_precision  # the other spelling works
