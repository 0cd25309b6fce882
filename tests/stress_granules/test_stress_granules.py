"""stress_granules/: reading microscopy files (hyperstacks, OME-TIFF, pixel sizes) and pairing, normalisation that
keeps controls dim, cached features, crop strategies, the sampler, touching granules, training (both presets,
resume, torchrun), evaluation on images of any size with granules per cell, figures, the design document's
commands, Windows wrappers and bad inputs."""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import stress_granules.data as granule_data
from stress_granules import evaluate as granule_evaluate
from stress_granules import train as granule_train
from stress_granules import visualize as granule_visualize
from stress_granules.data import (
    CROP_STRATEGIES,
    compute_features,
    crop,
    crop_centre,
    draw_strategy,
    granule_balance_weights,
    make_sample,
    pair_files,
    read_image,
    synthetic_cell_image,
    weighted_indices,
    write_demo_dataset,
)
from stress_granules.model import UNet, granules_from_probability, predict_probability

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--image_size",
    "64",
    "--base_channels",
    "8",
    "--batch_size",
    "4",
    "--epochs",
    "1",
    "--num_workers",
    "0",
    "--crops_per_image",
    "2",
]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Training copies its best model into the working directory, as the design document says: a test's own."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 images: 6 stressed, 2 controls; split 6 training, 1 validation, 1 test."""
    return write_demo_dataset(tmp_path_factory.mktemp("granules") / "data", n_images=8, size=(96, 112), controls=2)


def copy_dataset(data: Path, root: Path) -> Path:
    """A private copy of the demo images and masks, to break one file of it."""
    for sub in ("images", "masks"):
        shutil.copytree(data / sub, root / sub)
    return root


def train(tmp_path: Path, data: Path, *extra: str) -> Path:
    argv = [
        "--images",
        str(data / "images"),
        "--masks",
        str(data / "masks"),
        "--output_dir",
        str(tmp_path / "metrics"),
        *TINY,
        *extra,
    ]
    tmp_path.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:  # module fixtures call this too: no function's tmp_path there
        patch.chdir(tmp_path)
        return granule_train.main(granule_train.parse_args(argv))


@pytest.fixture(scope="module")
def robust_run(tmp_path_factory, data) -> Path:
    """Two epochs of the robust preset, the feature computations counted (test_features_are_cached_not_recomputed).
    The resume tests compare their interrupted runs with this one."""
    calls, original = [], granule_data.multiscale_clahe

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(granule_data, "multiscale_clahe", counting)
        run = train(tmp_path_factory.mktemp("robust"), data, "--epochs", "2", "--save_every", "1")
    (run / "feature_calls.txt").write_text(str(len(calls)))
    return run


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def test_crop_strategy_shares_and_centres():
    rng = np.random.default_rng(0)
    draws = [draw_strategy(rng) for _ in range(20_000)]
    for name, share in CROP_STRATEGIES.items():
        assert draws.count(name) / len(draws) == pytest.approx(share, abs=0.015), name

    mask = np.zeros((200, 200), np.uint8)
    mask[50:60, 50:60] = 1
    sample = make_sample("a", "unused.npy", mask, crop_size=64)
    distance = ndimage.distance_transform_edt(mask == 0)
    for _ in range(50):
        y, x = crop_centre(sample, "granule", rng)
        assert mask[y, x]
        y, x = crop_centre(sample, "edge", rng)
        assert mask[y, x] and not mask[y - 1 : y + 2, x - 1 : x + 2].all()
        y, x = crop_centre(sample, "background", rng)
        assert distance[y, x] >= 64 / np.sqrt(2)  # a 64 px crop centred here holds no granule
        y, x = crop_centre(sample, "mixed", rng)
        assert 12 <= distance[y, x] <= 20
    empty = make_sample("b", "unused.npy", np.zeros((50, 50), np.uint8), 64)
    assert all(0 <= v < 50 for v in crop_centre(empty, "granule", rng))  # no granule: a random centre


def test_crop_dataset_draws_the_strategies_in_their_shares(tmp_path):
    rng = np.random.default_rng(1)
    image, mask = synthetic_cell_image(rng, (160, 160))
    np.save(tmp_path / "f.npy", compute_features(image, "raw").astype(np.float16))
    dataset = granule_data.CropDataset(
        [make_sample("a", tmp_path / "f.npy", (mask > 0).astype(np.uint8), 32)],
        32,
        crops_per_image=4000,
        preset="robust",
        augment=False,
    )
    strategies = [dataset[(i, 7)]["strategy"] for i in range(len(dataset))]
    for name, share in CROP_STRATEGIES.items():
        assert strategies.count(name) / len(strategies) == pytest.approx(share, abs=0.025), name
    item = dataset[(0, 7)]
    assert item["image"].shape == (1, 32, 32) and item["mask"].shape == (1, 32, 32)
    assert torch.equal(dataset[(5, 7)]["image"], dataset[(5, 7)]["image"])  # (index, seed) fixes the crop


def test_masks_in_every_common_png_form_and_16_bit_png_images(tmp_path):
    from PIL import Image

    labels = np.zeros((12, 16), np.uint8)
    labels[2:5, 3:7] = 1
    palette = Image.fromarray(labels, mode="P")
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    Image.fromarray(labels).save(tmp_path / "zero_one.png")
    Image.fromarray(labels * 255).convert("RGB").save(tmp_path / "rgb.png")
    for name in ("palette.png", "zero_one.png", "rgb.png"):
        np.testing.assert_array_equal(granule_data.read_mask(tmp_path / name, (12, 16), tmp_path / "x.tif"), labels)
    cv2.imwrite(str(tmp_path / "deep.png"), (labels.astype(np.uint16) * 4000 + 100))
    deep = read_image(tmp_path / "deep.png")
    assert deep.dtype == np.uint16 and deep.max() == 4100


def test_an_anti_aliased_binary_mask_is_binary_and_a_label_image_stays_labels(tmp_path):
    """Soft edges (a drawing program's anti-aliasing, or a resized mask) are not one granule per grey level."""
    soft = np.zeros((40, 60), np.uint8)
    cv2.circle(soft, (15, 20), 7, 255, -1, lineType=cv2.LINE_AA)
    cv2.circle(soft, (42, 18), 5, 255, -1, lineType=cv2.LINE_AA)
    assert len(np.unique(soft)) > 5  # many grey levels at the rims
    cv2.imwrite(str(tmp_path / "soft.png"), soft)
    labels = granule_data.read_mask(tmp_path / "soft.png", soft.shape, tmp_path / "x.tif")
    assert labels.max() == 2 and np.array_equal(labels > 0, soft >= 128)
    small = np.zeros((30, 60), np.uint8)  # granule-sized soft spots: more rim than inside
    for x in (8, 22, 36, 50):
        cv2.circle(small, (x, 15), 2, 255, -1, lineType=cv2.LINE_AA)
    cv2.imwrite(str(tmp_path / "small.png"), small)
    assert granule_data.read_mask(tmp_path / "small.png", small.shape, tmp_path / "x.tif").max() == 4
    touching = np.zeros((20, 30), np.uint16)
    touching[4:12, 3:10], touching[4:12, 10:18], touching[14:18, 20:26] = 1, 2, 3  # two touch: labels, not binary
    tifffile.imwrite(tmp_path / "labels.tif", touching)
    assert np.array_equal(granule_data.read_mask(tmp_path / "labels.tif", touching.shape, tmp_path / "x.tif"), touching)


def test_presets_set_the_defaults_and_help_shows_them(monkeypatch):
    parse = granule_train.parse_args
    monkeypatch.setattr(granule_train, "pick_device", lambda: torch.device("cpu"))
    improved = parse(["--images", "i", "--masks", "m", "--preset", "improved"])
    assert (improved.epochs, improved.early_stopping_patience, improved.crops_per_image) == (75, 15, 3)
    assert (improved.features, improved.selection_metric, improved.image_size, improved.lr) == (
        "clahe",
        "dice",
        256,
        1e-4,
    )
    robust = parse(["--images", "i", "--masks", "m", "--epochs", "7"])
    assert (robust.epochs, robust.early_stopping_patience, robust.crops_per_image) == (7, 30, 5)
    assert (robust.features, robust.selection_metric, robust.use_mixed_precision) == ("multiscale", "f1", False)
    assert parse(["--demo", "--preset", "improved", "--lr", "0.01"]).lr == 0.01  # a flag wins over --demo
    assert (parse(["--demo"]).epochs, parse(["--demo"]).image_size) == (40, 128)
    assert parse(["--demo", "--use_mixed_precision"]).use_mixed_precision is True  # CPU autocast on request
    monkeypatch.setattr(granule_train, "pick_device", lambda: torch.device("cuda"))
    assert parse(["--demo"]).use_mixed_precision is True  # AMP on CUDA by default
    assert len(granule_data.build_augmentation("robust")) > len(granule_data.build_augmentation("improved"))
    with pytest.raises(SystemExit, match="--save_every 0"):
        granule_train.check_args(parse(["--images", "i", "--masks", "m", "--save_every", "0"]))


def test_help_shows_each_default_once_from_the_parser(capsys, monkeypatch):
    monkeypatch.setattr(granule_train, "pick_device", lambda: torch.device("cpu"))
    for argv, shown in (
        (["--help"], ["--epochs EPOCHS", "epochs (default: 200)", "(default: 0.0001)"]),
        (["--preset", "improved", "--help"], ["epochs (default: 75)", "(default: clahe)"]),
        (["--demo", "--help"], ["epochs (default: 40)", "crop size, multiple of 16 (default: 128)"]),
    ):
        with pytest.raises(SystemExit):
            granule_train.parse_args(argv)
        text = capsys.readouterr().out
        for piece in shown:
            assert piece in text, (argv, piece)
        assert "--image-size" not in text and "--use_mixed_precision, --no-use_mixed_precision" in text
    for module, argv in ((granule_evaluate, ["--help"]), (granule_visualize, ["predictions", "--help"])):
        with pytest.raises(SystemExit):
            module.parse_args(argv)
        assert "granule probability threshold; without it, the run's" in capsys.readouterr().out


def test_crops_of_small_images_are_reflect_padded():
    image = np.arange(20 * 30, dtype=np.float32).reshape(1, 20, 30)
    out = crop(image, (10, 15), 64)
    assert out.shape == (1, 64, 64)
    assert out[0, 32, 32] == image[0, 10, 15]  # the centre stays the centre
    assert set(np.unique(out)) <= set(np.unique(image))  # padding repeats the image, no zeros invented


def test_sixteen_bit_images_are_normalised_not_truncated():
    rng = np.random.default_rng(0)
    image, mask = synthetic_cell_image(rng, (128, 128))
    assert image.dtype == np.uint16 and image.max() > 255  # truncation to 8 bits would saturate
    features = compute_features(image, "multiscale")
    assert features.shape == (4, 128, 128) and features.dtype == np.float32
    assert 0 <= features.min() and features.max() <= 1 and features[0].std() > 0.05
    granules = features[0][mask > 0].mean()
    assert granules > features[0][mask == 0].mean() + 0.2  # granules are the bright structures
    assert compute_features(image, "clahe").shape == (2, 128, 128)


def test_balanced_sampler_weights_and_ddp_shards():
    samples = [
        make_sample(str(i), "unused.npy", m, 16)
        for i, m in enumerate(
            [np.zeros((20, 20), np.uint8)] + [np.pad(np.ones((k, k), np.uint8), (0, 20 - k)) for k in (2, 3, 4, 8, 9)]
        )
    ]
    weights = granule_balance_weights(samples, crops_per_image=2)
    per_image = weights[::2]
    assert per_image.sum() == pytest.approx(1.0) and (weights[1::2] == per_image).all()
    # bins: no granules (1 image), at most the median area (3 images), above it (2): each bin gets a third
    assert per_image[0] == pytest.approx(1 / 3) and per_image[1] == pytest.approx(1 / 9)
    assert per_image[5] == pytest.approx(1 / 6)
    a, b = weighted_indices(weights, 5, 0, 2), weighted_indices(weights, 5, 1, 2)
    assert len(a) == len(b) == 6 and weighted_indices(weights, 5, 0, 2) == a  # same draw for the same seed
    assert sorted(a + b) == sorted(weighted_indices(weights, 5))  # the two ranks split one draw


def test_reading_pairs_and_channels(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    grey = np.random.default_rng(0).integers(0, 4000, (20, 30)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "images" / "a.tif", np.stack([grey] * 3, -1))  # three identical channels
    cv2.imwrite(str(tmp_path / "masks" / "a.png"), (grey > 2000).astype(np.uint8) * 255)
    np.testing.assert_array_equal(read_image(tmp_path / "images" / "a.tif"), grey)
    assert pair_files(tmp_path / "images", tmp_path / "masks") == [
        (tmp_path / "images" / "a.tif", tmp_path / "masks" / "a.png")
    ]


# ----------------------------------------------------------------------------------------------------------------
# Model and training
# ----------------------------------------------------------------------------------------------------------------


def test_tiled_probability_on_images_larger_and_smaller_than_a_tile():
    model = UNet(in_channels=2, base_channels=4).eval()
    for shape in ((2, 150, 200), (2, 40, 23)):
        features = np.random.default_rng(0).random(shape).astype(np.float32)
        probability = predict_probability(model, features, tile=64, overlap=16)
        assert probability.shape == shape[1:] and (0 <= probability).all() and (probability <= 1).all()
    pointwise = torch.nn.Conv2d(2, 1, 1)

    class Pointwise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = pointwise

        def forward(self, x):
            return self.conv(x)

    features = np.random.default_rng(1).random((2, 150, 200)).astype(np.float32)
    with torch.no_grad():
        direct = pointwise(torch.from_numpy(features)[None]).sigmoid()[0, 0].numpy()
    np.testing.assert_allclose(predict_probability(Pointwise(), features, tile=64, overlap=16), direct, atol=1e-5)
    labels = granules_from_probability(np.pad(np.ones((4, 4)), 3) * 0.9 + np.pad(np.ones((3, 3)), (0, 7)) * 0.9)
    assert labels.max() == 1  # the 9 px speck is below min_size 15, the 16 px granule stays


def test_robust_run_writes_its_outputs(robust_run):
    assert robust_run.name.startswith("robust_cpu_") and robust_run.parent.name == "metrics"
    for name in (
        "config.json",
        "best_model.pth",
        "last.pth",
        "checkpoint_epoch_1.pth",
        "checkpoint_epoch_2.pth",
        "training_history.json",
        "evaluation_report.json",
        "training_curves.png",
        "test_predictions.png",
        "train.log",
        "split.json",
    ):
        assert (robust_run / name).is_file(), name
    history = json.loads((robust_run / "training_history.json").read_text())
    assert len(history) == 2 and set(history[0]["train"]) == {"loss", "bce", "focal_tversky", "dice"}
    split = json.loads((robust_run / "split.json").read_text())
    assert [len(split[k]) for k in ("train", "val", "test")] == [6, 1, 1]
    assert len(set(split["train"]) | set(split["val"]) | set(split["test"])) == 8  # no image in two splits

    events = EventAccumulator(str(robust_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    pixel = {f"val/pixel_{k}" for k in ("dice", "iou", "precision", "recall", "f1", "specificity", "accuracy")}
    granule = {f"val/granule_{k}" for k in ("precision", "recall", "f1")}
    assert scalars == {"train/loss", "train/bce", "train/focal_tversky", "train/dice", "lr"} | pixel | granule
    for entry in history:
        logged = {tag: {e.step: e.value for e in events.Scalars(tag)}[entry["epoch"]] for tag in scalars}
        assert logged["train/loss"] == pytest.approx(entry["train"]["loss"], rel=1e-6)
        assert logged["train/focal_tversky"] == pytest.approx(entry["train"]["focal_tversky"], rel=1e-6)
        assert logged["lr"] == pytest.approx(entry["lr"], rel=1e-6)
        assert logged["val/pixel_dice"] == pytest.approx(entry["val"]["pixel"]["dice"], rel=1e-6, abs=1e-9)
        assert logged["val/granule_f1"] == pytest.approx(entry["val"]["object"]["f1"], rel=1e-6, abs=1e-9)
    (name,) = [Path(p).stem for p in split["val"]]
    assert events.Tags()["images"] == [f"val/{name}"]  # image | truth | prediction
    picture = events.Images(f"val/{name}")
    assert [e.step for e in picture] == [1, 2] and picture[0].width > 3 * picture[0].height - 10
    report = json.loads((robust_run / "evaluation_report.json").read_text())
    assert report["selection_metric"] == "f1" and {"model", "otsu_baseline"} <= set(report)
    assert report["split"] == "test" and report["images"] == split["test"]  # held out from model selection
    assert report["note"] == "held out from training and model selection" and report["model"]["images"] == 1
    assert 0 <= report["otsu_baseline"]["pixel"]["dice"] <= 1
    best = torch.load(robust_run / "best_model.pth", weights_only=True)
    assert best["model_args"]["in_channels"] == 4  # 3 CLAHE scales + edge
    assert report["best_epoch"] == best["epoch"]
    assert best["args"]["min_dynamic_range"] > 0  # the floor, from the training images with granules
    copy = robust_run.parents[1] / "robust_stress_granule_model.pth"  # the working directory, as the document says
    assert torch.load(copy, weights_only=True)["epoch"] == best["epoch"]


def test_export_runs_in_onnxruntime_as_in_pytorch(robust_run, data, tmp_path):
    """evaluate.py --export: model.onnx on a tile of real features (Preprocess.compute, as model.json describes)
    gives the PyTorch model's granule probability."""
    import onnxruntime

    from stress_granules.model import load_checkpoint

    out = granule_evaluate.main(granule_evaluate.parse_args([str(robust_run), "--export", str(tmp_path / "x")]))
    spec = json.loads((out / "model.json").read_text())
    assert spec["input"]["shape"] == ["batch", 4, "y (a multiple of 16)", "x (a multiple of 16)"]
    assert len(spec["input"]["channels"]) == 4
    assert spec["outputs"][0]["name"] == "granule" and spec["checked"]["onnxruntime_max_abs_difference"] <= 1e-4
    model, checkpoint = load_checkpoint(robust_run / "best_model.pth")
    prep = granule_data.Preprocess.from_args(checkpoint["args"])
    image = prep.read(sorted((data / "images").iterdir())[0])
    x = prep.compute(image)[None, :, :64, :64].astype(np.float32)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (probability,) = session.run(None, {"input": x})
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.from_numpy(x))).numpy()
    assert probability.shape == (1, 1, 64, 64) and np.abs(probability - expected).max() <= 1e-4
    x = prep.compute(image)[None, :, :48, :80].astype(np.float32)  # any multiple of 16
    (other,) = session.run(None, {"input": x})
    with torch.no_grad():
        assert np.abs(other - torch.sigmoid(model(torch.from_numpy(x))).numpy()).max() <= 1e-4
    # the bioimage.io package passes bioimage.io's own test (both weight formats on its test tensors)
    from bioimageio.core import test_model

    summary = test_model(out / "rdf.yaml")
    assert summary.status == "passed", summary.format()
    report = summary.format()
    assert "Reproduce test outputs from test inputs (torchscript)" in report
    assert "Reproduce test outputs from test inputs (onnx)" in report
    assert np.load(out / "test_input.npy").shape[:2] == (1, 4) and (out / "cover.png").is_file()


def test_a_moved_run_folder_still_finds_its_split(robust_run, tmp_path):
    """A run folder copied elsewhere (its checkpoint still names the old folder, now gone) scores its test images
    from the split.json beside the checkpoint."""
    import shutil

    moved = tmp_path / "elsewhere" / robust_run.name
    shutil.copytree(robust_run, moved, ignore=shutil.ignore_patterns("tensorboard"))
    best = torch.load(moved / "best_model.pth", weights_only=True)
    best["args"]["run_dir"] = str(tmp_path / "gone")
    torch.save(best, moved / "best_model.pth")
    out = granule_evaluate.main(granule_evaluate.parse_args([str(moved), "--output_dir", str(tmp_path)]))
    report = json.loads((out / "evaluation_report.json").read_text())
    split = json.loads((moved / "split.json").read_text())
    assert report["images"] == split["test"] and report["split"] == "test"


def test_evaluate_takes_the_runs_settings_and_reproduces_its_validation(robust_run, tmp_path):
    best = torch.load(robust_run / "best_model.pth", weights_only=True)
    out = granule_evaluate.main(granule_evaluate.parse_args([str(robust_run), "--split", "val", "--output_dir", "."]))
    report = json.loads((out / "evaluation_report.json").read_text())
    assert report["split"] == "val" and "chose this model" in report["source"] and report["seen_by_training"] == 1
    assert report["settings"] == {"tile": 64, "overlap": 16, "threshold": 0.5, "min_size": 15, "split": True,
                                  "channel": None, "z_projection": None,
                                  "min_dynamic_range": best["args"]["min_dynamic_range"],
                                  "train_shape": best["args"]["train_image_shape"]}  # fmt: skip
    assert json.dumps(report["pixel"]) == json.dumps(best["val"]["pixel"])  # NaN == NaN in JSON text
    assert json.dumps(report["object"]) == json.dumps(best["val"]["object"])
    test = granule_evaluate.main(granule_evaluate.parse_args([str(robust_run), "--output_dir", "."]))
    split = json.loads((robust_run / "split.json").read_text())
    assert json.loads((test / "evaluation_report.json").read_text())["images"] == split["test"]


def test_improved_preset(tmp_path, data):
    run = train(tmp_path, data, "--preset", "improved")
    best = torch.load(run / "best_model.pth", weights_only=True)
    assert run.name.startswith("improved_cpu_") and best["model_args"]["in_channels"] == 2
    assert best["args"]["selection_metric"] == "dice" and best["args"]["early_stopping_patience"] == 15


def test_features_are_cached_not_recomputed(robust_run, monkeypatch):
    assert (robust_run / "feature_calls.txt").read_text() == "8"  # once per image, not per crop or per epoch
    monkeypatch.setattr(granule_data, "multiscale_clahe", lambda *a, **k: pytest.fail("computed again"))
    args = argparse.Namespace(**json.loads((robust_run / "config.json").read_text()))
    splits, train_samples, val_samples = granule_train.load_data(args, lambda *a: None)  # a second run: the cache
    assert len(train_samples) + len(val_samples) == 7 and len(splits["test"]) == 1


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_after_interruption_repeats_the_next_epoch_exactly(tmp_path, data, robust_run, monkeypatch, workers):
    expected = json.loads((robust_run / "training_history.json").read_text())  # the same run, not interrupted
    original, calls = granule_train.train_one_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(granule_train, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", data, "--epochs", "2", "--num_workers", str(workers))
    monkeypatch.setattr(granule_train, "train_one_epoch", original)
    (cut,) = (tmp_path / "cut" / "metrics").glob("robust_*")
    granule_train.main(granule_train.parse_args(["--resume", str(cut), "--num_workers", str(workers)]))
    resumed = json.loads((cut / "training_history.json").read_text())
    assert len(resumed) == 2
    assert resumed[1]["train"]["loss"] == pytest.approx(expected[1]["train"]["loss"], rel=1e-6)
    assert resumed[1]["val"]["pixel"]["dice"] == pytest.approx(expected[1]["val"]["pixel"]["dice"], rel=1e-6, abs=1e-9)
    events = EventAccumulator(str(cut / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]  # the resumed run appends to the same folder
    if workers == 0:  # a finished run can be extended with a larger --epochs
        granule_train.main(granule_train.parse_args(["--resume", str(cut), "--epochs", "3", "--num_workers", "0"]))
        assert len(json.loads((cut / "training_history.json").read_text())) == 3
        # resuming takes the images of the run's split.json, not a fresh split (a run made before a change of the
        # splitting rule keeps its own): here a recorded split that the rule would not draw
        split = json.loads((cut / "split.json").read_text())
        split["train"], split["test"] = split["train"][1:], split["test"] + split["train"][:1]
        (cut / "split.json").write_text(json.dumps(split))
        granule_train.main(granule_train.parse_args(["--resume", str(cut), "--epochs", "4", "--num_workers", "0"]))
        report = json.loads((cut / "evaluation_report.json").read_text())
        assert sorted(report["images"]) == sorted(split["test"])
        assert json.loads((cut / "split.json").read_text()) == split
        with pytest.raises(SystemExit, match="resume from a run's last.pth"):
            granule_train.main(granule_train.parse_args(["--resume", str(cut / "best_model.pth")]))


def test_torchrun_two_cpu_processes(tmp_path, data):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "stress_granules" / "train.py"),
        "--images",
        str(data / "images"),
        "--masks",
        str(data / "masks"),
        "--output_dir",
        str(tmp_path / "metrics"),
        *TINY,
        "--num_workers",
        "1",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "metrics").glob("robust_*")  # only rank 0 writes
    history = json.loads((run / "training_history.json").read_text())
    assert history[0]["val"]["images"] == 1  # the one validation image, scored once over both ranks
    assert np.isfinite(history[0]["train"]["loss"])  # each rank trained on its share of the crops


def test_demo_beats_the_otsu_baseline_then_evaluate_and_visualize(tmp_path):
    def script(*argv):
        result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    # the demo's first 10 of 40 epochs (the same schedule, a quarter of the time)
    script(str(REPO / "stress_granules" / "train.py"), "--demo", "--epochs", "10")
    (run,) = (tmp_path / "metrics").glob("robust_*")
    report = json.loads((run / "evaluation_report.json").read_text())
    model, otsu = report["model"], report["otsu_baseline"]
    assert report["split"] == "test" and model["images"] == 6 and model["controls"]["images"] == 2
    # measured (10 epochs): test granule F1 0.71 against Otsu's 0.10, Dice 0.77 against 0.06, false granules per
    # control image 0.00 against 41.0 (all 40 epochs: see README.md)
    assert model["object"]["f1"] > otsu["object"]["f1"] + 0.3, (model, otsu)
    assert model["pixel"]["dice"] > otsu["pixel"]["dice"] + 0.3
    assert (
        model["controls"]["false_granules_per_control_image"]
        <= 2
        < 10
        < otsu["controls"]["false_granules_per_control_image"]
    )
    assert (tmp_path / "robust_stress_granule_model.pth").is_file()
    script(str(REPO / "stress_granules" / "evaluate.py"), str(run))  # the run's validation images
    (predictions,) = run.glob("predictions_*")
    assert json.loads((predictions / "evaluation_report.json").read_text())["object"]["f1"] > 0.5
    script(str(REPO / "stress_granules" / "visualize.py"), "history", str(run))
    assert list((run / "figures").glob("history_*.png"))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and figures
# ----------------------------------------------------------------------------------------------------------------


def test_evaluate_images_larger_and_smaller_than_the_crop(robust_run, tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    big, big_labels = synthetic_cell_image(rng, (200, 150))
    big_mask = (big_labels > 0).astype(np.uint8) * 255  # binary masks: granules are their 8-connected components
    tifffile.imwrite(images / "big.tif", big)
    cv2.imwrite(str(masks / "big.png"), big_mask)
    tifffile.imwrite(images / "small.tif", big[:40, :50])
    cv2.imwrite(str(masks / "small.png"), big_mask[:40, :50])
    truth = {name: (cv2.imread(str(masks / f"{name}.png"), cv2.IMREAD_UNCHANGED) > 0) for name in ("big", "small")}

    def oracle(model, features, tile, overlap, **kwargs):  # predicts the true mask, so there is something to count
        (name,) = [n for n, m in truth.items() if m.shape == features.shape[1:]]
        return truth[name].astype(np.float32)

    monkeypatch.setattr(granule_evaluate, "predict_probability", oracle)
    argv = [
        str(robust_run),
        "--images",
        str(images),
        "--masks",
        str(masks),
        "--pixel_size",
        "0.1",
        "--tile_size",
        "64",
        "--overlap",
        "16",
        "--min_size",
        "1",
        "--no-split_touching",
    ]
    out = granule_evaluate.main(granule_evaluate.parse_args(argv))
    import pandas as pd

    granules = pd.read_csv(out / "granules.csv")
    summary = pd.read_csv(out / "image_summary.csv")
    for name, shape in (("big", (200, 150)), ("small", (40, 50))):
        saved = tifffile.imread(out / "masks" / f"{name}.tif")
        _, components = ndimage.label(saved > 0, structure=np.ones((3, 3)))
        rows = granules[granules["image"] == f"{name}.tif"]
        assert saved.shape == shape and components > 0 and len(rows) == components
        assert sorted(np.unique(saved[saved > 0])) == sorted(rows["granule_id"])  # label ids are the CSV's rows
        np.testing.assert_array_equal(np.bincount(saved.ravel())[rows["granule_id"]], rows["area_px"])
        row = summary[summary["image"] == f"{name}.tif"].iloc[0]
        assert row["granules"] == components and row["area_fraction"] == pytest.approx((saved > 0).mean())
    assert np.allclose(granules["area_um2"], granules["area_px"] * 0.01)
    report = json.loads((out / "evaluation_report.json").read_text())
    assert len(report["images"]) == report["images_with_masks"] == 2 and {"pixel", "object"} <= set(report)
    assert report["pixel"]["dice"] == pytest.approx(1.0) and report["object"]["f1"] == pytest.approx(1.0)


def test_visualize_predictions_and_sizes(robust_run):
    parse = granule_visualize.parse_args
    figure = granule_visualize.main(parse(["predictions", str(robust_run), "--n", "1"]))
    assert figure.parent == robust_run / "figures" and figure.stat().st_size > 5_000
    out = granule_evaluate.main(granule_evaluate.parse_args([str(robust_run), "--min_size", "1", "--threshold", "0.1"]))
    assert granule_visualize.main(parse(["sizes", str(out)])).is_file()


@pytest.mark.parametrize("script,name", [("train", "train.bat"), ("evaluate", "evaluate.bat")])
def test_windows_wrappers_use_flags_that_exist(script, name):
    text = (REPO / "stress_granules" / name).read_text()
    (line,) = [line for line in text.splitlines() if f"stress_granules\\{script}.py" in line]
    words = [w for w in shlex.split(line.split(f"stress_granules\\{script}.py", 1)[1]) if w != "%*"]
    words = [
        w.replace("%IMAGES%", "i").replace("%MASKS%", "m").replace("%MODEL%", "m.pth").replace("%PIXEL_SIZE%", "0.1")
        for w in words
    ]
    module = granule_train if script == "train" else granule_evaluate
    module.parse_args(words)  # exits on an unknown flag


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors_and_touch_no_earlier_run(tmp_path, data, robust_run):
    def listing():  # run folders and their files; the shared feature cache may grow
        return sorted(
            (str(p.relative_to(robust_run.parent)), p.stat().st_mtime_ns)
            for p in robust_run.parent.rglob("*")
            if "cache" not in p.relative_to(robust_run.parent).parts
        )

    before = listing()

    def copy(name: str) -> Path:
        return copy_dataset(data, tmp_path / name)

    def run(root: Path, *extra):
        return granule_train.main(
            granule_train.parse_args(
                [
                    "--images",
                    str(root / "images"),
                    "--masks",
                    str(root / "masks"),
                    "--output_dir",
                    str(robust_run.parent),
                    *TINY,
                    *extra,
                ]
            )
        )

    unpaired = copy("unpaired")
    (unpaired / "masks" / "cell_003.tif").unlink()
    with pytest.raises(SystemExit, match="cell_003.tif"):
        run(unpaired)

    mismatch = copy("mismatch")
    tifffile.imwrite(mismatch / "masks" / "cell_002.tif", np.zeros((50, 60), np.uint8))
    with pytest.raises(SystemExit, match=r"masks/cell_002.tif has shape \(50, 60\), but its image .*cell_002.tif has"):
        run(mismatch)

    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        run(empty)

    background = copy("background")
    for path in (background / "masks").iterdir():
        cv2.imwrite(str(path), np.zeros(cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape, np.uint8))
    with pytest.raises(SystemExit, match="all background"):
        run(background)

    corrupt = copy("corrupt")
    (corrupt / "images" / "cell_004.tif").write_bytes(b"II*\x00 not really a tiff")
    with pytest.raises(SystemExit, match="cell_004.tif: cannot read"):
        run(corrupt)

    rgb = copy("rgb")
    image = tifffile.imread(rgb / "images" / "cell_001.tif")
    tifffile.imwrite(rgb / "images" / "cell_001.tif", np.stack([image, image // 2, image], -1))
    with pytest.raises(SystemExit, match="cell_001.tif holds an RGB image whose channels differ: give --channel 0..2"):
        run(rgb)

    torch.save({"domain": "pannuke", "arch": "attention_unet", "model": {}}, tmp_path / "pannuke.pth")
    with pytest.raises(SystemExit, match="not a stress_granules checkpoint"):
        granule_evaluate.main(
            granule_evaluate.parse_args([str(tmp_path / "pannuke.pth"), "--images", str(data / "images")])
        )
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        granule_evaluate.main(granule_evaluate.parse_args([str(REPO / "README.md"), "--images", str(data / "images")]))

    assert listing() == before


def test_unpaired_files_can_be_skipped(tmp_path, data):
    root = copy_dataset(data, tmp_path / "skip")
    (root / "masks" / "cell_003.tif").unlink()
    assert len(pair_files(root / "images", root / "masks", skip_unpaired=True, log=lambda *a: None)) == 7


def test_nan_loss_skips_steps_then_stops_with_a_message(tmp_path, data, monkeypatch):
    original = granule_train.build_loss

    def nan_loss(args):
        criterion = original(args)
        forward = criterion.forward

        def nan_forward(*a, **k):
            total, terms = forward(*a, **k)
            return total * float("nan"), terms

        criterion.forward = nan_forward
        return criterion

    monkeypatch.setattr(granule_train, "build_loss", nan_loss)
    with pytest.raises(SystemExit, match="NaN or infinite for 2 steps in a row"):
        train(tmp_path, data, "--max_nan_steps", "2")


# ----------------------------------------------------------------------------------------------------------------
# Controls, touching granules, granules per cell, microscopy files (issue: counts a cell biologist can publish)
# ----------------------------------------------------------------------------------------------------------------


def test_a_granule_free_image_stays_dim_through_normalisation():
    rng = np.random.default_rng(0)
    stressed = [synthetic_cell_image(rng, (160, 160))[0] for _ in range(4)]
    control = synthetic_cell_image(rng, (160, 160), stressed=False)[0]
    flat = np.clip(rng.poisson(700, (160, 160)) + rng.normal(0, 20, (160, 160)), 0, None).astype(np.uint16)
    floor = float(np.median([np.percentile(i, 99.8) - np.percentile(i, 1) for i in stressed]))
    with_floor, own = granule_data.Preprocess("multiscale", floor), granule_data.Preprocess("multiscale", 0.0)
    for image in (control, flat):
        assert np.percentile(own.normalize(image), 99.9) > 0.99  # by its own percentiles: stretched to full scale
        assert np.percentile(with_floor.normalize(image), 99.9) < 0.5  # with the floor: dim
        bright = (with_floor.compute(image) > 0.5).mean(axis=(1, 2))
        assert bright[0] < 0.02 and bright[3] < 0.01, bright  # clip-2 CLAHE and edge channels: few bright pixels
    wide = max(stressed, key=lambda i: np.percentile(i, 99.8) - np.percentile(i, 1))  # its range is above the floor
    np.testing.assert_array_equal(with_floor.normalize(wide), own.normalize(wide))  # stressed images: as before
    granules = synthetic_cell_image(np.random.default_rng(1), (160, 160))
    normalized = with_floor.normalize(granules[0])
    assert normalized[granules[1] > 0].mean() > normalized[granules[1] == 0].mean() + 0.2  # granules stay bright


def test_two_touching_granules_are_two_in_truth_and_prediction(tmp_path):
    yy, xx = np.mgrid[:40, :60]
    left, right = (yy - 20) ** 2 + (xx - 20) ** 2 <= 36, (yy - 20) ** 2 + (xx - 31) ** 2 <= 36
    assert ndimage.label(left | right, structure=np.ones((3, 3)))[1] == 1  # they touch
    truth = np.where(left, 1, np.where(right, 2, 0)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "labels.tif", truth)
    cv2.imwrite(str(tmp_path / "binary.png"), (truth > 0).astype(np.uint8) * 255)
    read = granule_data.read_mask(tmp_path / "labels.tif", truth.shape, tmp_path / "x.tif")
    np.testing.assert_array_equal(read, truth)  # a label mask keeps its ids
    assert granule_data.read_mask(tmp_path / "binary.png", truth.shape, tmp_path / "x.tif").max() == 1
    probability = (left | right).astype(np.float32) * 0.9
    split = granules_from_probability(probability)
    assert split.max() == 2 and granules_from_probability(probability, split=False).max() == 1
    from stress_granules.model import GranuleScores

    scores = GranuleScores()
    scores.update(split, truth)
    assert [scores.compute()["object"][k] for k in ("tp", "fp", "fn")] == [2, 0, 0]
    # --min_size filters the prediction only: a true 9 px granule the model finds too small stays a miss
    small = np.zeros((20, 20), np.uint16)
    small[2:5, 2:5] = 1
    small[10:16, 10:16] = 2
    scores = GranuleScores()
    scores.update(granules_from_probability((small > 0).astype(np.float32), 0.5, 15), small)
    assert (scores.compute()["object"]["tp"], scores.compute()["object"]["fn"]) == (1, 1)
    # false granules per control image: a prediction in an empty mask
    scores.update(np.pad(np.ones((5, 5), np.int32), 5), np.zeros((15, 15), np.uint16))
    scores.update(np.zeros((15, 15), np.int32), np.zeros((15, 15), np.uint16))
    assert scores.compute()["controls"] == {"images": 2, "false_granules": 1, "false_granules_per_control_image": 0.5}


def test_touching_granules_split_on_the_demo_masks():
    """The split on true masks, against the true ids: most granules merged by connectivity come apart."""
    from common.metrics import match_instances

    rng = np.random.default_rng(4)
    true = merged = split_found = whole_found = 0
    for _ in range(4):
        _, labels = synthetic_cell_image(rng, (200, 200))
        binary = (labels > 0).astype(np.float32)
        true += int(labels.max())
        merged += int(labels.max()) - ndimage.label(binary, structure=np.ones((3, 3)))[1]
        split_found += match_instances(labels, granules_from_probability(binary, 0.5, 1), 0.5).tp
        whole_found += match_instances(labels, granules_from_probability(binary, 0.5, 1, split=False), 0.5).tp
    # measured: 150 true granules, 20 of them merged into clusters; 141 matched with the split, 130 without
    assert merged >= 15 and split_found - whole_found >= merged / 2, (true, merged, split_found, whole_found)


def write_hyperstack(path: Path, planes: np.ndarray, axes: str, pixel_size: float | None = None) -> None:
    extra = {"resolution": (1 / pixel_size, 1 / pixel_size)} if pixel_size else {}
    tifffile.imwrite(path, planes, imagej=True, metadata={"axes": axes, "unit": "um"}, **extra)


def test_hyperstacks_ome_tiffs_and_pixel_sizes(tmp_path):
    rng = np.random.default_rng(0)
    granules, nuclei = (rng.integers(0, 4000, (32, 40)).astype(np.uint16) for _ in range(2))
    write_hyperstack(tmp_path / "two.tif", np.stack([nuclei, granules]), "CYX", pixel_size=0.108)
    with pytest.raises(SystemExit, match=r"two.tif holds an ImageJ hyperstack of 2 channels of 32 x 40 px \(axes "
                       r"CYX\): give --channel 0..1"):  # fmt: skip
        read_image(tmp_path / "two.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "two.tif", channel=1), granules)
    with pytest.raises(SystemExit, match="--channel 2 is not among its channels 0..1"):
        read_image(tmp_path / "two.tif", channel=2)
    stack = rng.integers(0, 4000, (5, 32, 40)).astype(np.uint16)
    write_hyperstack(tmp_path / "z.tif", stack, "ZYX")
    with pytest.raises(SystemExit, match="holds an ImageJ hyperstack of 5 z-slices of 32 x 40 px.*--z_projection"):
        read_image(tmp_path / "z.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "z.tif", z_projection="max"), stack.max(0))
    np.testing.assert_allclose(read_image(tmp_path / "z.tif", z_projection="mean"), stack.mean(0), rtol=1e-6)
    ome = rng.integers(0, 4000, (3, 2, 32, 40)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "o.ome.tif", ome, metadata={"axes": "ZCYX", "PhysicalSizeX": 65, "PhysicalSizeXUnit":
                     "nm", "PhysicalSizeY": 65, "PhysicalSizeYUnit": "nm"})  # fmt: skip
    with pytest.raises(SystemExit, match="holds an OME-TIFF of 3 z-slices x 2 channels"):
        read_image(tmp_path / "o.ome.tif", z_projection="max")
    np.testing.assert_array_equal(read_image(tmp_path / "o.ome.tif", 0, "max"), ome[:, 0].max(0))
    assert granule_data.read_pixel_size(tmp_path / "two.tif") == pytest.approx(0.108, rel=1e-4)
    assert granule_data.read_pixel_size(tmp_path / "o.ome.tif") == pytest.approx(0.065)
    tifffile.imwrite(tmp_path / "plain.tif", granules)
    assert granule_data.read_pixel_size(tmp_path / "plain.tif") is None  # no ImageJ or OME size: none invented
    labels = np.zeros((32, 40), np.uint16)
    labels[3:6, 4:9] = 7
    granule_data.write_labels(tmp_path / "labels.tif", labels, 0.25)
    assert granule_data.read_pixel_size(tmp_path / "labels.tif") == pytest.approx(0.25, rel=1e-4)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "labels.tif"), labels)


def test_cells_csv_on_a_hand_made_image_with_known_counts(robust_run, tmp_path, monkeypatch):
    """Two cells: cell 1 holds two granules (one of them touching a third, outside every cell), cell 2 none.
    The image is a 2-channel ImageJ hyperstack at 0.2 um per pixel; --channel 1 picks the granule channel."""
    granules = np.zeros((64, 80), np.uint16)
    cells = np.zeros((64, 80), np.uint16)
    cells[5:35, 5:45] = 1  # 30 x 40 = 1200 px
    cells[40:60, 50:75] = 2  # 20 x 25 = 500 px
    granules[10:15, 10:15] = 1  # 25 px, intensity 1000
    granules[20:26, 20:26] = 2  # 36 px, intensity 2000
    granules[10:14, 50:54] = 3  # 16 px outside both cells, intensity 3000
    intensity = {1: 1000, 2: 2000, 3: 3000}
    image = np.full((64, 80), 100, np.uint16)
    for gid, value in intensity.items():
        image[granules == gid] = value
    (tmp_path / "images").mkdir()
    (tmp_path / "cells").mkdir()
    write_hyperstack(tmp_path / "images" / "plate_A1.tif", np.stack([np.zeros_like(image), image]), "CYX", 0.2)
    tifffile.imwrite(tmp_path / "cells" / "plate_A1.tif", cells)
    monkeypatch.setattr(granule_evaluate, "predict_probability", lambda *a, **k: (granules > 0).astype(np.float32))
    argv = [str(robust_run), "--images", str(tmp_path / "images"), "--cells", str(tmp_path / "cells"), "--channel",
            "1", "--output_dir", str(tmp_path)]  # fmt: skip
    out = granule_evaluate.main(granule_evaluate.parse_args(argv))
    import pandas as pd

    table = pd.read_csv(out / "cells.csv")
    assert list(table["cell_id"]) == [1, 2] and list(table["area_px"]) == [1200, 500]
    np.testing.assert_allclose(table["area_um2"], [1200 * 0.04, 500 * 0.04])
    assert list(table["granules"]) == [2, 0]
    assert table["granule_area_fraction"][0] == pytest.approx(61 / 1200) and table["granule_area_fraction"][1] == 0
    assert table["mean_granule_intensity"][0] == pytest.approx((25 * 1000 + 36 * 2000) / 61)
    assert np.isnan(table["mean_granule_intensity"][1])
    found = pd.read_csv(out / "granules.csv")
    labels = tifffile.imread(out / "masks" / "plate_A1.tif")
    assert sorted(found["granule_id"]) == sorted(np.unique(labels[labels > 0]))  # label ids are the CSV's rows
    for row in found.itertuples():
        assert (labels == row.granule_id).sum() == row.area_px
        assert row.mean_intensity == intensity[int(np.bincount(granules[labels == row.granule_id]).argmax())]
    assert sorted(found["cell_id"]) == [0, 1, 1]  # the granule outside every cell has cell id 0
    np.testing.assert_allclose(found["area_um2"], found["area_px"] * 0.04)
    assert granule_data.read_pixel_size(out / "masks" / "plate_A1.tif") == pytest.approx(0.2, rel=1e-4)
    summary = pd.read_csv(out / "image_summary.csv").iloc[0]
    assert summary["cells"] == 2 and summary["mean_granules_per_cell"] == 1.0
    assert summary["granules_outside_cells"] == 1 and summary["pixel_size_um"] == pytest.approx(0.2, rel=1e-4)
    assert summary["mean_granule_area_fraction_per_cell"] == pytest.approx(61 / 1200 / 2)
    report = json.loads((out / "evaluation_report.json").read_text())
    assert report["counts_per"] == "cell" and report["granules_per_cell"] == 1.0
    assert report["seen_by_training"] == 0 and report["settings"]["channel"] == 1
    os.remove(tmp_path / "cells" / "plate_A1.tif")
    tifffile.imwrite(tmp_path / "cells" / "other.tif", cells)
    with pytest.raises(SystemExit, match="plate_A1.tif has no cell mask in"):
        granule_evaluate.main(granule_evaluate.parse_args(argv))
    argv_plain = [
        str(robust_run),
        "--images",
        str(tmp_path / "images"),
        "--channel",
        "1",
        "--output_dir",
        str(tmp_path),
    ]
    plain = granule_evaluate.main(granule_evaluate.parse_args(argv_plain))
    assert json.loads((plain / "evaluation_report.json").read_text())["counts_per"] == "image"
    assert not (plain / "cells.csv").exists()


def test_the_design_documents_commands_and_outputs(tmp_path, data):
    """../shared/seeds/000_3a704cd6db8cf7bd.txt: `python robust_training_gpu.py` (here stress_granules/train.py, on
    data/stress_granules/{images,masks}, epochs made small), its default settings, its outputs, and the best model
    copied to the working directory as robust_stress_granule_model.pth (improved_... for that preset)."""
    defaults = granule_train.parse_args([])
    assert (defaults.image_size, defaults.batch_size, defaults.lr, defaults.epochs) == (256, 4, 1e-4, 200)
    assert (defaults.early_stopping_patience, defaults.crops_per_image, defaults.save_every) == (30, 5, 10)
    assert (defaults.pos_weight, defaults.scheduler, defaults.selection_metric) == (
        10.0,
        "CosineAnnealingWarmRestarts",
        "f1",
    )
    improved = granule_train.parse_args(["--preset", "improved"])
    assert (improved.epochs, improved.early_stopping_patience, improved.crops_per_image) == (75, 15, 3)
    (tmp_path / "data").mkdir()
    shutil.copytree(data, tmp_path / "data" / "stress_granules")
    small = [
        "--epochs",
        "1",
        "--image_size",
        "64",
        "--base_channels",
        "8",
        "--num_workers",
        "0",
        "--crops_per_image",
        "2",
    ]
    for preset in ("robust", "improved"):
        command = [sys.executable, str(REPO / "stress_granules" / "train.py"), "--preset", preset, *small]
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        (run,) = (tmp_path / "metrics").glob(f"{preset}_cpu_*")
        for name in ("best_model.pth", "training_history.json", "evaluation_report.json", "config.json",
                     "training_curves.png", "test_predictions.png"):  # fmt: skip
            assert (run / name).is_file(), name
        report = json.loads((run / "evaluation_report.json").read_text())
        for key in ("dice", "precision", "recall", "f1", "accuracy", "specificity"):
            assert key in report["model"]["pixel"]
        copy = torch.load(tmp_path / f"{preset}_stress_granule_model.pth", weights_only=True)
        assert copy["epoch"] == torch.load(run / "best_model.pth", weights_only=True)["epoch"]
    result = subprocess.run([sys.executable, str(REPO / "stress_granules" / "train.py")], capture_output=True,
                            text=True, cwd=tmp_path / "metrics", timeout=120)  # fmt: skip
    assert result.returncode != 0 and "data/stress_granules/images: no such folder (--images)" in result.stderr
    assert "Traceback" not in result.stderr


def test_colour_masks_with_alpha_and_planar_rgb_tiffs(tmp_path):
    from PIL import Image

    control = np.zeros((20, 24, 4), np.uint8)
    control[..., 3] = 255  # an empty, opaque RGBA mask: a control, not 480 granule pixels
    Image.fromarray(control, mode="RGBA").save(tmp_path / "rgba.png")
    grey_alpha = np.zeros((20, 24, 2), np.uint8)
    grey_alpha[..., 1] = 255
    grey_alpha[2:6, 3:8, 0] = 255
    Image.fromarray(grey_alpha, mode="LA").save(tmp_path / "la.png")
    assert granule_data.read_mask(tmp_path / "rgba.png", (20, 24), tmp_path / "x.tif").max() == 0
    assert granule_data.mask_has_granules([(tmp_path / "x.tif", tmp_path / "rgba.png")]) == {tmp_path / "x.tif": False}
    assert (granule_data.read_mask(tmp_path / "la.png", (20, 24), tmp_path / "x.tif") > 0).sum() == 20
    grey = np.random.default_rng(0).integers(0, 4000, (20, 24)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "planar.tif", np.stack([grey] * 3), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(tmp_path / "planar.tif"), grey)  # channel-first RGB: samples last


def test_blocks_of_a_large_image_get_clahe_tiles_of_the_training_images_size():
    """CLAHE's grid is a share of the image: a 1,024 x 2,048 px block of a run trained on 512 px images gets
    twice and four times the tiles (64 px tiles for the 8 x 8 grid, as in training); an image of the training
    images' size gets the features it always got; the last, narrower block keeps the tile size."""
    settings = granule_data.FEATURE_SETTINGS["multiscale"]
    assert settings == ((2.0, (8, 8)), (4.0, (8, 8)), (8.0, (16, 16)))
    block = granule_data.block_clahe_settings(settings, (1024, 2048), (512, 512))
    assert block == [(2.0, (32, 16)), (4.0, (32, 16)), (8.0, (64, 32))]  # (across, down)
    assert granule_data.block_clahe_settings(settings, (1024, 100), (512, 512))[0] == (2.0, (2, 16))
    rng = np.random.default_rng(0)
    image = (rng.normal(400, 30, (512, 512)) + 2000 * (rng.random((512, 512)) > 0.995)).astype(np.uint16)
    prep = granule_data.Preprocess("multiscale")
    np.testing.assert_array_equal(
        prep.compute(image, (300.0, 2500.0), (512, 512)), prep.compute(image, (300.0, 2500.0))
    )
    half = prep.compute(image[:256], (300.0, 2500.0), (512, 512))  # 8 x 4 tiles of 64 px, not 8 x 8 of 32 x 64
    assert not np.array_equal(half, prep.compute(image[:256], (300.0, 2500.0)))


def test_a_large_tiff_is_segmented_block_by_block_as_the_whole_image(robust_run, tmp_path, monkeypatch):
    """A TIFF past data.IN_MEMORY_PX is read a block at a time (tifffile's zarr view), stretched by the whole
    image's percentiles and stitched: with a per-pixel segmenter (the stretched image thresholded; the run's
    dynamic-range floor may keep it below 0.5), the blocks give
    the granules the whole image gives, each once, into masks/<name>.ome.zarr, and their rows in granules.csv."""
    import pandas as pd
    import zarr

    rng = np.random.default_rng(2)
    image = rng.normal(500, 20, (900, 1100)).clip(0, 65535).astype(np.uint16)
    yy, xx = np.mgrid[:900, :1100]
    for y in range(15, 890, 34):
        for x in range(15, 1090, 34):
            cy, cx, r = y + rng.uniform(-6, 6), x + rng.uniform(-6, 6), rng.uniform(3, 7)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = 3000
    images = tmp_path / "plate"
    images.mkdir()
    tifffile.imwrite(images / "well_A1.tif", image, tile=(256, 256), resolution=(1 / 0.1, 1 / 0.1),
                     metadata={"unit": "um"}, imagej=True)  # fmt: skip
    monkeypatch.setattr(
        granule_data.Preprocess, "compute", lambda self, im, bounds=None, shape=None: self.normalize(im, bounds)[None]
    )
    monkeypatch.setattr(granule_evaluate, "predict_probability", lambda model, f, *a, **k: np.asarray(f[0], np.float32))
    argv = [str(robust_run), "--images", str(images), "--output_dir", str(tmp_path), "--threshold", "0.1",
            "--min_size", "5", "--no-split_touching"]  # fmt: skip
    whole_out = granule_evaluate.main(granule_evaluate.parse_args(argv))
    whole = tifffile.imread(whole_out / "masks" / "well_A1.tif").astype(np.int64)
    monkeypatch.setattr(granule_data, "IN_MEMORY_PX", 500 * 500)
    out = granule_evaluate.main(granule_evaluate.parse_args([*argv, "--block_size", "384", "--block_overlap", "64"]))
    streamed = np.asarray(zarr.open_group(str(out / "masks" / "well_A1.ome.zarr"), mode="r")["0"][:])
    n = int(whole.max())
    assert n >= 500 and streamed.max() == n
    pairs = np.unique(np.stack([whole.ravel(), streamed.ravel()]), axis=1)
    assert len(pairs[0]) == n + 1 and ((pairs[0] == 0) == (pairs[1] == 0)).all()  # the same granules
    table = pd.read_csv(out / "granules.csv")
    assert table["granule_id"].tolist() == list(range(1, n + 1))
    row = table.iloc[n // 2]
    ys, xs = np.nonzero(streamed == row["granule_id"])
    assert (row["centroid_y"], row["centroid_x"], row["area_px"]) == pytest.approx((ys.mean(), xs.mean(), len(ys)))
    assert row["area_um2"] == pytest.approx(len(ys) * 0.01)
    summary = pd.read_csv(out / "image_summary.csv")
    assert summary.loc[0, "granules"] == n and summary.loc[0, "blocks"] == 3 * 4
    # a large z-stack cannot be read a plane-block at a time: it is skipped, named, and the other image goes on
    stack = np.stack([image[:600, :600]] * 3)
    tifffile.imwrite(images / "stack_B2.tif", stack, tile=(256, 256), imagej=True, metadata={"axes": "ZYX"})
    with pytest.raises(SystemExit, match="1 image\\(s\\) could not be read"):
        granule_evaluate.main(granule_evaluate.parse_args([*argv, "--output_dir", str(tmp_path / "with_stack")]))
    (again,) = (tmp_path / "with_stack").glob("predictions*")
    report = json.loads((again / "evaluation_report.json").read_text())
    assert len(report["skipped"]) == 1 and "stack_B2.tif" in report["skipped"][0] and "2D TIFF" in report["skipped"][0]
    again_labels = zarr.open_group(str(again / "masks" / "well_A1.ome.zarr"), mode="r")["0"]
    assert int(np.asarray(again_labels[:]).max()) == n
