"""Run the whole CellSAM pipeline (CellFinder boxes -> SAM masks -> one label image) on a folder of images of any
size, and score it where masks are given.

    python cellsam/evaluate.py output/my_cells                        # its test images (else a fold's validation)
    python cellsam/evaluate.py output/my_cells --fold 2 --images NEW/images            # label images only
    python cellsam/evaluate.py output/my_cells --images DATA/images --masks DATA/masks  # with scores
    python cellsam/evaluate.py --cellsam_checkpoint cellsam_general.pt --images DATA/images --masks DATA/masks
    python cellsam/evaluate.py output/my_cells --export exported/     # TorchScript + ONNX graphs, model.json
                                                   # a released (or fine-tuned) published CellSAM, as it comes

Images larger than the model's window are cut into overlapping tiles at their own pixel scale; a cell is taken
from the tile whose core holds its centre (--overlap should exceed the largest cell's diameter). The published
CellSAM segments an image that fits its window whole, resized to 1024 px, as cellSAM's segment_cellular_image
does. Writes a new folder <experiment>/evaluation/evaluation_<YYYYmmdd_HHMMSS>/ (output/evaluation/... for
--cellsam_checkpoint; or in --output_dir): labels/<image>.tif (cell ids, uint16 or uint32, with the pixel size of
--pixel_size or of the image's metadata, for Fiji and napari), cells/<image>.csv (a row per cell id: area,
centroid), geojson/<image>.geojson (each cell's outline for QuPath: File > Import objects) and, with masks,
report.json and per_image.csv:
- CellSAM's F1 at IoU 0.5 (TP / (TP + (FP + FN) / 2), averaged per image), precision, recall, PQ;
- average precision over IoU 0.5:0.95 as cell-segmentation papers report it (TP / (TP + FP + FN) at each IoU
  threshold 0.5, 0.55, ..., 0.95, averaged over thresholds and images);
- box AP at IoU 0.5 of CellFinder alone (stage 1: its scored boxes against the cells' boxes, all-point
  interpolated precision-recall area, over every image together; a larger image in tiles, each box taken from the
  tile whose core holds its centre, as the pipeline takes cells);
- the same F1, precision, recall and PQ for Otsu + distance-transform watershed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import json
import time

import numpy as np
import pandas as pd
import tifffile
import torch
from skimage.measure import regionprops_table
from torchvision.ops import box_iou

from cellsam.config import ExperimentConfig
from cellsam.data import boxes_from_mask, find_pairs, is_large
from cellsam.model import decode_masks, detect_tiled
from cellsam.train import build_model, new_experiment_dir, otsu_watershed, read_pair, score_images
from cellsam.utils import write_json
from common.export import exported_graph
from common.formats import label_image_attrs, label_tiff, pixel_size_from_tiff, qupath_features
from common.metrics import instance_overlaps, match_instances
from common.tiling import pyramid_plan


def load_fold(experiment: Path, fold: int, device) -> tuple:
    """(the model of one fold, its ExperimentConfig): the published CellSAM from the fold's
    cellsam_finetuned.pt; this folder's model rebuilt from experiment_config.json and the best checkpoints of
    both stages."""
    config_file = experiment / "experiment_config.json"
    if not config_file.is_file():
        raise SystemExit(f"{experiment}: no experiment_config.json (give output/<name> of cellsam/train.py)")
    config = ExperimentConfig.from_dict(json.loads(config_file.read_text()))
    folder = experiment / "models" / f"fold_{fold}"
    if config.architecture == "published":
        from cellsam.published import CellSAM, load_cellsam_weights

        path = folder / "cellsam_finetuned.pt"
        if not path.is_file():
            raise SystemExit(f"fold {fold}: {path} missing (did that fold finish?)")
        model = CellSAM(config.sam_size)
        load_cellsam_weights(model, path, log=lambda *_: None, flag="fold model")
        model.window = config.window
        return model.to(device).eval(), config
    paths = [folder / "best_model_s1.pth", folder / "best_model_s2.pth"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"fold {fold}: {', '.join(missing)} missing (did that fold finish?)")
    model = build_model(config)
    for path in paths:  # stage 2's weights (the encoder it started from included) come last
        saved = torch.load(path, map_location="cpu", weights_only=True)
        for name, state in saved["modules"].items():
            model.parts[name].load_state_dict(state)
    return model.to(device).eval(), config


def box_average_precision(detections: list[tuple], iou_threshold: float = 0.5) -> float:
    """Box AP over images: detections = [(boxes (N, 4) xyxy, scores (N,), true boxes (K, 4) xyxy), ...]. Each
    detection, from the most confident, is a true positive if it overlaps a not yet matched true box by IoU >=
    threshold; AP = area under the precision-recall curve with precision made monotone (all-point interpolation,
    as PASCAL VOC 2010+ and COCO)."""
    scores, hits, n_true = [], [], 0
    for boxes, box_scores, truth in detections:
        n_true += len(truth)
        order = torch.as_tensor(box_scores).argsort(descending=True)
        boxes, box_scores = torch.as_tensor(boxes)[order], torch.as_tensor(box_scores)[order]
        taken = torch.zeros(len(truth), dtype=torch.bool)
        iou = box_iou(boxes, torch.as_tensor(truth)) if len(truth) and len(boxes) else torch.zeros(len(boxes), 0)
        for row, score in zip(iou, box_scores.tolist(), strict=True):
            candidates = torch.where(~taken & (row >= iou_threshold), row, torch.tensor(-1.0))
            best = int(candidates.argmax()) if len(candidates) else -1
            hit = best >= 0 and candidates[best] >= iou_threshold
            if hit:
                taken[best] = True
            scores.append(score)
            hits.append(bool(hit))
    if n_true == 0:
        return float("nan")
    order = np.argsort(-np.array(scores), kind="stable")
    tp = np.cumsum(np.array(hits, float)[order])
    recall = np.concatenate([[0.0], tp / n_true])
    precision = np.concatenate([[1.0], tp / np.arange(1, len(tp) + 1)])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum((recall[1:] - recall[:-1]) * precision[1:]))


def average_precision_over_iou(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean over IoU 0.5, 0.55, ..., 0.95 of TP / (TP + FP + FN) (the cell-segmentation 'AP')."""
    values, overlaps = [], instance_overlaps(truth, pred)
    for threshold in np.arange(0.5, 0.96, 0.05):
        match = match_instances(truth, pred, float(threshold), overlaps)
        total = match.tp + match.fp + match.fn
        values.append(match.tp / total if total else float("nan"))
    return float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")


def load_released(path: str, device, sam_size="vit_b", allow_missing=False, window=None) -> tuple:
    """(a published CellSAM from a released or fine-tuned file, an ExperimentConfig of defaults)."""
    from cellsam.published import CellSAM, load_cellsam_weights

    model = CellSAM(sam_size)
    load_cellsam_weights(model, path, allow_missing)
    model.window = window
    config = ExperimentConfig(architecture="published", sam_size=sam_size, cellsam_checkpoint=path, window=window)
    return model.to(device).eval(), config


def write_cells(out: Path, pair, labels: np.ndarray, pixel_size: float | None) -> None:
    """labels/<image>.tif (cell ids, with the pixel size for Fiji and napari when known), cells/<image>.csv (a row
    per cell id: area, centroid) and geojson/<image>.geojson (each cell's outline, for QuPath)."""
    array, options = label_tiff(labels, pixel_size)
    tifffile.imwrite(out / "labels" / f"{pair.name}.tif", array, **options)
    props = regionprops_table(labels, properties=("label", "area", "centroid"))
    table = pd.DataFrame({"cell_id": props["label"], "area_px": props["area"].astype(int),
                          "centroid_x_px": props["centroid-1"].round(2),
                          "centroid_y_px": props["centroid-0"].round(2)})  # fmt: skip
    if pixel_size:
        table.insert(2, "area_um2", (table["area_px"] * pixel_size**2).round(3))
    table.to_csv(out / "cells" / f"{pair.name}.csv", index=False)
    areas = {int(i): {"Area px": int(a)} for i, a in zip(table["cell_id"], table["area_px"], strict=True)}
    features = qupath_features(labels, measurements=areas, object_type="annotation", name=pair.name)
    write_json(out / "geojson" / f"{pair.name}.geojson", features)


class CellWriter:
    """cells/<image>.csv and geojson/<image>.geojson of an image segmented a tile at a time: each tile's new cells
    appended as they are found (tile_and_stitch's on_cells), under a temporary name until complete."""

    def __init__(self, out: Path, name: str, pixel_size: float | None):
        self.name, self.pixel_size, self.count = name, pixel_size, 0
        self.paths = [out / "cells" / f"{name}.csv", out / "geojson" / f"{name}.geojson"]
        self.csv = open(self.paths[0].with_suffix(".csv.part"), "w")
        columns = ["cell_id", "area_px", *(["area_um2"] if pixel_size else []), "centroid_x_px", "centroid_y_px"]
        self.csv.write(",".join(columns) + "\n")
        self.geojson = open(self.paths[1].with_suffix(".geojson.part"), "w")
        self.geojson.write('{"type": "FeatureCollection", "features": [\n')

    def add(self, window: np.ndarray, y0: int, x0: int, ids: list[int]) -> None:
        first = ids[0]  # the new ids are first, first + 1, ...: the largest in the window
        local = np.where(window >= first, window - (first - 1), 0)
        props = regionprops_table(local, properties=("label", "area", "centroid"))
        areas = {}
        for k, area, y, x in zip(props["label"], props["area"], props["centroid-0"], props["centroid-1"], strict=True):
            um2 = [f"{area * self.pixel_size**2:.3f}"] if self.pixel_size else []
            row = [str(k + first - 1), str(int(area)), *um2, f"{x + x0:.2f}", f"{y + y0:.2f}"]
            self.csv.write(",".join(row) + "\n")
            areas[int(k) + first - 1] = {"Area px": int(area)}
        features = qupath_features(local, measurements=areas, object_type="annotation", name=self.name,
                                   offset=(x0, y0), id_offset=first - 1)["features"]  # fmt: skip
        for feature in features:
            self.geojson.write(("" if self.count == 0 else ",\n") + json.dumps(feature))
            self.count += 1

    def close(self) -> None:
        self.geojson.write("\n]}\n")
        for handle, path in zip((self.csv, self.geojson), self.paths, strict=True):
            handle.close()
            path.with_suffix(path.suffix + ".part").replace(path)


def open_labels(path: Path, shape, chunk: int = 1024):
    """A new OME-Zarr label image at <path> (its level 0: uint32 ids, 0 where nothing is written) to fill a
    tile at a time; finish_labels adds the rest."""
    import zarr

    chunks = tuple(min(chunk, n) for n in shape)
    return zarr.open_group(str(path), mode="w").create_array("0", shape=tuple(shape), chunks=chunks, dtype="uint32",
                                                            fill_value=0)  # fmt: skip


def finish_labels(path: Path, pixel_size: float | None) -> None:
    """The label image's pyramid (common.tiling.pyramid_plan: every second pixel, so ids stay ids, a block at a
    time) and its OME-Zarr label-image metadata at its root (common.formats.label_image_attrs): napari
    (napari-ome-zarr) opens <path> as labels, Fiji's and QuPath's OME-Zarr readers as an image."""
    import zarr

    root = zarr.open_group(str(path), mode="r+")
    full = root["0"]
    plan = pyramid_plan(full.shape)
    for level, (shape, copies) in enumerate(plan, start=1):
        above = root[str(level - 1)]
        smaller = root.create_array(str(level), shape=shape, chunks=full.chunks, dtype=full.dtype, fill_value=0)
        for source, target in copies:
            smaller[target] = above[source]
    root.attrs.update(label_image_attrs(len(plan) + 1, pixel_size, "cells"))


def read_pixel_size(path: Path) -> float | None:
    """The pixel size (um) in a TIFF's ImageJ, OME or per-centimetre tags; None for other files or without one."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            return pixel_size_from_tiff(tif)
    except Exception:  # unreadable metadata: reading the pixels reports the file
        return None


class FinderGraph(torch.nn.Module):
    """CellFinder of the published CellSAM on an image resized to the input size (0..255): its input steps
    (cellSAM's 8-bit truncation, SAM's pixel normalisation, ImageNet + min-max), the sigmoid of its class logits
    (Q queries x classes) and its boxes (cx, cy, w, h as fractions of the input)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        from cellsam.published import finder_input

        out = self.model.cellfinder(finder_input(image / 255, self.model.model, self.model.adv_mode))
        return out["pred_logits"].sigmoid(), out["pred_boxes"]


class EncoderGraph(torch.nn.Module):
    """The masks' SAM image encoder on mask_input's output (0..255): SAM's pixel normalisation, then the ViT."""

    def __init__(self, model):
        super().__init__()
        self.sam = model.mask_sam

    def forward(self, image):
        return self.sam.image_encoder((image - self.sam.pixel_mean) / self.sam.pixel_std)


class DecoderGraph(torch.nn.Module):
    """SAM's prompt encoder and mask decoder: an image embedding and N boxes (x0, y0, x1, y1 in input pixels) ->
    N mask probabilities at a quarter of the input size and their predicted IoU."""

    def __init__(self, model):
        super().__init__()
        self.sam = model.mask_sam

    def forward(self, embedding, boxes):
        logits, iou = decode_masks(self.sam, embedding, boxes)
        return logits.sigmoid(), iou


def export(args, model, config, source: str) -> Path:
    """--export DIR: the published CellSAM as three graphs, each TorchScript (.pt) and ONNX (.onnx) checked with
    onnxruntime against PyTorch: cellfinder (image -> box scores and boxes), image_encoder (the masks' input ->
    embedding) and mask_decoder (embedding + boxes -> masks); model.json says what each takes and gives, and the
    steps between them (cellsam/published.py), which stay outside the graphs."""
    from cellsam.published import mask_input

    out = Path(args.export)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--export {out}: the folder is not empty (an earlier export?); give a new one")
    if config.architecture != "published":
        raise SystemExit(
            f"--export: the published CellSAM architecture only (this experiment is {config.architecture})"
        )
    model = model.cpu().eval()
    size = model.input_size
    torch.manual_seed(0)
    image = torch.rand(1, 3, size, size) * 255
    masks_in = mask_input(image / 255, model.adv_mode)
    with torch.no_grad():
        embedding = EncoderGraph(model)(masks_in)
    boxes = torch.tensor([[10.0, 20.0, size / 3, size / 2], [size / 2, size / 2, size - 8.0, size - 4.0]])
    # one image at a time, as the pipeline runs them (CellFinder's graph fixes its batch of one)
    graphs = {
        "cellfinder": (FinderGraph(model), (image,), ["image"], ["scores", "boxes"], None, {"image": image.numpy()}),
        "image_encoder": (EncoderGraph(model), (masks_in,), ["image"], ["embedding"], None,
                          {"image": masks_in.numpy()}),
        "mask_decoder": (DecoderGraph(model), (embedding, boxes), ["embedding", "boxes"], ["masks", "iou"],
                         ({}, {0: torch.export.Dim("boxes", min=1)}),
                         {"embedding": embedding.numpy(), "boxes": torch.cat([boxes, boxes]).numpy()}),
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "domain": "cellsam", "checkpoint": source, "sam_size": model.sam_size, "input_size": size,
        "pipeline": [
            f"read the image as CellSAM does (cellsam/published.py read_image: 3 channels, each min-max scaled), "
            f"on 0..255; resize it (or each window of a large image) to {size} x {size}",
            "cellfinder(image): scores (1, Q, classes) and boxes (1, Q, 4) cx, cy, w, h in 0..1; a query's score is "
            f"its best class; keep the boxes above {model.bbox_threshold} (cellSAM's dynamic threshold: "
            "published.py box_score_threshold), in input pixels as x0, y0, x1, y1",
            "image_encoder(mask_input(image)): mask_input clips each image to the 0th..99.5th percentile of its "
            "non-zero values, rescales to 0..1, then ImageNet normalisation and min-max per channel, times 255 "
            "(published.py mask_input; outside the graph: its percentile of the non-zero values)",
            "mask_decoder(embedding, boxes): masks (N, h, w) at SAM's low resolution (graphs.mask_decoder.outputs) "
            f"and iou (N,); keep masks with "
            f"iou >= {model.iou_threshold}, upsample to the input size and threshold at {model.mask_threshold}, "
            "then paint them into one label image (published.py masks_from_boxes, paint_labels)",
        ],
        "graphs": {},
        "exported": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
    }  # fmt: skip
    for name, (net, examples, inputs, outputs, dynamic, feeds) in graphs.items():
        traced, onnx_model, reference, checks = exported_graph(net, examples, inputs, outputs, dynamic, feeds)
        traced.save(str(out / f"{name}.pt"))
        (out / f"{name}.onnx").write_bytes(onnx_model)
        spec["graphs"][name] = {
            "files": {"torchscript": f"{name}.pt", "onnx": f"{name}.onnx"},
            "inputs": {n: list(x.shape) for n, x in zip(inputs, examples, strict=True)},
            "outputs": {n: list(r.shape) for n, r in zip(outputs, reference, strict=True)},
            "checked": checks,
        }
    write_json(out / "model.json", spec)
    print(f"exported to {out}: cellfinder, image_encoder and mask_decoder (.pt TorchScript, .onnx), model.json")
    return out


def main(args) -> Path:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.experiment is None and not args.cellsam_checkpoint:
        raise SystemExit("give an experiment folder (output/<name> of cellsam/train.py) or --cellsam_checkpoint FILE")
    if args.cellsam_checkpoint:
        if not args.images and not args.export:
            raise SystemExit("--cellsam_checkpoint: give --images (and --masks for scores)")
        pairs = find_pairs(args.images, args.masks) if args.images else []  # a bad folder stops before the model
        model, config = load_released(args.cellsam_checkpoint, device, args.sam_size, args.allow_missing_keys,
                                      args.window)  # fmt: skip
        if args.export:
            return export(args, model, config, str(Path(args.cellsam_checkpoint).resolve()))
        fold, experiment, parent = None, Path(args.cellsam_checkpoint), Path("output") / "evaluation"
        scored_on = f"--images {args.images}"
        if args.bbox_threshold is not None:
            config.stage1_config.score_threshold = args.bbox_threshold
    else:
        experiment = parent = Path(args.experiment)
        results_file = experiment / "results" / "individual_results.json"
        folds = json.loads(results_file.read_text()) if results_file.is_file() else []
        fold = args.fold or (folds[0]["fold"] if folds else 1)
        model, config = load_fold(experiment, fold, device)
        if args.export:
            return export(args, model, config, f"{experiment.resolve()} fold {fold}")
        if args.images:
            pairs, scored_on = find_pairs(args.images, args.masks), f"--images {args.images}"
        elif config.test_img_path:  # images that took no part in training or model choice
            pairs, scored_on = find_pairs(config.test_img_path, config.test_mask_path), "the experiment's test images"
        else:  # the fold's held-out images
            held_out = next((f["val_images"] for f in folds if f["fold"] == fold), [])
            if not held_out:
                raise SystemExit(f"fold {fold} held no images out (full_dataset?): give --images (and --masks)")
            pairs = [p for p in find_pairs(config.img_path, config.mask_path) if p.name in held_out]
            scored_on = f"fold {fold}'s validation images, which also chose its best epochs (optimistic)"
        parent = parent / "evaluation"
    out = new_experiment_dir(Path(args.output_dir or parent), f"evaluation_{time.strftime('%Y%m%d_%H%M%S')}")
    for folder in ("labels", "cells", "geojson"):
        (out / folder).mkdir()
    print(f"{'fold ' + str(fold) if fold else experiment}: segmenting {len(pairs)} image(s) on {device.type}; "
          f"writing {out}")  # fmt: skip
    rows, predictions, baselines, truths, detections = [], [], [], [], []
    threshold = config.stage1_config.score_threshold
    for pair in pairs:
        if is_large(pair.image):  # a tile at a time: flat memory, no scores
            pixel_size = args.pixel_size or read_pixel_size(pair.image)
            image, writer = model.large_image(pair.image, config.gamma), CellWriter(out, pair.name, pixel_size)
            print(f"{pair.name}: {image.shape[1]} x {image.shape[0]} px, segmented a tile at a time"
                  + (" (its mask is not used: scores need the image whole)" if pair.mask else ""))  # fmt: skip
            path = out / "labels" / f"{pair.name}.ome.zarr"
            model.segment(image, threshold, args.overlap, device, open_labels(path, image.shape[:2]), writer.add)
            finish_labels(path, pixel_size)
            writer.close()
            image.close()
            print(f"{pair.name}: {writer.count} cells -> {path}")
            continue
        image, truth = read_pair(pair, config.gamma, model.read_image)
        labels = model.segment(image, threshold, args.overlap, device)
        write_cells(out, pair, labels, args.pixel_size or read_pixel_size(pair.image))
        if truth is None:
            continue
        predictions.append(labels)
        truths.append(truth)
        baselines.append(otsu_watershed(read_pair(pair, config.gamma)[0]))  # read_image's scaling, either model
        boxes, scores = detect_tiled(model, image, args.overlap, device)
        detections.append((boxes, scores, torch.from_numpy(boxes_from_mask(truth)[1])))
        match = match_instances(truth, labels, 0.5)
        rows.append({"image": pair.name, "cells": match.tp + match.fn, "predicted": match.tp + match.fp,
                     "f1": match.f1, "precision": match.precision, "recall": match.recall,
                     "ap_50_95": average_precision_over_iou(truth, labels)})  # fmt: skip
    if rows:
        report = {"experiment": str(experiment), "fold": fold, "scored_on": scored_on, "images": len(rows),
                  "image_names": [r["image"] for r in rows], **score_images(predictions, truths)}  # fmt: skip
        report["ap_50_95"] = float(np.nanmean([r["ap_50_95"] for r in rows]))
        report["box_ap_50"] = box_average_precision(detections, 0.5)
        report["baseline_otsu_watershed"] = score_images(baselines, truths)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        pd.DataFrame(rows).to_csv(out / "per_image.csv", index=False)
        print(f"{len(rows)} image(s), {scored_on}:")
        print(f"F1 {report['f1']:.3f}  precision {report['precision']:.3f}  recall {report['recall']:.3f}  PQ "
              f"{report['pq']:.3f}  AP50:95 {report['ap_50_95']:.3f}  box AP50 {report['box_ap_50']:.3f}  "
              f"(Otsu + watershed F1 {report['baseline_otsu_watershed']['f1']:.3f})")  # fmt: skip
    print(f"wrote {out}")
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("experiment", nargs="?", help="output/<name> of cellsam/train.py")
    p.add_argument("--cellsam_checkpoint", "--cellsam-checkpoint", dest="cellsam_checkpoint",
                   help="instead of an experiment: a published-layout CellSAM file (cellsam_general.pt, "
                        "cellsam_extra.pt or a fold's cellsam_finetuned.pt); needs --images")  # fmt: skip
    p.add_argument("--bbox_threshold", type=float, help="with --cellsam_checkpoint: CellFinder's score threshold [0.4]")
    p.add_argument("--sam_size", default="vit_b", help="with --cellsam_checkpoint: vit_b (the released models) or "
                   "vit_tiny [vit_b]")  # fmt: skip
    p.add_argument("--window", type=int, help="with --cellsam_checkpoint: images larger than this are cut into "
                   "windows of it, each resized to 1024 px (cellSAM's wsi.py: 512) [1024]")  # fmt: skip
    p.add_argument(
        "--allow_missing_keys",
        action="store_true",
        help="with --cellsam_checkpoint: load a file that lacks some published keys (the rest as built)",
    )
    p.add_argument("--fold", type=int, help="which fold's models [the first]")
    p.add_argument("--images", help="image folder [the experiment's test images, else the fold's validation images]")
    p.add_argument("--masks", help="their instance masks: adds the scores")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", help="[EXPERIMENT/evaluation]")
    p.add_argument("--pixel_size", "--pixel-size", dest="pixel_size", type=float,
                   help="micrometres per pixel of the images, stored in the label TIFFs [read from each image's "
                        "ImageJ or OME-TIFF metadata; none if it has none]")  # fmt: skip
    p.add_argument("--export", metavar="DIR", help="write the published CellSAM as TorchScript and ONNX graphs "
                   "(cellfinder, image_encoder, mask_decoder) with model.json into DIR, and stop")  # fmt: skip
    p.add_argument("--overlap", type=int, default=64, help="tile overlap in pixels, above the largest cell [64]")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
