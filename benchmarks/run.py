"""Speed and memory of every domain, side by side with reference implementations; writes benchmarks/RESULTS.md.

    python benchmarks/run.py --quick                 # every item, small sizes (a few minutes on 2 CPU cores)
    python benchmarks/run.py                         # the full sizes
    python benchmarks/run.py --device cuda           # on a GPU machine: the model items on the GPU
    python benchmarks/run.py --items metrics,watershed --output /tmp/RESULTS.md

Items (see issue #8):
  pipeline   data pipeline vs model: samples/s of each domain's training dataset + augmentation (1 worker, all
             workers), training steps/s of its default model on the same batch size, and their ratio; epoch 1
             (cold preprocessing cache) against epoch 2 (warm)
  steps      training step variants of each default model: fp32, channels_last, bf16 autocast, torch.compile
  window     hydra_lv's streaming sliding-window inference against MONAI's sliding_window_inference (same
             model, window, overlap 0.25, Gaussian blending): equal outputs, time ratio, peak memory
  metrics    our instance matching / PQ / AJI against a per-instance-pair reference: identical values, time
             ratio, and how time grows with the instance count (fitted exponent)
  watershed  hydra_lv's seeded-watershed decoding against volume size: seconds, peak memory, fitted exponent
  memory     resident memory while reading a large memory-mapped PanNuke fold and large HDF5 volumes

Every timing is the median of several repeats; each ratio comes from pairs run one after the other (ours, then
the reference, repeated), so a slow moment of the machine hits both sides. Peak memory is measured in a fresh
process per case (its peak resident set size), so one case cannot inherit another's peak.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: the domains and `common`

import argparse
import copy
import multiprocessing
import os
import platform
import resource
import statistics
import time
from datetime import datetime
from functools import partial

import numpy as np
import torch
from scipy import ndimage

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------


def median_time(fn, repeats: int) -> float:
    """Median wall time of fn() over repeats (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def paired_times(ours, reference, repeats: int) -> tuple[float, float, float]:
    """(median time of ours, median time of the reference, median of the per-pair ratios ours / reference), the
    two run one after the other in each repeat."""
    ours(), reference()
    a, b = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        ours()
        a.append(time.perf_counter() - started)
        started = time.perf_counter()
        reference()
        b.append(time.perf_counter() - started)
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b, strict=True))


def _child(queue, fn, args):
    started = time.perf_counter()
    value = fn(*args)
    seconds = time.perf_counter() - started
    queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, value))  # Linux: KiB -> MiB


def in_fresh_process(fn, *args):
    """(seconds, peak RSS in MiB, return value) of fn(*args) run in a new process (spawned: nothing inherited)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, fn, args))
    process.start()
    result = queue.get()
    process.join()
    return result


def fit_exponent(sizes, seconds) -> float:
    """b of seconds ~ a * size^b: the slope of a least-squares line through (log size, log seconds)."""
    return float(np.polyfit(np.log(np.asarray(sizes, float)), np.log(np.asarray(seconds, float)), 1)[0])


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic label images and volumes
# ----------------------------------------------------------------------------------------------------------------


def touching_blobs(shape, n: int, radius: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(labels int32 of `shape`, centres (n, ndim)): n blobs of about `radius`, each pixel given to its nearest
    centre (so neighbours touch) where it lies within that centre's radius. One distance transform: linear in
    the pixel count, fast for 2048 x 2048 with 5,000 instances."""
    centres = (rng.uniform(0, 1, (n, len(shape))) * np.asarray(shape)).astype(int)
    seeds = np.zeros(shape, bool)
    seeds[tuple(centres.T)] = True
    distance, nearest = ndimage.distance_transform_edt(~seeds, return_indices=True)
    ids = np.zeros(shape, np.int32)
    ids[tuple(centres.T)] = np.arange(1, n + 1)
    labels = ids[tuple(nearest)]
    radii = rng.uniform(0.6, 1.4, n + 1) * radius
    labels[distance > radii[labels]] = 0
    return labels, centres


def imperfect_prediction(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A prediction with the usual faults: every instance shifted by a pixel, 5 % missed, 5 % merged with a
    neighbour, and some false positives."""
    pred = np.roll(labels, (1, -1), axis=(0, 1)).copy()
    n = int(labels.max())
    mapping = np.arange(n + 1)
    missed = rng.choice(np.arange(1, n + 1), max(1, n // 20), replace=False)
    mapping[missed] = 0
    merged = rng.choice(np.arange(2, n + 1), max(1, n // 20), replace=False)
    mapping[merged] = merged - 1
    pred = mapping[pred]
    extra, _ = touching_blobs(labels.shape, max(1, n // 20), 4, rng)
    pred[(extra > 0) & (pred == 0)] = extra[(extra > 0) & (pred == 0)] + n
    return pred


# ----------------------------------------------------------------------------------------------------------------
# Item: instance metrics
# ----------------------------------------------------------------------------------------------------------------


def reference_metrics(true: np.ndarray, pred: np.ndarray, crop: bool = False) -> dict:
    """A straightforward per-instance-pair implementation, as HoVer-Net's `get_fast_pq` / `get_fast_aji` are
    written: for each true instance its mask over the whole image, the predicted ids under it, and one
    intersection and union per (true, pred) pair from whole-image masks. crop=True does the same inside each true
    instance's bounding box (a stronger reference: no whole-image mask per instance). Returns tp, fp, fn, PQ and
    AJI."""
    pred_areas = np.bincount(pred.ravel())
    boxes = ndimage.find_objects(true)
    pairs = []  # (true id, pred id, intersection, union)
    true_areas = {}
    for t, box in enumerate(boxes, start=1):
        if box is None:
            continue
        region = box if crop else (slice(None),) * true.ndim
        t_mask = true[region] == t
        true_areas[t] = int(t_mask.sum())
        for p in np.unique(pred[region][t_mask]):
            if p == 0:
                continue
            p_mask = pred[region] == p
            inter = int(np.logical_and(t_mask, p_mask).sum())
            union = true_areas[t] + int(pred_areas[p]) - inter if crop else int(np.logical_or(t_mask, p_mask).sum())
            pairs.append((t, int(p), inter, union))
    pred_ids = [p for p in range(1, len(pred_areas)) if pred_areas[p]]
    matched = [(t, p, i / u) for t, p, i, u in pairs if i / u > 0.5]
    tp = len(matched)
    fp, fn = len(pred_ids) - tp, len(true_areas) - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn) if tp + fp + fn else float("nan")
    sq = sum(iou for _, _, iou in matched) / (tp + 1.0e-6)
    # AJI: each true instance with its prediction of highest IoU (lowest pred id on ties)
    best = {}
    for t, p, i, u in pairs:
        score = i / (u + 1.0e-6)
        if t not in best or score > best[t][0]:
            best[t] = (score, p, i, u)
    inter = sum(v[2] for v in best.values())
    union = sum(v[3] for v in best.values())
    used = {v[1] for v in best.values()}
    union += sum(a for t, a in true_areas.items() if t not in best)
    union += sum(int(pred_areas[p]) for p in pred_ids if p not in used)
    return {"tp": tp, "fp": fp, "fn": fn, "pq": dq * sq, "aji": inter / union}


def our_metrics(true: np.ndarray, pred: np.ndarray) -> dict:
    from common.metrics import aggregated_jaccard_index, instance_overlaps, panoptic_quality

    overlaps = instance_overlaps(true, pred)  # one pass over the pixels for both scores
    pq = panoptic_quality(true, pred, overlaps=overlaps)
    aji = aggregated_jaccard_index(true, pred, overlaps=overlaps)
    return {"tp": pq["tp"], "fp": pq["fp"], "fn": pq["fn"], "pq": pq["pq"], "aji": aji}


METRICS_HEADER = ["case", "instances", "PQ / AJI", "identical", "ours, ms", "HoVer-Net loop, ms", "ratio",
                  "cropped loop, ms", "ratio"]  # fmt: skip


def bench_metrics(quick: bool) -> str:
    rng = np.random.default_rng(0)
    cases = [("256 x 256, ~50 nuclei", 256, 50, 8.0), ("2048 x 2048, ~5,000 instances", 2048, 5000, 7.0)]
    if quick:
        cases[1] = ("1024 x 1024, ~1,250 instances", 1024, 1250, 7.0)
    rows = []
    for name, side, n, radius in cases:
        true, _ = touching_blobs((side, side), n, radius, rng)
        pred = imperfect_prediction(true, rng)
        ours = our_metrics(true, pred)
        same = all(
            all(ours[k] == r[k] if k in ("tp", "fp", "fn") else abs(ours[k] - r[k]) < 1e-9 for k in ours)
            for r in (reference_metrics(true, pred), reference_metrics(true, pred, crop=True))
        )
        repeats = 1 if side > 1024 else 3 if side > 256 else 7
        t_ours, t_full, full_ratio = paired_times(
            partial(our_metrics, true, pred), partial(reference_metrics, true, pred), repeats
        )
        _, t_crop, crop_ratio = paired_times(
            partial(our_metrics, true, pred), partial(reference_metrics, true, pred, crop=True), max(repeats, 3)
        )
        rows.append([name, int(true.max()), f"{ours['pq']:.4f} / {ours['aji']:.4f}", "yes" if same else "**NO**",
                     t_ours * 1e3, t_full * 1e3, full_ratio, t_crop * 1e3, crop_ratio])  # fmt: skip
    # growth with the instance count at a fixed density (~1 instance per 840 px, as in the 2048 px case)
    counts = [250, 500, 1000, 2000] if quick else [500, 1000, 2000, 4000, 8000]
    seconds = []
    for n in counts:
        side = int(np.sqrt(n * 840))
        true, _ = touching_blobs((side, side), n, 7.0, rng)
        pred = imperfect_prediction(true, rng)
        seconds.append(median_time(partial(our_metrics, true, pred), 3))
    growth = table(["instances", *map(str, counts)], [["ours, ms", *[s * 1e3 for s in seconds]]])
    return (
        "PQ (with its tp/fp/fn) and AJI of an imperfect prediction (1 px shift, 5 % missed, 5 % merged, false "
        "positives). References: the per-instance-pair loop of HoVer-Net's `get_fast_pq`/`get_fast_aji` (a "
        "whole-image mask per instance), and the same loop cropped to each instance's bounding box. Ratios are "
        "ours / reference (below 1: ours is faster).\n\n"
        + table(METRICS_HEADER, rows)
        + f"\n\nTime against the instance count (fixed density): exponent **{fit_exponent(counts, seconds):.2f}**\n\n"
        + growth
    )


# ----------------------------------------------------------------------------------------------------------------
# Item: watershed decoding (hydra_lv)
# ----------------------------------------------------------------------------------------------------------------


def probability_maps(shape, folder: Path) -> int:
    """binary, boundary and distance maps (float32 .npy in folder) of touching vesicles filling `shape`, as a
    trained network would give them; returns the vesicle count."""
    rng = np.random.default_rng(0)
    n = max(4, int(np.prod(shape) / 40_000))
    labels, _ = touching_blobs(shape, n, 9.0, rng)
    np.save(folder / "binary.npy", (labels > 0).astype(np.float32))
    boundary = np.zeros(shape, np.float32)
    for z in range(shape[0]):  # a 1-voxel in-plane boundary per section
        section = labels[z]
        boundary[z] = (ndimage.grey_dilation(section, size=3) != ndimage.grey_erosion(section, size=3)) & (section > 0)
    np.save(folder / "boundary.npy", boundary)
    del boundary
    distance = ndimage.distance_transform_edt(labels > 0, sampling=(30 / 8, 1, 1)).astype(np.float32)
    np.save(folder / "distance.npy", np.where(labels > 0, np.tanh(distance / 6), -1).astype(np.float32))
    return n


def decode_case(folder: Path) -> tuple[float, int, float]:
    """(seconds, instances found, peak MiB that NumPy and Python allocated while decoding) of hydra_lv's
    decode_instances on the maps in folder."""
    import tracemalloc

    from hydra_lv.model import decode_instances

    maps = [np.load(folder / f"{name}.npy") for name in ("binary", "boundary", "distance")]
    tracemalloc.start()
    started = time.perf_counter()
    decoded = decode_instances(*maps)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, int(decoded.max()), peak


WATERSHED_HEADER = ["volume (z x y x x)", "voxels", "vesicles found", "decode, s", "decoding peak, MiB",
                    "decoding, bytes / voxel", "process peak RSS, MiB"]  # fmt: skip


def bench_watershed(quick: bool, workdir: Path) -> str:
    shapes = [(32, 256, 256), (32, 512, 512), (64, 512, 512)]
    if not quick:
        shapes += [(64, 1024, 1024), (128, 1024, 1024)]
    rows, sizes, seconds = [], [], []
    for shape in shapes:
        folder = workdir / "watershed"
        folder.mkdir(parents=True, exist_ok=True)
        n = probability_maps(shape, folder)
        _, peak, (decode_seconds, found, allocated) = in_fresh_process(decode_case, folder)
        voxels = int(np.prod(shape))
        sizes.append(voxels)
        seconds.append(decode_seconds)
        rows.append(["x".join(map(str, shape)), f"{voxels / 1e6:.0f} M", f"{found} of {n}", decode_seconds,
                     allocated, allocated * 2**20 / voxels, peak])  # fmt: skip
    return (
        "`hydra_lv.model.decode_instances` (seeds, foreground, watershed of the distance, small-object removal) on "
        "touching vesicles, in a fresh process that first loads the three float32 maps (12 bytes / voxel). "
        "Decoding memory: the peak of what NumPy and Python allocate while decoding (tracemalloc), beyond the "
        "maps; process peak RSS: everything (Python, torch, the maps and decoding).\n\n"
        + table(WATERSHED_HEADER, rows)
        + f"\n\nTime against voxels: exponent **{fit_exponent(sizes, seconds):.2f}** (target <= 1.1)"
    )


# ----------------------------------------------------------------------------------------------------------------
# Item: sliding-window inference against MONAI
# ----------------------------------------------------------------------------------------------------------------


def window_case(implementation: str, shape, window, filters, device: str):
    """(seconds, output) of one sliding-window pass of a hydra_lv model of the default architecture, ours or
    MONAI's."""
    from hydra_lv.data import load_config
    from hydra_lv.model import build_model, predict_windows, sliding_window_inference

    torch.manual_seed(0)
    model = build_model(load_config()["model"]["architecture"], filters=filters).to(device).eval()
    volume = (np.random.default_rng(0).uniform(0, 1, shape) * 255).astype(np.uint8)
    started = time.perf_counter()
    if implementation == "ours":
        out = sliding_window_inference(model, volume, window, overlap=0.25, batch_size=1, device=device)
    else:
        from monai.inferers import sliding_window_inference as monai_sliding_window

        def predictor(x):  # the same activations as ours (sigmoid, sigmoid, tanh), no flips
            return predict_windows(model, x, tta=False)

        with torch.no_grad():
            x = torch.from_numpy(volume.astype(np.float32) / 255)[None, None].to(device)
            out = monai_sliding_window(x, window, 1, predictor, overlap=0.25, mode="gaussian", sigma_scale=0.125,
                                       sw_device=device, device="cpu")[0].numpy()  # fmt: skip
    return time.perf_counter() - started, out


WINDOW_HEADER = ["volume", "window", "ours, s", "MONAI, s", "ratio ours/MONAI", "ours peak RSS, MiB",
                 "MONAI peak RSS, MiB", "max |difference|"]  # fmt: skip


def bench_window(quick: bool, device: str) -> str:
    from hydra_lv.data import load_config
    from hydra_lv.train import DEMO as HYDRA_DEMO

    model = load_config()["model"]
    if quick:  # the demo's network and window
        filters, window, shape = HYDRA_DEMO["model.filters"], tuple(HYDRA_DEMO["model.input_size"]), (48, 192, 192)
    else:
        filters, window, shape = model["filters"], tuple(model["input_size"]), (64, 256, 256)
    rows = []
    runs = {"ours": [], "monai": []}
    for _ in range(3):  # medians of pairs run one after the other
        for implementation in ("ours", "monai"):
            _, peak, (seconds, out) = in_fresh_process(window_case, implementation, shape, window, filters, device)
            runs[implementation].append((seconds, peak, out))
    ours, monai = runs["ours"], runs["monai"]
    difference = float(np.abs(ours[0][2] - monai[0][2]).max())
    ratio = statistics.median(a[0] / b[0] for a, b in zip(ours, monai, strict=True))
    rows.append(["x".join(map(str, shape)), "x".join(map(str, window)), statistics.median(r[0] for r in ours),
                 statistics.median(r[0] for r in monai), ratio, statistics.median(r[1] for r in ours),
                 statistics.median(r[1] for r in monai), difference])  # fmt: skip
    return (
        f"hydra_lv's {model['architecture']} with filters {filters} ({'the demo' if quick else 'the default'}; "
        f"random weights), overlap 0.25, Gaussian blending (sigma = window / 8), batch 1, on {device}; each side in "
        "a fresh process; peak RSS includes the input volume and the output.\n\n" + table(WINDOW_HEADER, rows)
    )


# ----------------------------------------------------------------------------------------------------------------
# Items: data pipeline vs model, training step variants (per domain, from benchmarks/domains.py)
# ----------------------------------------------------------------------------------------------------------------


def loader_rate(bench, workers: int, batches: int) -> float:
    """Samples per second of the domain's DataLoader (dataset + augmentation + collation), after the first batch
    (worker start-up excluded)."""
    loader = torch.utils.data.DataLoader(bench.dataset, batch_size=bench.batch_size, shuffle=True,
                                         num_workers=workers, collate_fn=bench.collate_fn,
                                         drop_last=True)  # fmt: skip
    iterator = iter(loader)
    next(iterator)
    started, samples = time.perf_counter(), 0
    for _ in range(batches):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        samples += bench.batch_size
    del batch
    return samples / (time.perf_counter() - started)


def step_rate(bench, batch, device: str, variant: str = "fp32", steps: int = 3) -> float:
    """Training steps per second (forward, loss, backward, AdamW step) of the default model on one batch."""
    model = copy.deepcopy(bench.model).to(device)  # every variant starts from the same weights
    if variant == "channels_last":  # channels_last_3d for the 3D networks
        volumetric = any(isinstance(m, torch.nn.Conv3d) for m in model.modules())
        model = model.to(memory_format=torch.channels_last_3d if volumetric else torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = variant == "bf16"
    run = torch.compile(model) if variant == "compile" else model

    def one_step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            loss = bench.step_loss(run, batch, device)
        loss.float().backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return 1.0 / median_time(one_step, steps)


def bench_pipeline(quick: bool, device: str, workdir: Path) -> tuple[str, str]:
    from benchmarks.domains import DOMAINS, build

    workers = os.cpu_count() or 1
    pipeline_rows, step_rows = [], []
    for name in DOMAINS:
        bench = build(name, workdir, quick)
        batch = next(iter(torch.utils.data.DataLoader(bench.dataset, batch_size=bench.batch_size,
                                                      collate_fn=bench.collate_fn)))  # fmt: skip
        one = loader_rate(bench, 1, 3 if quick else 10)
        every = loader_rate(bench, workers, 3 if quick else 10)
        steps = step_rate(bench, batch, device)
        needed = steps * bench.batch_size
        cold, warm = bench.cache_epochs() if bench.cache_epochs else (float("nan"), float("nan"))
        pipeline_rows.append([name, bench.batch_size, one, every, steps, needed, every / needed,
                              "loader" if every < needed else "model", cold, warm])  # fmt: skip
        variants = []
        for variant in ("fp32", "channels_last", "bf16", "compile"):
            try:
                variants.append(step_rate(bench, batch, device, variant))
            except Exception as error:  # torch.compile without a compiler, bf16 kernels missing on a CPU, ...
                variants.append(f"fails ({type(error).__name__})")
        step_rows.append([name, bench.notes, *variants])
    header = ["domain", "batch", "loader 1 worker, samples/s", f"loader {workers} workers, samples/s",
              "model steps/s", "model samples/s", "loader/model", "limits", "epoch 1 (cold), s",
              "epoch 2 (warm), s"]  # fmt: skip
    pipeline = (
        f"Loader: samples/s of the training dataset with its augmentation, 1 worker and all {workers}. Model: "
        f"training steps/s of the default model on {device}, and the samples/s it consumes. Loader/model above 1: "
        "the loader keeps up. Epochs: one pass with the preprocessing cache built from scratch, then one with it "
        "warm.\n\n" + table(header, pipeline_rows)
    )
    steps = f"Training steps/s of each default model on {device}, one batch.\n\n" + table(
        ["domain", "model", "fp32", "channels_last", "bf16 autocast", "torch.compile"], step_rows
    )
    return pipeline, steps


# ----------------------------------------------------------------------------------------------------------------
# Item: memory at scale
# ----------------------------------------------------------------------------------------------------------------


def resident_mib() -> dict:
    """This process's resident memory in MiB: anonymous (its own heap: what must stay flat), file-backed (pages of
    memory-mapped files, which the kernel can drop) and the peak of both together (VmHWM)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def write_large_fold(root: Path, tiles: int) -> Path:
    """Fold 1 of `tiles` synthetic PanNuke tiles in the official layout (uint8 images, int32 masks), written
    through memory maps 64 tiles at a time (16 distinct tiles repeated), so writing needs little memory."""
    from common.metrics import PANNUKE_TISSUES
    from pannuke.data import synthetic_tile

    images_dir, masks_dir = root / "Fold 1" / "images" / "fold1", root / "Fold 1" / "masks" / "fold1"
    if (images_dir / "types.npy").is_file() and len(np.load(images_dir / "types.npy")) == tiles:
        return root
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    distinct = [synthetic_tile(rng, 256) for _ in range(16)]
    images = np.lib.format.open_memmap(images_dir / "images.npy", "w+", np.uint8, (tiles, 256, 256, 3))
    masks = np.lib.format.open_memmap(masks_dir / "masks.npy", "w+", np.int32, (tiles, 256, 256, 6))
    for start in range(0, tiles, 64):
        for i in range(start, min(start + 64, tiles)):
            images[i], masks[i] = distinct[i % 16][0], distinct[i % 16][1].astype(np.int32)
        images.flush()
        masks.flush()
    del images, masks
    np.save(images_dir / "types.npy", rng.choice(np.array(PANNUKE_TISSUES), tiles))
    return root


def pannuke_memory_case(root: Path, cache: Path) -> dict:
    """Caches fold 1 (as train.py does on first use), then reads every tile through PanNukeDataset with training
    augmentation; resident memory after caching and the highest seen while iterating."""
    from pannuke.data import PanNukeDataset, load_fold

    started = time.perf_counter()
    fold = load_fold(root, 1, cache, log=lambda *a: None)
    cached, cache_seconds = resident_mib(), time.perf_counter() - started
    dataset = PanNukeDataset(fold, train=True)
    peak = dict(cached)
    for i in range(len(dataset)):
        dataset[i]
        if i % 50 == 0:
            now = resident_mib()
            peak = {k: max(peak[k], now[k]) for k in now}
    return {"cache_seconds": cache_seconds, "after_cache": cached, "iterating": peak}


def hydra_memory_case(workdir: Path, shape, patches: int) -> dict:
    """hydra_lv's training PatchDataset (the demo's patch size) over two volumes of `shape`; resident memory
    while drawing `patches` patches."""
    from benchmarks.domains import build_hydra_lv

    dataset = build_hydra_lv(workdir, True, shape).dataset
    start = resident_mib()
    peak = dict(start)
    for i in range(patches):
        dataset[i]
        if i % 8 == 0:
            now = resident_mib()
            peak = {k: max(peak[k], now[k]) for k in now}
    return {"start": start, "iterating": peak}


def bench_memory(quick: bool, workdir: Path) -> str:
    tiles = [250, 500, 1000] if quick else [2000, 4000, 8000]
    rows = []
    for n in tiles:
        root = write_large_fold(workdir / f"pannuke_{n}", n)
        cache = workdir / f"pannuke_{n}" / "cache"
        if cache.exists():  # measure the caching too
            import shutil

            shutil.rmtree(cache)
        _, _, out = in_fresh_process(pannuke_memory_case, root, cache)
        rows.append([f"PanNuke fold, {n} tiles", out["cache_seconds"], out["after_cache"]["RssAnon"],
                     out["iterating"]["RssAnon"], out["iterating"]["RssFile"], out["iterating"]["VmHWM"]])  # fmt: skip
    shapes = [(24, 160, 160), (24, 320, 320)] + ([] if quick else [(48, 640, 640)])
    for shape in shapes:
        folder = workdir / ("hydra_" + "x".join(map(str, shape)))
        in_fresh_process(hydra_memory_case, folder, shape, 0)  # writes the volumes: their peak is not reading's
        _, _, out = in_fresh_process(hydra_memory_case, folder, shape, 64)
        rows.append([f"hydra_lv, 2 volumes of {'x'.join(map(str, shape))}, 64 patches", "", out["start"]["RssAnon"],
                     out["iterating"]["RssAnon"], out["iterating"]["RssFile"], out["iterating"]["VmHWM"]])  # fmt: skip
    return (
        "Resident memory of a fresh process (MiB) that reads a whole dataset as training does. Anonymous memory is "
        "the process's own (it must not grow with the dataset); file-backed pages are memory-mapped files, counted "
        "while touched (PanNuke reads its cache with file reads, so they stay at the libraries' own). The PanNuke "
        "peak includes caching the fold; the hydra_lv volumes are written by an earlier process.\n\n"
        + table(
            [
                "dataset",
                "caching, s",
                "anonymous after caching / start",
                "anonymous peak while reading",
                "file-backed peak",
                "peak RSS (VmHWM)",
            ],
            rows,
        )  # fmt: skip
    )


# ----------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------


def machine(device: str) -> str:
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else "none used"
    import monai
    import scipy
    import skimage

    return (
        f"- date: {datetime.now():%Y-%m-%d %H:%M}\n- machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{platform.system()} {platform.release()}; GPU: {gpu}\n- Python {platform.python_version()}, torch "
        f"{torch.__version__}, NumPy {np.__version__}, SciPy {scipy.__version__}, scikit-image "
        f"{skimage.__version__}, MONAI {monai.__version__}; torch threads {torch.get_num_threads()}"
    )


CHANGES_TITLE = "## What the figures changed"
ITEMS = ("pipeline", "steps", "window", "metrics", "watershed", "memory")


def main(args) -> Path:
    items = ITEMS if args.items == "all" else tuple(args.items.split(","))
    unknown = set(items) - set(ITEMS)
    if unknown:
        raise SystemExit(f"--items {args.items}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ITEMS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA GPU here (torch {torch.__version__}); use --device cpu")
    sections = []
    workdir = Path(args.workdir)
    for item in items:
        started = time.perf_counter()
        print(f"benchmark: {item} ...", flush=True)
        if item == "metrics":
            sections.append(("Instance metrics", bench_metrics(args.quick)))
        elif item == "watershed":
            sections.append(("Watershed decoding (hydra_lv)", bench_watershed(args.quick, workdir)))
        elif item == "window":
            title = "Sliding-window inference (hydra_lv) against MONAI"
            sections.append((title, bench_window(args.quick, args.device)))
        elif item == "memory":
            sections.append(("Memory at scale", bench_memory(args.quick, workdir)))
        elif item == "steps" and "pipeline" in items:
            continue  # measured with the pipeline item
        elif item == "pipeline" or item == "steps":
            pipeline, steps = bench_pipeline(args.quick, args.device, workdir)
            if "pipeline" in items:
                sections.append(("Data pipeline against model", pipeline))
            if "steps" in items:
                sections.append(("Training step variants", steps))
        print(f"benchmark: {item} done in {time.perf_counter() - started:.0f} s", flush=True)
    text = (
        f"# Benchmarks{' (--quick)' if args.quick else ''}\n\nWritten by `python benchmarks/run.py"
        f"{' --quick' if args.quick else ''}{f' --device {args.device}' if args.device != 'cpu' else ''}`.\n\n"
        + machine(args.device)
        + "".join(f"\n\n## {title}\n\n{body}" for title, body in sections)
        + "\n"
    )
    output = Path(args.output)
    kept = CHANGES_TITLE in output.read_text() if output.is_file() else False
    if kept:  # the hand-written account of what the figures led to stays with every new run
        text += "\n" + CHANGES_TITLE + output.read_text().split(CHANGES_TITLE, 1)[1].rstrip() + "\n"
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, output)
    print(f"wrote {output}")
    return output


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: every item in a few minutes on 2 CPU cores")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the models run [cpu]")
    p.add_argument("--items", default="all", help=f"comma-separated, from {', '.join(ITEMS)} [all]")
    p.add_argument("--output", default=str(RESULTS), help=f"the report [{RESULTS}]")
    p.add_argument("--workdir", default="benchmarks/_work", help="synthetic data for the pipeline items")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
