"""Metrics: hand-computed cases, empty and absent-class cases, agreement with scikit-learn, scikit-image,
MONAI and a per-instance-pair reference implementation."""

import math
import multiprocessing
import os
import sys

import numpy as np
import pytest
import torch
from monai.metrics import compute_panoptic_quality
from skimage.metrics import adapted_rand_error, variation_of_information
from sklearn.metrics import cohen_kappa_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

from common.metrics import (
    PANNUKE_TISSUES,
    ConfusionMatrix,
    adapted_rand,
    aggregated_jaccard_index,
    instance_overlaps,
    match_instances,
    pannuke_binarize,
    pannuke_panoptic_quality,
    panoptic_quality,
    quadratic_weighted_kappa,
    roc_auc_one_vs_rest,
)
from common.metrics import variation_of_information as our_voi

sys.path.insert(0, os.path.dirname(__file__))
from naive_instance_metrics import naive_aji, naive_binarize, naive_match, naive_pannuke, naive_pq  # noqa: E402


def blobs(shape, count, rng, radius=(2, 6)):
    """A label image of `count` random discs (later ones cover earlier ones), ids scattered, not 1..n."""
    labels = np.zeros(shape, dtype=np.int64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    ids = rng.choice(np.arange(1, 10 * count + 10), size=count, replace=False)
    for label in ids:
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        ry, rx = rng.uniform(*radius, size=2)
        labels[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = label
    return labels


def perturbed(true, rng):
    """A plausible prediction: instances shifted by a pixel or two, some dropped, some merged, some spurious."""
    pred = np.zeros_like(true)
    for label in np.unique(true)[1:]:
        if rng.random() < 0.15:
            continue  # missed
        dy, dx = rng.integers(-2, 3, size=2)
        mask = np.roll(true == label, (dy, dx), axis=(0, 1))
        pred[mask] = label * 3 + 1
    spurious = blobs(true.shape, 3, rng, radius=(1, 3))
    pred[(spurious > 0) & (pred == 0)] = spurious[(spurious > 0) & (pred == 0)] + 10_000
    return pred


@pytest.fixture(params=range(6))
def label_pair(request):
    rng = np.random.default_rng(request.param)
    true = blobs((48, 48), int(rng.integers(5, 25)), rng)
    return true, perturbed(true, rng)


# ---------------------------------------------------------------------------------------------- ConfusionMatrix


def test_confusion_matrix_hand_computed():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1, 2, 2, 0]), torch.tensor([0, 1, 2, 2, 2, 1]))
    np.testing.assert_array_equal(cm.matrix.numpy(), [[1, 0, 0], [1, 1, 0], [0, 1, 2]])
    s = cm.compute()
    # class 2: TP 2, FP 0, FN 1, TN 3
    assert s["dice"][2] == pytest.approx(4 / 5)
    assert s["iou"][2] == pytest.approx(2 / 3)
    assert s["precision"][2] == 1.0 and s["recall"][2] == pytest.approx(2 / 3)
    assert s["specificity"][2] == 1.0 and s["accuracy"][2] == pytest.approx(5 / 6)
    assert s["overall_accuracy"] == pytest.approx(4 / 6)
    assert s["mean_dice"] == pytest.approx(np.mean(s["dice"]))
    assert s["fg_mean_dice"] == pytest.approx(np.mean(s["dice"][1:]))
    assert s["f1"] == s["dice"]


@pytest.mark.parametrize("num_classes", [2, 6])
def test_confusion_matrix_matches_sklearn(num_classes):
    g = torch.Generator().manual_seed(num_classes)
    target = torch.randint(0, num_classes, (4, 32, 32), generator=g)
    pred = torch.where(
        torch.rand(4, 32, 32, generator=g) < 0.6, target, torch.randint(0, num_classes, (4, 32, 32), generator=g)
    )
    cm = ConfusionMatrix(num_classes)
    for i in range(4):  # streaming over batches equals one pass
        cm.update(pred[i], target[i])
    s = cm.compute()
    labels = list(range(num_classes))
    np.testing.assert_array_equal(cm.matrix.numpy(), confusion_matrix(target.ravel(), pred.ravel(), labels=labels))
    p, r, f, _ = precision_recall_fscore_support(target.ravel(), pred.ravel(), labels=labels, zero_division=np.nan)
    np.testing.assert_allclose(s["precision"], p)
    np.testing.assert_allclose(s["recall"], r)
    np.testing.assert_allclose(s["dice"], f)
    # specificity of class c is the recall of "not c"
    for c in labels:
        assert s["specificity"][c] == pytest.approx(
            precision_recall_fscore_support(target.ravel() != c, pred.ravel() != c, average="binary")[1]
        )


def test_confusion_matrix_absent_class_is_nan_and_skipped_in_means():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    s = cm.compute()
    assert math.isnan(s["dice"][2]) and math.isnan(s["iou"][2])
    assert s["mean_dice"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert s["specificity"][2] == 1.0  # nothing predicted as 2 and nothing is 2


def test_confusion_matrix_ignore_index_and_range_check():
    cm = ConfusionMatrix(2, ignore_index=255)
    cm.update(torch.tensor([1, 0, 1]), torch.tensor([1, 255, 0]))
    assert cm.matrix.sum() == 2
    with pytest.raises(ValueError, match="class indices must lie in 0..1"):
        cm.update(torch.tensor([2]), torch.tensor([0]))
    with pytest.raises(ValueError, match="does not match"):
        cm.update(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="class indices"):
        cm.update(torch.tensor([0.9999]), torch.tensor([0]))  # probabilities passed by mistake
    cm.update(torch.tensor([1.0]), torch.tensor([1]))  # whole numbers in a float tensor are fine


def _ddp_worker(rank, world_size, init_file, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([rank, 1, 2]), torch.tensor([rank, 1, 1]))
    cm.all_reduce()
    queue.put((rank, cm.matrix.tolist()))
    dist.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="uses fork")
def test_confusion_matrix_all_reduce_sums_ranks(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, tmp_path / "init", queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = [[1, 0, 0], [0, 3, 2], [0, 0, 0]]  # rank 0 adds (0,0),(1,1),(1,2); rank 1 adds (1,1) twice, (1,2)
    assert results[0] == expected and results[1] == expected


# ---------------------------------------------------------------------------------------------- instances


def hand_pair():
    true = np.zeros((8, 8), int)
    true[1:4, 1:4] = 5  # 9 px
    true[5:7, 5:8] = 9  # 6 px
    pred = np.zeros((8, 8), int)
    pred[1:4, 1:3] = 2  # 6 px inside true 5: IoU 6/9
    pred[5:7, 5:7] = 3  # 4 px inside true 9: IoU 4/6
    pred[0, 0] = 4  # spurious 1 px
    return true, pred


def test_ids_survive_images_without_background():
    true = np.array([[1, 1, 2, 2]])
    pred = np.array([[7, 7, 7, 3]])
    o = instance_overlaps(true, pred)
    assert o.true_ids.tolist() == [1, 2] and o.pred_ids.tolist() == [3, 7]
    m = match_instances(true, pred)
    assert m.matched_true.tolist() == [1] and m.matched_pred.tolist() == [7]


def test_overlaps_hand_computed():
    true, pred = hand_pair()
    o = instance_overlaps(true, pred)
    assert o.true_areas.tolist() == [9, 6] and o.pred_areas.tolist() == [6, 4, 1]
    assert o.true_ids.tolist() == [5, 9] and o.pred_ids.tolist() == [2, 3, 4]
    assert o.intersection.tolist() == [6, 4]
    np.testing.assert_allclose(o.iou, [6 / 9, 4 / 6])


def test_overlaps_with_huge_ids_or_no_background_equal_the_renumbered_images():
    # ids past the lookup table (sorted instead) and images with no background give the same pairs, areas and
    # scores as the same images numbered 1..n
    rng = np.random.default_rng(3)
    true = rng.integers(0, 6, (40, 50))
    pred = np.roll(true, 1, axis=1)
    pred[:, :5] = rng.integers(0, 6, (40, 5))
    plain = instance_overlaps(true, pred)
    for shift in (2**31 - 10, 7):  # huge ids; and every pixel an instance (no 0 left)
        big_true, big_pred = np.where(true > 0, true + shift, 0), np.where(pred > 0, pred + shift, 0)
        if shift == 7:
            big_true, big_pred = true + shift, pred + shift
        o = instance_overlaps(big_true.astype(np.int64), big_pred.astype(np.int64))
        if shift != 7:
            for field in ("true_areas", "pred_areas", "true_index", "pred_index", "intersection"):
                assert getattr(o, field).tolist() == getattr(plain, field).tolist(), field
            assert o.true_ids.tolist() == (plain.true_ids + shift).tolist()
        assert (
            o.true_areas.sum() == (big_true > 0).sum()
            and o.intersection.sum() == ((big_true > 0) & (big_pred > 0)).sum()
        )
        reference = naive_match(big_true, big_pred, 0.5)
        assert match_instances(big_true, big_pred).tp == reference[0]


def test_overlaps_counted_once_give_the_same_scores():
    rng = np.random.default_rng(5)
    true = rng.integers(0, 8, (30, 30))
    pred = np.roll(true, 2, axis=0)
    overlaps = instance_overlaps(true, pred)
    for threshold in (0.3, 0.5, 0.7):
        a, b = match_instances(true, pred, threshold), match_instances(true, pred, threshold, overlaps)
        assert (a.tp, a.fp, a.fn) == (b.tp, b.fp, b.fn) and a.matched_iou.tolist() == b.matched_iou.tolist()
    assert panoptic_quality(true, pred) == panoptic_quality(true, pred, overlaps=overlaps)
    assert aggregated_jaccard_index(true, pred) == aggregated_jaccard_index(true, pred, overlaps=overlaps)


def test_match_pq_aji_hand_computed():
    true, pred = hand_pair()
    m = match_instances(true, pred)
    assert (m.tp, m.fp, m.fn) == (2, 1, 0)
    assert m.precision == pytest.approx(2 / 3) and m.recall == 1.0 and m.f1 == pytest.approx(0.8)
    assert m.mean_iou == pytest.approx((6 / 9 + 4 / 6) / 2)
    assert sorted(zip(m.matched_true.tolist(), m.matched_pred.tolist(), strict=True)) == [(5, 2), (9, 3)]
    pq = panoptic_quality(true, pred)
    assert pq["dq"] == pytest.approx(0.8)
    assert pq["sq"] == pytest.approx((6 / 9 + 4 / 6) / 2, rel=1e-5)
    assert pq["pq"] == pytest.approx(0.8 * (6 / 9 + 4 / 6) / 2, rel=1e-5)
    # AJI: (6 + 4) / (9 + 6 + 1)
    assert aggregated_jaccard_index(true, pred) == pytest.approx(10 / 16)
    # at IoU 0.7 nothing matches
    m = match_instances(true, pred, iou_threshold=0.7)
    assert (m.tp, m.fp, m.fn) == (0, 3, 2) and m.f1 == 0 and math.isnan(m.mean_iou)


def test_iou_exactly_half_is_not_a_match():
    true = np.zeros((1, 4), int)
    true[0, :2] = 1
    pred = np.zeros((1, 4), int)
    pred[0, :1] = 1  # IoU 1/2: PQ matches need IoU > 0.5
    assert match_instances(true, pred).tp == 0


def test_low_threshold_uses_optimal_assignment():
    # A = px 0-4, B = px 5-6; X = px 0-1, Y = px 2-6. IoU A-X 2/5, A-Y 3/7 (the largest), B-Y 2/5.
    # Greedy by IoU takes A-Y and leaves B and X unmatched; the assignment of largest total IoU is A-X, B-Y.
    true = np.array([[1, 1, 1, 1, 1, 2, 2]])
    pred = np.array([[3, 3, 4, 4, 4, 4, 4]])
    np.testing.assert_allclose(instance_overlaps(true, pred).iou, [2 / 5, 3 / 7, 2 / 5])
    m = match_instances(true, pred, iou_threshold=0.3)
    assert sorted(zip(m.matched_true.tolist(), m.matched_pred.tolist(), strict=True)) == [(1, 3), (2, 4)]
    assert (m.tp, m.fp, m.fn) == naive_match(true, pred, 0.3)[:3]
    assert match_instances(true, pred, iou_threshold=0.5).tp == 0


def test_empty_cases():
    empty = np.zeros((6, 6), int)
    some = np.zeros((6, 6), int)
    some[1:3, 1:3] = 4
    assert all(math.isnan(panoptic_quality(empty, some)[k]) for k in ("dq", "sq", "pq"))  # absent class: NaN
    assert all(math.isnan(panoptic_quality(empty, empty)[k]) for k in ("dq", "sq", "pq"))
    assert panoptic_quality(some, empty)["pq"] == 0.0
    m = match_instances(empty, empty)
    assert (m.tp, m.fp, m.fn) == (0, 0, 0) and math.isnan(m.f1) and math.isnan(m.precision)
    m = match_instances(some, empty)
    assert m.recall == 0 and math.isnan(m.precision) and m.f1 == 0
    assert math.isnan(aggregated_jaccard_index(empty, empty))
    assert aggregated_jaccard_index(some, empty) == 0 and aggregated_jaccard_index(empty, some) == 0


def test_bad_label_images_are_rejected():
    with pytest.raises(ValueError, match="differ in shape"):
        match_instances(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(ValueError, match="integer label image"):
        match_instances(np.full((4, 4), 0.5), np.zeros((4, 4), int))
    # float images of whole numbers (PanNuke ships its masks as float64) are label images
    true, pred = hand_pair()
    assert match_instances(true.astype(np.float64), pred.astype(np.float32)).tp == 2


def test_pq_below_half_assigns_over_all_pairs_like_hovernet():
    # HoVer-Net solves the assignment on every overlapping pair, then drops pairs at or below the threshold
    true = np.array([[1, 0, 1, 1, 0, 2]])
    pred = np.array([[2, 0, 1, 1, 2, 1]])
    ours = panoptic_quality(true, pred, iou_threshold=0.3)
    assert [ours["dq"], ours["sq"], ours["pq"]] == pytest.approx(list(naive_pq(true, pred, 0.3)), abs=1e-12)
    assert ours["sq"] == pytest.approx(1 / 3, rel=1e-5)


@pytest.mark.parametrize("seed", range(20))
def test_low_threshold_matching_on_crowded_images(seed):
    rng = np.random.default_rng(100 + seed)
    true = blobs((32, 32), 12, rng, radius=(2, 5))
    pred = blobs((32, 32), 12, rng, radius=(2, 5))  # unrelated: many competing weak overlaps
    for threshold in (0.0, 0.2):
        m = match_instances(true, pred, threshold)
        tp, fp, fn, matched = naive_match(true, pred, threshold)
        assert (m.tp, m.fp, m.fn) == (tp, fp, fn)
        assert m.matched_iou.sum() == pytest.approx(matched.sum())


def test_pq_on_empty_ground_truth_can_follow_get_fast_pq():
    empty = np.zeros((6, 6), int)
    some = np.zeros((6, 6), int)
    some[1:3, 1:3] = 4
    assert panoptic_quality(empty, some, absent_is_nan=False)["pq"] == 0.0
    assert math.isnan(panoptic_quality(empty, empty, absent_is_nan=False)["pq"])


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_matching_and_pq_agree_with_per_pair_reference(label_pair, threshold):
    true, pred = label_pair
    m = match_instances(true, pred, threshold)
    tp, fp, fn, matched = naive_match(true, pred, threshold)
    assert (m.tp, m.fp, m.fn) == (tp, fp, fn)
    assert sorted(m.matched_iou.tolist()) == pytest.approx(sorted(matched.tolist()))
    ours = panoptic_quality(true, pred, threshold)
    assert [ours["dq"], ours["sq"], ours["pq"]] == pytest.approx(list(naive_pq(true, pred, threshold)), abs=1e-12)


def test_aji_agrees_with_per_pair_reference(label_pair):
    true, pred = label_pair
    assert aggregated_jaccard_index(true, pred) == pytest.approx(naive_aji(true, pred), abs=1e-12)


def test_pq_agrees_with_monai(label_pair):
    true, pred = label_pair
    tp, fp, fn, iou_sum = compute_panoptic_quality(
        torch.from_numpy(pred), torch.from_numpy(true), output_confusion_matrix=True
    ).tolist()
    ours = panoptic_quality(true, pred)
    assert (ours["tp"], ours["fp"], ours["fn"]) == (tp, fp, fn)
    assert ours["sq"] * (ours["tp"] + 1e-6) == pytest.approx(iou_sum, rel=1e-5)


def test_matching_works_in_3d():
    rng = np.random.default_rng(0)
    true = np.stack([blobs((24, 24), 6, rng) for _ in range(3)])  # ids may repeat across slices: one 3D object
    pred = np.roll(true, 1, axis=2)
    tp, fp, fn, _ = naive_match(true, pred)
    m = match_instances(true, pred)
    assert (m.tp, m.fp, m.fn) == (tp, fp, fn)


# ---------------------------------------------------------------------------------------------- PanNuke


def test_pannuke_binarize_later_channel_wins():
    masks = np.zeros((4, 4, 3), int)
    masks[0:2, 0:2, 0] = 7
    masks[1:3, 1:3, 1] = 7
    masks[3, 3, 2] = 2
    out = pannuke_binarize(masks)
    assert out[0, 0] != out[1, 1] and out[1, 1] == out[2, 2]  # channel 1 covers the overlap
    assert len(np.unique(out)) == 4  # background + 3 instances
    np.testing.assert_array_equal(out > 0, naive_binarize(masks) > 0)
    assert aggregated_jaccard_index(out, naive_binarize(masks)) == 1.0


def pannuke_tiles(n, rng, size=40):
    masks = np.zeros((n, size, size, 6), dtype=np.float64)  # PanNuke ships float masks
    for i in range(n):
        for c in range(5):
            if rng.random() < 0.35:
                continue  # this class absent from this tile
            masks[i, ..., c] = blobs((size, size), int(rng.integers(1, 6)), rng)
            for earlier in range(c):  # a pixel belongs to one class
                masks[i, ..., earlier][masks[i, ..., c] > 0] = 0
        masks[i, ..., 5] = (masks[i, ..., :5].sum(-1) == 0).astype(float)
    return masks


def test_pannuke_aggregation_agrees_with_run_py():
    rng = np.random.default_rng(7)
    true = pannuke_tiles(10, rng)
    pred = true.copy()
    for i in range(10):
        for c in range(5):
            pred[i, ..., c] = perturbed(true[i, ..., c].astype(np.int64), rng)
    types = rng.choice(np.array(PANNUKE_TISSUES[:3]), size=10)
    ours = pannuke_panoptic_quality(true, pred, types)
    mpq, bpq, per_class = naive_pannuke(true.astype(np.int64), pred.astype(np.int64), list(types))
    assert ours["mpq"] == pytest.approx(mpq, abs=1e-12)
    assert ours["bpq"] == pytest.approx(bpq, abs=1e-12)
    assert list(ours["pq_per_class"].values()) == pytest.approx(per_class, abs=1e-12, nan_ok=True)
    assert sum(t["tiles"] for t in ours["per_tissue"].values()) == 10


def test_pannuke_perfect_prediction_and_absent_class():
    rng = np.random.default_rng(1)
    true = pannuke_tiles(4, rng)
    true[..., 3] = 0  # no "Dead" nuclei anywhere
    scores = pannuke_panoptic_quality(true, true, ["Breast", "Colon", "Breast", "Colon"])
    assert scores["mpq"] == pytest.approx(1.0, abs=1e-5) and scores["bpq"] == pytest.approx(1.0, abs=1e-5)
    assert math.isnan(scores["pq_per_class"]["Dead"])
    with pytest.raises(ValueError, match="tissue types"):
        pannuke_panoptic_quality(true, true, ["Breast"])
    with pytest.raises(ValueError, match="5 class channels"):
        pannuke_panoptic_quality(true[..., :3], true[..., :3], ["Breast"] * 4)


# ---------------------------------------------------------------------------------------------- 3D volumes


def test_adapted_rand_and_voi_hand_computed():
    true = np.zeros((2, 4, 4), int)
    true[:, :, :2] = 1
    true[:, :, 2:] = 2
    merged = np.where(true > 0, 5, 0)  # one predicted object covering both true ones
    assert adapted_rand(true, true)["adapted_rand_error"] == pytest.approx(0.0)
    # SNEMI3D counts pairs of voxels: sum n_ij^2 - n = 2 * 16^2 - 32 = 480 over the joint table, 480 over the
    # true sizes, 32^2 - 32 = 992 over the predicted size; F = 2 * 480 / (480 + 992)
    assert adapted_rand(true, merged)["adapted_rand_error"] == pytest.approx(1 - 960 / 1472)
    voi = our_voi(true, merged)  # in bits: one predicted object holding two equal true ones costs 1 bit
    assert voi["voi_merge"] == pytest.approx(1.0) and voi["voi_split"] == pytest.approx(0.0)
    voi = our_voi(merged, true)  # the other way round it is a split
    assert voi["voi_split"] == pytest.approx(1.0) and voi["voi_merge"] == pytest.approx(0.0)
    assert voi["voi"] == pytest.approx(1.0)


def test_label_zero_in_ground_truth_is_ignored():
    rng = np.random.default_rng(3)
    true = np.stack([blobs((20, 20), 5, rng) for _ in range(3)])
    pred = np.roll(true, 1, axis=1)
    noisy = pred.copy()
    noisy[true == 0] = rng.integers(1, 50, size=int((true == 0).sum()))  # anything where the truth is unlabeled
    assert adapted_rand(true, noisy) == adapted_rand(true, pred)
    assert our_voi(true, noisy) == pytest.approx(our_voi(true, pred))
    are, _, _ = adapted_rand_error(true, pred, ignore_labels=(0,))
    assert adapted_rand(true, pred)["adapted_rand_error"] == are
    split, merge = variation_of_information(true, pred, ignore_labels=(0,))
    assert our_voi(true, pred)["voi_split"] == split


# ---------------------------------------------------------------------------------------------- grading


def test_qwk_hand_computed_and_against_sklearn():
    assert quadratic_weighted_kappa([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]) == pytest.approx(1.0)
    # 2 classes, y = [0, 1], p = [1, 1]: O = [[0,1],[0,1]], E = [[0,1],[0,1]] * ... -> kappa 0
    assert quadratic_weighted_kappa([0, 1], [1, 1]) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    p = np.clip(y + rng.integers(-1, 2, 200), 0, 4)
    # hand formula: kappa = 1 - sum(W * O) / sum(W * E), W_ij = (i - j)^2 / (K - 1)^2
    observed = np.zeros((5, 5))
    np.add.at(observed, (y, p), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    weights = (np.subtract.outer(np.arange(5), np.arange(5)) ** 2) / 16
    kappa = 1 - (weights * observed).sum() / (weights * expected).sum()
    assert quadratic_weighted_kappa(y, p, num_classes=5) == pytest.approx(kappa)
    assert quadratic_weighted_kappa(y, p) == pytest.approx(cohen_kappa_score(y, p, weights="quadratic"))


def test_roc_auc_one_vs_rest():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[y] * 0.8 + 0.1
    s = roc_auc_one_vs_rest(y, probs)
    assert s["auc_per_class"] == [1.0, 1.0, 1.0] and s["macro_auc"] == 1.0
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 100)
    probs = rng.dirichlet(np.ones(4), 100)
    s = roc_auc_one_vs_rest(y, probs)
    assert s["macro_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    s = roc_auc_one_vs_rest(np.array([0, 1, 0, 1]), rng.dirichlet(np.ones(3), 4))
    assert math.isnan(s["auc_per_class"][2]) and not math.isnan(s["macro_auc"])


def test_instance_metrics_accept_read_only_memory_maps(tmp_path):
    true = np.zeros((16, 16), np.int32)
    true[2:6, 2:6], true[8:12, 8:12] = 1, 2
    np.save(tmp_path / "true.npy", true)
    mapped = np.load(tmp_path / "true.npy", mmap_mode="r")
    assert not mapped.flags.writeable
    assert panoptic_quality(mapped, mapped)["pq"] == pytest.approx(1.0, abs=1e-5)
    assert aggregated_jaccard_index(mapped, true) == pytest.approx(1.0, abs=1e-5)
