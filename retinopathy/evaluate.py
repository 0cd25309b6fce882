"""Score a trained diabetic-retinopathy model on labelled photos, or grade unlabelled ones.

    python retinopathy/evaluate.py --model-path ml/models/<run>/best_model.pth --output-dir results  # test split
    python retinopathy/evaluate.py --labels-csv DATA/test.csv --img-dir DATA/test_images \\
        --model-path ml/models/<run>/best_model.pth --output-dir results --tta
    python retinopathy/evaluate.py --img-dir DATA/test_images --model-path ml/models/<run>   # no labels

Without --labels-csv and --img-dir it scores the run's held-out test split (split.json), photos that neither
trained nor chose the model. Given a labelled CSV, it leaves out the photos the run trained on or chose the model
with (split.json's train and val rows, matched by id_code) and says how many, unless --include-training-images;
metrics.json then counts the photos the model saw (images_seen_in_training) and the console says so.

With labels, --output-dir receives (straight in, as the training guide writes them; if the folder already holds
an evaluation, a new folder evaluation_<YYYYmmdd_HHMMSS>/ inside it; without --output-dir, one inside
RUN/evaluation/)
- metrics.json: accuracy, quadratic weighted kappa (the APTOS metric), macro F1 (over the grades that occur in the
  labels or the predictions, as scikit-learn computes it), per-grade precision / recall / F1 / support, one-vs-rest
  ROC AUC per grade and their mean, the confusion matrix, and referable diabetic retinopathy (grade >= 2, the
  screening referral point): sensitivity and specificity of "predicted grade >= 2" and the AUC of P(grade >= 2),
  each with a 95 % confidence interval (exact binomial for sensitivity and specificity, bootstrap for the AUC);
- classification_report.txt (scikit-learn's), confusion_matrix.png, roc_curves.png;
- predictions.csv: id_code,diagnosis,prob_0..prob_4 (diagnosis = the predicted grade).
Without --labels-csv, every image of --img-dir is graded and predictions.csv is the Kaggle submission format
(id_code,diagnosis); probabilities.csv holds id_code,prob_0..prob_4.

The photos are preprocessed exactly as in training (the settings are stored in the checkpoint) and cached.
--tta averages the probabilities over the photo and its three flips.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import math
import os

import matplotlib
import numpy as np
import pandas as pd
import torch
from scipy.stats import binomtest
from sklearn.metrics import (
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.export import deployable
from common.metrics import quadratic_weighted_kappa, roc_auc_one_vs_rest
from retinopathy.data import (
    GRADES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FundusDataset,
    HelpFormatter,
    cache_settings,
    new_folder,
    prepare_images,
    read_folder,
    read_id_list,
    read_labels,
    read_table,
    run_split,
    seen_in_training,
    write_json,
)
from retinopathy.model import load_checkpoint, pick_device, predict_probabilities

matplotlib.use("Agg")
import matplotlib.pyplot as plt


@torch.no_grad()
def predict(model, records, settings, cache_dir, device, batch_size=32, num_workers=2, tta=False) -> np.ndarray:
    """(N, C) probabilities for the records, in their order (no more loader workers than this machine's cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    loader = DataLoader(
        FundusDataset(records, settings, cache_dir),
        batch_size,
        num_workers=min(num_workers, cores),
        pin_memory=device.type == "cuda",
    )
    batches = tqdm(loader, desc="grading", leave=False, dynamic_ncols=True)
    return torch.cat([predict_probabilities(model, batch["image"].to(device), tta).cpu() for batch in batches]).numpy()


def grading_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict:
    """Every score of metrics.json from the true grades and the (N, C) probabilities."""
    num_classes = probs.shape[1]
    y_pred = probs.argmax(1)
    grades = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=grades, zero_division=0)
    auc = roc_auc_one_vs_rest(y_true, probs)
    return {
        "images": len(y_true),
        "accuracy": float((y_true == y_pred).mean()),
        "qwk": quadratic_weighted_kappa(y_true, y_pred, num_classes=num_classes),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "per_class": {
            GRADES[c] if c < len(GRADES) else str(c): {
                "grade": c,
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
                "roc_auc": auc["auc_per_class"][c],
            }
            for c in grades
        },
        "macro_roc_auc": auc["macro_auc"],
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=grades).tolist(),
        **({"referable_dr": referable_dr(y_true, probs)} if num_classes > REFERABLE else {}),
    }


REFERABLE = 2  # moderate non-proliferative DR or worse: the grade screening programmes refer to an ophthalmologist


def referable_dr(y_true: np.ndarray, probs: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Referable DR as a screening test: a photo is referred when its predicted grade is >= 2; the AUC ranks
    photos by P(grade >= 2), the summed probabilities of grades 2..4. 95 % confidence intervals: sensitivity and
    specificity are proportions, so theirs is the exact (Clopper-Pearson) binomial interval that diagnostic-
    accuracy studies report; a percentile bootstrap would claim "1.000-1.000" for 14 of 14 negatives found.
    The AUC's is the percentile bootstrap over photos (n_boot resamples, seeded, so a report is reproducible)."""
    truth, referred, score = np.asarray(y_true) >= REFERABLE, probs.argmax(1) >= REFERABLE, probs[:, REFERABLE:].sum(1)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    result = {"definition": "true grade >= 2; referred: predicted grade >= 2; AUC of P(grade >= 2)"}
    for name, hits, total in (
        ("sensitivity", int((truth & referred).sum()), positives),
        ("specificity", int((~truth & ~referred).sum()), negatives),
    ):
        if total:
            interval = binomtest(hits, total).proportion_ci(confidence_level=0.95, method="exact")
            result[name], result[f"{name}_ci95"] = hits / total, [float(interval.low), float(interval.high)]
        else:
            result[name], result[f"{name}_ci95"] = math.nan, [math.nan] * 2

    def auc(i: np.ndarray) -> float:
        t = truth[i]
        return float(roc_auc_score(t, score[i])) if 0 < t.sum() < len(t) else math.nan

    result["auc"] = auc(np.arange(len(truth)))
    draws = np.random.default_rng(seed).integers(0, len(truth), size=(n_boot, len(truth)))
    resampled = np.array([auc(i) for i in draws])
    finite = resampled[np.isfinite(resampled)]
    result["auc_ci95"] = np.percentile(finite, [2.5, 97.5]).tolist() if finite.size else [math.nan] * 2
    intervals = {
        "sensitivity": "exact binomial",
        "specificity": "exact binomial",
        "auc": f"bootstrap, {n_boot} resamples",
    }
    return {**result, "positives": positives, "negatives": negatives, "ci_method": intervals}


def with_ci(referable: dict, name: str) -> str:
    """'0.912 (95% CI 0.850-0.960)' for one score of referable_dr."""
    low, high = referable[f"{name}_ci95"]
    value = referable[name]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "undefined"
    return f"{value:.3f} (95% CI {low:.3f}-{high:.3f})"


def no_nan(value):
    """JSON has no NaN: an undefined score (e.g. the AUC of an absent grade) is written as null."""
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [no_nan(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def plot_confusion_matrix(matrix: np.ndarray, path: Path) -> None:
    """Counts in each cell; the colour is the share of each true grade (row), so rare grades show too."""
    matrix = np.asarray(matrix)
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    names = [f"{c} {GRADES[c]}" if c < len(GRADES) else str(c) for c in range(len(matrix))]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(matrix)):
        for j in range(len(matrix)):
            ax.text(j, i, f"{matrix[i, j]}\n{shares[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted grade")
    ax.set_ylabel("true grade")
    fig.colorbar(image, ax=ax, label="share of the true grade")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_roc_curves(y_true: np.ndarray, probs: np.ndarray, aucs: list, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for c in range(probs.shape[1]):
        if math.isnan(aucs[c]):
            continue  # a grade absent from the labels has no ROC curve
        fpr, tpr, _ = roc_curve(y_true == c, probs[:, c])
        ax.plot(fpr, tpr, label=f"{c} {GRADES[c] if c < len(GRADES) else ''} (AUC {aucs[c]:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("one-vs-rest ROC per grade")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def labelled_records(args, trained, run_dir, num_classes, settings, cache_dir) -> tuple[list, str, int]:
    """The photos to score and what they are: (records, source, how many of them trained or chose the model)."""
    if args.img_dir is None:  # the run's own held-out test split
        records, part = run_split(trained, run_dir, "test", num_classes, settings, cache_dir)
        if part == "test" and not records:
            raise SystemExit(f"{run_dir} was trained with --test-split 0: it has no held-out photos. Give "
                             "--labels-csv and --img-dir of photos it never saw")  # fmt: skip
        if part == "test":
            return records, f"held-out test split of {trained['labels_csv']}", 0
        print(f"warning: {run_dir} was trained before runs kept a test split; scoring its validation split, which "
              "chose the model, so the numbers are optimistic")  # fmt: skip
        return records, f"validation split of {trained['labels_csv']} (it chose the model)", len(records)
    if args.labels_csv and "diagnosis" not in read_table(args.labels_csv, nrows=0).columns:
        return read_id_list(args.labels_csv, args.img_dir), str(Path(args.labels_csv).resolve()), 0
    if args.labels_csv:
        records = read_labels(args.labels_csv, args.img_dir, num_classes, args.skip_bad_rows)
    else:
        records = read_folder(args.img_dir)
    source = str(Path(args.labels_csv or args.img_dir).resolve())
    seen = seen_in_training(run_dir)
    overlap = [r for r in records if r.id_code in seen] if records[0].diagnosis is not None else []
    if overlap and not args.include_training_images:
        records = [r for r in records if r.id_code not in seen]
        print(f"left out {len(overlap)} of {len(records) + len(overlap)} photos that the run trained on or chose "
              f"its model with ({run_dir / 'split.json'}); --include-training-images keeps them")  # fmt: skip
        if not records:
            raise SystemExit(f"{args.labels_csv}: every photo was used in training; score photos the model never "
                             "saw, or pass --include-training-images")  # fmt: skip
        overlap = []
    return prepare_images(records, settings, cache_dir, args.skip_bad_rows), source, len(overlap)


def output_folder(args, run_dir: Path) -> Path:
    """--output-dir itself when it holds no evaluation yet (the guide's results/metrics.json), else a new folder
    inside it; without --output-dir a new folder in RUN/evaluation. Nothing is ever written over."""
    if args.output_dir is None:
        return new_folder(run_dir / "evaluation", "evaluation")
    out = Path(args.output_dir)
    if any((out / name).exists() for name in ("metrics.json", "predictions.csv")):
        folder = new_folder(out, "evaluation")
        print(f"{out} already holds an evaluation; writing to {folder} instead")
        return folder
    out.mkdir(parents=True, exist_ok=True)
    return out


def export(args) -> Path:
    """--export DIR: the classifier with its softmax as DIR/model.pt (TorchScript), DIR/model.onnx (checked with
    onnxruntime against PyTorch) and DIR/model.json (what goes in and comes out): common/export.py."""
    out = Path(args.export)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--export {out}: the folder is not empty (an earlier export?); give a new one")
    model, checkpoint = load_checkpoint(args.model_path, "cpu")
    trained, size = checkpoint["args"], checkpoint["args"]["image_size"]
    steps = ["black border cropped and the fundus circle masked (--medical-preprocess)"] * bool(
        trained.get("medical_preprocess"))  # fmt: skip
    steps.append(f"resized (padded to a square) to {size} x {size} px")
    steps += ["CLAHE (clip 2, 8 x 8 grid)"] * bool(trained.get("medical_preprocess"))
    steps += [f"Ben Graham's local average subtracted (sigma {max(size / 30, 1.0):g})"] * bool(
        trained.get("ben_graham")
    )
    steps.append(f"RGB / 255, minus ImageNet's mean {list(IMAGENET_MEAN)}, over its standard deviation "
                 f"{list(IMAGENET_STD)}")  # fmt: skip
    grades = ["No DR", "Mild", "Moderate", "Severe", "Proliferative DR"][: checkpoint["model_args"]["num_classes"]]
    description = {
        "domain": "retinopathy", "checkpoint": str(Path(args.model_path).resolve()), "epoch": checkpoint.get("epoch"),
        "architecture": checkpoint["model_args"]["name"],
        "input": {"axes": "bcyx", "channels": ["R", "G", "B"], "image_size": size,
                  "normalisation": "; ".join(steps) + " (retinopathy/data.py preprocess)"},
        "outputs": {"grade": {"classes": grades, "meaning": "softmax probability of each grade (APTOS 0-4)"}},
    }  # fmt: skip
    torch.manual_seed(0)
    example = torch.randn(1, 3, size, size)
    traced, onnx_model, spec, _ = deployable(model, lambda x: x.softmax(1), example, description, ["grade"])
    out.mkdir(parents=True, exist_ok=True)
    traced.save(str(out / "model.pt"))
    (out / "model.onnx").write_bytes(onnx_model)
    write_json(out / "model.json", spec)
    print(f"exported to {out}: model.pt (TorchScript), model.onnx (onnxruntime within "
          f"{spec['checked']['onnxruntime_max_abs_difference']:.1e} of PyTorch), model.json")  # fmt: skip
    return out


def main(args) -> Path:
    if args.export:
        return export(args)
    device = pick_device()
    model, checkpoint = load_checkpoint(args.model_path, device)
    trained = checkpoint["args"]
    num_classes = checkpoint["model_args"]["num_classes"]
    settings = cache_settings(argparse.Namespace(**trained))  # preprocessing exactly as in training
    cache_dir = Path(args.cache_dir or trained["cache_dir"])
    model_path = Path(args.model_path)
    run_dir = model_path if model_path.is_dir() else model_path.parent

    if args.labels_csv and not args.img_dir:
        raise SystemExit("--labels-csv needs --img-dir (the folder of its images)")
    records, source, seen = labelled_records(args, trained, run_dir, num_classes, settings, cache_dir)
    out_dir = output_folder(args, run_dir)
    print(f"grading {len(records)} images ({source}) with {args.model_path} on {device.type}; writing {out_dir}")
    probs = predict(model, records, settings, cache_dir, device, args.batch_size, args.num_workers, args.tta)
    ids = [r.id_code for r in records]
    prob_columns = {f"prob_{c}": probs[:, c] for c in range(num_classes)}
    if records[0].diagnosis is None:
        pd.DataFrame({"id_code": ids, "diagnosis": probs.argmax(1)}).to_csv(out_dir / "predictions.csv", index=False)
        pd.DataFrame({"id_code": ids, **prob_columns}).to_csv(out_dir / "probabilities.csv", index=False)
        counts = np.bincount(probs.argmax(1), minlength=num_classes)
        print("predicted grades: " + ", ".join(f"{c}: {n}" for c, n in enumerate(counts)))
        print(f"wrote {out_dir / 'predictions.csv'} (Kaggle submission format)")
        return out_dir

    y_true = np.array([r.diagnosis for r in records])
    pd.DataFrame({"id_code": ids, "diagnosis": probs.argmax(1), **prob_columns}).to_csv(
        out_dir / "predictions.csv", index=False
    )
    metrics = grading_metrics(y_true, probs)
    metrics.update({"model_path": str(Path(args.model_path).resolve()), "data": source, "tta": args.tta,
                    "images_seen_in_training": seen})  # fmt: skip
    seen_note = ""
    if seen:
        seen_note = (f"{seen} of these {len(records)} photos trained the model or chose it: the scores overstate how "
                     "it grades new photos")  # fmt: skip
        metrics["warning"] = seen_note
    write_json(out_dir / "metrics.json", no_nan(metrics))
    report = classification_report(
        y_true,
        probs.argmax(1),
        labels=list(range(num_classes)),
        target_names=[GRADES[c] if c < len(GRADES) else str(c) for c in range(num_classes)],
        digits=4,
        zero_division=0,
    )
    header = f"accuracy {metrics['accuracy']:.4f}  quadratic weighted kappa {metrics['qwk']:.4f}"
    referable = metrics.get("referable_dr")
    if referable:
        header += (f"\nreferable DR (grade >= 2, {referable['positives']} of {len(records)} photos): sensitivity "
                   f"{with_ci(referable, 'sensitivity')}  specificity {with_ci(referable, 'specificity')}  AUC "
                   f"{with_ci(referable, 'auc')}")  # fmt: skip
    warning = f"WARNING: {seen_note}\n" if seen_note else ""
    (out_dir / "classification_report.txt").write_text(f"{source}\n{warning}{header}\n\n{report}", encoding="utf-8")
    plot_confusion_matrix(np.array(metrics["confusion_matrix"]), out_dir / "confusion_matrix.png")
    aucs = [metrics["per_class"][name]["roc_auc"] for name in metrics["per_class"]]
    plot_roc_curves(y_true, probs, aucs, out_dir / "roc_curves.png")
    print(report)
    print(f"{header}\nmacro F1 {metrics['macro_f1']:.4f}  macro ROC AUC {metrics['macro_roc_auc']:.4f}  "
          f"({len(records)} photos: {source})\n{warning}wrote {out_dir}")  # fmt: skip
    return out_dir


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = p.add_argument
    add("--model-path", "--model_path", dest="model_path", required=True, help="best_model.pth or its run folder")
    add("--labels-csv", "--labels_csv", dest="labels_csv", help="CSV with id_code,diagnosis (leave out: no labels)")
    add(
        "--img-dir",
        "--img_dir",
        dest="img_dir",
        help="the photos (leave out, with --labels-csv too: the run's held-out test split)",
    )
    add(
        "--output-dir",
        "--output_dir",
        dest="output_dir",
        help="results go straight in here (a new folder inside if it holds an evaluation); without it "
        "RUN/evaluation/evaluation_<time>",
    )
    add("--cache-dir", "--cache_dir", dest="cache_dir", help="preprocessed photos; without it the training run's cache")
    add("--tta", action="store_true", help="average over the photo and its three flips")
    add("--include-training-images", "--include_training_images", dest="include_training_images",
        action="store_true", help="--labels-csv: keep the photos the run trained on or chose its model with (the "
        "report then says so)")  # fmt: skip
    add("--export", metavar="DIR", help="write the network as TorchScript and ONNX with model.json into DIR, and stop")
    add("--batch-size", "--batch_size", dest="batch_size", type=int, default=32, help="images per batch")
    add("--num-workers", "--num_workers", dest="num_workers", type=int, default=2, help="loader workers")
    add(
        "--skip-bad-rows",
        "--skip_bad_rows",
        dest="skip_bad_rows",
        action="store_true",
        help="skip rows and images that cannot be used (the count is reported)",
    )
    return p  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
