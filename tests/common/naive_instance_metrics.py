"""Straightforward per-instance-pair metrics, written from the definitions in HoVer-Net's `stats_utils.py` and
PanNuke-metrics' `run.py`: one boolean mask per instance, every pair compared. Slow on purpose (an independent
reference for tests and for the speed comparison in benchmarks), never used by the scripts."""

import warnings

import numpy as np
from scipy.optimize import linear_sum_assignment


def _ids(labels):
    return [int(i) for i in np.unique(labels) if i != 0]


def pairwise(true, pred):
    """Intersection and union of every (true, pred) pair of instances."""
    t_ids, p_ids = _ids(true), _ids(pred)
    inter = np.zeros((len(t_ids), len(p_ids)))
    union = np.zeros((len(t_ids), len(p_ids)))
    for i, t in enumerate(t_ids):
        t_mask = true == t
        for j, p in enumerate(p_ids):
            p_mask = pred == p
            inter[i, j] = np.logical_and(t_mask, p_mask).sum()
            union[i, j] = np.logical_or(t_mask, p_mask).sum()
    return t_ids, p_ids, inter, union


def naive_match(true, pred, iou_threshold=0.5):
    """(tp, fp, fn, list of matched IoU)."""
    t_ids, p_ids, inter, union = pairwise(true, pred)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    if iou_threshold >= 0.5:
        rows, cols = np.nonzero(iou > iou_threshold)
    else:
        rows, cols = linear_sum_assignment(-iou)
        keep = iou[rows, cols] > iou_threshold
        rows, cols = rows[keep], cols[keep]
    matched = iou[rows, cols]
    tp = len(matched)
    return tp, len(p_ids) - tp, len(t_ids) - tp, matched


def naive_pq(true, pred, iou_threshold=0.5):
    """(dq, sq, pq) as get_fast_pq, NaN when the ground truth is empty (PanNuke-metrics)."""
    if not _ids(true):
        return float("nan"), float("nan"), float("nan")
    tp, fp, fn, matched = naive_match(true, pred, iou_threshold)
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = matched.sum() / (tp + 1.0e-6)
    return dq, sq, dq * sq


def naive_aji(true, pred):
    """get_fast_aji: each true instance takes the prediction of highest IoU (first on ties)."""
    t_ids, p_ids, inter, union = pairwise(true, pred)
    if not t_ids and not p_ids:
        return float("nan")
    total_inter = total_union = 0.0
    used_pred = set()
    paired_true = set()
    if p_ids:
        iou = inter / (union + 1.0e-6)
        for i in range(len(t_ids)):
            j = int(np.argmax(iou[i]))
            if iou[i, j] > 0:
                total_inter += inter[i, j]
                total_union += union[i, j]
                used_pred.add(j)
                paired_true.add(i)
    for i, t in enumerate(t_ids):
        if i not in paired_true:
            total_union += (true == t).sum()
    for j, p in enumerate(p_ids):
        if j not in used_pred:
            total_union += (pred == p).sum()
    return total_inter / total_union


def naive_binarize(x):
    """PanNuke-metrics' binarize: new ids channel by channel, later channels overwrite earlier ones."""
    out = np.zeros(x.shape[:2])
    count = 1
    for c in range(x.shape[2]):
        for value in _ids(x[..., c]):
            inside = x[..., c] == value
            out *= 1 - inside
            out += count * inside
            count += 1
    return out.astype(np.int64)


def naive_pannuke(true, pred, types):
    """PanNuke-metrics run.py: (mPQ, bPQ, per-class PQ list)."""
    mpq_all, bpq_all = [], []
    for i in range(true.shape[0]):
        bpq_all.append(naive_pq(naive_binarize(true[i, ..., :5]), naive_binarize(pred[i, ..., :5]))[2])
        mpq_all.append([naive_pq(true[i, ..., c], pred[i, ..., c])[2] for c in range(5)])
    with warnings.catch_warnings():  # nanmean of all-NaN rows warns, as in run.py
        warnings.simplefilter("ignore", RuntimeWarning)
        mpq_each = [np.nanmean(row) for row in mpq_all]
        per_class = [np.nanmean([row[c] for row in mpq_all]) for c in range(5)]
        tissue_mpq, tissue_bpq = [], []
        for tissue in sorted(set(types)):
            rows = [i for i, t in enumerate(types) if t == tissue]
            tissue_mpq.append(np.nanmean([mpq_each[i] for i in rows]))
            tissue_bpq.append(np.nanmean([bpq_all[i] for i in rows]))
        return np.nanmean(tissue_mpq), np.nanmean(tissue_bpq), per_class
