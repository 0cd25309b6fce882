"""Score a trained diabetic-retinopathy model on labelled photos, or grade unlabelled ones.

    python retinopathy/evaluate.py --model-path ml/models/<run>            # the run's own validation split
    python retinopathy/evaluate.py --labels-csv DATA/test.csv --img-dir DATA/test_images \\
        --model-path ml/models/<run>/best_model.pth --output-dir results --tta
    python retinopathy/evaluate.py --img-dir DATA/test_images --model-path ml/models/<run>   # no labels

With labels, a new folder --output-dir/evaluation_<YYYYmmdd_HHMMSS>/ (default: inside the run folder) receives
- metrics.json: accuracy, quadratic weighted kappa (the APTOS metric), macro F1 (over the grades that occur in the
  labels or the predictions, as scikit-learn computes it), per-grade precision / recall / F1 / support, one-vs-rest
  ROC AUC per grade and their mean, and the confusion matrix;
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

import matplotlib
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import (
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_curve,
)
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.metrics import quadratic_weighted_kappa, roc_auc_one_vs_rest
from retinopathy.data import (
    GRADES,
    FundusDataset,
    HelpFormatter,
    cache_settings,
    new_folder,
    prepare_images,
    read_folder,
    read_id_list,
    read_labels,
    validation_records,
    write_json,
)
from retinopathy.model import load_checkpoint, pick_device, predict_probabilities

matplotlib.use("Agg")
import matplotlib.pyplot as plt


@torch.no_grad()
def predict(model, records, settings, cache_dir, device, batch_size=32, num_workers=2, tta=False) -> np.ndarray:
    """(N, C) probabilities for the records, in their order."""
    loader = DataLoader(
        FundusDataset(records, settings, cache_dir),
        batch_size,
        num_workers=num_workers,
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
    }


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


def main(args) -> Path:
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
    if args.img_dir is None:  # the run's own validation photos
        records = validation_records(trained, run_dir, num_classes, settings, cache_dir)
        source = f"validation split of {trained['labels_csv']}"
    else:
        if args.labels_csv and "diagnosis" not in pd.read_csv(args.labels_csv, nrows=0).columns:
            records = read_id_list(args.labels_csv, args.img_dir)  # ids without grades: grade them
            source = str(Path(args.labels_csv).resolve())
        elif args.labels_csv:
            records = read_labels(args.labels_csv, args.img_dir, num_classes, args.skip_bad_rows)
            source = str(Path(args.labels_csv).resolve())
        else:
            records = read_folder(args.img_dir)
            source = str(Path(args.img_dir).resolve())
        records = prepare_images(records, settings, cache_dir, args.skip_bad_rows)

    out_dir = new_folder(Path(args.output_dir) if args.output_dir else run_dir / "evaluation", "evaluation")
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
    metrics.update({"model_path": str(Path(args.model_path).resolve()), "data": source, "tta": args.tta})
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
    (out_dir / "classification_report.txt").write_text(f"{source}\n{header}\n\n{report}")
    plot_confusion_matrix(np.array(metrics["confusion_matrix"]), out_dir / "confusion_matrix.png")
    aucs = [metrics["per_class"][name]["roc_auc"] for name in metrics["per_class"]]
    plot_roc_curves(y_true, probs, aucs, out_dir / "roc_curves.png")
    print(report)
    print(
        f"{header}  macro F1 {metrics['macro_f1']:.4f}  macro ROC AUC {metrics['macro_roc_auc']:.4f}\nwrote {out_dir}"
    )
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
        help="the photos (leave out, with --labels-csv too: the run's val split)",
    )
    add(
        "--output-dir",
        "--output_dir",
        dest="output_dir",
        help="results go to a new folder in here; without it RUN/evaluation",
    )
    add("--cache-dir", "--cache_dir", dest="cache_dir", help="preprocessed photos; without it the training run's cache")
    add("--tta", action="store_true", help="average over the photo and its three flips")
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
