"""retinopathy/train.py: two-stage freezing, each loss, resume equivalence, the outputs of a run."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from retinopathy import train as fundus_train
from retinopathy.data import write_demo_dataset
from retinopathy.model import build_classifier, set_backbone_trainable

TINY = [
    "--model-name",
    "resnet18",
    "--no-pretrained",
    "--image-size",
    "32",
    "--batch-size",
    "8",
    "--num-workers",
    "0",
    "--epochs-stage1",
    "1",
    "--epochs-stage2",
    "1",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("fundus_train") / "data", n_images=40)


def train(tmp_path, data, *extra):
    argv = [
        "--labels-csv",
        str(data / "train.csv"),
        "--img-dir",
        str(data / "train_images"),
        "--save-dir",
        str(tmp_path / "models"),
        *TINY,
        *extra,
    ]
    return fundus_train.main(fundus_train.parse_args(argv))


def test_stage_one_trains_only_the_head():
    model = build_classifier("resnet18", 5)
    set_backbone_trainable(model, False)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.conv1.weight.grad is None and model.layer4[0].conv1.weight.grad is None
    assert model.fc.weight.grad is not None
    set_backbone_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())
    effnet = build_classifier("efficientnet_b0", 5)
    set_backbone_trainable(effnet, False)
    assert [n for n, p in effnet.named_parameters() if p.requires_grad] == ["classifier.1.weight", "classifier.1.bias"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data):
    """One stage-1 epoch and two stage-2 epochs with focal loss: the outputs test and the resume test share it."""
    return train(tmp_path_factory.mktemp("full"), data, "--loss", "focal", "--epochs-stage2", "2", "--save-freq", "1")


@pytest.mark.parametrize("loss", ["ce", "weighted_ce", "focal"])
def test_two_stage_run_with_each_loss(tmp_path, data, full_run, loss):
    # every run has the advanced augmentation, medical preprocessing and mixed precision (the defaults); ce and
    # weighted_ce add Ben Graham's filter
    extra = ["--ben-graham", "--epochs-stage2", "2", "--save-freq", "1"]
    run = full_run if loss == "focal" else train(tmp_path, data, "--loss", loss, *extra)
    assert run.name == "models"  # the files go straight into --save-dir
    for name in (
        "config.json",
        "best_model.pth",
        "best_stage1.pth",
        "last.pth",
        "checkpoint_epoch_1.pth",
        "checkpoint_epoch_3.pth",
        "training_history.json",
        "train.log",
        "split.json",
    ):
        assert (run / name).is_file(), name
    split = json.loads((run / "split.json").read_text())
    assert [len(split[k]) for k in ("train", "val", "test")] == [28, 8, 4]
    assert not set(split["train"]) & set(split["val"]) and not set(split["test"]) & (
        set(split["train"]) | set(split["val"])
    )
    # best_model.pth is the best stage-2 epoch, best_stage1.pth stage 1's
    history_qwk = [h["val"]["qwk"] for h in json.loads((run / "training_history.json").read_text())]
    assert torch.load(run / "best_model.pth", weights_only=True)["epoch"] == 2 + history_qwk[1:].index(
        max(history_qwk[1:])
    )
    assert torch.load(run / "best_stage1.pth", weights_only=True)["epoch"] == 1
    # the best model scored on the held-out test split at the end
    (report,) = (run / "evaluation").glob("evaluation_*")
    assert json.loads((report / "metrics.json").read_text())["images"] == 4
    history = json.loads((run / "training_history.json").read_text())
    assert [h["stage"] for h in history] == ["stage1", "stage2", "stage2"]
    assert all(
        -1 <= h["val"]["qwk"] <= 1 and 0 <= h["val"]["accuracy"] <= 1 and h["val"]["images"] == 8 for h in history
    )
    stage1 = torch.load(run / "best_stage1.pth", weights_only=True)
    last = torch.load(run / "last.pth", weights_only=True)
    assert stage1["domain"] == "retinopathy" and last["args"]["loss"] == loss
    # stage 1 left the backbone as it was built, BatchNorm statistics included; stage 2 changed it
    assert not torch.equal(stage1["model"]["conv1.weight"], last["model"]["conv1.weight"])
    fresh = build_classifier("resnet18", 5).state_dict()
    assert torch.equal(stage1["model"]["layer1.0.bn1.running_mean"], fresh["layer1.0.bn1.running_mean"])
    assert not torch.equal(last["model"]["layer1.0.bn1.running_mean"], fresh["layer1.0.bn1.running_mean"])
    if loss != "focal":
        config = json.loads((run / "config.json").read_text())
        assert config["advanced_aug"] and config["medical_preprocess"] and config["ben_graham"]
        assert config["mixed_precision"] and config["test_split"] == 0.1
        assert len(list((tmp_path / "models" / "cache").glob("*.png"))) == 40  # each photo preprocessed once, first
        return

    # TensorBoard: per epoch the training terms, the learning rate, the validation metrics, prediction images
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    ea.Reload()
    tags = {"train/loss", "train/accuracy", "lr", "val/loss", "val/accuracy", "val/qwk"}
    assert set(ea.Tags()["scalars"]) == tags
    for tag in tags:
        logged = {e.step: e.value for e in ea.Scalars(tag)}
        section, _, name = tag.rpartition("/")
        expected = {h["epoch"]: h[section][name] if section else h[name] for h in history}
        assert logged == pytest.approx(expected, rel=1e-6), tag
    images = ea.Images("val/predictions")
    assert [e.step for e in images] == [1, 2, 3] and images[0].width > images[0].height > 0  # photo | grade bars


def test_resume_after_interruption_repeats_the_next_epoch_exactly(tmp_path, data, full_run, monkeypatch, capsys):
    expected = json.loads((full_run / "training_history.json").read_text())
    original, calls = fundus_train.train_one_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed in the second epoch of stage 2
        return original(*args, **kwargs)

    monkeypatch.setattr(fundus_train, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", data, "--loss", "focal", "--epochs-stage2", "2", "--save-freq", "1")
    monkeypatch.setattr(fundus_train, "train_one_epoch", original)
    cut = tmp_path / "cut" / "models"
    fundus_train.main(fundus_train.parse_args(["--resume", str(cut), "--num-workers", "0", "--loss", "ce"]))
    resumed = json.loads((cut / "training_history.json").read_text())
    assert [h["stage"] for h in resumed] == ["stage1", "stage2", "stage2"]
    assert resumed[2]["train"]["loss"] == pytest.approx(expected[2]["train"]["loss"], rel=1e-6)
    assert resumed[2]["val"]["qwk"] == pytest.approx(expected[2]["val"]["qwk"], abs=1e-9)
    assert "stored settings win; ignoring --loss" in capsys.readouterr().out
    # the resumed run appends to the same TensorBoard folder: one value per epoch, the resumed one included
    ea = EventAccumulator(str(cut / "tensorboard"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 3]
    assert ea.Scalars("train/loss")[2].value == pytest.approx(expected[2]["train"]["loss"], rel=1e-6)


def test_mixed_precision_keeps_fp32_on_a_cpu_without_bf16_instructions(monkeypatch):
    """Emulated bf16 took 11x as long per step as fp32 on the AVX2 CPU the demo was measured on."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for avx512_bf16, amx, emulated in ((True, False, False), (False, True, False), (False, False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert fundus_train.emulated_bf16(cpu) is emulated
        assert fundus_train.emulated_bf16(cuda) is False
    lines = []  # the last case, no bf16 instructions, stays patched
    args = fundus_train.parse_args(["--demo"])
    assert args.mixed_precision is True
    ctx, scaler = fundus_train.mixed_precision(cpu, args.mixed_precision and not fundus_train.emulated_bf16(cpu))
    with ctx:
        assert not torch.is_autocast_enabled("cpu")
    fundus_train.log_banner(lines.append, args, cpu, ctx)
    assert "Mixed precision: True (fp32 training: this CPU has no bf16 instructions" in "\n".join(lines)


def test_class_weights_are_balanced_and_cover_absent_grades():
    weights = fundus_train.class_weights([0, 0, 0, 0, 1, 1, 2, 2], 5)
    assert weights.tolist()[:3] == pytest.approx([8 / 12, 8 / 6, 8 / 6])
    assert weights[3] == weights[4] == pytest.approx(8 / 6)  # absent grades: the largest weight
