"""retinopathy: the demo learns; evaluate.py (with and without labels, re-scored by scikit-learn), visualize.py,
torchrun, the Windows wrappers, and bad inputs."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import beta
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    recall_score,
    roc_auc_score,
)

from retinopathy import evaluate as fundus_evaluate
from retinopathy import train as fundus_train
from retinopathy import visualize as fundus_visualize
from retinopathy.data import FundusDataset, cache_settings, read_labels, write_demo_dataset
from retinopathy.model import grad_cam, load_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model-name", "resnet18", "--no-pretrained", "--image-size", "32", "--batch-size", "8", "--num-workers", "0"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`python retinopathy/train.py --demo`, as a user types it, in an empty folder, for half its 12 epochs."""
    cwd = tmp_path_factory.mktemp("fundus_demo")
    result = subprocess.run(
        [sys.executable, str(REPO / "retinopathy" / "train.py"), "--demo", "--epochs-stage2", "6"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    run = cwd / "ml" / "models" / "retinopathy_demo"
    assert (run / "best_model.pth").is_file() and (cwd / "ml" / "models" / "demo_data").is_dir()
    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("fundus_eval") / "data", n_images=40)


def evaluate(*argv):
    return fundus_evaluate.main(fundus_evaluate.parse_args([str(a) for a in argv]))


def visualize(*argv):
    return fundus_visualize.main(fundus_visualize.parse_args([str(a) for a in argv]))


def test_demo_learns_well_above_chance(demo_run):
    history = json.loads((demo_run / "training_history.json").read_text())
    best = max(h["val"]["qwk"] for h in history)
    # chance (a constant or random grade) scores a QWK of 0; the synthetic grades follow visible lesions
    assert best > 0.5, [round(h["val"]["qwk"], 3) for h in history]  # measured: 0.61 after 6 epochs, 0.64 after 12
    assert history[-1]["train"]["loss"] < history[0]["train"]["loss"]
    log = (demo_run / "train.log").read_text(encoding="utf-8")
    assert "✅ Best model saved: Val QWK = " in log and "Held-out test split, 24 photos" in log
    config = json.loads((demo_run / "config.json").read_text())  # the guide's defaults
    assert config["advanced_aug"] and config["medical_preprocess"] and config["mixed_precision"]


def split_of(run: Path) -> dict:
    return json.loads((run / "split.json").read_text())


def test_export_runs_in_onnxruntime_as_in_pytorch(demo_run, tmp_path):
    """evaluate.py --export: model.onnx, on a photo prepared as model.json says, gives PyTorch's probabilities."""
    import onnxruntime

    from retinopathy.data import IMAGENET_MEAN, IMAGENET_STD, preprocess

    out = fundus_evaluate.main(fundus_evaluate.parse_args(["--model-path", str(demo_run), "--export",
                                                           str(tmp_path / "export")]))  # fmt: skip
    spec = json.loads((out / "model.json").read_text())
    model, checkpoint = load_checkpoint(demo_run)
    args, size = checkpoint["args"], checkpoint["args"]["image_size"]
    assert spec["input"]["shape"] == ["batch", 3, size, size] and "ImageNet" in spec["input"]["normalisation"]
    assert spec["outputs"][0]["classes"][0] == "No DR" and spec["outputs"][0]["shape"] == ["batch", 5]
    photo = sorted((demo_run.parent / "demo_data").glob("*/train_images/*.png"))[0]
    image = preprocess(cv2.imread(str(photo))[..., ::-1], size, args["medical_preprocess"], args["ben_graham"])
    x = ((image / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)[None].astype(np.float32)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (grades,) = session.run(None, {"input": x})
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).softmax(1).numpy()
    assert np.abs(grades - expected).max() <= 1e-4 and grades.sum() == pytest.approx(1, abs=1e-5)


def test_evaluate_on_the_validation_split_gives_the_numbers_training_chose_by(demo_run, tmp_path):
    """Validation (fp32, whatever the training precision) and evaluate.py score alike: the validation photos,
    listed in a CSV and kept with --include-training-images, give the QWK best_model.pth was saved for; the report
    says those photos chose the model."""
    config = json.loads((demo_run / "config.json").read_text())
    labels = pd.read_csv(config["labels_csv"], dtype={"id_code": str})
    labels[labels["id_code"].isin(split_of(demo_run)["val"])].to_csv(tmp_path / "val.csv", index=False)
    argv = ["--model-path", demo_run, "--labels-csv", tmp_path / "val.csv", "--img-dir", config["img_dir"]]
    with pytest.raises(SystemExit, match="every photo was used in training"):
        evaluate(*argv, "--num-workers", 0)
    out = evaluate(*argv, "--num-workers", 0, "--include-training-images", "--output-dir", tmp_path / "val")
    metrics = json.loads((out / "metrics.json").read_text())
    best = torch.load(demo_run / "best_model.pth", weights_only=True)
    assert metrics["images"] == best["val"]["images"] == metrics["images_seen_in_training"] == 48
    assert metrics["qwk"] == pytest.approx(best["val"]["qwk"], abs=1e-9)
    assert metrics["accuracy"] == pytest.approx(best["val"]["accuracy"], abs=1e-9)
    assert "overstate" in metrics["warning"] and "WARNING" in (out / "classification_report.txt").read_text()


def test_evaluate_on_the_training_csv_leaves_out_what_the_run_saw(demo_run, tmp_path, capsys):
    config = json.loads((demo_run / "config.json").read_text())
    argv = ["--model-path", demo_run, "--labels-csv", config["labels_csv"], "--img-dir", config["img_dir"]]
    out = evaluate(*argv, "--num-workers", 0, "--output-dir", tmp_path)
    assert out == tmp_path
    split = split_of(demo_run)
    assert "left out 215 of 239 photos that the run trained on or chose its model with" in capsys.readouterr().out
    scored = pd.read_csv(out / "predictions.csv", dtype={"id_code": str})["id_code"]
    assert sorted(scored) == sorted(split["test"])
    assert json.loads((out / "metrics.json").read_text())["images_seen_in_training"] == 0
    everything = evaluate(*argv, "--num-workers", 0, "--output-dir", tmp_path, "--include-training-images")
    assert everything.parent == tmp_path  # tmp_path holds an evaluation: a new folder inside, nothing overwritten
    metrics = json.loads((everything / "metrics.json").read_text())
    assert metrics["images"] == 239 and metrics["images_seen_in_training"] == 215


def test_evaluate_on_the_run_scores_its_test_split_as_scikit_learn_does(demo_run):
    out = evaluate("--model-path", demo_run, "--num-workers", 0)
    assert out.parent == demo_run / "evaluation"
    for name in ("metrics.json", "classification_report.txt", "confusion_matrix.png", "roc_curves.png"):
        assert (out / name).is_file(), name
    assert (
        cv2.imread(str(out / "confusion_matrix.png")) is not None
        and cv2.imread(str(out / "roc_curves.png")) is not None
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == len(split_of(demo_run)["test"]) == 24 and metrics["images_seen_in_training"] == 0
    assert metrics["data"].startswith("held-out test split")
    # the same numbers as the report training made at its end
    first = sorted((demo_run / "evaluation").glob("evaluation_*"))[0]
    assert first != out and json.loads((first / "metrics.json").read_text())["qwk"] == metrics["qwk"]

    # predictions.csv, joined to the labels and re-scored with scikit-learn, gives every number of metrics.json
    predictions = pd.read_csv(out / "predictions.csv", dtype={"id_code": str})
    assert list(predictions.columns) == ["id_code", "diagnosis"] + [f"prob_{c}" for c in range(5)]
    config = json.loads((demo_run / "config.json").read_text())
    labels = pd.read_csv(config["labels_csv"], dtype={"id_code": str})
    joined = predictions.merge(labels, on="id_code", suffixes=("_pred", ""))
    assert len(joined) == len(predictions) == metrics["images"]
    y, pred = joined["diagnosis"].to_numpy(), joined["diagnosis_pred"].to_numpy()
    probs = joined[[f"prob_{c}" for c in range(5)]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and (probs.argmax(1) == pred).all()
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert metrics["qwk"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(5))))
    assert metrics["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=list(range(5)), zero_division=0)
    per_class = list(metrics["per_class"].values())
    assert [c["support"] for c in per_class] == support.tolist()
    assert [c["precision"] for c in per_class] == pytest.approx(precision.tolist(), abs=1e-6)
    assert [c["recall"] for c in per_class] == pytest.approx(recall.tolist(), abs=1e-6)
    assert [c["f1"] for c in per_class] == pytest.approx(f1.tolist(), abs=1e-6)
    aucs = [roc_auc_score(y == c, probs[:, c]) for c in range(5)]  # every grade is in the stratified split
    assert [c["roc_auc"] for c in per_class] == pytest.approx(aucs, abs=1e-5)
    assert metrics["macro_roc_auc"] == pytest.approx(np.mean(aucs), abs=1e-5)
    # referable DR (grade >= 2): sensitivity and specificity of "predicted grade >= 2", AUC of P(grade >= 2)
    referable = metrics["referable_dr"]
    truth, referred = y >= 2, pred >= 2
    assert referable["positives"] == truth.sum() > 0 and referable["negatives"] == (~truth).sum() > 0
    assert referable["sensitivity"] == pytest.approx(recall_score(truth, referred))
    assert referable["specificity"] == pytest.approx(recall_score(~truth, ~referred))
    assert referable["auc"] == pytest.approx(roc_auc_score(truth, probs[:, 2:].sum(1)), abs=1e-6)
    for name in ("sensitivity", "specificity", "auc"):
        low, high = referable[f"{name}_ci95"]
        assert 0 <= low <= referable[name] <= high <= 1 and high - low > 0.05, name
    assert metrics["confusion_matrix"] == confusion_matrix(y, pred, labels=list(range(5))).tolist()
    report = (out / "classification_report.txt").read_text()
    assert f"quadratic weighted kappa {metrics['qwk']:.4f}" in report and "Proliferative DR" in report

    # a second evaluation never overwrites the first; TTA averages four views, still probabilities
    again = evaluate("--model-path", demo_run / "best_model.pth", "--num-workers", 0, "--tta")
    assert again.parent == demo_run / "evaluation"
    assert again != out and (out / "metrics.json").read_text() == json.dumps(metrics, indent=2)
    tta = pd.read_csv(again / "predictions.csv")
    assert np.allclose(tta[[f"prob_{c}" for c in range(5)]].sum(axis=1), 1, atol=1e-5)
    assert json.loads((again / "metrics.json").read_text())["tta"] is True


def test_referable_dr_intervals_on_a_hand_computed_case():
    # 10 photos: grades 0,0,0,0,1,1 (negatives) and 2,2,3,4 (positives); predicted grades give 3 of 4 positives
    # referred and 6 of 6 negatives kept, so sensitivity 3/4 and specificity 6/6
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 4])
    predicted = np.array([0, 1, 0, 0, 1, 0, 2, 1, 4, 3])
    probs = np.full((10, 5), 0.05)
    probs[np.arange(10), predicted] = 0.8
    referable = fundus_evaluate.referable_dr(y, probs, n_boot=500)
    assert (referable["positives"], referable["negatives"]) == (4, 6)
    assert (referable["sensitivity"], referable["specificity"]) == (0.75, 1.0)
    # Clopper-Pearson by its definition, the beta quantiles: [B(0.025; k, n-k+1), B(0.975; k+1, n-k)]
    assert referable["sensitivity_ci95"] == pytest.approx([beta.ppf(0.025, 3, 2), beta.ppf(0.975, 4, 1)])
    assert referable["specificity_ci95"] == pytest.approx([0.025 ** (1 / 6), 1.0])  # all found: (alpha/2)^(1/n)
    # the AUC of P(grade >= 2): every negative scores 0.15, as does photo 7 (a grade 2 graded 1); the other three
    # positives score 0.9, so 18 of the 24 pairs are ordered and 6 tied (half each): 21 / 24
    score = probs[:, 2:].sum(1)
    assert referable["auc"] == pytest.approx(roc_auc_score(y >= 2, score)) == pytest.approx(21 / 24)
    low, high = referable["auc_ci95"]
    assert 0 <= low <= referable["auc"] <= high <= 1


def test_evaluate_without_labels_writes_a_kaggle_submission(demo_run, tmp_path):
    config = json.loads((demo_run / "config.json").read_text())
    out = evaluate(
        "--model-path", demo_run, "--img-dir", config["img_dir"], "--output-dir", tmp_path, "--num-workers", 0
    )
    assert out == tmp_path and not (out / "metrics.json").exists()
    submission = pd.read_csv(out / "predictions.csv", dtype={"id_code": str})
    assert list(submission.columns) == ["id_code", "diagnosis"]
    assert sorted(submission["id_code"]) == sorted(p.stem for p in Path(config["img_dir"]).glob("*.png"))
    assert submission["diagnosis"].isin(range(5)).all()
    probabilities = pd.read_csv(out / "probabilities.csv", dtype={"id_code": str})
    assert (probabilities[[f"prob_{c}" for c in range(5)]].to_numpy().argmax(1) == submission["diagnosis"]).all()
    # an id list without grades (APTOS test.csv) grades those photos, in the CSV's order
    ids = sorted(submission["id_code"])[:5][::-1]
    pd.DataFrame({"id_code": ids}).to_csv(tmp_path / "test.csv", index=False)
    listed = evaluate("--model-path", demo_run, "--labels-csv", tmp_path / "test.csv", "--img-dir", config["img_dir"],
                      "--output-dir", tmp_path, "--num-workers", 0)  # fmt: skip
    assert pd.read_csv(listed / "predictions.csv", dtype={"id_code": str})["id_code"].tolist() == ids
    # the same photos graded with labels get the same grades
    labelled = sorted((demo_run / "evaluation").glob("evaluation_*"))[0]
    graded = pd.read_csv(labelled / "predictions.csv", dtype={"id_code": str}).set_index("id_code")["diagnosis"]
    assert (submission.set_index("id_code").loc[graded.index, "diagnosis"] == graded).all()


def test_figures_and_grad_cam_of_the_trained_model(demo_run, tmp_path):
    paths = [
        visualize("curves", demo_run),
        visualize("grid", demo_run, "--per-grade", 2),
        visualize("gradcam", demo_run, "--n", 2),
        visualize("gradcam", demo_run / "best_model.pth", "--images", "demo0001", "--output-dir", tmp_path),
    ]
    config = json.loads((demo_run / "config.json").read_text())
    photo = Path(config["img_dir"]) / "demo0002.png"
    paths.append(visualize("preprocessing", photo, "--image-size", 96, "--output-dir", tmp_path))
    assert len(set(paths)) == 5 and all(cv2.imread(str(p)) is not None for p in paths)
    assert paths[0].parent == demo_run / "figures" and paths[3].parent == tmp_path

    # Grad-CAM of the trained model: one 0..1 map per photo, peaking at 1, and not flat (at 128 px ResNet18's
    # layer4 is 4 x 4 cells, too coarse to ask where on the disc it points; the hand-built case below checks that)
    model, checkpoint = load_checkpoint(demo_run)
    records = read_labels(config["labels_csv"], config["img_dir"])
    val = [r for r in records if r.id_code in split_of(demo_run)["val"] and r.diagnosis >= 3]
    settings = cache_settings(type("Args", (), checkpoint["args"]))
    dataset = FundusDataset(val, settings, Path(config["cache_dir"]))
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    cams = grad_cam(model, images).numpy()
    assert cams.shape == (len(val), 128, 128) and cams.min() >= 0 and np.allclose(cams.max((1, 2)), 1)
    assert (cams.std((1, 2)) > 0.05).all()


def test_grad_cam_follows_the_class_evidence():
    """A hand-built network: grade 1's logit is mean(A0) - mean(A1) of the layer4 activations A. Its gradient
    weights are +1/HW and -1/HW, so Grad-CAM = ReLU(A0 - A1) / max: 1 where only channel 0 is on (top half),
    0 where channel 1 outweighs it (bottom half)."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer4 = torch.nn.Identity()

        def forward(self, x):
            a = self.layer4(x)
            score = a[:, 0].mean((1, 2)) - a[:, 1].mean((1, 2))
            return torch.stack([torch.zeros_like(score), score], 1)

    image = torch.zeros(1, 3, 8, 8)
    image[0, 0, :4] = 2.0  # channel 0: strong in the top half
    image[0, 0, 4:] = 1.0
    image[0, 1, 4:] = 3.0  # channel 1: bottom half, outweighs channel 0 there
    cam = grad_cam(Net(), image, torch.tensor([1]))[0]
    assert torch.allclose(cam[:4], torch.ones(4, 8)) and torch.allclose(cam[4:], torch.zeros(4, 8))


def test_torchrun_two_cpu_processes(tmp_path, data):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(REPO / "retinopathy" / "train.py"), "--labels-csv", str(data / "train.csv")]
    command += ["--img-dir", str(data / "train_images"), "--save-dir", str(tmp_path / "models"), *TINY]
    command += ["--epochs-stage1", "1", "--epochs-stage2", "1", "--batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "models"  # only rank 0 writes
    history = json.loads((run / "training_history.json").read_text())
    assert [h["stage"] for h in history] == ["stage1", "stage2"]
    assert all(np.isfinite(h["train"]["loss"]) for h in history)
    assert history[0]["val"]["images"] == 8  # both ranks' halves of the validation split, gathered
    assert "4 x 2 process(es)" in (run / "train.log").read_text()
    assert (run / "best_model.pth").is_file() and (run / "best_stage1.pth").is_file()


@pytest.mark.parametrize("name", ["train.bat", "evaluate.bat"])
def test_windows_wrappers_use_flags_that_exist(name):
    text = (REPO / "retinopathy" / name).read_text()
    script = name.replace(".bat", ".py")
    lines = [line for line in text.splitlines() if f"retinopathy\\{script}" in line]
    assert lines
    module = {"train.bat": fundus_train, "evaluate.bat": fundus_evaluate}[name]
    for line in lines:
        words = shlex.split(line.split(f"retinopathy\\{script}", 1)[1].replace("\\", "/"))
        words = [w.replace("%DATA%", "data").replace("%MODEL%", "run").replace("%LABELS%", "l.csv") for w in words]
        args = module.parse_args([w for w in words if w != "%*"])  # exits on an unknown flag
        if name == "train.bat":
            assert args.model_name == "efficientnet_b3" and args.loss == "focal" and args.mixed_precision
        else:
            assert args.model_path == "run" and args.tta


def test_bad_inputs_give_clear_errors_and_lose_nothing(tmp_path, data):
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted((data / "train_images").glob("*.png"))[:6]:
        (photos / path.name).write_bytes(path.read_bytes())
    (photos / "corrupt.png").write_bytes(b"\x89PNG not really")
    cv2.imwrite(str(photos / "black.png"), np.zeros((60, 60, 3), np.uint8))
    table = pd.DataFrame({"id_code": [p.stem for p in sorted(photos.iterdir())]})
    table["diagnosis"] = [0, 1, 2, 0, 1, 2, 0, 1]
    table.to_csv(tmp_path / "labels.csv", index=False)

    def train(*extra):
        argv = ["--labels-csv", tmp_path / "labels.csv", "--img-dir", photos, "--save-dir", tmp_path / "models"]
        argv += [*TINY, "--epochs-stage1", "0", "--epochs-stage2", "1", *extra]
        return fundus_train.main(fundus_train.parse_args([str(a) for a in argv]))

    with pytest.raises(
        SystemExit, match=r"(?s)2 unusable image\(s\):\n.*black.png: the image is all black.*corrupt.png: cannot read"
    ):
        train()
    assert not fundus_train.holds_run(tmp_path / "models")  # the refused run wrote no run files
    run = train("--skip-bad-rows", "--val-split", "0.34")
    assert "skipped 2 unusable image(s)" in (run / "train.log").read_text(encoding="utf-8")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir())
    with pytest.raises(SystemExit, match=r"(?s)models already holds a training run.*--resume .*models"):
        train("--skip-bad-rows")  # a second run into the same folder stops before anything is written
    with pytest.raises(SystemExit, match="--test-split 0.9: shares between 0 and 1"):
        train("--val-split", "0.2", "--test-split", "0.9")

    with pytest.raises(SystemExit, match=r"corrupt\.png: cannot read the image"):
        evaluate("--model-path", run, "--img-dir", photos, "--output-dir", tmp_path / "out")
    out = evaluate("--model-path", run, "--img-dir", photos, "--output-dir", tmp_path / "out", "--skip-bad-rows")
    assert len(pd.read_csv(out / "predictions.csv")) == 6
    with pytest.raises(SystemExit, match="--labels-csv needs --img-dir"):
        evaluate("--model-path", run, "--labels-csv", tmp_path / "labels.csv")
    (tmp_path / "fake.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"fake\.pth: not a readable checkpoint"):
        evaluate("--model-path", tmp_path / "fake.pth", "--img-dir", photos)
    with pytest.raises(SystemExit, match="no such checkpoint"):
        evaluate("--model-path", tmp_path / "nothing", "--img-dir", photos)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="empty: no images"):
        evaluate("--model-path", run, "--img-dir", empty)
    with pytest.raises(SystemExit, match="--resume .*give a run folder or its last.pth"):
        fundus_train.main(fundus_train.parse_args(["--resume", str(tmp_path / "nothing")]))
    with pytest.raises(SystemExit, match="training_history.json: no training history"):
        visualize("curves", tmp_path)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir() if p.name != "evaluation") == [
        entry for entry in before if entry[0] != "evaluation"
    ]
