"""retinopathy/data.py: the labels CSV, preprocessing and its cache, the split, the dataset, synthetic fundi."""

import argparse

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import retinopathy.data as fundus_data
from retinopathy.data import (
    APTOS_COUNTS,
    FundusDataset,
    cache_settings,
    cached_image,
    preprocess,
    read_labels,
    read_rgb,
    split_records,
    stratified_split,
    synthetic_fundus,
    write_demo_dataset,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("fundus") / "data", n_images=60)


def test_demo_set_has_the_aptos_imbalance_and_reads_back(demo):
    records = read_labels(demo / "train.csv", demo / "train_images")
    counts = np.bincount([r.diagnosis for r in records], minlength=5)
    assert len(records) == counts.sum() and counts.argmax() == 0 and counts[2] > counts[1]
    expected = np.array(APTOS_COUNTS) / sum(APTOS_COUNTS)
    assert np.abs(counts / counts.sum() - expected).max() < 0.06
    sizes = {read_rgb(r.path).shape[:2] for r in records[:6]}
    assert len(sizes) > 1  # photos of several sizes


def test_synthetic_grades_follow_their_lesions():
    rng = np.random.default_rng(0)

    def exudate_pixels(grade):
        image = synthetic_fundus(grade, rng, (300, 300)).astype(int)
        # hard exudates are yellow: much less blue than green (the pale optic disc has more)
        yellow = (image[..., 0] > 150) & (image[..., 1] > 130) & (image[..., 2] < 0.55 * image[..., 1])
        return int(yellow.sum())

    median = {grade: np.median([exudate_pixels(grade) for _ in range(6)]) for grade in range(5)}
    assert median[0] < 20 and median[1] < 20  # no exudates below moderate (a few disc-edge pixels at most)
    assert min(median[2], median[3], median[4]) > 100 and median[3] > median[2]


def test_medical_preprocessing_keeps_the_disc_and_drops_the_border():
    rng = np.random.default_rng(1)
    photo = synthetic_fundus(2, rng, (300, 400))
    wide = cv2.copyMakeBorder(photo, 40, 40, 200, 200, cv2.BORDER_CONSTANT, value=0)  # a real-looking black frame
    out = preprocess(wide, 128, medical=True)
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8
    grey = out.mean(-1)
    yy, xx = np.mgrid[:128, :128]
    radius = np.hypot(yy - 63.5, xx - 63.5)
    assert grey[radius < 55].min() > 20  # the disc fills the frame: no black inside it
    assert grey[radius > 66].max() < 20  # only the corners outside the circle are black
    plain = preprocess(wide, 128)
    assert (plain.mean(-1) > 20).mean() < 0.5  # without the crop, the frame would waste most of the pixels
    assert preprocess(wide, 64, medical=True, ben=True).shape == (64, 64, 3)


def test_the_cache_is_hit_on_the_second_read(demo, tmp_path, monkeypatch):
    records = read_labels(demo / "train.csv", demo / "train_images")[:4]
    settings = cache_settings(argparse.Namespace(image_size=64, medical_preprocess=True, ben_graham=False))
    calls = []
    original = fundus_data.read_rgb
    monkeypatch.setattr(fundus_data, "read_rgb", lambda path: calls.append(path) or original(path))
    dataset = FundusDataset(records, settings, tmp_path / "cache", augment="advanced")
    first = [dataset[i]["image"] for i in range(4)]
    assert len(calls) == 4
    dataset.set_epoch_seed(3)
    second = [dataset[i]["image"] for i in range(4)]  # a second epoch: cache hits, no decoding
    assert len(calls) == 4 and all(a.shape == b.shape == (3, 64, 64) for a, b in zip(first, second, strict=True))
    assert torch.equal(dataset[2]["image"], dataset[2]["image"])  # (epoch seed, index) fixes the augmentation
    other = cache_settings(argparse.Namespace(image_size=64, medical_preprocess=False, ben_graham=False))
    cached_image(records[0], other, tmp_path / "cache")
    assert len(calls) == 5  # other settings, another cache entry


def test_stratified_split_keeps_the_grade_shares(demo):
    records = read_labels(demo / "train.csv", demo / "train_images")
    train, val = stratified_split(records, 0.2, 42)
    assert len(val) == pytest.approx(0.2 * len(records), abs=1)
    assert {r.id_code for r in train}.isdisjoint(r.id_code for r in val)
    assert set(r.diagnosis for r in val) == set(range(5))
    assert [r.id_code for r in stratified_split(records, 0.2, 42)[1]] == [r.id_code for r in val]
    few = records[:12]  # too few photos to hold every grade on both sides: an unstratified split, no crash
    assert len(stratified_split(few, 0.2, 42)[1]) == 3


def test_a_csv_edited_by_hand_reads_as_meant(demo, tmp_path):
    """Excel's "CSV UTF-8" (a byte-order mark), Windows line ends, spaces around names and cells."""
    table = pd.read_csv(demo / "train.csv", dtype={"id_code": str}).head(5)
    lines = ["id_code , diagnosis "] + [f" {i} ,  {g} " for i, g in zip(table.id_code, table.diagnosis, strict=True)]
    (tmp_path / "edited.csv").write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    records = read_labels(tmp_path / "edited.csv", demo / "train_images")
    assert [(r.id_code, r.diagnosis) for r in records] == list(zip(table.id_code, table.diagnosis, strict=True))


def test_three_splits_and_a_patient_in_one_of_them(demo, tmp_path):
    records = read_labels(demo / "train.csv", demo / "train_images")
    parts = split_records(records, 0.2, 0.1, 42)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [42, 12, 6]
    ids = [{r.id_code for r in parts[k]} for k in ("train", "val", "test")]
    assert sum(map(len, ids)) == len(set().union(*ids)) == len(records)
    assert split_records(records, 0.2, 0.0, 42)["test"] == []
    # two eyes per patient (patient of photo k: k // 2), graded alike or not: each patient lands in one split
    table = pd.read_csv(demo / "train.csv", dtype={"id_code": str})
    table["patient"] = [f"p{k // 2}" for k in range(len(table))]
    table.to_csv(tmp_path / "patients.csv", index=False)
    with pytest.raises(SystemExit, match="has no column 'person'"):
        read_labels(tmp_path / "patients.csv", demo / "train_images", patient_column="person")
    records = read_labels(tmp_path / "patients.csv", demo / "train_images", patient_column="patient")
    parts = split_records(records, 0.2, 0.1, 42)
    patients = [{r.patient for r in parts[k]} for k in ("train", "val", "test")]
    assert all(
        not a & b for a, b in [(patients[0], patients[1]), (patients[0], patients[2]), (patients[1], patients[2])]
    )
    assert sum(len(part) for part in parts.values()) == len(records) and all(parts.values())
    assert 0.05 <= len(parts["test"]) / len(records) <= 0.15 and 0.12 <= len(parts["val"]) / len(records) <= 0.3


def test_bad_rows_and_images_are_named(demo, tmp_path):
    table = pd.read_csv(demo / "train.csv", dtype={"id_code": str})
    table.drop(columns="diagnosis").to_csv(tmp_path / "no_column.csv", index=False)
    with pytest.raises(SystemExit, match=r"lacks the column\(s\) \['diagnosis'\]"):
        read_labels(tmp_path / "no_column.csv", demo / "train_images")
    bad = table.copy()
    bad.loc[3, "diagnosis"] = 7
    bad.loc[5, "id_code"] = "missing_photo"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    text = bad.copy()
    text["diagnosis"] = text["diagnosis"].astype(object)
    text.loc[8, "diagnosis"] = "x"  # one word in the column: only its row is bad, not every row read as text
    text.to_csv(tmp_path / "text.csv", index=False)
    said = []
    assert (
        len(read_labels(tmp_path / "text.csv", demo / "train_images", skip_bad_rows=True, log=said.append))
        == len(table) - 3
    )
    assert "skipped 3 bad row(s)" in said[0] and "diagnosis 'x' is not a grade" in said[0]
    pd.concat([table, table.iloc[:1]]).to_csv(tmp_path / "twice.csv", index=False)
    with pytest.raises(SystemExit, match=f"twice.csv: id_code {table.id_code[0]} appear"):
        read_labels(tmp_path / "twice.csv", demo / "train_images")
    with pytest.raises(
        SystemExit,
        match=r"(?s)2 bad row\(s\):\n.*bad.csv line 5 .*diagnosis 7 is not a grade.*line 7 .*no image missing_photo",
    ):
        read_labels(tmp_path / "bad.csv", demo / "train_images")
    said = []
    records = read_labels(tmp_path / "bad.csv", demo / "train_images", skip_bad_rows=True, log=said.append)
    assert len(records) == len(table) - 2 and "skipped 2 bad row(s)" in said[0]

    cv2.imwrite(str(tmp_path / "black.png"), np.zeros((50, 50, 3), np.uint8))
    with pytest.raises(SystemExit, match="black.png: the image is all black"):
        read_rgb(tmp_path / "black.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(SystemExit, match="broken.jpg: cannot read"):
        read_rgb(tmp_path / "broken.jpg")
