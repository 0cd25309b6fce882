"""Peak memory and time of inference against input size (issue 23): whole slides, plate images and EM volumes.

    python benchmarks/large_inputs.py              # the full sizes (about 30 min on 2 CPU cores)
    python benchmarks/large_inputs.py --quick      # small sizes, a few minutes
    python benchmarks/large_inputs.py --domains pannuke,hydra_lv --output /tmp/RESULTS.md

Each domain's evaluate.py runs, as a user runs it, on synthetic inputs written here in the domain's real format
(not timed): a pyramidal whole-slide TIFF for pannuke (0.25 um/px, 3 to 4 levels, tissue on a tenth of the
slide, glass elsewhere), large tiled TIFFs for stress_granules (16-bit, granules) and cellsam (cells), HDF5
volumes of 1 to 64 times the demo's for hydra_lv. The networks are the test suite's tiny ones, trained here for
a few seconds (the published CellSAM: vit_tiny with random weights, whose CellFinder keeps no box, so SAM's mask
decoder does not run: its figures are reading, normalisation, both encoders and CellFinder): the figures are of
the pipeline (reading, network, decoding, stitching, writing), not of a model's quality. Every case runs in a
fresh process; its peak resident set size is the memory figure. The table goes into benchmarks/RESULTS.md under
its own heading (the other sections are kept).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: the domains and `common`

import argparse
import os
import shutil
import tempfile

import numpy as np

from benchmarks.run import RESULTS, fit_exponent, in_fresh_process, machine, table

TITLE = "## Large inputs at flat memory (issue 23)"
SIZES = {  # full, quick: slide / image side in px; volume in multiples of the demo's (24, 160, 160)
    "pannuke": ([4000, 8000, 16000, 40000], [2000, 4000, 8000]),
    "stress_granules": ([4096, 8192, 16384], [2048, 4096]),
    "cellsam": ([2048, 4096, 8192], [1024, 2048]),
    "hydra_lv": ([1, 2, 4, 8, 16, 64], [1, 2, 4]),
}
# a network trained for seconds is unsure: decoding thresholds that let it find vesicles, so decoding is timed too
DECODING = ["decoding.foreground=0.25", "decoding.seed_binary=0.3", "decoding.seed_contour=0.95",
            "decoding.seed_distance=0.0", "decoding.min_seed_size=4", "decoding.min_object_size=16"]  # fmt: skip
# issue 23 asks for flat memory from 1x to 16x the demo volume (voxels here); the 64x case shows what lies beyond
ISSUE_RANGE = {"hydra_lv": 16 * 24 * 160 * 160}
VOLUME_FACTORS = {1: (1, 1, 1), 2: (2, 1, 1), 4: (2, 2, 1), 8: (2, 2, 2), 16: (4, 2, 2), 64: (4, 4, 4)}


# ----------------------------------------------------------------------------------------------------------------
# Inputs, written tile by tile (a 40,000 px slide is never in memory here either)
# ----------------------------------------------------------------------------------------------------------------


def write_slide(path: Path, side: int, seed: int = 0) -> None:
    """A pyramidal tiled TIFF of side x side px at 0.25 um/px: synthetic H&E tiles (pannuke's demo) inside an
    ellipse covering a tenth of the slide, glass elsewhere; JPEG tiles, levels halving down to under
    4,096 px (two at least)."""
    import tifffile

    from pannuke.data import synthetic_tile

    rng = np.random.default_rng(seed)
    tissue_tiles = [synthetic_tile(rng, 256)[0] for _ in range(8)]
    glass = np.full((256, 256, 3), 238, np.uint8)
    levels = [side]
    while levels[-1] >= 4096 or len(levels) < 2:  # a pyramid at every size: read as a slide
        levels.append((levels[-1] + 1) // 2)

    def tiles(size: int):
        n = -(-size // 256)
        for ty in range(n):
            for tx in range(n):
                y, x = (ty + 0.5) / n - 0.5, (tx + 0.5) / n - 0.5  # the tile's centre, -0.5..0.5
                inside = (y / 0.3) ** 2 + (x / 0.106) ** 2 <= 1  # an ellipse of pi * 0.3 * 0.106 = 0.1 of the slide
                yield tissue_tiles[(ty * 7 + tx) % len(tissue_tiles)] if inside else glass

    options = dict(tile=(256, 256), compression="jpeg", photometric="rgb", resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level, size in enumerate(levels):
            per_cm = 1e4 / (0.25 * 2**level)
            extra = {"subifds": len(levels) - 1} if level == 0 else {"subfiletype": 1}
            tif.write(tiles(size), shape=(size, size, 3), dtype=np.uint8, resolution=(per_cm, per_cm), **options,
                      **extra)  # fmt: skip


def write_plate(path: Path, side: int, kind: str, seed: int = 0) -> None:
    """A large 16-bit grey tiled TIFF (zlib): bright granules (stress_granules) or cells (cellsam) on a grid of
    jittered spots over a noisy background, 0.1 um/px."""
    import tifffile

    rng = np.random.default_rng(seed)
    radius, spacing, level = (3, 24, 2500) if kind == "granules" else (10, 40, 3000)
    yy, xx = np.mgrid[:256, :256]
    patterns = []
    for _ in range(6):
        tile = rng.normal(400, 15, (256, 256))
        for cy in range(spacing // 2, 256, spacing):
            for cx in range(spacing // 2, 256, spacing):
                y, x = cy + rng.uniform(-4, 4), cx + rng.uniform(-4, 4)
                tile[(yy - y) ** 2 + (xx - x) ** 2 <= rng.uniform(0.6, 1.0) * radius**2] = level
        patterns.append(tile.clip(0, 65535).astype(np.uint16))
    n = -(-side // 256)
    tiles = (patterns[(ty * 5 + tx) % 6] for ty in range(n) for tx in range(n))
    tifffile.imwrite(path, tiles, shape=(side, side), dtype=np.uint16, tile=(256, 256), compression="zlib",
                     resolution=(1e4 / 0.1, 1e4 / 0.1), resolutionunit="CENTIMETER")  # fmt: skip


def write_em_volume(path: Path, factor: int) -> None:
    """The demo's synthetic EM volume (24, 160, 160) tiled 1 to 64 times (z, then y, then x doubled)."""
    from hydra_lv.data import synthetic_em_volume, write_volume

    image = synthetic_em_volume((24, 160, 160), rng=np.random.default_rng(0))[0]
    write_volume(path, np.tile(image, VOLUME_FACTORS[factor]))


# ----------------------------------------------------------------------------------------------------------------
# Models: the test suite's tiny ones, trained for seconds
# ----------------------------------------------------------------------------------------------------------------


def pannuke_model(work: Path) -> Path:
    from pannuke import train
    from pannuke.data import write_demo_dataset

    data = work / "pannuke_data"
    write_demo_dataset(data, (16, 8, 8), 64)
    argv = ["--data_dir", str(data), "--output_dir", str(work / "pannuke_runs"), "--encoder", "resnet18",
            "--encoder_weights", "none", "--image_size", "64", "--batch_size", "4", "--num_workers", "0", "--epochs",
            "1", "--no-tta"]  # fmt: skip
    return train.main(train.parse_args(argv))


def stress_granules_model(work: Path) -> Path:
    from stress_granules import train
    from stress_granules.data import write_demo_dataset

    data = write_demo_dataset(work / "granule_data", n_images=6, size=(96, 112), controls=1)
    argv = ["--images", str(data / "images"), "--masks", str(data / "masks"), "--output_dir", str(work / "metrics"),
            "--image_size", "64", "--base_channels", "8", "--batch_size", "4", "--epochs", "1", "--num_workers", "0",
            "--crops_per_image", "2"]  # fmt: skip
    cwd = os.getcwd()
    os.chdir(work)  # training copies its best model into the working directory
    try:
        return train.main(train.parse_args(argv))
    finally:
        os.chdir(cwd)


def cellsam_model(work: Path) -> Path:
    import torch

    from cellsam.published import CellSAM

    torch.manual_seed(0)
    path = work / "tiny_cellsam.pt"
    torch.save(CellSAM("vit_tiny").state_dict(), path)
    return path


def hydra_model(work: Path) -> Path:
    from hydra_lv import train
    from hydra_lv.data import write_demo_volumes

    root = write_demo_volumes(work / "em", n_volumes=3, shape=(12, 96, 96))
    items = {"data.train_image": f"{root}/vol[12]_im.h5", "data.train_label": f"{root}/vol[12]_vesicle_ins.h5",
             "data.train_mask": f"{root}/vol[12]_mask.h5", "data.val_image": f"{root}/vol3_im.h5",
             "data.val_label": f"{root}/vol3_vesicle_ins.h5", "data.val_mask": f"{root}/vol3_mask.h5",
             "model.filters": "[4,8]", "data.patch_size": "[8,32,32]", "model.input_size": "[8,32,32]",
             "model.output_size": "[8,32,32]", "data.pad_size": "[1,4,4]", "data.iterations_per_epoch": "16",
             "data.val_patches": "4", "system.training.batch_size": "2", "system.training.num_workers": "0",
             "optimization.max_epochs": "40"}  # fmt: skip
    argv = ["--output-root", str(work / "outputs"), "--no-test-after", *[f"{k}={v}" for k, v in items.items()]]
    return train.main(train.parse_args(argv)) / "checkpoints" / "best.ckpt"


# ----------------------------------------------------------------------------------------------------------------
# Cases: each domain's evaluate.py, in a fresh process
# ----------------------------------------------------------------------------------------------------------------


def pannuke_case(run: str, slide: str, out: str) -> int:
    from pannuke import evaluate

    evaluate.main(evaluate.parse_args([run, "--images", slide, "--output_dir", out]))
    return 0


def stress_granules_case(run: str, folder: str, out: str) -> int:
    import stress_granules.data
    from stress_granules import evaluate

    stress_granules.data.IN_MEMORY_PX = 0  # every size block by block, as a plate image past 8,192 px is
    evaluate.main(evaluate.parse_args([run, "--images", folder, "--output_dir", out, "--pixel_size", "0.1"]))
    return 0


def cellsam_case(checkpoint: str, folder: str, out: str) -> int:
    import warnings

    import cellsam.data
    from cellsam import evaluate

    warnings.filterwarnings("ignore", "No cells detected")  # random weights: see the docstring
    cellsam.data.IN_MEMORY_PX = 0
    argv = ["--cellsam_checkpoint", checkpoint, "--sam_size", "vit_tiny", "--images", folder, "--window", "512",
            "--output_dir", out]  # fmt: skip
    evaluate.main(evaluate.get_args_parser().parse_args(argv))
    return 0


def hydra_case(checkpoint: str, volume: str, out: str) -> int:
    from hydra_lv import evaluate

    argv = ["--checkpoint", checkpoint, "--output-dir", out, f"data.test_image={volume}", "data.test_label=null",
            "data.test_mask=null", "inference.block_size=[24,160,160]", "inference.block_overlap=[6,48,48]",
            *DECODING]  # fmt: skip
    evaluate.main(evaluate.parse_args(argv))
    return 0


def measure(domain: str, sizes, work: Path) -> list[list]:
    model = {"pannuke": pannuke_model, "stress_granules": stress_granules_model, "cellsam": cellsam_model,
             "hydra_lv": hydra_model}[domain](work)  # fmt: skip
    rows = []
    for size in sizes:
        case_dir = work / f"{domain}_{size}"
        case_dir.mkdir()
        if domain == "pannuke":
            write_slide(case_dir / "slide.tif", size)
            args, pixels = (str(model), str(case_dir / "slide.tif")), size * size
            label = f"{size:,} x {size:,} px slide"
        elif domain == "hydra_lv":
            write_em_volume(case_dir / "vol_im.h5", size)
            args = (str(model), str(case_dir / "vol_im.h5"))
            pixels = 24 * 160 * 160 * size
            shape = [a * b for a, b in zip((24, 160, 160), VOLUME_FACTORS[size], strict=True)]
            label = f"{size}x the demo volume ({' x '.join(map(str, shape))})"
        else:
            (case_dir / "images").mkdir()
            write_plate(case_dir / "images" / "plate.tif", size, "granules" if domain == "stress_granules" else "cells")
            args, pixels = (str(model), str(case_dir / "images")), size * size
            label = f"{size:,} x {size:,} px image"
        case = {"pannuke": pannuke_case, "stress_granules": stress_granules_case, "cellsam": cellsam_case,
                "hydra_lv": hydra_case}[domain]  # fmt: skip
        seconds, peak, _ = in_fresh_process(case, *args, str(case_dir / "out"))
        print(f"{domain} {label}: {seconds:.1f} s, peak RSS {peak:.0f} MiB", flush=True)
        rows.append([domain, label, pixels, seconds, peak])
        shutil.rmtree(case_dir)  # the next size needs the disk
    return rows


def report(rows: list[list]) -> str:
    body = [table(["domain", "input", "pixels / voxels", "seconds", "peak RSS (MiB)"],
                  [[d, label, f"{n:,}", s, m] for d, label, n, s, m in rows])]  # fmt: skip
    summary = []
    for domain in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == domain]
        ranges = [(mine, "")]
        if domain in ISSUE_RANGE and mine[-1][2] > ISSUE_RANGE[domain]:  # the issue's range, then all the cases
            ranges.insert(0, ([r for r in mine if r[2] <= ISSUE_RANGE[domain]], " (issue 23's range)"))
        for cases, note in ranges:
            peaks = [r[4] for r in cases]
            spread = (max(peaks) - min(peaks)) / min(peaks)
            exponent = fit_exponent([r[2] for r in cases], [r[3] for r in cases]) if len(cases) > 1 else float("nan")
            summary.append([domain, f"{cases[0][2]:,} .. {cases[-1][2]:,}{note}", f"{spread:.1%}", exponent,
                            "yes" if spread <= 0.10 and exponent <= 1.1 else "no"])  # fmt: skip
    body.append(table(["domain", "range", "peak RSS spread (max - min) / min", "time exponent (s ~ n^b)",
                       "flat (<= 10 %) and linear (b <= 1.1)"], summary))  # fmt: skip
    return "\n\n".join(body)


def write_section(output: Path, text: str) -> None:
    """The section under TITLE replaced (or added before the hand-written account at the end); the rest kept."""
    old = output.read_text() if output.is_file() else "# Benchmarks\n"
    if TITLE in old:
        before, after = old.split(TITLE, 1)
        rest = after.split("\n## ", 1)
        new = before + TITLE + "\n\n" + text + "\n" + ("\n## " + rest[1] if len(rest) > 1 else "")
    elif "## What the figures changed" in old:
        before, after = old.split("## What the figures changed", 1)
        new = before + TITLE + "\n\n" + text + "\n\n## What the figures changed" + after
    else:
        new = old.rstrip() + "\n\n" + TITLE + "\n\n" + text + "\n"
    tmp = output.with_suffix(".tmp")
    tmp.write_text(new)
    os.replace(tmp, output)


def main(args) -> Path:
    domains = args.domains.split(",")
    unknown = set(domains) - set(SIZES)
    if unknown:
        raise SystemExit(f"--domains: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SIZES)}")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for domain in domains:
            folder = Path(work) / domain
            folder.mkdir()
            rows += measure(domain, SIZES[domain][1 if args.quick else 0], folder)
    command = "python benchmarks/large_inputs.py" + (" --quick" if args.quick else "")
    text = (f"Written by `{command}`.\n\n{machine('cpu')}\n\nEach domain's evaluate.py on synthetic inputs in its "
            "real format (see the script's docstring: tiny networks, so the figures are the pipeline's); peak RSS "
            "of a fresh process per case, torch and the libraries included.\n\n" + report(rows))  # fmt: skip
    output = Path(args.output)
    write_section(output, text)
    print(f"wrote {output}")
    return output


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes on 2 CPU cores")
    p.add_argument("--domains", default=",".join(SIZES), help=f"comma-separated, from {', '.join(SIZES)} [all]")
    p.add_argument("--output", default=str(RESULTS), help=f"the report [{RESULTS}]")
    p.add_argument("--workdir", default=None, help="where the synthetic inputs go (a temporary folder in it) [/tmp]")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
