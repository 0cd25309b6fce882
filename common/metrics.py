"""Metrics for semantic segmentation, instance segmentation, 3D label volumes and grading.

- ConfusionMatrix: streaming pixel counts in torch (GPU-friendly, summed across DDP ranks).
- Instance matching, panoptic quality and AJI on label images, through one sparse contingency table of
  overlapping pixels: cost grows with the number of pixels, not with the number of instance pairs.
- PanNuke's bPQ / mPQ aggregation, exactly as the PanNuke-metrics script computes it.
- Adapted Rand error and variation of information: scikit-image's implementations.
- Quadratic weighted kappa and one-vs-rest ROC AUC: scikit-learn's implementations.

Convention: a score whose denominator is empty (no ground truth, no prediction) is NaN, not 0 or 1, and
averages skip NaN (nan-mean), as PanNuke-metrics does for classes absent from an image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.metrics import adapted_rand_error as _skimage_adapted_rand_error
from skimage.metrics import variation_of_information as _skimage_variation_of_information
from sklearn.metrics import cohen_kappa_score, roc_auc_score

# Tissue names of PanNuke's types.npy, in the order PanNuke-metrics reports them.
PANNUKE_TISSUES = (
    "Adrenal_gland",
    "Bile-duct",
    "Bladder",
    "Breast",
    "Cervix",
    "Colon",
    "Esophagus",
    "HeadNeck",
    "Kidney",
    "Liver",
    "Lung",
    "Ovarian",
    "Pancreatic",
    "Prostate",
    "Skin",
    "Stomach",
    "Testis",
    "Thyroid",
    "Uterus",
)
PANNUKE_CLASSES = ("Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial")


def nanmean(values) -> float:
    """Mean over the finite values; NaN (without a warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _ratio(numerator, denominator):
    """Elementwise numerator / denominator with NaN where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


# ----------------------------------------------------------------------------------------------------------------
# Pixel metrics
# ----------------------------------------------------------------------------------------------------------------


class ConfusionMatrix:
    """Streaming confusion matrix (rows: target class, columns: predicted class) over a whole dataset.

        cm = ConfusionMatrix(num_classes=6, device="cuda")
        for ...: cm.update(logits.argmax(1), target)
        cm.all_reduce()          # under DDP: sum the counts of every rank (no-op otherwise)
        scores = cm.compute()    # per class and mean: dice, iou, precision, recall, f1, accuracy, specificity

    For a binary task use num_classes=2 and pred = probability > 0.5. Pixels whose target is ignore_index are
    not counted. Pixel-level F1 equals Dice; both names are reported.
    """

    METRICS = ("dice", "iou", "precision", "recall", "f1", "accuracy", "specificity")

    def __init__(self, num_classes: int, device: torch.device | str | None = None, ignore_index: int | None = None):
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (binary: 2), got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred and target: class indices of the same shape (any number of dimensions)."""
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} does not match target {tuple(target.shape)}")
        for name, values in (("pred", pred), ("target", target)):
            if values.is_floating_point() and not torch.equal(values, values.round()):
                raise ValueError(f"{name} must hold class indices; got fractional {values.dtype} values")
        pred = pred.reshape(-1).to(self.matrix.device, torch.int64)
        target = target.reshape(-1).to(self.matrix.device, torch.int64)
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            pred, target = pred[keep], target[keep]
        k = self.num_classes
        if target.numel() and (
            min(int(pred.min()), int(target.min())) < 0 or max(int(pred.max()), int(target.max())) >= k
        ):
            raise ValueError(
                f"class indices must lie in 0..{k - 1}; got pred in "
                f"{int(pred.min())}..{int(pred.max())}, target in {int(target.min())}..{int(target.max())}"
            )
        self.matrix += torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the counts over DDP ranks (call once, after the last update, on every rank)."""
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl" and self.matrix.device.type != "cuda":
                on_gpu = self.matrix.to(f"cuda:{torch.cuda.current_device()}")  # NCCL reduces CUDA tensors only
                dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
                self.matrix.copy_(on_gpu)
            else:
                dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)
        return self

    def compute(self) -> dict:
        """Per-class lists, `mean_<metric>` over all classes and `fg_mean_<metric>` over classes 1..C-1 (NaN-skipping).

        `overall_accuracy` is the fraction of correctly classified pixels. A per-class score with an empty
        denominator (class absent from target and prediction) is NaN.
        """
        m = self.matrix.cpu().double().numpy()  # MPS has no float64
        tp = np.diag(m)
        fp = m.sum(0) - tp
        fn = m.sum(1) - tp
        total = m.sum()
        tn = total - tp - fp - fn
        per_class = {
            "dice": _ratio(2 * tp, 2 * tp + fp + fn),
            "iou": _ratio(tp, tp + fp + fn),
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
            "accuracy": _ratio(tp + tn, np.full_like(tp, total)),
            "specificity": _ratio(tn, tn + fp),
        }
        per_class["f1"] = per_class["dice"]
        scores: dict = {"num_pixels": int(total), "overall_accuracy": float(_ratio(tp.sum(), total))}
        for name in self.METRICS:
            values = per_class[name]
            scores[name] = [float(v) for v in values]
            scores[f"mean_{name}"] = nanmean(values)
            scores[f"fg_mean_{name}"] = nanmean(values[1:])
        return scores


# ----------------------------------------------------------------------------------------------------------------
# Instance metrics
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class InstanceOverlaps:
    """Every pair of overlapping instances of two label images (instances numbered 1..n after relabelling)."""

    true_areas: np.ndarray  # (n_true,) pixel counts of true instances 1..n_true
    pred_areas: np.ndarray  # (n_pred,)
    true_index: np.ndarray  # (n_pairs,) 0-based index of the true instance of each overlapping pair
    pred_index: np.ndarray  # (n_pairs,)
    intersection: np.ndarray  # (n_pairs,) overlapping pixels of each pair
    true_ids: np.ndarray  # original ids, true_ids[i] is instance i
    pred_ids: np.ndarray

    @property
    def union(self) -> np.ndarray:
        return self.true_areas[self.true_index] + self.pred_areas[self.pred_index] - self.intersection

    @property
    def iou(self) -> np.ndarray:
        return self.intersection / self.union


def _label_image(labels: np.ndarray, name: str) -> np.ndarray:
    """An integer label image; float images holding whole numbers (PanNuke's masks) are converted."""
    if np.issubdtype(labels.dtype, np.floating):
        if not np.array_equal(labels, np.round(labels)):
            raise ValueError(f"{name} labels must be an integer label image, got non-integral {labels.dtype} values")
        labels = labels.astype(np.int64)
    elif labels.dtype == bool:
        labels = labels.astype(np.uint8)
    elif not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} labels must be an integer label image, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} labels must be >= 0 (0 = background), found {labels.min()}")
    return labels


# ids up to this use a lookup table (one bincount, 8 bytes per possible id); larger ids are sorted instead
_LOOKUP_LIMIT = 1 << 24


def _sequential(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat int64 labels renumbered 1..n in the order of their ids (0 stays 0), areas (n,), original ids (n,))."""
    flat = labels.ravel()
    top = int(flat.max(initial=0))
    if top < _LOOKUP_LIMIT:
        counts = np.bincount(flat, minlength=1)
        present = counts > 0
        present[0] = False
        lookup = np.cumsum(present) * present  # id -> its rank among the present ids, absent ids (and 0) -> 0
        return lookup[flat], counts[present].astype(np.int64), np.flatnonzero(present).astype(np.int64)
    ids, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if ids[0] != 0:  # no background: shift so the first id becomes 1
        return inverse.astype(np.int64) + 1, counts.astype(np.int64), ids.astype(np.int64)
    return inverse.astype(np.int64), counts[1:].astype(np.int64), ids[1:].astype(np.int64)


def instance_overlaps(true: np.ndarray, pred: np.ndarray) -> InstanceOverlaps:
    """One pass over both label images (any dimension, 0 = background): areas and all overlapping pairs.

    Each pixel's pair of instances becomes one code, true * (n_pred + 1) + pred. In raster order a pair repeats
    over runs of pixels (an instance's row), so only run starts are sorted: a few hundred thousand codes on a
    2048 x 2048 image with 5,000 instances, instead of four million pixels."""
    true = np.asarray(true)
    pred = np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"label images differ in shape: true {true.shape}, pred {pred.shape}")
    true_seq, true_areas, true_ids = _sequential(_label_image(true, "true"))
    pred_seq, pred_areas, pred_ids = _sequential(_label_image(pred, "pred"))
    true_index = pred_index = intersection = np.zeros(0, dtype=np.int64)
    if true_areas.size and pred_areas.size:
        codes = true_seq * (pred_areas.size + 1) + pred_seq
        starts = np.flatnonzero(np.concatenate(([True], codes[1:] != codes[:-1])))
        lengths = np.diff(np.append(starts, codes.size))
        pair_codes, run_pair = np.unique(codes[starts], return_inverse=True)
        counts = np.bincount(run_pair.ravel(), weights=lengths).astype(np.int64)
        true_of, pred_of = np.divmod(pair_codes, pred_areas.size + 1)
        keep = (true_of > 0) & (pred_of > 0)  # codes are sorted: pairs come ordered by (true, pred)
        true_index, pred_index, intersection = true_of[keep] - 1, pred_of[keep] - 1, counts[keep]
    return InstanceOverlaps(
        true_areas=true_areas,
        pred_areas=pred_areas,
        true_index=true_index,
        pred_index=pred_index,
        intersection=intersection,
        true_ids=true_ids,
        pred_ids=pred_ids,
    )


@dataclass
class InstanceMatch:
    """One-to-one matching of true and predicted instances at an IoU threshold."""

    tp: int
    fp: int
    fn: int
    matched_true: np.ndarray  # original ids of matched true instances
    matched_pred: np.ndarray  # original ids of the predicted instance each is matched to
    matched_iou: np.ndarray

    @property
    def precision(self) -> float:
        return float(_ratio(self.tp, self.tp + self.fp))

    @property
    def recall(self) -> float:
        return float(_ratio(self.tp, self.tp + self.fn))

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN) = TP / (TP + (FP + FN) / 2), CellSAM's F1."""
        return float(_ratio(self.tp, self.tp + 0.5 * (self.fp + self.fn)))

    @property
    def mean_iou(self) -> float:
        """Mean IoU of the matched pairs (NaN when nothing matched)."""
        return float(self.matched_iou.mean()) if self.tp else float("nan")

    def as_dict(self) -> dict:
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "mean_matched_iou": self.mean_iou,
        }


def _match(overlaps: InstanceOverlaps, iou_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Matched pairs (true index, pred index, IoU) with IoU > threshold, as HoVer-Net's `get_fast_pq` pairs them.

    At 0.5 and above a true instance can overlap at most one prediction by more than half of their union, so
    the pairs above the threshold are unique as they stand. Below 0.5 pairs compete: the Hungarian algorithm
    picks the assignment of largest total IoU over all overlapping pairs, and pairs at or below the
    threshold are dropped afterwards. The assignment is solved separately on each connected group of
    overlapping instances (the total is a sum over groups), so large images stay fast.
    """
    iou = overlaps.iou
    if iou_threshold >= 0.5 or iou.size == 0:
        keep = iou > iou_threshold
        return overlaps.true_index[keep], overlaps.pred_index[keep], iou[keep]
    n_true = overlaps.true_areas.size
    graph = coo_matrix(
        (np.ones(iou.size), (overlaps.true_index, n_true + overlaps.pred_index)),
        shape=(n_true + overlaps.pred_areas.size,) * 2,
    )
    _, group_of = connected_components(graph, directed=False)
    pair_group = group_of[overlaps.true_index]
    order = np.argsort(pair_group, kind="stable")
    matched = []
    for pairs in np.split(order, np.flatnonzero(np.diff(pair_group[order])) + 1):
        rows, row_of = np.unique(overlaps.true_index[pairs], return_inverse=True)
        cols, col_of = np.unique(overlaps.pred_index[pairs], return_inverse=True)
        group_iou = np.zeros((rows.size, cols.size))
        group_iou[row_of, col_of] = iou[pairs]
        r, c = linear_sum_assignment(-group_iou)
        keep = group_iou[r, c] > iou_threshold
        matched.append((rows[r[keep]], cols[c[keep]], group_iou[r[keep], c[keep]]))
    t, p, matched_iou = (np.concatenate(parts) for parts in zip(*matched, strict=True))
    return t, p, matched_iou


def match_instances(
    true: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5, overlaps: InstanceOverlaps | None = None
) -> InstanceMatch:
    """Match the instances of two label images one to one at IoU > iou_threshold: TP, FP, FN, precision,
    recall, F1 and the mean IoU of the matches (`.as_dict()` for a report). overlaps: instance_overlaps(true,
    pred) when the caller has it already (several thresholds, PQ and AJI of one pair: counted once)."""
    overlaps = instance_overlaps(true, pred) if overlaps is None else overlaps
    t, p, iou = _match(overlaps, iou_threshold)
    tp = int(t.size)
    return InstanceMatch(
        tp=tp,
        fp=int(overlaps.pred_areas.size - tp),
        fn=int(overlaps.true_areas.size - tp),
        matched_true=overlaps.true_ids[t],
        matched_pred=overlaps.pred_ids[p],
        matched_iou=iou,
    )


def panoptic_quality(
    true: np.ndarray,
    pred: np.ndarray,
    iou_threshold: float = 0.5,
    absent_is_nan: bool = True,
    overlaps: InstanceOverlaps | None = None,
) -> dict:
    """Panoptic quality of one label image as HoVer-Net's `get_fast_pq` (used by PanNuke-metrics) computes it.

    DQ = TP / (TP + FP/2 + FN/2), SQ = sum of matched IoU / (TP + 1e-6), PQ = DQ * SQ, matches at IoU > 0.5.
    When the ground truth has no instance, all three are NaN (PanNuke's rule for an absent class, so that
    nan-means skip it); with absent_is_nan=False they are 0 if anything was predicted, as `get_fast_pq` gives.
    Nothing in either image is NaN either way.
    """
    match = match_instances(true, pred, iou_threshold, overlaps)
    counts = {"tp": match.tp, "fp": match.fp, "fn": match.fn}
    if match.tp + match.fn == 0:
        value = float("nan") if absent_is_nan or match.fp == 0 else 0.0
        return {"dq": value, "sq": value, "pq": value, **counts}
    dq = match.tp / (match.tp + 0.5 * match.fp + 0.5 * match.fn)
    sq = float(match.matched_iou.sum()) / (match.tp + 1.0e-6)
    return {"dq": dq, "sq": sq, "pq": dq * sq, **counts}


def aggregated_jaccard_index(true: np.ndarray, pred: np.ndarray, overlaps: InstanceOverlaps | None = None) -> float:
    """AJI (Kumar et al. 2017) as HoVer-Net's `get_fast_aji` computes it.

    Each true instance is paired with the prediction of highest IoU (a prediction may be used more than once);
    AJI = sum of paired intersections / (sum of paired unions + areas of unpaired true and predicted
    instances). NaN when both images are empty. overlaps: as for match_instances.
    """
    overlaps = instance_overlaps(true, pred) if overlaps is None else overlaps
    n_true, n_pred = overlaps.true_areas.size, overlaps.pred_areas.size
    if n_true == 0 and n_pred == 0:
        return float("nan")
    union = overlaps.union
    score = overlaps.intersection / (union + 1.0e-6)  # HoVer-Net's tie-breaking score
    # Pairs are sorted by (true, pred): for each true instance keep the highest score, lowest pred id on ties.
    order = np.lexsort((overlaps.pred_index, -score, overlaps.true_index))
    first = np.ones(order.size, dtype=bool)
    first[1:] = overlaps.true_index[order][1:] != overlaps.true_index[order][:-1]
    best = order[first]
    paired_true, paired_pred = overlaps.true_index[best], overlaps.pred_index[best]
    inter = float(overlaps.intersection[best].sum())
    total_union = float(union[best].sum())
    unpaired_true = np.setdiff1d(np.arange(n_true), paired_true)
    unpaired_pred = np.setdiff1d(np.arange(n_pred), paired_pred)
    total_union += float(overlaps.true_areas[unpaired_true].sum() + overlaps.pred_areas[unpaired_pred].sum())
    return inter / total_union


# ----------------------------------------------------------------------------------------------------------------
# PanNuke aggregation
# ----------------------------------------------------------------------------------------------------------------


def pannuke_binarize(masks: np.ndarray) -> np.ndarray:
    """Merge PanNuke's per-class instance channels (H, W, C) into one instance map, as PanNuke-metrics'
    `binarize`: instances get new ids channel by channel, a later channel wins where channels overlap."""
    out = np.zeros(masks.shape[:2], dtype=np.int64)
    offset = 0
    for channel in range(masks.shape[2]):
        labels, areas, _ = _sequential(_label_image(np.asarray(masks[..., channel]), "mask"))  # ids 1..n by id
        labels = labels.reshape(out.shape)
        inside = labels > 0
        out[inside] = labels[inside] + offset
        offset += areas.size
    return out


def pannuke_tile_pq(true_masks: np.ndarray, pred_masks: np.ndarray) -> tuple[np.ndarray, float]:
    """PQ of one PanNuke tile (H, W, 5 or 6): per class (5 values) and binary, as PanNuke-metrics' `run.py`:
    NaN where the ground truth holds a single value (class absent, or one instance filling the tile)."""
    true_i = np.asarray(true_masks)[..., :5].astype(np.int64)
    pred_i = np.asarray(pred_masks)[..., :5].astype(np.int64)
    class_pq = np.full(5, np.nan)
    binary_pq = float("nan")
    true_binary = pannuke_binarize(true_i)
    if true_binary.min() != true_binary.max():
        binary_pq = panoptic_quality(true_binary, pannuke_binarize(pred_i))["pq"]
    for c in range(5):
        if true_i[..., c].min() != true_i[..., c].max():
            class_pq[c] = panoptic_quality(true_i[..., c], pred_i[..., c])["pq"]
    return class_pq, binary_pq


def pannuke_aggregate(class_pq: np.ndarray, binary_pq: np.ndarray, types: Sequence[str]) -> dict:
    """PanNuke's aggregation of per-tile scores (from `pannuke_tile_pq`): mPQ of a tile = nan-mean over its
    classes; per tissue = nan-mean over its tiles; reported mPQ and bPQ = nan-mean over tissues; per-class PQ =
    nan-mean over all tiles."""
    class_pq = np.asarray(class_pq, dtype=np.float64).reshape(-1, 5)
    binary_pq = np.asarray(binary_pq, dtype=np.float64).reshape(-1)
    types = [str(t) for t in types]
    if not len(types) == len(class_pq) == len(binary_pq):
        raise ValueError(f"{len(types)} tissue types given for {len(class_pq)} tiles")
    mpq_per_tile = np.array([nanmean(row) for row in class_pq])
    tissues = {}
    for tissue in dict.fromkeys(types):  # first-seen order
        rows = [i for i, t in enumerate(types) if t == tissue]
        tissues[tissue] = {"mpq": nanmean(mpq_per_tile[rows]), "bpq": nanmean(binary_pq[rows]), "tiles": len(rows)}
    return {
        "mpq": nanmean([s["mpq"] for s in tissues.values()]),
        "bpq": nanmean([s["bpq"] for s in tissues.values()]),
        "pq_per_class": {name: nanmean(class_pq[:, c]) for c, name in enumerate(PANNUKE_CLASSES)},
        "per_tissue": tissues,
        "mpq_per_tile": mpq_per_tile.tolist(),
        "bpq_per_tile": binary_pq.tolist(),
        "pq_per_tile_and_class": class_pq.tolist(),
    }


def pannuke_panoptic_quality(true_masks: np.ndarray, pred_masks: np.ndarray, types: Sequence[str]) -> dict:
    """PanNuke's official scores (PanNuke-metrics `run.py`) for a stack of tiles.

    true_masks, pred_masks: (N, H, W, 6) or (N, H, W, 5) PanNuke masks (channels 0-4: instance ids of
    Neoplastic, Inflammatory, Connective, Dead, Epithelial; a 6th background channel is ignored).
    types: the tissue name of each tile. See `pannuke_tile_pq` and `pannuke_aggregate`; to score tiles as they
    are predicted without holding the stack, call those two directly.
    """
    true_masks = np.asarray(true_masks)
    pred_masks = np.asarray(pred_masks)
    if true_masks.shape[:3] != pred_masks.shape[:3] or true_masks.ndim != 4 or pred_masks.ndim != 4:
        raise ValueError(
            f"expected (N, H, W, 6) masks of equal size, got true {true_masks.shape}, pred {pred_masks.shape}"
        )
    if min(true_masks.shape[3], pred_masks.shape[3]) < 5:
        raise ValueError(f"PanNuke masks need 5 class channels, got true {true_masks.shape}, pred {pred_masks.shape}")
    if len(types) != true_masks.shape[0]:
        raise ValueError(f"{len(types)} tissue types given for {true_masks.shape[0]} tiles")
    scores = [pannuke_tile_pq(true_masks[i], pred_masks[i]) for i in range(true_masks.shape[0])]
    class_pq = np.array([s[0] for s in scores]).reshape(-1, 5)
    return pannuke_aggregate(class_pq, np.array([s[1] for s in scores]), types)


# ----------------------------------------------------------------------------------------------------------------
# 3D label volumes (connectomics)
# ----------------------------------------------------------------------------------------------------------------


def adapted_rand(true: np.ndarray, pred: np.ndarray) -> dict:
    """Adapted Rand error (SNEMI3D): 1 - F-score of the Rand split and merge scores, counted over pairs of
    voxels (sum n_ij^2 - n), with precision and recall as scikit-image's `adapted_rand_error` (used here)
    returns them. Voxels whose ground truth is 0 are ignored. Note: scikit-image's precision falls with split
    errors and its recall with merge errors (the reverse of its docstring, scikit-image issue 6485); read
    the VOI split / merge for which kind of error dominates."""
    error, precision, recall = _skimage_adapted_rand_error(np.asarray(true), np.asarray(pred), ignore_labels=(0,))
    return {"adapted_rand_error": float(error), "precision": float(precision), "recall": float(recall)}


def variation_of_information(true: np.ndarray, pred: np.ndarray) -> dict:
    """Variation of information split into its two conditional entropies, in bits, with voxels whose ground
    truth is 0 ignored (scikit-image's `variation_of_information`).

    split = H(pred | true): high when the prediction cuts true objects apart (over-segmentation);
    merge = H(true | pred): high when one predicted object covers several true ones.
    """
    # scikit-image returns (H(image1 | image0), H(image0 | image1)) for (image0, image1) = (true, pred).
    split, merge = _skimage_variation_of_information(np.asarray(true), np.asarray(pred), ignore_labels=(0,))
    return {"voi_split": float(split), "voi_merge": float(merge), "voi": float(split + merge)}


# ----------------------------------------------------------------------------------------------------------------
# Grading
# ----------------------------------------------------------------------------------------------------------------


def quadratic_weighted_kappa(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int | None = None) -> float:
    """Cohen's kappa with quadratic weights (the APTOS competition metric), scikit-learn's implementation.
    With num_classes, the weight matrix spans every grade 0..num_classes-1 even if some never occur."""
    labels = None if num_classes is None else list(range(num_classes))
    return float(cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic"))


def roc_auc_one_vs_rest(y_true: Sequence[int], probs: np.ndarray) -> dict:
    """One-vs-rest ROC AUC of every class from (N, C) probabilities, and their macro (nan-)mean.
    A class that is absent (or the only one present) has no ROC curve: NaN."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    per_class = []
    for c in range(probs.shape[1]):
        positives = y_true == c
        if positives.all() or not positives.any():
            per_class.append(float("nan"))
        else:
            per_class.append(float(roc_auc_score(positives, probs[:, c])))
    return {"auc_per_class": per_class, "macro_auc": nanmean(per_class)}
