"""Test mode for hydra_lv: sliding-window inference over whole volumes, watershed decoding, and scores.

    python hydra_lv/evaluate.py --checkpoint outputs/hydra_lv_rsunet/checkpoints/best.ckpt
    python hydra_lv/train.py --mode test --checkpoint outputs/hydra_lv_rsunet/checkpoints/best.ckpt   # calls this
    python hydra_lv/evaluate.py --checkpoint best.ckpt data.test_image=DATA/vol5_im.h5 data.test_label=null
    python hydra_lv/evaluate.py --checkpoint best.ckpt inference.tta=true decoding.seed_binary=0.8

Volumes: data.test_* of the run's config (overridable as above), else its validation volumes, else the regions of
its training volumes that training held out for validation (data.val_fraction); test_results.json and the console
say which, and whether training saw them.
Inference: windows of model.input_size with inference.overlap (0.25), Gaussian blending, flip TTA with
inference.tta; the volume streams through one window row at a time and finished sections are written to disk, so
memory does not grow with the volume's depth. Decoding (decoding.*): seeds where binary > 0.9, boundary < 0.8
and distance > 0.5 (seeds under 16 voxels dropped), watershed of the negated distance inside binary > 0.85,
objects under 64 voxels removed.

Writes <run>/results/ (results_2, ... when that exists): predictions.h5 (dataset `main`, uint8 (3, z, y, x):
binary and boundary probability x 255, distance (d + 1) / 2 x 255), segmentation.h5 (`main`, uint32 instance ids);
with several volumes, <volume>_predictions.h5 and <volume>_segmentation.h5; and results.ome.zarr (OME-Zarr with
the maps and, as its label image, the segmentation, scaled by data.resolution: napari and neuroglancer open it).
With labels: test_results.json (adapted Rand error, VOI split / merge, instance precision / recall / F1 at IoU
0.5, inside the valid mask; the same for a threshold + connected-components baseline on the same predictions)
and a line per volume in <run>/test_results.log. test_results.json always lists each volume's files
(visualize.py --results reads it).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import ctypes
import glob
import hashlib
import json
import os
import time

import h5py
import numpy as np
import torch
import yaml
import zarr
from tqdm import tqdm

from common.export import deployable
from common.metrics import adapted_rand, match_instances, variation_of_information
from common.tiling import block_grid, core_slices, ngff_datasets, paste_objects, pyramid_plan
from hydra_lv.data import (
    DOMAIN,
    DataError,
    HelpFormatter,
    apply_overrides,
    find_volumes,
    held_out_regions,
    intensity_scale,
    load_config,
    new_folder,
    open_dataset,
    write_json,
)
from hydra_lv.model import (
    connected_components_baseline,
    decode_instances,
    load_weights,
    model_from_config,
    pick_device,
    precision_setting,
    sliding_window_inference,
)
from hydra_lv.train import mixed_precision


def load_model(path: str | Path, device) -> tuple[torch.nn.Module, dict]:
    """The network of a checkpoint of this domain, rebuilt from the config stored in it."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--checkpoint {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SystemExit(f"--checkpoint {path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("domain") != DOMAIN:
        raise SystemExit(f"--checkpoint {path}: not a {DOMAIN} checkpoint")
    model = model_from_config(checkpoint["config"])
    load_weights(model, checkpoint["model"], path)
    return model.to(device).eval(), checkpoint


def write_h5(path: Path, shape, dtype) -> tuple[h5py.File, h5py.Dataset]:
    f = h5py.File(path, "w")
    chunks = tuple(min(n, c) for n, c in zip(shape, (1, 8, 64, 64)[-len(shape) :], strict=True))
    return f, f.create_dataset("main", shape=shape, dtype=dtype, chunks=chunks, compression="gzip", compression_opts=1)


class ResultsZarr:
    """results.ome.zarr, filled a block at a time: the three predicted maps as a (c, z, y, x) uint8 OME-Zarr image
    and the segmentation as its label image `labels/segmentation`; finish() adds the in-plane pyramid (every
    second voxel of the level before, block by block) and the NGFF metadata in nanometres from data.resolution,
    so that napari (napari-ome-zarr) and neuroglancer open it at its voxel size."""

    def __init__(self, path: Path, shape):
        self.path, self.shape = path, tuple(shape)
        self.root = zarr.open_group(str(path), mode="w")
        self.labels_group = self.root.create_group("labels").create_group("segmentation")
        chunks = tuple(min(c, n) for c, n in zip((8, 256, 256), self.shape, strict=True))
        self.maps = self.root.create_array("0", shape=(3, *self.shape), chunks=(1, *chunks), dtype="uint8")
        self.labels = self.labels_group.create_array("0", shape=self.shape, chunks=chunks, dtype="uint32",
                                                     fill_value=0)  # fmt: skip

    def finish(self, resolution) -> None:
        from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

        for group, name, channel in ((self.root, "predictions", True), (self.labels_group, "segmentation", False)):
            full = group["0"]
            plan = pyramid_plan(full.shape, smallest=256, block=1024)
            for level, (shape, copies) in enumerate(plan, start=1):
                above = group[str(level - 1)]
                smaller = group.create_array(str(level), shape=shape, chunks=full.chunks, dtype=full.dtype,
                                             fill_value=0)  # fmt: skip
                for source, target in copies:
                    smaller[target] = above[source]
            axes = [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]
            scale = [float(r) for r in resolution]
            if channel:
                axes, scale = [{"name": "c", "type": "channel"}, *axes], [1.0, *scale]
            write_multiscales_metadata(group, ngff_datasets(len(plan) + 1, scale), axes=axes, name=name)
        write_label_metadata(self.root["labels"], "segmentation")


def block_settings(cfg: dict, shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(block, overlap) of block-wise segmentation: inference.block_size (at least a window, at most the
    volume) and inference.block_overlap (below the block)."""
    window = [int(w) for w in cfg["model"]["input_size"]]
    block = [max(min(int(b), n), w) for b, n, w in zip(cfg["inference"]["block_size"], shape, window, strict=True)]
    overlap = [min(int(o), b - 1) for o, b in zip(cfg["inference"]["block_overlap"], block, strict=True)]
    return tuple(block), tuple(overlap)


def segment_volume(model, image, origin, shape, scale, cfg, device, ctx, maps_out, labels_out, progress=False) -> int:
    """Segment image[origin : origin + shape] block by block (inference.block_size, overlapping by
    inference.block_overlap): each block is read, predicted window by window and decoded on its own; its maps'
    core go to every array of `maps_out` ((3, z, y, x) uint8), and each vesicle whose centre lies in the core
    is pasted with the next id into every array of `labels_out` (common.tiling: a vesicle cut by one block's edge
    is taken whole from its neighbour, so each gets one id). Memory is one block's, whatever the volume's size.
    Returns the number of vesicles."""
    inference = cfg["inference"]
    block, overlap = block_settings(cfg, shape)
    blocks = block_grid(shape, block, overlap)
    next_id = 1
    for start, core in tqdm(blocks, desc="blocks", unit="block", disable=not progress or len(blocks) == 1, leave=False):
        stop = [min(a + b, n) for a, b, n in zip(start, block, shape, strict=True)]
        region = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
        read = tuple(slice(o + a, o + b) for o, a, b in zip(origin, start, stop, strict=True))
        maps = sliding_window_inference(
            model, image[read], cfg["model"]["input_size"], inference["overlap"],
            cfg["system"]["inference"]["batch_size"], inference["tta"], inference["blending"], device, ctx=ctx,
            progress=progress and len(blocks) == 1, scale=scale,
        )  # fmt: skip
        stored = maps.copy()
        stored[2] = (stored[2] + 1) / 2  # distance -1..1 stored as 0..1
        stored = np.clip(np.round(stored * 255), 0, 255).astype(np.uint8)
        inside = core_slices(start, core, shape)
        local = tuple(slice(c.start - a, c.stop - a) for c, a in zip(inside, start, strict=True))
        for out in maps_out:
            out[(slice(None), *inside)] = stored[(slice(None), *local)]
        found = decode_instances(maps[0], maps[1], maps[2], **cfg["decoding"])
        window = np.asarray(labels_out[0][region])
        pasted = paste_objects(window, found, core, next_id)
        if pasted:
            for out in labels_out:
                out[region] = window
            next_id += len(pasted)
    return next_id - 1


def score(true: np.ndarray, pred: np.ndarray) -> dict:
    """Adapted Rand error, VOI and instance matching at IoU 0.5 (true label 0 ignored by the first two)."""
    match = match_instances(true, pred, 0.5)
    return {
        **adapted_rand(true, pred),
        **variation_of_information(true, pred),
        "instance_precision": match.precision,
        "instance_recall": match.recall,
        "instance_f1": match.f1,
        "true_instances": match.tp + match.fn,
        "predicted_instances": match.tp + match.fp,
    }


def test_volumes(cfg: dict, overrides: list[str]):
    """(volumes, the split they come from): data.test_* (else the validation, else the training volumes).
    Overriding data.test_image alone drops the checkpoint's test labels and mask: they belonged to other volumes."""
    data = dict(cfg["data"])
    given = {item.split("=", 1)[0] for item in overrides}
    if "data.test_image" in given:
        for kind in ("label", "mask"):
            if f"data.test_{kind}" not in given:
                data[f"test_{kind}"] = None
    for split in ("test", "val", "train"):
        volumes = find_volumes(data, split, need_labels=False)
        if volumes:
            return volumes, split
    raise DataError("no test volume: set data.test_image (and data.test_label to score it)")


def seen_by_training(volume, cfg: dict) -> str:
    """What training did with a volume: 'trained on', 'validated on (chose the model)' or 'held out'. A held-out
    region of a training volume was validated on."""
    if volume.bounds is not None:
        return "validated on (chose the model)"
    path = os.path.realpath(volume.image)
    for split, role in (("train", "trained on"), ("val", "validated on (chose the model)")):
        pattern = cfg["data"].get(f"{split}_image")
        if pattern and path in {os.path.realpath(p) for p in glob.glob(str(pattern))}:
            return role
    return "held out"


# decoding.* searched by --tune-decoding: (low, high, log scale); the seeds and sizes as pytorch_connectomics tunes
DECODING_SPACE = {
    "seed_binary": (0.5, 0.98, False), "seed_contour": (0.2, 0.95, False), "seed_distance": (0.0, 0.9, False),
    "foreground": (0.3, 0.95, False), "min_seed_size": (2, 128, True), "min_object_size": (8, 512, True),
}  # fmt: skip


def validation_volumes(cfg: dict) -> list:
    """The volumes that chose the model: data.val_*, else the held-out regions of the training volumes."""
    volumes = find_volumes(cfg["data"], "val", need_labels=True)
    if volumes:
        return volumes
    train = find_volumes(cfg["data"], "train")
    return held_out_regions(train, cfg["data"]["patch_size"], cfg["data"].get("val_fraction", 0.2))[1]


def predict_volume(model, volume, cfg: dict, device, ctx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(maps (3, z, y, x): binary, boundary, distance; labels inside the valid mask; valid) of a labelled volume or
    region, in memory (tuning decodes each many times)."""
    image = open_dataset(volume.image)
    scale = intensity_scale(image)
    image = np.asarray(image[volume.slices()])
    inference = cfg["inference"]
    maps = sliding_window_inference(
        model, image, cfg["model"]["input_size"], inference["overlap"], cfg["system"]["inference"]["batch_size"],
        inference["tta"], inference["blending"], device, ctx=ctx, scale=scale,
    )  # fmt: skip
    labels = np.asarray(open_dataset(volume.label)[volume.slices()]).astype(np.int64)
    valid = (
        np.ones(labels.shape, bool)
        if volume.mask is None
        else np.asarray(open_dataset(volume.mask)[volume.slices()]) > 0
    )
    return maps, labels * valid, valid


def study_name(checkpoint: dict, cfg: dict) -> str:
    """The Optuna study of one model and one way of predicting: a digest of the weights, the inference settings,
    the validation data and the search space. A resumed tuning of the same model goes on; a retrained model, or
    other inference settings, start a study of their own."""
    digest = hashlib.sha1()
    for name, tensor in checkpoint["model"].items():
        digest.update(name.encode())
        digest.update(tensor.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    settings = {"inference": cfg["inference"], "window": cfg["model"]["input_size"], "space": DECODING_SPACE,
                "data": {k: v for k, v in cfg["data"].items() if k.startswith(("val", "train"))}}  # fmt: skip
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return f"decoding_{digest.hexdigest()[:16]}"


def tune_decoding(checkpoint_path: str | Path, n_trials: int, overrides=(), storage: str | None = None) -> dict:
    """decoding.* tuned with Optuna (TPE, seeded) on the validation volumes: the objective is the mean adapted Rand
    error of the watershed decoding there, as pytorch_connectomics tunes its decoding; the first trial is the
    current setting, so the result is never worse on them. The best setting goes into the run's config.yaml and
    best.ckpt, where test mode reads it; decoding_tuning.json keeps the before and after. The study lives in
    <run>/decoding_study.db (SQLite; storage: a database URL shares it across machines), so a killed tuning goes on.
    The test volumes are not used: they stay an independent score."""
    import optuna

    device = pick_device()
    checkpoint_path = Path(checkpoint_path)
    model, checkpoint = load_model(checkpoint_path, device)
    cfg = apply_overrides(checkpoint["config"], list(overrides), "the checkpoint's config")
    run_dir = checkpoint_path.resolve().parent.parent
    volumes = validation_volumes(cfg)
    ctx, _ = mixed_precision(device, *precision_setting(device, cfg["optimization"]["precision"]))
    print(f"tuning decoding.* on {', '.join(v.name + v.region for v in volumes)} (validation), {n_trials} trials")
    predicted = [predict_volume(model, v, cfg, device, ctx) for v in volumes]

    def error(decoding: dict) -> float:
        errors = []
        for (binary, boundary, distance), labels, valid in predicted:
            segmentation = decode_instances(binary, boundary, distance, **decoding)
            errors.append(adapted_rand(labels, segmentation * valid)["adapted_rand_error"])
        return float(np.mean(errors))

    def objective(trial) -> float:
        decoding = {}
        for key, (low, high, log) in DECODING_SPACE.items():
            suggest = trial.suggest_int if isinstance(low, int) else trial.suggest_float
            decoding[key] = suggest(key, low, high, log=log)
        return error(decoding)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=storage or f"sqlite:///{run_dir / 'decoding_study.db'}", study_name=study_name(checkpoint, cfg),
        direction="minimize", sampler=optuna.samplers.TPESampler(seed=int(cfg["seed"])), load_if_exists=True,
    )  # fmt: skip
    before = {k: cfg["decoding"][k] for k in DECODING_SPACE}
    if not study.trials:
        study.enqueue_trial(before)
    remaining = n_trials - len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    study.optimize(objective, n_trials=max(0, remaining))
    best = {**cfg["decoding"], **study.best_params}
    before_error = error(before)  # the setting it started from, scored now (trial 0 may have been killed)
    if before_error <= study.best_value:
        best = {**cfg["decoding"], **before}
    result = {
        "tuned_on": [v.name + v.region for v in volumes],
        "trials": len(study.trials),
        "before": {"decoding": before, "adapted_rand_error": before_error},
        "after": {
            "decoding": {k: best[k] for k in DECODING_SPACE},
            "adapted_rand_error": min(before_error, study.best_value),
        },  # fmt: skip
    }
    print(f"decoding: adapted Rand error on validation {before_error:.4f} -> "
          f"{result['after']['adapted_rand_error']:.4f} with {result['after']['decoding']}")  # fmt: skip
    # the run's config and its best checkpoint carry the tuned decoding: test mode uses it
    checkpoint["config"]["decoding"] = best
    checkpoint["decoding_tuning"] = result
    tmp = checkpoint_path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, checkpoint_path)
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        stored = yaml.safe_load(config_file.read_text())
        stored["decoding"] = best
        tmp = config_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(stored, sort_keys=False))
        os.replace(tmp, config_file)
    write_json(run_dir / "decoding_tuning.json", result)
    return result


def export(args) -> Path:
    """--export DIR: the network with its output activations as DIR/model.pt (TorchScript), DIR/model.onnx
    (checked with onnxruntime against PyTorch) and DIR/model.json (what goes in and comes out): common/export.py."""
    out = Path(args.export)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--export {out}: the folder is not empty (an earlier export?); give a new one")
    model, checkpoint = load_model(args.checkpoint, torch.device("cpu"))
    cfg = apply_overrides(checkpoint["config"], args.overrides, "the checkpoint's config")
    window = cfg["model"]["input_size"]
    torch.manual_seed(0)
    description = {
        "domain": DOMAIN, "checkpoint": str(Path(args.checkpoint).resolve()),
        "architecture": cfg["model"]["architecture"],
        "input": {
            "axes": "bczyx", "channels": ["EM intensity"], "window_zyx": window,
            "voxel_size_nm_zyx": cfg["data"]["resolution"],
            "normalisation": "uint8: value / 255; uint16 or float: (value - p0.5) / (p99.5 - p0.5), clipped to 0..1, "
            "with the 0.5th and 99.5th percentiles of the whole volume",
            "tiling": f"windows of {window} voxels, overlap {cfg['inference']['overlap']}, "
            f"{cfg['inference']['blending']} blending (hydra_lv/model.py sliding_window_inference)",
        },
        "outputs": {"maps": {"channels": ["binary probability", "boundary probability", "distance (-1 outside, "
                                          "up to 1 at a vesicle's centre)"]}},  # fmt: skip
        "decoding": cfg["decoding"],
    }  # fmt: skip

    def head(x):  # binary and boundary probabilities, distance in -1..1
        return torch.cat([torch.sigmoid(x[:, :2]), torch.tanh(x[:, 2:3])], 1)

    traced, onnx_model, spec, _ = deployable(model, head, torch.rand(1, 1, *window), description, ["maps"])
    out.mkdir(parents=True, exist_ok=True)
    traced.save(str(out / "model.pt"))
    (out / "model.onnx").write_bytes(onnx_model)
    write_json(out / "model.json", spec)
    print(f"exported to {out}: model.pt (TorchScript), model.onnx (onnxruntime within "
          f"{spec['checked']['onnxruntime_max_abs_difference']:.1e} of PyTorch), model.json")  # fmt: skip
    return out


def cap_malloc_arenas(arenas: int = 2) -> None:
    """Bound the memory block-wise segmentation keeps as it goes (Linux with glibc; elsewhere nothing is done):
    glibc gives threads (torch's, zarr's writers') malloc arenas of their own, up to 8 per core, and the blocks'
    freed buffers scattered over them made peak RSS creep up with the volume's size (19 % from 1x to 64x the
    demo volume); with two arenas, and zarr writing from one thread, 9.6 % from 1x to 16x and 11 % to 64x
    (benchmarks/RESULTS.md, issue 23)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc
        pass


def main(args) -> Path:
    if args.export:
        return export(args)
    cap_malloc_arenas()
    if args.tune_decoding:
        tune_decoding(args.checkpoint, args.tune_decoding, args.overrides)
    device = pick_device()
    model, checkpoint = load_model(args.checkpoint, device)
    for key, value in load_config()["inference"].items():  # settings added since the checkpoint was trained
        checkpoint["config"]["inference"].setdefault(key, value)
    cfg = apply_overrides(checkpoint["config"], args.overrides, "the checkpoint's config")
    volumes, split = test_volumes(cfg, args.overrides)
    if split == "train":  # no test, no validation volumes: the regions training held out to validate on
        volumes = held_out_regions(volumes, cfg["data"]["patch_size"], cfg["data"].get("val_fraction", 0.2))[1]
    roles = [seen_by_training(v, cfg) for v in volumes]
    note = {
        "test": "test volumes",
        "val": "no data.test_image: the validation volumes, which chose the model (not an independent score)",
        "train": "no data.test_image or data.val_image: the held-out regions of the training volumes, never trained "
        "on but validated on (they chose the model: not an independent score)",
    }[split]
    if split != "test":
        print(f"scoring {note}")
    names = [v.name for v in volumes]
    if len(set(names)) < len(names):  # e.g. DATA/a/im.h5 and DATA/b/im.h5
        names = [f"{v.image.parent.name}_{v.name}" for v in volumes]
    run_dir = Path(args.checkpoint).resolve().parent.parent
    out = new_folder(Path(args.output_dir) if args.output_dir else run_dir, "results")
    window = cfg["model"]["input_size"]
    inference, decoding = cfg["inference"], cfg["decoding"]
    ctx, _ = mixed_precision(device, *precision_setting(device, cfg["optimization"]["precision"]))
    report = {"checkpoint": str(Path(args.checkpoint).resolve()), "inference": inference, "decoding": decoding,
              "voxel_size_nm": cfg["data"]["resolution"]}  # fmt: skip
    if "decoding_tuning" in checkpoint:  # --tune-decoding chose these on the validation volumes
        report["decoding_tuning"] = checkpoint["decoding_tuning"]
    report["scored"] = {"split": split, "held_out": all(r == "held out" for r in roles), "note": note}
    report["volumes"] = {}
    for volume, name in tqdm(list(zip(volumes, names, strict=True)), desc="volumes", disable=len(volumes) == 1):
        started = time.time()
        prefix = "" if len(volumes) == 1 else f"{name}_"
        image = open_dataset(volume.image)
        scale = intensity_scale(image)  # the stretch training used: 0..255 for uint8, percentiles otherwise
        origin = [a for a, _ in volume.bounds] if volume.bounds is not None else [0, 0, 0]
        shape = tuple(b - a for a, b in volume.bounds) if volume.bounds is not None else tuple(image.shape)
        if args.fast_dev_run:  # one window of the first volume
            shape = tuple(min(n, w) for n, w in zip(shape, window, strict=True))
        block, block_overlap = block_settings(cfg, shape)
        print(f"{name}{volume.region} ({roles[names.index(name)]} by training): {shape} voxels, windows {window}, "
              f"overlap {inference['overlap']}, TTA {inference['tta']}; blocks {list(block)} overlapping by "
              f"{list(block_overlap)}")  # fmt: skip
        files = {"predictions": out / f"{prefix}predictions.h5", "segmentation": out / f"{prefix}segmentation.h5",
                 "ome_zarr": out / f"{prefix}results.ome.zarr"}  # fmt: skip
        results = ResultsZarr(files["ome_zarr"], shape)
        f, predictions = write_h5(files["predictions"], (3, *shape), np.uint8)
        g, segmentation = write_h5(files["segmentation"], shape, np.uint32)
        with f, g, zarr.config.set({"threading.max_workers": 1}):  # see cap_malloc_arenas
            found = segment_volume(model, image, origin, shape, scale, cfg, device, ctx, [predictions, results.maps],
                                   [segmentation, results.labels], progress=True)  # fmt: skip
            results.finish(cfg["data"]["resolution"])
        seconds = time.time() - started
        print(f"  {found} vesicles in {seconds:.1f}s -> {files['segmentation']}")
        entry = {"image": str(volume.image), "label": volume.label and str(volume.label), "region": volume.bounds}
        entry.update({"mask": volume.mask and str(volume.mask), "shape": list(shape), "seconds": round(seconds, 2)})
        entry.update({k: str(v) for k, v in files.items()})
        entry["training"] = roles[names.index(name)]  # trained on, validated on (chose the model) or held out
        report["volumes"][name] = entry
        if volume.label is None:
            continue
        # scoring holds the volume's labels, segmentation and binary map in memory (inference above does not)
        crop = tuple(slice(r.start, r.start + n) for r, n in zip(volume.slices(), shape, strict=True))
        labels = np.asarray(open_dataset(volume.label)[crop]).astype(np.int64)
        valid = np.ones(shape, bool) if volume.mask is None else np.asarray(open_dataset(volume.mask)[crop]) > 0
        with h5py.File(files["predictions"], "r") as f, h5py.File(files["segmentation"], "r") as g:
            binary, segmentation = f["main"][0].astype(np.float32) / 255, g["main"][...]
        baseline = connected_components_baseline(binary, 0.5, decoding["min_object_size"])
        # scored inside the valid region only: outside it, nothing was annotated
        entry.update(score(labels * valid, segmentation * valid))
        entry["baseline_threshold_connected_components"] = score(labels * valid, baseline * valid)
        print(
            f"  adapted Rand error {entry['adapted_rand_error']:.4f} (baseline "
            f"{entry['baseline_threshold_connected_components']['adapted_rand_error']:.4f}), "
            f"VOI split {entry['voi_split']:.3f} merge {entry['voi_merge']:.3f}, instance F1 {entry['instance_f1']:.3f}"
        )
        with open(run_dir / "test_results.log", "a") as log:
            log.write(
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {Path(args.checkpoint).name}  {name}  "
                f"adapted_rand_error {entry['adapted_rand_error']:.4f}  voi_split {entry['voi_split']:.4f}  "
                f"voi_merge {entry['voi_merge']:.4f}  instance_f1 {entry['instance_f1']:.4f}  "
                f"baseline_adapted_rand_error "
                f"{entry['baseline_threshold_connected_components']['adapted_rand_error']:.4f}  {out}\n"
            )
    scored = [v for v in report["volumes"].values() if "adapted_rand_error" in v]
    if len(scored) > 1:
        keys = [k for k, v in scored[0].items() if isinstance(v, float)]
        report["mean"] = {k: float(np.mean([v[k] for v in scored])) for k in keys}
    write_json(out / "test_results.json", report)
    print(f"wrote {out}")
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument(
        "overrides", nargs="*", help="dotted.key=value over the checkpoint's config, e.g. inference.tta=true"
    )
    p.add_argument("--checkpoint", required=True, help="outputs/<experiment_name>/checkpoints/best.ckpt")
    p.add_argument(
        "--output-dir", "--output_dir", dest="output_dir", help="results/ goes in here; unset: the run folder"
    )
    p.add_argument("--fast-dev-run", "--fast_dev_run", dest="fast_dev_run", action="store_true", help="one window only")
    p.add_argument(
        "--export", metavar="DIR", help="write the network as TorchScript and ONNX with model.json into DIR, and stop"
    )
    p.add_argument(
        "--tune-decoding", "--tune_decoding", dest="tune_decoding", type=int, default=0, metavar="N",
        help="first tune decoding.* in N Optuna trials on the validation volumes (written into the run's config)",
    )  # fmt: skip
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Overrides may come before, between or after the flags (argparse's intermixed parsing)."""
    return get_args_parser().parse_intermixed_args(argv)


if __name__ == "__main__":
    main(parse_args())
