"""Figures for hydra_lv volumes: z-slice montages and an orthogonal (xz) view, or a neuroglancer viewer.

    python hydra_lv/visualize.py --results outputs/hydra_lv_rsunet/results       # everything test mode wrote
    python hydra_lv/visualize.py --image predictions.h5 --label segmentation.h5 --slices 8 16
    python hydra_lv/visualize.py --image DATA/vol1_im.h5 --predictions results/predictions.h5 \\
        --label results/segmentation.h5 --ground-truth DATA/vol1_vesicle_ins.h5 --y 300
    python hydra_lv/visualize.py --results outputs/hydra_lv_rsunet/results --neuroglancer   # needs neuroglancer

--image is the EM volume, or a predictions.h5 (3 channels: binary, boundary, distance; then no EM column).
The montage has a row per chosen z-slice (--slices; default five spread over the volume) and a column each for
the image, the three predicted channels, the segmentation in random colours and the ground truth. The xz view
cuts every given volume at one y (--y; default the middle), stretched 30 / 8 in z so vesicles look round.
Figures go to --output-dir (default: a figures/ folder beside the first file), named <kind>_<timestamp>.png.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import json
import time

import matplotlib
import numpy as np

from hydra_lv.data import DataError, HelpFormatter, open_dataset

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CHANNELS = ("binary", "boundary", "distance")


def random_colours(labels: np.ndarray) -> np.ndarray:
    """RGB with a colour per id, scattered by a hash of the id (the same id: the same colour in every slice and
    view, for any id size), black background."""
    ids = labels.astype(np.uint64)
    channels = [((ids * np.uint64(k)) % np.uint64(1009)).astype(np.float32) / 1009 for k in (2654435761, 40503, 97)]
    colours = 0.25 + 0.75 * np.stack(channels, -1)
    colours[labels == 0] = 0
    return colours


def save(fig, folder: Path, name: str) -> Path:
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


def gather(args) -> dict:
    """{"image", "predictions", "label", "ground_truth"}: h5 datasets (opened lazily), those that were given."""
    files = {
        "image": args.image,
        "predictions": args.predictions,
        "label": args.label,
        "ground_truth": args.ground_truth,
    }
    if args.results:  # test mode's test_results.json names every volume's files
        report_file = Path(args.results) / "test_results.json"
        if not report_file.is_file():
            raise DataError(f"--results {args.results}: no test_results.json (a results folder of test mode?)")
        tested = json.loads(report_file.read_text())["volumes"]
        name = args.volume or next(iter(tested))
        if name not in tested:
            raise SystemExit(f"--volume {name}: the results hold {', '.join(tested)}")
        entry = tested[name]
        for key, stored in (("image", "image"), ("predictions", "predictions"), ("label", "segmentation"),
                            ("ground_truth", "label")):  # fmt: skip
            files[key] = files[key] or entry.get(stored)
        region = entry.get("region")  # a held-out region of a training volume: the image and truth cut to it
    else:
        region = None
    volumes = {}
    for key, path in files.items():
        if path is None:
            continue
        path = Path(path)
        if not path.exists():
            raise DataError(f"--{key.replace('_', '-')} {path}: no such file")
        volumes[key] = open_dataset(path)
        if region and key in ("image", "ground_truth") and volumes[key].ndim == 3:
            volumes[key] = np.asarray(volumes[key][tuple(slice(a, b) for a, b in region)])
    if "image" in volumes and volumes["image"].ndim == 4:  # a predictions.h5 given as --image
        volumes.setdefault("predictions", volumes.pop("image"))
    if not volumes:
        raise SystemExit("give --results, or at least one of --image, --predictions, --label, --ground-truth")
    shapes = {k: tuple(v.shape[-3:]) for k, v in volumes.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"the volumes differ in shape: {shapes}")
    return volumes


def panels(volumes: dict, cut) -> list[tuple[str, np.ndarray, dict]]:
    """(title, 2D image, imshow options) for one cut (a z index, or (slice(None), y) for xz)."""
    out = []
    if "image" in volumes:
        out.append(("EM image", np.asarray(volumes["image"][cut]), {"cmap": "gray"}))
    if "predictions" in volumes:
        for c, name in enumerate(CHANNELS):
            out.append(
                (name, np.asarray(volumes["predictions"][(c, *cut)]) / 255, {"cmap": "magma", "vmin": 0, "vmax": 1})
            )
    if "label" in volumes:
        out.append(("segmentation", random_colours(np.asarray(volumes["label"][cut])), {}))
    if "ground_truth" in volumes:
        out.append(("ground truth", random_colours(np.asarray(volumes["ground_truth"][cut])), {}))
    return out


def voxel_size(args) -> list[float]:
    """nm per voxel (z, y, x): --voxel-size, else the run's data.resolution (test_results.json), else 30 x 8 x 8."""
    if args.voxel_size:
        return [float(v) for v in args.voxel_size]
    if args.results:
        stored = json.loads((Path(args.results) / "test_results.json").read_text()).get("voxel_size_nm")
        if stored:
            return [float(v) for v in stored]
    return [30.0, 8.0, 8.0]


def main(args) -> list[Path]:
    volumes = gather(args)
    voxel = voxel_size(args)
    stretch = voxel[0] / voxel[2]
    depth, height, _ = next(iter(volumes.values())).shape[-3:]
    slices = args.slices or sorted({int(z) for z in np.linspace(0, depth - 1, min(5, depth) + 2)[1:-1]})
    bad = [z for z in slices if not 0 <= z < depth]
    if bad:
        raise SystemExit(f"--slices {bad}: the volume has z 0..{depth - 1}")
    first = Path(args.results or args.image or args.predictions or args.label or args.ground_truth)
    folder = Path(args.output_dir) if args.output_dir else (first if first.is_dir() else first.parent) / "figures"

    rows = [panels(volumes, (z,)) for z in slices]
    fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(2.8 * len(rows[0]), 2.8 * len(rows)), squeeze=False)
    for r, (z, row) in enumerate(zip(slices, rows, strict=True)):
        for c, (title, image, options) in enumerate(row):
            axes[r, c].imshow(image, interpolation="nearest", **options)
            axes[r, c].set_title(title if r == 0 else "", fontsize=9)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(f"z = {z}")
    written = [save(fig, folder, "montage")]

    y = height // 2 if args.y is None else args.y
    if not 0 <= y < height:
        raise SystemExit(f"--y {y}: the volume has y 0..{height - 1}")
    row = panels(volumes, (slice(None), y))
    fig, axes = plt.subplots(len(row), 1, figsize=(10, 1.2 + len(row) * depth * stretch / 60), squeeze=False)
    for ax, (title, image, options) in zip(axes[:, 0], row, strict=True):
        ax.imshow(image, aspect=stretch, interpolation="nearest", **options)  # e.g. 30 nm sections, 8 nm pixels
        ax.set_ylabel(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title(f"xz view at y = {y} (z stretched {voxel[0]:g} / {voxel[2]:g})")
    written.append(save(fig, folder, "xz"))

    if args.neuroglancer:
        serve_neuroglancer(volumes, voxel)
    return written


def serve_neuroglancer(volumes: dict, voxel=(30, 8, 8)) -> None:
    """Serve the volumes on localhost with neuroglancer (pip install neuroglancer) until Ctrl-C."""
    try:
        import neuroglancer
    except ImportError:
        raise SystemExit("--neuroglancer needs the neuroglancer package: pip install neuroglancer") from None
    neuroglancer.set_server_bind_address("127.0.0.1")
    viewer = neuroglancer.Viewer()
    space = neuroglancer.CoordinateSpace(names=["z", "y", "x"], units="nm", scales=list(voxel))
    with viewer.txn() as state:
        if "image" in volumes:
            state.layers["image"] = neuroglancer.ImageLayer(
                source=neuroglancer.LocalVolume(np.asarray(volumes["image"]), space)
            )
        for key in ("label", "ground_truth"):
            if key in volumes:
                data = np.asarray(volumes[key]).astype(np.uint32)
                state.layers[key] = neuroglancer.SegmentationLayer(source=neuroglancer.LocalVolume(data, space))
    print(f"neuroglancer: open {viewer} in a browser; Ctrl-C to stop")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add = p.add_argument
    add("--results", help="a results folder of test mode: its predictions, segmentation, image and ground truth")
    add("--volume", help="with --results holding several volumes: which one; unset: the first")
    add("--image", help="EM volume (.h5), or a predictions.h5")
    add("--predictions", help="predictions.h5 (3 channels)")
    add("--label", help="segmentation.h5 (instance ids)")
    add("--ground-truth", "--ground_truth", dest="ground_truth", help="true instance ids (.h5)")
    add("--slices", type=int, nargs="+", help="z indices for the montage; unset: five spread over the volume")
    add("--y", type=int, help="y of the xz view; unset: the middle")
    add(
        "--output-dir",
        "--output_dir",
        dest="output_dir",
        help="where figures go; unset: figures/ beside the first file",
    )
    add("--voxel-size", "--voxel_size", dest="voxel_size", type=float, nargs=3, metavar=("Z", "Y", "X"),
        help="nm per voxel; unset: the run's data.resolution (from --results), else 30 8 8")  # fmt: skip
    add("--neuroglancer", action="store_true", help="also serve the volumes on localhost (needs neuroglancer)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
