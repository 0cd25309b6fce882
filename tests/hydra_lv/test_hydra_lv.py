"""hydra_lv: configuration, targets, sliding-window inference, decoding, the training loop (demo, resume,
torchrun, profiling), test mode re-scored with scikit-image, figures, Windows wrappers and bad inputs."""

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from skimage.metrics import adapted_rand_error, variation_of_information

from hydra_lv import evaluate as hydra_evaluate
from hydra_lv import train as hydra_train
from hydra_lv import visualize as hydra_visualize
from hydra_lv.data import (
    PatchDataset,
    apply_overrides,
    find_volumes,
    load_config,
    make_targets,
    write_demo_volumes,
    write_volume,
)
from hydra_lv.model import (
    HydraLoss,
    RSUNet,
    build_model,
    connected_components_baseline,
    decode_instances,
    sliding_window_inference,
    watershed_by_component,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """Three small synthetic volumes in the real layout."""
    return write_demo_volumes(tmp_path_factory.mktemp("em") / "data", n_volumes=3, shape=(12, 96, 96))


def tiny(root: Path, *extra) -> list[str]:
    """Overrides for a seconds-long run on the small volumes: vol1-2 train, vol3 validation and test."""
    items = {
        "data.train_image": f"{root}/vol[12]_im.h5",
        "data.train_label": f"{root}/vol[12]_vesicle_ins.h5",
        "data.train_mask": f"{root}/vol[12]_mask.h5",
        "data.val_image": f"{root}/vol3_im.h5",
        "data.val_label": f"{root}/vol3_vesicle_ins.h5",
        "data.val_mask": f"{root}/vol3_mask.h5",
        "model.filters": "[4,8]",
        "data.patch_size": "[8,32,32]",
        "model.input_size": "[8,32,32]",
        "model.output_size": "[8,32,32]",
        "data.pad_size": "[1,4,4]",
        "data.iterations_per_epoch": "4",
        "data.val_patches": "4",
        "system.training.batch_size": "2",
        "system.training.num_workers": "0",
        "optimization.max_epochs": "2",
    }
    return [f"{k}={v}" for k, v in items.items()] + list(extra)


def train(tmp_path, root, *argv, overrides=()):
    return hydra_train.main(
        hydra_train.parse_args(
            ["--output-root", str(tmp_path / "outputs"), "--no-test-after", *argv, *tiny(root, *overrides)]
        )
    )


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


def test_overrides_are_parsed_as_yaml_and_unknown_keys_name_close_matches():
    cfg = load_config(
        REPO / "hydra_lv" / "hydra-lv.yaml",
        ["system.training.batch_size=8", "data.patch_size=[24,96,96]", "optimization.optimizer.lr=1e-4",
         "data.val_image=null", "model.architecture=unet3d", "experiment_name=lv run"],
    )  # fmt: skip
    assert cfg["system"]["training"]["batch_size"] == 8 and cfg["data"]["patch_size"] == [24, 96, 96]
    assert cfg["optimization"]["optimizer"]["lr"] == pytest.approx(1e-4) and cfg["data"]["val_image"] is None
    assert cfg["model"]["architecture"] == "unet3d" and cfg["experiment_name"] == "lv run"
    defaults = yaml.safe_load((REPO / "hydra_lv" / "hydra-lv.yaml").read_text())
    assert defaults["model"]["loss_weights"] == [1.0, 1.0, 3.0] and defaults["inference"]["overlap"] == 0.25
    with pytest.raises(
        SystemExit, match=r"unknown key 'system.training.batchsize'.*did you mean system.training.batch_size"
    ):
        apply_overrides(defaults, ["system.training.batchsize=8"])
    with pytest.raises(SystemExit, match="expected dotted.key=value"):
        apply_overrides(defaults, ["batch_size"])
    with pytest.raises(SystemExit, match="not valid YAML"):
        apply_overrides(defaults, ["data.patch_size=[1,2"])
    assert apply_overrides(defaults, [])["data"] == defaults["data"]  # a copy, the input untouched


# ----------------------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------------------


def test_targets_on_a_hand_made_volume():
    labels = np.zeros((1, 5, 9), np.int64)
    labels[0, 1:4, 1:4] = 1  # a 3 x 3 square
    labels[0, 1:4, 4:7] = 2  # touching it on the right
    binary, boundary, distance = make_targets(labels, resolution=(30, 8, 8))
    assert binary.sum() == 18 and set(np.unique(binary)) == {0, 1}
    # both sides of every border (edge_mode all): every voxel of both squares touches another id in-plane except
    # the two centres, and so does each background voxel beside a square (4-neighbours: not the corners)
    expected_boundary = np.zeros(labels.shape, np.float32)
    expected_boundary[0, 0, 1:7] = expected_boundary[0, 4, 1:7] = 1  # above and below
    expected_boundary[0, 1:4, 0] = expected_boundary[0, 1:4, 7] = 1  # left and right
    expected_boundary[0, 1:4, 1:7] = 1
    expected_boundary[0, 2, 2] = expected_boundary[0, 2, 5] = 0
    assert np.array_equal(boundary, expected_boundary)
    # distance: the centre is 2 px (16 nm) from the outside, the rim 1 px (8 nm); each square scaled to its max
    square = np.array([[0.5, 0.5, 0.5], [0.5, 1.0, 0.5], [0.5, 0.5, 0.5]], np.float32)
    assert np.allclose(distance[0, 1:4, 1:4], square) and np.allclose(distance[0, 1:4, 4:7], square)
    assert (distance[labels == 0] == -1).all()


def test_a_vesicle_cut_by_the_block_goes_on_beyond_it_and_context_makes_the_patch_exact(tmp_path):
    """The block's border is not the vesicle's outside: a 4 x 3 px rectangle cut by the x = 0 face keeps 16 nm (its
    maximum) at the face instead of 8 nm (truncated). With data.pad_size of context around the patch, the patch's
    targets are those of the whole volume."""
    labels = np.zeros((1, 5, 8), np.int64)
    labels[0, 1:4, 0:4] = 1  # rows 1-3, columns 0-3: touches the x = 0 face
    distance = make_targets(labels, resolution=(30, 8, 8))[2, 0]
    assert np.allclose(distance[2, :4], [1.0, 1.0, 1.0, 0.5]) and np.allclose(distance[1, :4], 0.5)

    volume = np.zeros((6, 48, 48), np.uint32)
    zz, yy, xx = np.ogrid[:6, :48, :48]
    volume[((zz - 2.5) / 2) ** 2 + ((yy - 24) / 9) ** 2 + ((xx - 20) / 9) ** 2 <= 1] = 7  # 18 px across
    write_volume(tmp_path / "v_im.h5", np.full(volume.shape, 100, np.uint8))
    write_volume(tmp_path / "v_ins.h5", volume)
    (files,) = find_volumes({"train_image": f"{tmp_path}/v_im.h5", "train_label": f"{tmp_path}/v_ins.h5"}, "train")
    whole = make_targets(volume)
    for pad in ((0, 0, 0), (2, 16, 16)):
        dataset = PatchDataset([files], (6, 16, 16), pad, (30, 8, 8), 1)
        item = dataset.patch_at(0, (3, 24, 32))  # the patch: x 24..40, the vesicle's right edge (x 12..28)
        target = item["target"].numpy()
        assert (target[0] > 0).sum() > 20 and item["weight"].all()
        if pad == (0, 0, 0):  # cut at the patch's x = 0: the distances there are not the rim's smallest
            face = target[2][:, :, 0][target[0][:, :, 0] > 0]
            assert face.max() == pytest.approx(1.0)
        else:  # the same targets as the whole volume's where the patch sits
            assert np.allclose(target, whole[:, :, 16:32, 24:40])


def test_distance_target_is_in_physical_units():
    """A block of 3 sections x 7 x 7 px: its centre is 2 sections (60 nm) from the outside in z but 4 px (32 nm)
    in-plane, so 32 nm is its distance; the top-section centre is 30 nm away in z: 30 / 32. Counting voxels
    instead would give 1 / 2."""
    labels = np.zeros((5, 9, 9), np.int64)
    labels[1:4, 1:8, 1:8] = 1
    distance = make_targets(labels, resolution=(30, 8, 8))[2]
    assert distance[2, 4, 4] == pytest.approx(1.0)
    assert distance[1, 4, 4] == pytest.approx(30 / 32)
    assert distance[2, 4, 3] == pytest.approx(24 / 32)


def test_patches_stay_inside_the_valid_mask_and_are_reproducible(volumes):
    vols = find_volumes({"train_image": f"{volumes}/vol*_im.h5", "train_label": f"{volumes}/vol*_vesicle_ins.h5",
                         "train_mask": f"{volumes}/vol*_mask.h5"}, "train")  # fmt: skip
    assert [v.name for v in vols] == ["vol1", "vol2", "vol3"] and vols[0].shape == (12, 96, 96)
    dataset = PatchDataset(vols, (8, 32, 32), (1, 4, 4), (30, 8, 8), 8, augment=True)
    item = dataset[3]
    assert item["image"].shape == (1, 8, 32, 32) and item["target"].shape == (3, 8, 32, 32)
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert torch.equal(dataset.item(3, 5)["image"], dataset.item(3, 5)["image"])  # (epoch seed, index) fixes it
    assert not torch.equal(dataset.item(3, 5)["image"], dataset.item(3, 6)["image"])
    # centres are drawn where the mask is set: the unannotated corner block is (mostly) out of every patch
    assert np.mean([dataset[i]["weight"].mean().item() for i in range(8)]) > 0.6
    # ... and reach the last sections and columns a patch can be centred on: z 8 = 12 - 8 / 2, y and x 80
    assert dataset.centres[0][:, 0].max() == 8 and dataset.centres[0][:, 1:].max() == 80


def test_only_voxels_inside_the_volume_count(tmp_path):
    """A volume smaller than the patch, without a mask: the mirrored margin carries no loss weight."""
    write_volume(tmp_path / "small_im.h5", np.full((4, 20, 24), 128, np.uint8))
    labels = np.zeros((4, 20, 24), np.uint32)
    labels[1:3, 4:12, 5:15] = 4_000_000_000  # a large id is fine
    write_volume(tmp_path / "small_ins.h5", labels)
    (volume,) = find_volumes(
        {"train_image": f"{tmp_path}/small_im.h5", "train_label": f"{tmp_path}/small_ins.h5"}, "train"
    )
    dataset = PatchDataset([volume], (8, 32, 32), (1, 4, 4), (30, 8, 8), 4)
    for i in range(4):
        item = dataset[i]
        assert 0 < item["weight"].sum() <= 4 * 20 * 24 < 8 * 32 * 32
        assert 0 < item["target"][0].sum() <= 2 * 8 * 10 and item["target"][2].max() == 1  # the vesicle, not mirrored


# ----------------------------------------------------------------------------------------------------------------
# Sliding-window inference and decoding
# ----------------------------------------------------------------------------------------------------------------


class Identity(torch.nn.Module):
    """Logits whose sigmoid is the input: inference must give the input back exactly."""

    def forward(self, x):
        logit = torch.logit(x.clamp(1e-4, 1 - 1e-4))
        return torch.cat([logit, logit, torch.atanh(x.clamp(-0.999, 0.999))], 1)


@pytest.mark.parametrize("shape", [(21, 70, 90), (5, 20, 30)])  # not a multiple of the window; smaller than it
def test_sliding_window_of_an_identity_model_reproduces_the_input(shape):
    rng = np.random.default_rng(0)
    volume = rng.integers(1, 255, shape).astype(np.uint8)
    whole = sliding_window_inference(Identity(), volume, (8, 32, 32), overlap=0.25, batch_size=3)
    expected = np.clip(volume / 255.0, 1e-4, 1 - 1e-4)
    assert whole.shape == (3, *shape)
    assert np.allclose(whole[0], expected, atol=1e-5) and np.allclose(
        whole[2], np.clip(volume / 255, -0.999, 0.999), atol=1e-4
    )
    # streamed: sections written out as they are finished, each once, in order, give the same volume
    out = np.full((3, *shape), np.nan, np.float32)

    def write(z0, z1, block):
        assert np.isnan(out[:, z0:z1]).all()  # each section written once
        out[:, z0:z1] = block

    sliding_window_inference(Identity(), volume, (8, 32, 32), overlap=0.25, batch_size=3, write=write)
    assert not np.isnan(out).any()
    assert np.allclose(out, whole, atol=1e-6)


def test_blending_weights_sum_correctly_at_the_borders():
    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 3, *x.shape[2:]), 2.0)

    out = sliding_window_inference(Constant(), np.zeros((13, 50, 41), np.float32), (8, 32, 32), overlap=0.25)
    assert np.allclose(out[0], 1 / (1 + np.exp(-2.0)), atol=1e-6) and np.allclose(out[2], np.tanh(2.0), atol=1e-6)


def test_decoding_separates_two_touching_spheres():
    zz, yy, xx = np.mgrid[:12, :48, :64]
    truth = np.zeros((12, 48, 64), np.int64)
    for index, cx in ((1, 20), (2, 40)):  # radius 10 px in-plane, 3 sections in z: they touch at x = 30
        truth[(((zz - 6) / 3.5) ** 2 + ((yy - 24) / 10) ** 2 + ((xx - cx) / 10) ** 2) <= 1] = index
    binary, boundary, distance = make_targets(truth)
    segmentation = decode_instances(binary, boundary, distance)
    assert segmentation.max() == 2
    for index in (1, 2):
        ids, counts = np.unique(segmentation[truth == index], return_counts=True)
        best = ids[counts.argmax()]
        iou = ((segmentation == best) & (truth == index)).sum() / ((segmentation == best) | (truth == index)).sum()
        assert best > 0 and iou > 0.8
    assert connected_components_baseline(binary).max() == 1  # thresholding merges them


def test_watershed_by_component_is_the_whole_volume_watershed_but_for_ties():
    from scipy import ndimage
    from skimage.segmentation import watershed

    rng = np.random.default_rng(0)
    # random blobs (no ties: a continuous random distance), several separate clusters, seeds in most of them
    mask = ndimage.gaussian_filter(rng.normal(size=(10, 60, 60)), 2) > 0.05
    image = ndimage.gaussian_filter(rng.normal(size=mask.shape), 1.5).astype(np.float32)
    markers = ndimage.label((image < np.quantile(image, 0.05)) & mask)[0]
    whole = watershed(image, markers=markers, mask=mask)
    assert ndimage.label(mask)[1] > 3 and len(np.unique(markers)) > 5
    np.testing.assert_array_equal(watershed_by_component(image, markers, mask), whole)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def test_demo_beats_the_connected_components_baseline_then_visualize(tmp_path):
    """`python hydra_lv/train.py --demo`, as a user types it, for half its 30 epochs: trains, then test mode
    scores volume 4, which training held out (volume 3 chose the model)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "hydra_lv" / "train.py"), "--demo", "optimization.max_epochs=15"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    run = tmp_path / "outputs" / "hydra_lv_demo"
    outputs = ["config.yaml", "metrics.csv", "train.log", "checkpoints/best.ckpt", "checkpoints/last.ckpt"]
    outputs += ["results/predictions.h5", "results/segmentation.h5", "results/test_results.json", "test_results.log"]
    for name in outputs:
        assert (run / name).is_file(), name
    results = json.loads((run / "results" / "test_results.json").read_text())
    report = results["volumes"]["vol4"]
    # the demo tests on a volume neither training nor validation saw, and says so
    assert report["training"] == "held out" and results["scored"] == {"split": "test", "held_out": True,
                                                                      "note": "test volumes"}  # fmt: skip
    baseline = report["baseline_threshold_connected_components"]
    assert report["adapted_rand_error"] < baseline["adapted_rand_error"] - 0.15, (report, baseline)
    assert report["instance_f1"] > 0.7

    # segmentation.h5, re-scored with scikit-image inside the valid mask, gives the numbers of the report
    data = tmp_path / "outputs" / "demo_data"
    with (
        h5py.File(run / "results" / "segmentation.h5") as f,
        h5py.File(data / "vol4_vesicle_ins.h5") as g,
        h5py.File(data / "vol4_mask.h5") as m,
    ):
        pred, true, valid = f["main"][:].astype(np.int64), g["main"][:].astype(np.int64), m["main"][:] > 0
    error, _, _ = adapted_rand_error(true * valid, pred * valid, ignore_labels=(0,))
    split, merge = variation_of_information(true * valid, pred * valid, ignore_labels=(0,))
    assert report["adapted_rand_error"] == pytest.approx(error, abs=1e-9)
    assert (report["voi_split"], report["voi_merge"]) == pytest.approx((split, merge), abs=1e-9)
    with h5py.File(run / "results" / "predictions.h5") as f:
        assert f["main"].shape == (3, 24, 160, 160) and f["main"].dtype == np.uint8

    figures = hydra_visualize.main(hydra_visualize.parse_args(["--results", str(run / "results")]))
    assert len(figures) == 2 and all(p.is_file() and p.stat().st_size > 10_000 for p in figures)
    # test mode again (from train.py) never overwrites the first results
    again = hydra_train.main(
        hydra_train.parse_args(["--mode", "test", "--checkpoint", str(run / "checkpoints" / "best.ckpt")])
    )
    assert again == run / "results_2" and len((run / "test_results.log").read_text().splitlines()) == 2
    # another image, no labels: segmented, not scored (the checkpoint's test labels belong to volume 4)
    other = hydra_evaluate.main(hydra_evaluate.parse_args(
        ["--checkpoint", str(run / "checkpoints" / "best.ckpt"), f"data.test_image={data / 'vol1_im.h5'}"]
    ))  # fmt: skip
    entry = json.loads((other / "test_results.json").read_text())["volumes"]["vol1"]
    assert entry["training"] == "trained on"  # a training volume segmented in test mode is named as one
    assert entry["label"] is None and "adapted_rand_error" not in entry and (other / "segmentation.h5").is_file()
    figures = hydra_visualize.main(hydra_visualize.parse_args(["--results", str(other)]))
    assert len(figures) == 2


@pytest.mark.parametrize("workers", [0, 1])  # 1: a persistent worker holds its own copy of the dataset
def test_resume_after_interruption_repeats_the_next_epoch_exactly(tmp_path, volumes, monkeypatch, workers):
    workers = [f"system.training.num_workers={workers}"]
    full = train(tmp_path / "full", volumes, overrides=workers)
    expected = (full / "metrics.csv").read_text().splitlines()
    original, calls = hydra_train.train_one_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed in the second epoch
        return original(*args, **kwargs)

    monkeypatch.setattr(hydra_train, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", volumes, overrides=workers)
    monkeypatch.setattr(hydra_train, "train_one_epoch", original)
    cut = tmp_path / "cut" / "outputs" / "hydra_lv_rsunet"
    hydra_train.main(hydra_train.parse_args(["--resume", str(cut), "--no-test-after"]))
    resumed = (cut / "metrics.csv").read_text().splitlines()
    strip = lambda lines: [",".join(v for i, v in enumerate(line.split(",")) if i != 2) for line in lines]  # noqa: E731
    assert strip(resumed) == strip(expected)  # every value but the seconds column
    again = train(
        tmp_path / "full", volumes, overrides=workers
    )  # the same experiment name again: a new folder, the first untouched
    assert again.name == "hydra_lv_rsunet_2" and (full / "metrics.csv").read_text().splitlines() == expected


def test_gradient_accumulation_unet3d_tensorboard_and_profile(tmp_path, volumes):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(tmp_path, volumes, overrides=["model.architecture=unet3d", "optimization.accumulate_grad_batches=2",
                                               "optimization.max_epochs=1"])  # fmt: skip
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["config"]["model"]["architecture"] == "unet3d" and saved["epoch"] == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["optimization"]["accumulate_grad_batches"] == 2
    # TensorBoard: every loss term, the learning rate, the validation terms, the seed document's names, images
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    ea.Reload()
    (row,) = csv.DictReader((run / "metrics.csv").open())
    expected = {"train/loss": "train_loss", "train/binary": "train_binary", "train/boundary": "train_boundary",
                "train/distance": "train_distance", "val/loss": "val_loss", "val/binary": "val_binary",
                "val/boundary": "val_boundary", "val/distance": "val_distance", "lr": "lr",
                "train_loss_total_epoch": "train_loss", "train_loss_0": "train_binary",
                "train_loss_1": "train_boundary", "train_loss_2": "train_distance"}  # fmt: skip
    assert set(expected) <= set(ea.Tags()["scalars"])
    for tag, column in expected.items():
        (event,) = ea.Scalars(tag)
        assert event.step == 1 and event.value == pytest.approx(float(row[column]), rel=1e-5), tag
    assert ea.Tags()["images"] == ["val/predictions"]
    profile = train(tmp_path, volumes, "--profile-dataloader")
    assert profile["loader_batches_per_s"] > 0 and profile["loader_and_step_batches_per_s"] > 0
    assert profile["limited_by"] in ("the data loader", "the model step")


def test_torchrun_two_cpu_processes(tmp_path, volumes):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(REPO / "hydra_lv" / "train.py"), "--output-root", str(tmp_path / "outputs"), *tiny(volumes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "outputs").iterdir()  # only rank 0 writes
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "2 process(es)" in (run / "train.log").read_text()
    assert (run / "results" / "test_results.json").is_file()  # test mode after training, on rank 0


@pytest.mark.parametrize("name", ["train.bat", "test.bat"])
def test_windows_wrappers_use_flags_that_exist(name):
    lines = [line for line in (REPO / "hydra_lv" / name).read_text().splitlines() if "hydra_lv\\train.py" in line]
    assert len(lines) == 1
    words = shlex.split(lines[0].split("hydra_lv\\train.py", 1)[1].replace("\\", "/"))
    words = [w.replace("%CHECKPOINT%", "best.ckpt").replace("%DATA%", "data") for w in words if w != "%*"]
    args = hydra_train.parse_args(words)
    load_config(args.config, args.overrides)  # every override is a known key
    assert (args.mode == "test") == (name == "test.bat")


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(tmp_path, volumes):
    with pytest.raises(SystemExit, match=r"data.train_image=.*nothing_\*.h5: the pattern matches no file"):
        train(tmp_path, volumes, overrides=[f"data.train_image={tmp_path}/nothing_*.h5"])
    write_volume(tmp_path / "small_im.h5", np.zeros((12, 64, 96), np.uint8))
    with pytest.raises(
        SystemExit, match=r"vol1_vesicle_ins.h5 has shape \(12, 96, 96\), its image small_im.h5 has \(12, 64, 96\)"
    ):
        overrides = [f"data.train_image={tmp_path}/small_im.h5", f"data.train_label={volumes}/vol1_vesicle_ins.h5"]
        train(tmp_path, volumes, overrides=[*overrides, "data.train_mask=null"])
    with h5py.File(tmp_path / "two_im.h5", "w") as f:
        f["raw"] = np.zeros((4, 8, 8), np.uint8)
        f["other"] = np.zeros((4, 8, 8), np.uint8)
    with pytest.raises(SystemExit, match=r"two_im.h5: holds 2 datasets \(.*\) and none named 'main'"):
        train(tmp_path, volumes, overrides=[f"data.train_image={tmp_path}/two_im.h5", "data.train_mask=null",
                                            f"data.train_label={volumes}/vol1_vesicle_ins.h5"])  # fmt: skip
    with pytest.raises(
        SystemExit, match="model.architecture=vnet: unknown; choose one of rsunet, unet3d, monai_unet, mednext"
    ):
        train(tmp_path, volumes, overrides=["model.architecture=vnet"])
    with pytest.raises(SystemExit, match="unknown key 'model.filter'"):
        train(tmp_path, volumes, overrides=["model.filter=[4,8]"])
    with pytest.raises(SystemExit, match=r"data.patch_size=\[8, 33, 32\]: .*multiples of \[1, 2, 2\] for 2 levels"):
        train(tmp_path, volumes, overrides=["data.patch_size=[8,33,32]"])
    with pytest.raises(SystemExit, match="no last.ckpt there"):
        hydra_train.main(hydra_train.parse_args(["--resume", str(tmp_path / "none")]))
    with pytest.raises(SystemExit, match="--mode test needs --checkpoint"):
        hydra_train.main(hydra_train.parse_args(["--mode", "test"]))
    (tmp_path / "bad.ckpt").write_bytes(b"junk")
    with pytest.raises(SystemExit, match="bad.ckpt: not a readable checkpoint"):
        hydra_evaluate.main(hydra_evaluate.parse_args(["--checkpoint", str(tmp_path / "bad.ckpt")]))
    # a patch larger than the volume is padded, not a crash: a single-name dataset (not `main`) reads too
    with h5py.File(tmp_path / "tiny_im.h5", "w") as f:
        f["raw"] = np.random.default_rng(0).integers(0, 255, (4, 20, 24), dtype=np.uint8)
    with h5py.File(tmp_path / "tiny_ins.h5", "w") as f:
        labels = np.zeros((4, 20, 24), np.uint16)
        labels[1:3, 5:12, 6:14] = 7
        f["seg"] = labels
    overrides = [f"data.train_image={tmp_path}/tiny_im.h5", f"data.train_label={tmp_path}/tiny_ins.h5"]
    run = train(tmp_path, volumes, overrides=[*overrides, "data.train_mask=null", "optimization.max_epochs=1"])
    assert (run / "checkpoints" / "best.ckpt").is_file()


def test_flip_tta_of_an_identity_model_is_the_identity():
    volume = np.random.default_rng(1).integers(1, 255, (10, 40, 36)).astype(np.uint8)
    plain = sliding_window_inference(Identity(), volume, (8, 32, 32))
    tta = sliding_window_inference(Identity(), volume, (8, 32, 32), tta=True)
    assert np.allclose(tta, plain, atol=1e-5)


def test_deep_supervision_loss_is_the_full_loss_plus_halved_coarser_scales():
    torch.manual_seed(0)
    target = torch.zeros(1, 3, 4, 16, 16)
    target[:, 0, :, 4:12, 4:12] = 1
    target[:, 1, :, 4:12, 4] = 1  # a thin line: max-pooling keeps it at the coarse scale
    target[:, 2] = torch.where(target[:, 0] > 0, 0.5, -1.0)
    valid = torch.ones(1, 1, 4, 16, 16)
    full, coarse = torch.randn(1, 3, 4, 16, 16), torch.randn(1, 3, 4, 8, 8)
    loss = HydraLoss()
    alone, terms = loss(full, target, valid)
    both, same_terms = loss((full, coarse), target, valid)
    small = torch.stack([target[:, 0, :, ::2, ::2], target[:, 1].reshape(1, 4, 8, 2, 8, 2).amax((3, 5)),
                         target[:, 2, :, ::2, ::2]], 1)  # fmt: skip
    assert small[:, 1, :, 2:6, 2].eq(1).all()
    expected = alone + loss(coarse, small, torch.ones(1, 1, 4, 8, 8))[0] / 2
    assert torch.allclose(both, expected) and terms == same_terms


@pytest.mark.parametrize("norm", ["batch", "sync_batch", "group", "instance", "none"])
def test_rsunet_follows_the_connectomics_layout(norm):
    model = build_model("rsunet", filters=(4, 8, 16), norm=norm, deep_supervision=True, resolution=(30, 8, 8))
    assert isinstance(model, RSUNet)
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.ConvTranspose3d not in kinds  # upsampling + 1x1x1 convolution, no checkerboard
    expected = {"batch": torch.nn.BatchNorm3d, "sync_batch": torch.nn.BatchNorm3d, "group": torch.nn.GroupNorm,
                "instance": torch.nn.InstanceNorm3d, "none": None}[norm]  # fmt: skip
    assert expected is None or expected in kinds
    if expected is None:
        assert not kinds & {torch.nn.BatchNorm3d, torch.nn.GroupNorm, torch.nn.InstanceNorm3d}
    level0, level2 = model.down[0], model.down[2]
    assert level0.pre[2].kernel_size == (1, 3, 3) and level2.pre[2].kernel_size == (3, 3, 3)  # z coarse at 8 nm
    assert hasattr(level0, "res") and hasattr(level0, "post")
    outputs = model.train()(torch.zeros(2, 1, 4, 32, 32))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 4, 32, 32), (2, 3, 4, 16, 16)]
    assert model.eval()(torch.zeros(1, 1, 4, 32, 32)).shape == (1, 3, 4, 32, 32)


@pytest.mark.parametrize("architecture", ["mednext", "rsunet"])
def test_mednext_and_deep_supervision_train_one_step(tmp_path, volumes, architecture):
    """One epoch of the real loop with deep supervision, then test mode loads the checkpoint."""
    sizes = ["data.patch_size=[8,32,32]", "model.input_size=[8,32,32]", "model.output_size=[8,32,32]"]
    run = train(tmp_path, volumes, overrides=[f"model.architecture={architecture}", "model.deep_supervision=true",
                                              "optimization.max_epochs=1", *sizes])  # fmt: skip
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    if architecture == "mednext":
        assert any("enc_stages" in key for key in checkpoint["model"])
    history = list(csv.DictReader(open(run / "metrics.csv")))
    assert np.isfinite(float(history[0]["train_loss"])) and float(history[0]["train_loss"]) > 0
    model, _ = hydra_evaluate.load_model(run / "checkpoints" / "best.ckpt", torch.device("cpu"))
    assert model(torch.zeros(1, 1, 8, 32, 32)).shape == (1, 3, 8, 32, 32)  # eval: one output


def test_an_old_checkpoint_is_a_clear_error(tmp_path, volumes):
    run = train(tmp_path, volumes, overrides=["optimization.max_epochs=1"])
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["model"] = {k.replace(".pre.", ".old."): v for k, v in checkpoint["model"].items()}
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.raises(SystemExit, match=r"old.ckpt: its weights do not fit .* older version of RSUNet"):
        hydra_evaluate.load_model(tmp_path / "old.ckpt", torch.device("cpu"))


def test_monai_unet_is_monai_and_trains_on_anisotropic_patches():
    from monai.networks.nets import UNet

    model = build_model("monai_unet", filters=(4, 8, 16))
    assert isinstance(model, UNet)
    assert model(torch.zeros(1, 1, 8, 32, 32)).shape == (1, 3, 8, 32, 32)  # z is never downsampled


def test_train_validation_and_test_globs_that_share_a_file_are_an_error(tmp_path):
    """The document's data.train_image `vol*_im.h5` also matches its Option 6 `vol_val*_im.h5`."""
    from hydra_lv.data import DataError, check_splits_disjoint

    for name in ("vol1_im.h5", "vol2_im.h5", "vol_val1_im.h5"):
        (tmp_path / name).write_bytes(b"")
    data = {"train_image": str(tmp_path / "vol*_im.h5"), "val_image": str(tmp_path / "vol_val*_im.h5")}
    with pytest.raises(DataError, match=r"vol_val1_im.h5 matches both data.train_image=.*vol\*_im.h5 and "
                       r"data.val_image=.*vol_val\*_im.h5"):  # fmt: skip
        check_splits_disjoint(data)
    check_splits_disjoint({**data, "train_image": str(tmp_path / "vol[0-9]*_im.h5")})  # exclusive globs pass
    with pytest.raises(DataError, match="vol2_im.h5 matches both data.train_image=.* and data.test_image="):
        check_splits_disjoint({"train_image": str(tmp_path / "vol[0-9]*_im.h5"), "test_image": str(tmp_path / "vol2*")})
    with pytest.raises(DataError, match="vol_val1_im.h5 matches both data.val_image=.* and data.test_image="):
        check_splits_disjoint({"val_image": str(tmp_path / "vol_val*"), "test_image": str(tmp_path / "vol_val1*")})
    with pytest.raises(SystemExit, match="matches both"):  # training stops on it before anything is written
        cfg = hydra_train.load_config(hydra_train.DEFAULT_CONFIG, [f"data.{k}={v}" for k, v in data.items()])
        hydra_train.load_data(cfg, 0, 1)


def test_without_validation_volumes_training_holds_out_regions_and_test_mode_says_so(tmp_path, volumes):
    from hydra_lv.data import held_out_regions

    vols = find_volumes({"train_image": f"{volumes}/vol[12]_im.h5", "train_label": f"{volumes}/vol[12]_vesicle_ins.h5",
                         "train_mask": f"{volumes}/vol[12]_mask.h5"}, "train")  # fmt: skip
    deep = [v.__class__(v.image, v.label, v.mask, (40, 96, 96)) for v in vols]  # z deep enough: a z-slab
    train_regions, val_regions = held_out_regions(deep, (8, 32, 32), 0.2)
    assert train_regions[0].bounds == ((0, 32), (0, 96), (0, 96)) and val_regions[0].bounds == (
        (32, 40),
        (0, 96),
        (0, 96),
    )
    train_regions, val_regions = held_out_regions(vols, (8, 32, 32), 0.2)  # 12 sections: cut along x instead
    assert train_regions[0].bounds == ((0, 12), (0, 96), (0, 64)) and val_regions[0].region == " x 64:96"
    dataset = PatchDataset(train_regions, (8, 32, 32), (1, 4, 4), (30, 8, 8), 16, augment=True, seed=3)
    assert all(c[2] + 16 <= 64 for centres in dataset.centres for c in centres)  # every patch inside the region
    for i in range(16):  # jitter may push a patch over the cut: the held-out voxels carry no weight
        item = dataset.item(i, 5)
        assert item["weight"].sum() > 0
    with pytest.raises(SystemExit, match=r"vol1_im.h5: \[12, 96, 96\] voxels hold no validation region .* give "):
        held_out_regions(vols, (8, 96, 96), 0.2)

    no_val = ["data.val_image=null", "data.val_label=null", "data.val_mask=null"]
    run = hydra_train.main(hydra_train.parse_args(
        ["--output-root", str(tmp_path / "outputs"), *tiny(volumes, *no_val), "optimization.max_epochs=1"]
    ))  # fmt: skip
    assert "validation: vol1 x 64:96, vol2 x 64:96 (held-out regions" in (run / "train.log").read_text()
    results = json.loads((run / "results" / "test_results.json").read_text())
    assert results["scored"]["split"] == "train" and results["scored"]["held_out"] is False
    assert "held-out regions of the training volumes" in results["scored"]["note"]
    entry = results["volumes"]["vol1"]
    assert entry["region"] == [[0, 12], [0, 96], [64, 96]] and entry["shape"] == [12, 96, 32]
    assert entry["training"] == "validated on (chose the model)" and "adapted_rand_error" in entry
    figures = hydra_visualize.main(hydra_visualize.parse_args(["--results", str(run / "results")]))
    assert len(figures) == 2  # the image and truth cut to the region, as the predictions are


def test_tune_decoding_on_the_validation_volume_writes_the_best_into_the_run(tmp_path, volumes):
    """Four Optuna trials on vol3 (validation): trial 0 is the config's decoding, and its objective is the adapted Rand
    error test mode reports for vol3 with that decoding; the best setting lands in best.ckpt and config.yaml, and test
    mode then reports the tuned score."""
    run = train(tmp_path, volumes, overrides=["optimization.max_epochs=3"])
    best = run / "checkpoints" / "best.ckpt"
    untuned = json.loads((hydra_evaluate.main(hydra_evaluate.parse_args(["--checkpoint", str(best)])) /
                          "test_results.json").read_text())  # fmt: skip
    tuned_dir = hydra_evaluate.main(hydra_evaluate.parse_args(["--checkpoint", str(best), "--tune-decoding", "4"]))
    result = json.loads((run / "decoding_tuning.json").read_text())
    assert result["tuned_on"] == ["vol3"] and result["trials"] == 4
    assert result["before"]["decoding"] == {k: untuned["decoding"][k] for k in hydra_evaluate.DECODING_SPACE}
    assert result["before"]["adapted_rand_error"] == pytest.approx(untuned["volumes"]["vol3"]["adapted_rand_error"])
    assert result["after"]["adapted_rand_error"] <= result["before"]["adapted_rand_error"]
    stored = torch.load(best, weights_only=True)["config"]["decoding"]
    assert {k: stored[k] for k in result["after"]["decoding"]} == result["after"]["decoding"]
    assert yaml.safe_load((run / "config.yaml").read_text())["decoding"] == stored
    report = json.loads((tuned_dir / "test_results.json").read_text())
    assert report["decoding"] == stored and report["decoding_tuning"]["tuned_on"] == ["vol3"]
    assert report["volumes"]["vol3"]["adapted_rand_error"] == pytest.approx(result["after"]["adapted_rand_error"])
    assert (run / "decoding_study.db").is_file()
    # best.ckpt now holds the tuned decoding; the same weights tune on in the same study, more trials
    again = hydra_evaluate.tune_decoding(best, 6)
    assert again["trials"] == 6 and again["before"]["decoding"] == result["after"]["decoding"]
    assert again["after"]["adapted_rand_error"] <= again["before"]["adapted_rand_error"]


def test_a_truncated_hdf5_file_and_overrides_among_the_flags(tmp_path):
    from hydra_lv.data import DataError, find_volumes, write_volume

    write_volume(tmp_path / "vol1_im.h5", np.zeros((4, 16, 16), np.uint8))
    whole = (tmp_path / "vol1_im.h5").read_bytes()
    (tmp_path / "vol1_im.h5").write_bytes(whole[: len(whole) // 2])  # a copy cut short
    with pytest.raises(DataError, match=r"vol1_im.h5: not a readable HDF5 file \(.*truncated"):
        find_volumes({"train_image": str(tmp_path / "vol*_im.h5")}, "train", need_labels=False)
    args = hydra_train.parse_args(["data.iterations_per_epoch=1", "--fast-dev-run", "model.filters=[4,8]"])
    assert args.fast_dev_run and args.overrides == ["data.iterations_per_epoch=1", "model.filters=[4,8]"]
    args = hydra_evaluate.parse_args(["inference.tta=true", "--checkpoint", "best.ckpt", "data.test_label=null"])
    assert args.checkpoint == "best.ckpt" and args.overrides == ["inference.tta=true", "data.test_label=null"]


def test_fast_dev_run_writes_to_its_own_folder():
    """The document runs --fast-dev-run, then --mode test --checkpoint outputs/hydra_lv_rsunet/...: the check must
    not take the real run's folder name."""
    cfg, _, _ = hydra_train.load_settings(hydra_train.parse_args(["--fast-dev-run"]), lambda *a: None)
    assert cfg["experiment_name"] == "hydra_lv_rsunet_fast_dev_run" and cfg["optimization"]["max_epochs"] == 1
    cfg, _, _ = hydra_train.load_settings(hydra_train.parse_args([]), lambda *a: None)
    assert cfg["experiment_name"] == "hydra_lv_rsunet"


def test_uint16_and_float_volumes_are_stretched_the_same_in_training_and_inference(tmp_path):
    from hydra_lv.data import intensity_scale, open_dataset, scale_intensity, write_volume

    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (6, 40, 40)).astype(np.uint8)
    assert intensity_scale(eight) == (0.0, 255.0)
    np.testing.assert_array_equal(scale_intensity(eight, (0.0, 255.0)), eight.astype(np.float32) / 255)
    deep = (eight.astype(np.uint16) * 16 + 1000).astype(np.uint16)  # a 12-bit camera's range, offset 1000
    low, span = intensity_scale(deep)
    assert low == pytest.approx(np.percentile(deep, 0.5)) and low + span == pytest.approx(np.percentile(deep, 99.5))
    scaled = scale_intensity(deep, (low, span))
    assert scaled.min() == 0 and scaled.max() == 1 and np.median(scaled) == pytest.approx(0.5, abs=0.03)
    np.testing.assert_allclose(
        scale_intensity(deep.astype(np.float32) / 7.0, intensity_scale(deep / 7.0)), scaled, atol=1e-5
    )
    write_volume(tmp_path / "deep_im.h5", deep)
    write_volume(tmp_path / "deep_ins.h5", np.ones(deep.shape, np.uint16))
    (volume,) = find_volumes(
        {"train_image": str(tmp_path / "deep_im.h5"), "train_label": str(tmp_path / "deep_ins.h5")}, "train"
    )
    patches = PatchDataset([volume], (4, 32, 32), (0, 0, 0), (30, 8, 8), 2, seed=0)
    assert (
        patches.scales == [(low, span)]
        and 0 <= float(patches[0]["image"].min()) < float(patches[0]["image"].max()) <= 1
    )

    out = sliding_window_inference(Identity(), open_dataset(tmp_path / "deep_im.h5"), (4, 32, 32), scale=(low, span))
    np.testing.assert_allclose(out[0], np.clip(scaled, 1e-4, 1 - 1e-4), atol=1e-5)  # read as training reads it


def test_export_writes_torchscript_and_onnx_that_onnxruntime_runs_like_pytorch(tmp_path, volumes):
    import onnxruntime

    run = train(tmp_path, volumes, overrides=["optimization.max_epochs=1"])
    out = hydra_evaluate.main(hydra_evaluate.parse_args(
        ["--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--export", str(tmp_path / "export")]))  # fmt: skip
    spec = json.loads((out / "model.json").read_text())
    assert spec["input"]["shape"] == ["batch", 1, 8, 32, 32] and spec["input"]["voxel_size_nm_zyx"] == [30, 8, 8]
    assert spec["outputs"][0]["name"] == "maps" and spec["outputs"][0]["shape"] == ["batch", 3, 8, 32, 32]
    # a real window of vol3, as the spec says to read it: onnxruntime against PyTorch's sliding window (one window)
    with h5py.File(volumes / "vol3_im.h5") as f:
        window = (f["main"][:8, :32, :32] / 255.0).astype(np.float32)[None, None]
    model, _ = hydra_evaluate.load_model(run / "checkpoints" / "best.ckpt", torch.device("cpu"))
    expected = sliding_window_inference(model, window[0, 0], (8, 32, 32), blending="constant")
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (maps,) = session.run(None, {"input": np.concatenate([window, window])})
    assert maps.shape == (2, 3, 8, 32, 32) and np.abs(maps[1] - expected).max() <= 1e-4
    with torch.no_grad():
        scripted = torch.jit.load(str(out / "model.pt"))(torch.from_numpy(window))[0]
    assert np.abs(scripted.numpy() - expected).max() <= 1e-4
    with pytest.raises(SystemExit, match="not empty"):
        hydra_evaluate.main(hydra_evaluate.parse_args(
            ["--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--export", str(out)]))  # fmt: skip


def test_ome_zarr_and_neuroglancer_carry_the_runs_voxel_size(tmp_path, volumes, monkeypatch):
    """results.ome.zarr, read with ome-zarr's own reader, holds the maps and the segmentation scaled by
    data.resolution; visualize.py --neuroglancer serves them at that voxel size, not a fixed 30 x 8 x 8."""
    import types

    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    run = train(tmp_path, volumes, overrides=["optimization.max_epochs=1", "data.resolution=[40,4,4]"])
    out = hydra_evaluate.main(hydra_evaluate.parse_args(["--checkpoint", str(run / "checkpoints" / "best.ckpt")]))
    report = json.loads((out / "test_results.json").read_text())
    assert report["voxel_size_nm"] == [40, 4, 4]
    nodes = {type(n.specs[0]).__name__: n for n in Reader(parse_url(str(out / "results.ome.zarr")))()}
    image, labels = nodes["Multiscales"], nodes["Label"]
    with h5py.File(out / "predictions.h5") as f, h5py.File(out / "segmentation.h5") as g:
        assert np.array_equal(np.asarray(image.data[0]), f["main"][:])
        assert np.array_equal(np.asarray(labels.data[0]), g["main"][:])
    assert image.metadata["coordinateTransformations"][0][0]["scale"] == [1.0, 40.0, 4.0, 4.0]
    assert labels.metadata["coordinateTransformations"][0][0]["scale"] == [40.0, 4.0, 4.0]
    assert [a.get("unit") for a in labels.metadata["axes"]] == ["nanometer"] * 3

    seen = {}
    fake = types.SimpleNamespace(
        set_server_bind_address=lambda *a: None, LocalVolume=lambda data, space: space,
        ImageLayer=lambda source: source, SegmentationLayer=lambda source: source,
        CoordinateSpace=lambda **kw: seen.setdefault("space", kw),
        Viewer=lambda: types.SimpleNamespace(txn=lambda: __import__("contextlib").nullcontext(
            types.SimpleNamespace(layers={}))),
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "neuroglancer", fake)
    monkeypatch.setattr(hydra_visualize.time, "sleep", lambda s: (_ for _ in ()).throw(KeyboardInterrupt))
    hydra_visualize.main(hydra_visualize.parse_args(["--results", str(out), "--neuroglancer"]))
    assert seen["space"]["scales"] == [40.0, 4.0, 4.0] and seen["space"]["units"] == "nm"


def blob_volume(shape=(30, 200, 200), seed=3):
    """Separate bright ellipsoids (5-7 sections, 12-18 px across) on a jittered grid, on a dark background."""
    rng = np.random.default_rng(seed)
    volume = np.full(shape, 40, np.uint8)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    count = 0
    for z in range(4, shape[0] - 3, 8):
        for y in range(12, shape[1] - 11, 30):
            for x in range(12, shape[2] - 11, 30):
                cz, cy, cx = z + rng.uniform(-1, 1), y + rng.uniform(-4, 4), x + rng.uniform(-4, 4)
                rz, r = rng.uniform(2.5, 3.2), rng.uniform(6, 9)
                volume[((zz - cz) / rz) ** 2 + ((yy - cy) / r) ** 2 + ((xx - cx) / r) ** 2 <= 1] = 220
                count += 1
    return volume, count


def test_large_volumes_are_segmented_block_by_block_as_whole_from_tiff_stacks_and_ome_zarr(
    tmp_path, volumes, monkeypatch
):
    """Test mode cuts a volume into overlapping blocks, predicts and decodes each on its own and stitches them:
    with a segmenter that only looks at each voxel (here the maps are the thresholded image), small blocks give
    the same vesicles as one block, each vesicle crossing a block border once; a TIFF stack and an OME-Zarr of
    the same volume are read chunk by chunk to the same result."""
    import tifffile
    import zarr
    from ome_zarr.writer import write_image

    from common.tiling import block_grid, core_slices
    from hydra_lv.data import scale_intensity

    volume, count = blob_volume()
    tifffile.imwrite(tmp_path / "big_im.tif", volume, tile=(64, 64))
    write_image(volume, zarr.open_group(str(tmp_path / "big_im.ome.zarr"), mode="w"), axes="zyx",
                storage_options={"chunks": (8, 64, 64)})  # fmt: skip
    run = train(tmp_path, volumes, overrides=["optimization.max_epochs=1"])
    reads = []

    def threshold(model, image, window, overlap, batch, tta, blending, device, write=None, ctx=None, progress=False,
                  scale=None):  # fmt: skip
        reads.append(image.shape)
        binary = (scale_intensity(image, scale) > 0.5).astype(np.float32)
        return np.stack([binary, np.zeros_like(binary), binary])

    monkeypatch.setattr(hydra_evaluate, "sliding_window_inference", threshold)
    checkpoint = str(run / "checkpoints" / "best.ckpt")
    results = {}
    small_blocks = ["inference.block_size=[12,64,64]", "inference.block_overlap=[6,32,32]"]
    for name, blocks in (("big_im.tif", ["inference.block_size=[64,256,256]"]), ("big_im.ome.zarr", small_blocks)):
        reads.clear()
        argv = ["--checkpoint", checkpoint, "--output-dir", str(tmp_path / f"out_{name}"),
                f"data.test_image={tmp_path / name}", "data.test_label=null", "data.test_mask=null",
                "decoding.min_object_size=20", *blocks]  # fmt: skip
        out = hydra_evaluate.main(hydra_evaluate.parse_args(argv))
        with h5py.File(out / "segmentation.h5") as f:
            results[name] = f["main"][:]
        results[name + " reads"] = list(reads)
        root = zarr.open_group(str(out / "results.ome.zarr"), mode="r")
        assert np.array_equal(root["labels"]["segmentation"]["0"][:], results[name])
    whole, tiled = results["big_im.tif"].astype(np.int64), results["big_im.ome.zarr"].astype(np.int64)
    assert results["big_im.tif reads"] == [volume.shape]  # one block
    assert len(results["big_im.ome.zarr reads"]) > 20 and max(results["big_im.ome.zarr reads"]) <= (12, 64, 64)
    assert whole.max() == tiled.max() == count
    pairs = np.unique(np.stack([whole.ravel(), tiled.ravel()]), axis=1)
    assert len(pairs[0]) == count + 1 and ((pairs[0] == 0) == (pairs[1] == 0)).all()  # the same vesicles
    owner = np.zeros(volume.shape, int)
    for i, (start, core) in enumerate(block_grid(volume.shape, (12, 64, 64), (6, 32, 32))):
        owner[core_slices(start, core, volume.shape)] = i
    assert sum(len(np.unique(owner[tiled == k])) > 1 for k in range(1, count + 1)) >= 10  # crossing block borders
