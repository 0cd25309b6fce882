"""APTOS-style fundus data: the labels CSV and image folder, the preprocessing cache, the dataset and its
augmentations, the stratified split, and synthetic fundus photographs for --demo.

On disk (see ../shared/DATA_FORMATS.md):
    DATA/train.csv                    id_code,diagnosis   (0 No DR, 1 Mild, 2 Moderate, 3 Severe, 4 Proliferative)
    DATA/train_images/<id_code>.png   (or .jpg/.jpeg), large photos with a black border

Decoding a 2000-3000 px JPEG/PNG takes longer than a training step, so every image is preprocessed and resized
once into a cache of small PNGs (`--cache-dir`, keyed by the preprocessing settings and the source file's size
and modification time); later epochs and later runs read only those.

Preprocessing (`preprocess`): pad to a square and resize; with `--medical-preprocess`, first crop the black
border (grey level <= 7) and cut to the fundus circle, and after resizing apply CLAHE on the L channel; with
`--ben-graham`, Ben Graham's 4 * image - 4 * GaussianBlur(image) + 128 (sigma = size / 30, his choice for
radius-normalised photos).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold, train_test_split
from tqdm import tqdm

from common.preprocessing import ben_graham, circle_crop, clahe, crop_black_border

GRADES = ("No DR", "Mild", "Moderate", "Severe", "Proliferative DR")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_VERSION = 1
APTOS_COUNTS = (1805, 370, 999, 193, 295)  # APTOS 2019 training set, grades 0-4


class DataError(SystemExit):
    """A problem with the user's data; the message names the row or file. Exits non-zero when not caught."""


# ----------------------------------------------------------------------------------------------------------------
# Labels and images
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Record:
    id_code: str
    path: Path
    diagnosis: int | None
    patient: str | None = None  # --patient-column: the photos of one person stay in one split


def find_image(img_dir: Path, id_code: str) -> Path | None:
    for suffix in (*IMAGE_SUFFIXES, *(s.upper() for s in IMAGE_SUFFIXES)):
        path = img_dir / f"{id_code}{suffix}"
        if path.is_file():
            return path
    return None


def listing(problems: list[str], limit: int = 10) -> str:
    """One problem a line, the first `limit` of them."""
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "".join(f"\n  {problem}" for problem in problems[:limit]) + more


def read_table(path: str | Path, nrows: int | None = None) -> pd.DataFrame:
    """A CSV as a person edited it: every cell text, a UTF-8 byte-order mark (Excel's "CSV UTF-8") dropped,
    spaces around column names and cells stripped, Windows line ends accepted (pandas reads them as they are)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        table = pd.read_csv(path, dtype=str, encoding="utf-8-sig", skipinitialspace=True, nrows=nrows)
    except Exception as error:
        raise DataError(f"{path}: not a readable CSV ({error})") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table.apply(lambda column: column.str.strip())


def read_labels(
    labels_csv: str | Path,
    img_dir: str | Path,
    num_classes: int = 5,
    skip_bad_rows: bool = False,
    log=print,
    patient_column: str | None = None,
) -> list[Record]:
    """Rows of an APTOS CSV with their image files. A missing column is an error; a label outside
    0..num_classes-1 or an id without an image is an error naming the row, or with skip_bad_rows a skipped row
    (the count is reported). patient_column: the column naming each photo's person (an empty cell: the photo is
    its own person)."""
    labels_csv, img_dir = Path(labels_csv), Path(img_dir)
    if not labels_csv.is_file():
        raise DataError(f"--labels-csv {labels_csv}: no such file")
    if not img_dir.is_dir():
        raise DataError(f"--img-dir {img_dir}: no such folder")
    table = read_table(labels_csv)
    if patient_column and patient_column not in table.columns:
        raise DataError(f"{labels_csv} has no column {patient_column!r} (--patient-column); found "
                        f"{list(table.columns)}")  # fmt: skip
    missing = [c for c in ("id_code", "diagnosis") if c not in table.columns]
    if missing:
        raise DataError(
            f"{labels_csv} lacks the column(s) {missing}; found {list(table.columns)} (expected id_code,diagnosis)"
        )
    if table.empty:
        raise DataError(f"{labels_csv} has no rows")
    duplicates = table["id_code"][table["id_code"].duplicated()].unique()
    if len(duplicates):
        raise DataError(f"{labels_csv}: id_code {', '.join(map(str, duplicates[:5]))} appear(s) more than once")
    # one non-number in the column would make pandas read every grade as text: compare numbers
    numeric = pd.to_numeric(table["diagnosis"], errors="coerce")
    records, problems = [], []
    patients = table[patient_column].fillna("").tolist() if patient_column else [None] * len(table)
    rows = zip(table.itertuples(index=False), numeric, patients, strict=True)
    for row_number, (row, value, patient) in enumerate(rows, start=2):
        where = f"{labels_csv} line {row_number} (id_code {row.id_code})"  # line 1 is the header
        if not (np.isfinite(value) and value == int(value) and 0 <= value < num_classes):
            shown = row.diagnosis if np.isfinite(value) else repr(row.diagnosis)  # a number as written, text quoted
            problems.append(f"{where}: diagnosis {shown} is not a grade in 0..{num_classes - 1}")
            continue
        grade = int(value)
        path = find_image(img_dir, str(row.id_code))
        if path is None:
            problems.append(f"{where}: no image {row.id_code}.png/.jpg/.jpeg in {img_dir}")
            continue
        patient = str(row.id_code) if patient == "" else patient
        records.append(Record(str(row.id_code), path, grade, patient))
    if problems and not skip_bad_rows:
        raise DataError(f"{len(problems)} bad row(s):{listing(problems)}\nfix them or pass --skip-bad-rows")
    if problems:
        log(f"skipped {len(problems)} bad row(s):{listing(problems)}")
    if not records:
        raise DataError(f"{labels_csv}: no usable row")
    return records


def read_folder(img_dir: str | Path) -> list[Record]:
    """Every image of a folder, unlabelled (for predictions in the Kaggle submission format)."""
    img_dir = Path(img_dir)
    if not img_dir.is_dir():
        raise DataError(f"--img-dir {img_dir}: no such folder")
    records = [Record(p.stem, p, None) for p in sorted(img_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not records:
        raise DataError(f"{img_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return records


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{path}: cannot read the image (corrupt or not an image)")
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.max() <= 7:
        raise DataError(f"{path}: the image is all black (no fundus to grade)")
    return image


def stratified_split(records: list[Record], val_split: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Train/validation split that keeps the grade proportions (scikit-learn), reproducible from seed."""
    labels = [r.diagnosis for r in records]
    counts = np.bincount(labels)
    n_val = int(np.ceil(val_split * len(records)))
    # a grade with one image cannot be split, and each side needs a place for every grade
    can_stratify = counts[counts > 0].min() >= 2 and min(n_val, len(records) - n_val) >= (counts > 0).sum()
    stratify = labels if can_stratify else None
    train, val = train_test_split(records, test_size=val_split, random_state=seed, stratify=stratify)
    return list(train), list(val)


def grouped_split(records: list[Record], share: float, seed: int) -> tuple[list[Record], list[Record]]:
    """As stratified_split, but a patient's photos stay on one side: scikit-learn's StratifiedGroupKFold with
    round(1 / share) folds, one fold split off (so the share is 1 / k, e.g. 0.1 or 0.2 exactly, 0.3 as 1/3)."""
    folds = min(max(2, round(1 / share)), len({r.patient for r in records}))
    if folds < 2:
        raise DataError("--patient-column: every photo belongs to one patient; there is nothing to split")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    labels, groups = [r.diagnosis for r in records], [r.patient for r in records]
    rest, held = next(splitter.split(np.zeros(len(records)), labels, groups))
    return [records[i] for i in rest], [records[i] for i in held]


def split_records(records: list[Record], val_split: float, test_split: float, seed: int) -> dict[str, list[Record]]:
    """{"train", "val", "test"}: shares val_split and test_split of all photos, stratified by grade; the test split
    (held out, reported) first, then validation (chooses the model) from the rest. Records with a patient keep each
    patient's photos in one split."""
    split = grouped_split if records and records[0].patient is not None else stratified_split
    rest, test = split(records, test_split, seed) if test_split > 0 else (list(records), [])
    train, val = split(rest, val_split / (1 - test_split), seed)
    return {"train": train, "val": val, "test": test}


def run_split(trained: dict, run_dir: Path, part: str, num_classes: int, settings: dict, cache_dir: Path):
    """The photos of one part ("train", "val" or "test") of a training run (`trained`: its stored arguments), as
    its split.json lists them, so a CSV edited since training cannot shift the split; runs without a split.json
    draw the train/validation split again. Returns (records, part): a run from before the test split gives its
    validation split for "test", and says so in the part it returns."""
    skip = trained["skip_bad_rows"]
    records = read_labels(trained["labels_csv"], trained["img_dir"], num_classes, skip, log=lambda *a: None)
    split = Path(run_dir) / "split.json"
    if not split.is_file():
        records = prepare_images(records, settings, cache_dir, skip, show=False)
        train, val = stratified_split(records, trained["val_split"], trained["random_seed"])
        return (train, "train") if part == "train" else (val, "val")
    by_id = {r.id_code: r for r in records}
    parts = json.loads(split.read_text())
    if part == "test" and "test" not in parts:
        part = "val"
    wanted = parts[part]
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise DataError(f"{split}: {len(missing)} photo(s) of its {part} split are no longer in "
                        f"{trained['labels_csv']}, e.g. {missing[0]}")  # fmt: skip
    return prepare_images([by_id[i] for i in wanted], settings, cache_dir, skip, show=False), part


def seen_in_training(run_dir: Path) -> set[str]:
    """The id_codes a run trained on or chose its model with (split.json's train and val); empty without one."""
    split = Path(run_dir) / "split.json"
    if not split.is_file():
        return set()
    parts = json.loads(split.read_text())
    return set(parts["train"]) | set(parts["val"])


def new_folder(parent: Path, name: str) -> Path:
    """A new folder parent/<name>_<YYYYmmdd_HHMMSS> (with _2, _3, ... if taken): outputs never overwrite others."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    for attempt in range(1, 1000):
        folder = Path(parent) / (f"{name}_{stamp}" + (f"_{attempt}" if attempt > 1 else ""))
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise SystemExit(f"could not create a new folder in {parent}")


def write_json(path: Path, data) -> None:
    """Written to a temporary file, then renamed: a killed run never leaves half a file."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as a user reads it: the description as written, each flag under one name (its other spelling, - or
    _, works too), and each default as the parser holds it, after a recipe, preset or --demo has set it."""

    def _format_action_invocation(self, action):
        if len(action.option_strings) > 1:
            shown = action.option_strings[: 2 if isinstance(action, argparse.BooleanOptionalAction) else 1]
            action = copy.copy(action)
            action.option_strings = shown
        return super()._format_action_invocation(action)

    def _get_help_string(self, action):
        text = action.help or ""
        quiet = action.default in (None, argparse.SUPPRESS) or (action.nargs == 0 and action.default is False)
        if "%(default)" in text or not action.option_strings or quiet:
            return text
        return f"{text} (default: %(default)s)"


def read_id_list(labels_csv: str | Path, img_dir: str | Path) -> list[Record]:
    """An id_code column without grades (e.g. APTOS test.csv): unlabelled records, in the CSV's order."""
    table = read_table(labels_csv)
    records, missing = [], []
    for id_code in table["id_code"]:
        path = find_image(Path(img_dir), id_code)
        if path is None:
            missing.append(id_code)
        else:
            records.append(Record(id_code, path, None))
    if missing:
        raise DataError(f"{labels_csv}: {len(missing)} id(s) have no image in {img_dir}, e.g. {missing[0]}")
    if not records:
        raise DataError(f"{labels_csv} has no rows")
    return records


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing and its cache
# ----------------------------------------------------------------------------------------------------------------


def square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Pad to a square with black (centred), then resize: the disc keeps its shape."""
    h, w = image.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    padded = cv2.copyMakeBorder(image, top, side - h - top, left, side - w - left, cv2.BORDER_CONSTANT, value=0)
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(padded, (size, size), interpolation=interpolation)


def preprocess(image: np.ndarray, size: int, medical: bool = False, ben: bool = False) -> np.ndarray:
    """uint8 RGB (size, size, 3), see the module docstring."""
    if medical:
        image = circle_crop(crop_black_border(image))
    image = square_resize(image, size)
    if medical:
        image = clahe(image, clip_limit=2.0, tile_grid_size=(8, 8))
    if ben:
        image = ben_graham(image, sigma=max(size / 30, 1.0))
    return image


def cache_settings(args) -> dict:
    return {
        "size": args.image_size,
        "medical": bool(args.medical_preprocess),
        "ben": bool(args.ben_graham),
        "version": CACHE_VERSION,
    }


def cache_path(record: Record, settings: dict, cache_dir: Path) -> Path:
    """Where the preprocessed image of a record lives: keyed by the settings and the source file's path, size
    and modification time, so an edited photo or other settings never reuse a stale file."""
    stat = record.path.stat()
    key = json.dumps(
        {**settings, "file": str(record.path.resolve()), "bytes": stat.st_size, "mtime": stat.st_mtime_ns},
        sort_keys=True,
    )
    return Path(cache_dir) / f"{record.id_code}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.png"


def cached_image(record: Record, settings: dict, cache_dir: Path) -> np.ndarray:
    """The preprocessed image of a record: from the cache, or computed and stored there (atomically)."""
    path = cache_path(record, settings, cache_dir)
    if path.is_file():
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is not None:
            return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    image = preprocess(read_rgb(record.path), settings["size"], settings["medical"], settings["ben"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.png")
    cv2.imwrite(str(tmp), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    os.replace(tmp, path)
    return image


def prepare_images(
    records: list[Record], settings: dict, cache_dir: Path, skip_bad: bool = False, log=print, show: bool = True
) -> list[Record]:
    """Decode, check and preprocess every image once, before training or inference starts, so that a bad file is
    reported here (not from inside a loader worker) and no epoch decodes a large photo. OpenCV releases the GIL,
    so a thread pool uses every core. An unreadable or all-black image is an error naming the file; with skip_bad
    its record is dropped and the count reported. Images already in the cache are not opened."""

    def check(record: Record) -> str | None:
        if cache_path(record, settings, cache_dir).is_file():
            return None
        try:
            cached_image(record, settings, cache_dir)
        except DataError as error:
            return str(error)
        except OSError as error:  # e.g. a cache folder of another machine, or a full disk
            raise DataError(f"cache {cache_dir}: cannot write ({error}); pass --cache-dir") from None
        return None

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        work = pool.map(check, records)
        problems = list(tqdm(work, total=len(records), desc="preprocessing", disable=not show, leave=False))
    bad = [problem for problem in problems if problem]
    if bad and not skip_bad:
        raise DataError(f"{len(bad)} unusable image(s):{listing(bad)}\nfix them or pass --skip-bad-rows")
    if bad:
        log(f"skipped {len(bad)} unusable image(s):{listing(bad)}")
    good = [record for record, problem in zip(records, problems, strict=True) if not problem]
    if not good:
        raise DataError(f"no usable image among {len(records)}")
    return good


# ----------------------------------------------------------------------------------------------------------------
# Dataset and augmentations
# ----------------------------------------------------------------------------------------------------------------


def build_augmentation(advanced: bool) -> A.Compose:
    """--advanced-aug (16 techniques): rotation, flips, transpose, shift/scale, optical, grid or elastic distortion
    (the eye's movement and the lens), CLAHE, colour jitter, brightness/contrast, hue/saturation, gamma, Gaussian
    noise or blur, coarse dropout. --no-advanced-aug: flips only (a fundus has no preferred orientation)."""
    flips = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if not advanced:
        return A.Compose(flips)
    return A.Compose(
        [
            A.Rotate(limit=180, border_mode=cv2.BORDER_CONSTANT, p=0.7),
            *flips,
            A.Transpose(p=0.5),
            A.Affine(translate_percent=(-0.05, 0.05), scale=(0.9, 1.1), border_mode=cv2.BORDER_CONSTANT, p=0.3),
            A.OneOf(
                [
                    A.OpticalDistortion(distort_limit=0.1),
                    A.GridDistortion(distort_limit=0.1),
                    A.ElasticTransform(alpha=20, sigma=6, border_mode=cv2.BORDER_CONSTANT),
                ],
                p=0.3,
            ),
            A.CLAHE(clip_limit=(1, 3), p=0.2),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
            A.RandomBrightnessContrast(0.1, 0.1, p=0.3),
            A.HueSaturationValue(hue_shift_limit=5, sat_shift_limit=15, val_shift_limit=10, p=0.2),
            A.RandomGamma(gamma_limit=(80, 120), p=0.2),
            A.OneOf([A.GaussNoise(std_range=(0.01, 0.04)), A.GaussianBlur(blur_limit=(3, 5))], p=0.3),
            A.CoarseDropout(
                num_holes_range=(1, 6), hole_height_range=(0.03, 0.08), hole_width_range=(0.03, 0.08), p=0.3
            ),
        ]
    )


class FundusDataset(torch.utils.data.Dataset):
    """(image (3, S, S) float32 ImageNet-normalised, label or -1, index) from the preprocessing cache.

    Augmentation is seeded per item from (epoch seed, index) when `set_epoch_seed` was called, so an epoch is
    the same whichever loader worker draws an item (exact --resume)."""

    def __init__(self, records: list[Record], settings: dict, cache_dir: Path, augment: str | None = None):
        self.records, self.settings, self.cache_dir = records, settings, Path(cache_dir)
        self.transform = None if augment is None else build_augmentation(augment == "advanced")
        self.seed = None

    def set_epoch_seed(self, seed: int) -> None:
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        image = cached_image(record, self.settings, self.cache_dir)
        if self.transform is not None:
            if self.seed is not None:
                self.transform.set_random_seed(int(np.random.SeedSequence([self.seed, i]).generate_state(1)[0]))
            image = self.transform(image=image)["image"]
        tensor = (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        return {
            "image": torch.from_numpy(tensor.transpose(2, 0, 1).astype(np.float32)),
            "label": -1 if record.diagnosis is None else record.diagnosis,
            "index": i,
        }


# ----------------------------------------------------------------------------------------------------------------
# Synthetic fundus photographs for --demo and tests
# ----------------------------------------------------------------------------------------------------------------


def _vessels(
    image: np.ndarray,
    centre: tuple[int, int],
    radius: int,
    rng: np.random.Generator,
    count: int,
    width: int,
    colour,
    tortuous: bool = False,
) -> None:
    for _ in range(count):
        angle = rng.uniform(0, 2 * np.pi)
        point = np.array(centre, float)
        points = [point.copy()]
        for _ in range(14):
            angle += rng.normal(0, 0.6 if tortuous else 0.15)
            point += (radius / (6 if tortuous else 12)) * np.array([np.cos(angle), np.sin(angle)])
            points.append(point.copy())
        cv2.polylines(image, [np.array(points, np.int32)], False, colour, width, cv2.LINE_AA)


def synthetic_fundus(grade: int, rng: np.random.Generator, size: tuple[int, int] = (400, 480)) -> np.ndarray:
    """An RGB fundus-like photo whose grade follows its lesions: 0 none; 1 a few microaneurysms (tiny dark red
    dots); 2 more microaneurysms, blot haemorrhages and hard exudates (yellow); 3 many haemorrhages and exudates;
    4 as 3 plus new vessels (fine, tortuous) at the optic disc. Orange-red disc on black with a bright optic
    disc, vessels and uneven illumination; width/height vary like real photos, with a black border."""
    h, w = size
    image = np.zeros((h, w, 3), np.uint8)
    radius = int(min(h, w) * rng.uniform(0.42, 0.48))
    centre = (w // 2 + int(rng.integers(-10, 11)), h // 2 + int(rng.integers(-10, 11)))
    base = np.array([200, 90, 40]) + rng.normal(0, 12, 3)
    cv2.circle(image, centre, radius, tuple(int(v) for v in np.clip(base, 0, 255)), -1, cv2.LINE_AA)
    disc = (centre[0] + int(radius * rng.choice([-0.45, 0.45])), centre[1] + int(rng.integers(-20, 21)))
    _vessels(image, disc, radius, rng, 6, max(2, radius // 60), (140, 40, 25))
    cv2.circle(image, disc, max(radius // 7, 4), (250, 220, 150), -1, cv2.LINE_AA)
    small = max(radius // 120, 1)
    counts = {  # microaneurysms, haemorrhages, exudates, new-vessel tufts
        0: (0, 0, 0, 0),
        1: (int(rng.integers(3, 7)), 0, 0, 0),
        2: (int(rng.integers(8, 15)), 3, 4, 0),
        3: (int(rng.integers(12, 20)), 12, 10, 0),
        4: (int(rng.integers(12, 20)), 10, 8, 3),
    }[grade]

    def inside():
        r, a = radius * 0.85 * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        return int(centre[0] + r * np.cos(a)), int(centre[1] + r * np.sin(a))

    for _ in range(counts[0]):
        cv2.circle(image, inside(), small + 1, (110, 20, 15), -1, cv2.LINE_AA)
    for _ in range(counts[1]):
        cv2.ellipse(
            image,
            inside(),
            (int(rng.integers(3, 8)) * small, int(rng.integers(3, 8)) * small),
            float(rng.uniform(0, 180)),
            0,
            360,
            (120, 25, 15),
            -1,
            cv2.LINE_AA,
        )
    for _ in range(counts[2]):
        cv2.circle(image, inside(), int(rng.integers(1, 4)) * small + 1, (235, 215, 90), -1, cv2.LINE_AA)
    if counts[3]:
        _vessels(image, disc, radius // 2, rng, 6 * counts[3], 1, (170, 30, 30), tortuous=True)
    yy, xx = np.mgrid[:h, :w]
    light = 1.1 - 0.35 * np.hypot(xx - centre[0], yy - centre[1]) / radius
    image = image.astype(np.float32) * light[..., None] + rng.normal(0, 3, image.shape)
    fundus = np.hypot(xx - centre[0], yy - centre[1]) <= radius
    image[~fundus] = rng.uniform(0, 4)  # the black border
    return np.clip(image, 0, 255).astype(np.uint8)


def write_demo_dataset(root: str | Path, n_images: int = 240, seed: int = 0) -> Path:
    """n_images synthetic photos with the APTOS grade proportions, at a few sizes, as train_images/<id>.png and
    train.csv. Skips writing when the same set exists already."""
    root = Path(root)
    marker = root / "demo.json"
    settings = {"n_images": n_images, "seed": seed, "version": 1}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    rng = np.random.default_rng(seed)
    shares = np.array(APTOS_COUNTS) / sum(APTOS_COUNTS)
    grades = np.repeat(np.arange(5), np.maximum(2, np.round(shares * n_images).astype(int)))
    rng.shuffle(grades)
    (root / "train_images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, grade in enumerate(grades):
        size = [(300, 360), (360, 480), (420, 420)][i % 3]
        id_code = f"demo{i:04d}"
        image = synthetic_fundus(int(grade), rng, size)
        cv2.imwrite(str(root / "train_images" / f"{id_code}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        rows.append({"id_code": id_code, "diagnosis": int(grade)})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    marker.write_text(json.dumps(settings))
    return root
