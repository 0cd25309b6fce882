"""Figures for diabetic-retinopathy runs: training curves, predictions per grade, preprocessing, Grad-CAM.

    python retinopathy/visualize.py curves ml/models/<run>
    python retinopathy/visualize.py grid ml/models/<run> --per-grade 4          # the run's held-out test split
    python retinopathy/visualize.py grid ml/models/<run> --labels-csv DATA/test.csv --img-dir DATA/test_images
    python retinopathy/visualize.py preprocessing DATA/train_images/000c1434d8d7.png --image-size 512
    python retinopathy/visualize.py gradcam ml/models/<run> --images 000c1434d8d7 DATA/other.png --tta

curves:        loss, accuracy and validation QWK per epoch, with the stage boundary.
grid:          a row per grade, photos as the model sees them, titled with the predicted grade and its
               probability (green when right, red when wrong).
preprocessing: one photo raw, border-cropped, circle-cropped, resized, with CLAHE, and with Ben Graham's filter.
gradcam:       each photo next to its Grad-CAM heat map for the predicted grade (the regions that raised it).
Figures go to <run>/figures/ (preprocessing: ./figures/), or --output-dir, named <kind>_<timestamp>.png.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import json
import time

import matplotlib
import numpy as np
import torch

from common.preprocessing import ben_graham, circle_crop, clahe, crop_black_border
from retinopathy.data import (
    GRADES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FundusDataset,
    HelpFormatter,
    Record,
    cache_settings,
    find_image,
    prepare_images,
    read_labels,
    read_rgb,
    read_table,
    run_split,
    square_resize,
)
from retinopathy.model import grad_cam, load_checkpoint, pick_device, predict_probabilities

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def save(fig, folder: Path, name: str) -> Path:
    """folder/<name>_<timestamp>.png, never over an existing figure."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{time.strftime('%Y%m%d_%H%M%S')}"
    path, attempt = folder / f"{stem}.png", 1
    while path.exists():
        attempt += 1
        path = folder / f"{stem}_{attempt}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return path


def run_folder(path: str) -> Path:
    path = Path(path)
    return path if path.is_dir() else path.parent


def grade_name(grade: int) -> str:
    return f"{grade} {GRADES[grade]}" if grade < len(GRADES) else str(grade)


def plot_curves(args) -> Path:
    run = run_folder(args.run)
    history_file = run / "training_history.json"
    if not history_file.is_file():
        raise SystemExit(f"{history_file}: no training history (give a run folder of retinopathy/train.py)")
    history = json.loads(history_file.read_text())
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("loss", "accuracy", None), ("loss", "accuracy", "QWK"), strict=True):
        if key:
            ax.plot(epochs, [h["train"][key] for h in history], "o-", label="train")
            ax.plot(epochs, [h["val"][key] for h in history], "o-", label="validation")
        else:
            qwk = [h["val"]["qwk"] for h in history]
            ax.plot(epochs, qwk, "o-", color="tab:green", label="validation QWK")
            best = int(np.nanargmax(qwk)) if np.isfinite(qwk).any() else 0
            ax.plot(epochs[best], qwk[best], "*", ms=14, color="gold", mec="k", label=f"best {qwk[best]:.3f}")
        stage2 = [h["epoch"] for h in history if h["stage"] == "stage2"]
        if stage2 and stage2[0] > epochs[0]:
            ax.axvline(stage2[0] - 0.5, color="grey", ls="--", lw=1, label="backbone unfrozen")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(run.name)
    return save(fig, Path(args.output_dir or run / "figures"), "curves")


def labelled_records(args, trained: dict, num_classes: int, settings: dict, cache_dir: Path) -> list[Record]:
    """--labels-csv/--img-dir, or the run's held-out test split as train.py drew it (its validation split for runs
    from before the test split)."""
    if args.labels_csv:
        if not args.img_dir:
            raise SystemExit("--labels-csv needs --img-dir")
        records = read_labels(args.labels_csv, args.img_dir, num_classes)
        return prepare_images(records, settings, cache_dir)
    return run_split(trained, run_folder(args.run), "test", num_classes, settings, cache_dir)[0]


def to_display(tensor: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) model input back to an RGB image in 0..1."""
    image = tensor.permute(1, 2, 0).numpy() * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(image, 0, 1)


def load_run(args):
    """(device, model, the run's arguments, grades, preprocessing settings, cache folder) of a run."""
    device = pick_device()
    model, checkpoint = load_checkpoint(args.run, device)
    trained = checkpoint["args"]
    settings = cache_settings(argparse.Namespace(**trained))
    return (
        device,
        model,
        trained,
        checkpoint["model_args"]["num_classes"],
        settings,
        Path(args.cache_dir or trained["cache_dir"]),
    )


def plot_grid(args) -> Path:
    device, model, trained, num_classes, settings, cache_dir = load_run(args)
    records = labelled_records(args, trained, num_classes, settings, cache_dir)
    rng = np.random.default_rng(args.seed)
    chosen = []
    for grade in range(num_classes):
        of_grade = [r for r in records if r.diagnosis == grade]
        picks = rng.choice(len(of_grade), min(args.per_grade, len(of_grade)), replace=False) if of_grade else []
        chosen.append([of_grade[i] for i in sorted(picks)])
    columns = max(1, max(len(row) for row in chosen))
    fig, axes = plt.subplots(num_classes, columns, figsize=(2.6 * columns, 2.8 * num_classes), squeeze=False)
    for grade, row in enumerate(chosen):
        for column in range(columns):
            ax = axes[grade, column]
            ax.axis("off")
            if column >= len(row):
                continue
            item = FundusDataset([row[column]], settings, cache_dir)[0]
            probs = predict_probabilities(model, item["image"][None].to(device), args.tta)[0].cpu()
            predicted = int(probs.argmax())
            ax.imshow(to_display(item["image"]))
            ax.set_title(
                f"{row[column].id_code}\npred {predicted} ({probs[predicted]:.0%})",
                fontsize=8,
                color="tab:green" if predicted == grade else "tab:red",
            )
        axes[grade, 0].text(-0.08, 0.5, grade_name(grade), transform=axes[grade, 0].transAxes, rotation=90,
                            va="center", ha="right", fontsize=10)  # fmt: skip
    fig.suptitle("true grade per row; predicted grade and its probability above each photo")
    return save(fig, Path(args.output_dir or run_folder(args.run) / "figures"), "grid")


def plot_preprocessing(args) -> Path:
    paths = [Path(p) for p in args.images]
    fig, axes = plt.subplots(len(paths), 6, figsize=(18, 3.2 * len(paths)), squeeze=False)
    for row, path in zip(axes, paths, strict=True):
        raw = read_rgb(path)
        border = crop_black_border(raw)
        circle = circle_crop(border)
        resized = square_resize(circle, args.image_size)
        steps = [
            (raw, f"raw {raw.shape[1]}x{raw.shape[0]}"),
            (border, f"black border cropped {border.shape[1]}x{border.shape[0]}"),
            (circle, "circle crop"),
            (resized, f"resized to {args.image_size}"),
            (clahe(resized, clip_limit=2.0, tile_grid_size=(8, 8)), "CLAHE (L channel)"),
            (ben_graham(resized, sigma=max(args.image_size / 30, 1.0)), "Ben Graham"),
        ]
        for ax, (image, title) in zip(row, steps, strict=True):
            ax.imshow(image)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        row[0].set_ylabel(path.name)
    fig.suptitle("--medical-preprocess = border crop + circle crop + resize + CLAHE; --ben-graham adds the last")
    return save(fig, Path(args.output_dir or "figures"), "preprocessing")


def plot_gradcam(args) -> Path:
    device, model, trained, num_classes, settings, cache_dir = load_run(args)
    if args.images:
        truth = {}  # true grades where the run's labels CSV knows the photo
        if Path(trained["labels_csv"]).is_file():
            truth = dict(read_table(trained["labels_csv"])[["id_code", "diagnosis"]].values)
        records = []
        for name in args.images:
            path = Path(name) if Path(name).is_file() else find_image(Path(trained["img_dir"]), name)
            if path is None:
                raise SystemExit(f"--images {name}: neither a file nor an id_code in {trained['img_dir']}")
            grade = truth.get(path.stem)
            records.append(Record(path.stem, path, None if grade is None else int(float(grade))))
        records = prepare_images(records, settings, cache_dir)
    else:  # the highest grades of the held-out test split first: they have the most lesions to point at
        records = labelled_records(args, trained, num_classes, settings, cache_dir)
        records = sorted(records, key=lambda r: -r.diagnosis)[: args.n]
    items = [FundusDataset([r], settings, cache_dir)[0] for r in records]
    images = torch.stack([item["image"] for item in items]).to(device)
    probs = predict_probabilities(model, images, args.tta).cpu()
    cams = grad_cam(model, images, probs.argmax(1).to(device)).cpu().numpy()  # the grade shown (with --tta)
    fig, axes = plt.subplots(len(records), 2, figsize=(6.5, 3.2 * len(records)), squeeze=False)
    for row, record, item, p, cam in zip(axes, records, items, probs, cams, strict=True):
        image = to_display(item["image"])
        predicted = int(p.argmax())
        truth = "" if record.diagnosis is None else f", true {record.diagnosis}"
        row[0].imshow(image)
        row[0].set_title(f"{record.id_code}{truth}", fontsize=9)
        row[1].imshow(image)
        row[1].imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        row[1].set_title(f"Grad-CAM for grade {predicted} ({p[predicted]:.0%})", fontsize=9)
        for ax in row:
            ax.axis("off")
    return save(fig, Path(args.output_dir or run_folder(args.run) / "figures"), "gradcam")


@torch.no_grad()
def prediction_images(model, ctx, dataset, device, n: int = 4) -> torch.Tensor:
    """(n, 3, S, 3S/2) for TensorBoard: the first n validation photos, each beside a bar per grade, as tall as its
    predicted probability; the true grade's bar green, a wrong prediction's red, the others grey."""
    model.eval()
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    images = torch.stack([item["image"] for item in items])
    with ctx:
        probs = model(images.to(device)).float().softmax(1).cpu()
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    photos = (images * std + mean).clamp(0, 1)
    size, grades = photos.shape[-1], probs.shape[1]
    panel, width = torch.ones(len(items), 3, size, size // 2), max(size // 2 // grades, 2)
    colours = {"truth": torch.tensor([0.1, 0.7, 0.2]), "wrong": torch.tensor([0.85, 0.1, 0.1])}
    for k, item in enumerate(items):
        predicted = int(probs[k].argmax())
        for c in range(grades):
            colour = colours["truth"] if c == item["label"] else colours["wrong"] if c == predicted else None
            height = max(int(round(float(probs[k, c]) * size)), 1)
            bar = panel[k, :, size - height :, c * width : (c + 1) * width - 1]
            bar[:] = (torch.full((3,), 0.6) if colour is None else colour).view(3, 1, 1)
    return torch.cat([photos, panel], dim=3)


def main(args) -> Path:
    return {"curves": plot_curves, "grid": plot_grid, "preprocessing": plot_preprocessing, "gradcam": plot_gradcam}[
        args.command
    ](args)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)

    def command(name, help, run=True):
        sub = commands.add_parser(name, help=help, formatter_class=HelpFormatter)
        if run:
            sub.add_argument("run", help="a run folder of retinopathy/train.py, or a checkpoint in it")
        sub.add_argument(
            "--output-dir", "--output_dir", dest="output_dir", help="figures go here; without it RUN/figures"
        )
        return sub

    command("curves", "training curves of a run")
    for name, help in (("grid", "photos per grade with predictions"), ("gradcam", "Grad-CAM heat maps")):
        sub = command(name, help)
        sub.add_argument(
            "--labels-csv",
            "--labels_csv",
            dest="labels_csv",
            help="labelled photos; without it the run's held-out test split",
        )
        sub.add_argument("--img-dir", "--img_dir", dest="img_dir", help="their folder")
        sub.add_argument("--tta", action="store_true", help="average the prediction over the photo's flips")
        sub.add_argument("--seed", type=int, default=0, help="which photos are drawn")
        sub.add_argument(
            "--cache-dir", "--cache_dir", dest="cache_dir", help="preprocessed photos; without it the run's cache"
        )
    grid = commands.choices["grid"]
    grid.add_argument("--per-grade", "--per_grade", dest="per_grade", type=int, default=4, help="photos per grade")
    gradcam = commands.choices["gradcam"]
    gradcam.add_argument("--images", nargs="+", help="photo files or id_codes of the run's image folder")
    gradcam.add_argument("--n", type=int, default=4, help="without --images: this many test-split photos")
    pre = command("preprocessing", "preprocessing steps of one or more photos", run=False)
    pre.add_argument("images", nargs="+", help="fundus photos")
    pre.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=512, help="size in pixels")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
