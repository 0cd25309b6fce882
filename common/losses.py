"""Segmentation losses on logits, batched, 2D or 3D.

Shapes shared by every loss in this module:
- logits: (N, C, *S) with S = (H, W) or (D, H, W).
- C == 1 (binary): sigmoid probabilities; target holds 0/1 (or soft) values, shape (N, 1, *S) or (N, *S).
- C > 1 (multi-class): softmax probabilities; target is class indices (N, *S), or one-hot / soft
  probabilities (N, C, *S), e.g. MixUp targets.

Losses are computed in float32 even under autocast: Dice-style sums over a whole batch overflow fp16.
Every loss is finite on empty masks (smoothing keeps the ratios defined, and the gradient then pushes the
predicted foreground down).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss


def target_like(logits: Tensor, target: Tensor) -> Tensor:
    """The target in the logits' shape (N, C, *S) and float32: one-hot from class indices, a channel added to
    binary masks. Class indices may also come as (N, 1, *S), as MONAI and some loaders give them. S may be
    empty: (N, C) logits of image classification with (N,) labels."""
    if logits.ndim < 2:
        raise ValueError(f"logits must be (N, C, *spatial), got shape {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if num_classes > 1 and target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    if target.ndim == logits.ndim - 1:
        if num_classes == 1:
            target = target.unsqueeze(1)
        else:
            target = F.one_hot(target.long(), num_classes).movedim(-1, 1)
    if target.shape != logits.shape:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}: expected class "
            f"indices {(logits.shape[0], *logits.shape[2:])} or one-hot {tuple(logits.shape)}"
        )
    return target.float()


def probabilities_and_onehot(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Probabilities (sigmoid if C == 1, softmax otherwise) in float32, and the target in the same shape."""
    target = target_like(logits, target)
    logits = logits.float()
    probs = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
    return probs, target


def _reduce_dims(probs: Tensor, batch: bool) -> tuple[int, ...]:
    """Dimensions summed per class: spatial only (one score per sample and class), or batch too."""
    spatial = tuple(range(2, probs.ndim))
    return (0, *spatial) if batch else spatial


def _select_classes(per_class: Tensor, include_background: bool) -> Tensor:
    """Drop class 0 (background) from (..., C) multi-class scores when asked; binary keeps its one channel."""
    if include_background or per_class.shape[-1] == 1:
        return per_class
    return per_class[..., 1:]


def _weighted_class_mean(per_class: Tensor, weights: Tensor | None) -> Tensor:
    """Mean over the last (class) dimension, weighted when weights are given, then over samples."""
    if weights is None:
        return per_class.mean()
    weights = weights.to(per_class)
    return ((per_class * weights).sum(-1) / weights.sum()).mean()


def soft_dice(probs: Tensor, target: Tensor, smooth: float = 1.0, batch: bool = True) -> Tensor:
    """Soft Dice per class, (2 * sum(p * g) + smooth) / (sum(p) + sum(g) + smooth): shape (C,) or (N, C)."""
    dims = _reduce_dims(probs, batch)
    intersection = (probs * target).sum(dims)
    denominator = probs.sum(dims) + target.sum(dims)
    return (2.0 * intersection + smooth) / (denominator + smooth)


def inverse_frequency_weights(class_counts: Tensor, power: float = 1.0, max_ratio: float | None = None) -> Tensor:
    """Class weights 1 / count ** power, normalised to sum to 1.

    power 0.5 (square-root inverse frequency) tempers the weight of very rare classes; max_ratio caps every weight
    at max_ratio times the smallest one. Together they keep one rare class from taking most of the loss.
    A class with count 0 would get an infinite weight; it gets the largest finite weight instead (as MONAI's
    GeneralizedDiceLoss does), so a class absent from a batch still counts but does not dominate.
    """
    counts = class_counts.float()
    weights = counts.pow(-power)
    finite = torch.isfinite(weights)
    if not finite.any():
        return torch.full_like(weights, 1.0 / weights.numel())
    weights = torch.where(finite, weights, weights[finite].max())
    if max_ratio is not None:
        weights = weights.clamp(max=max_ratio * float(weights.min()))
    return weights / weights.sum()


class DiceLoss(nn.Module):
    """1 - soft Dice, averaged over classes (optionally weighted) and, with batch=False, over samples.

    batch=True (default) sums intersections over the whole batch before the ratio ("batch Dice", as in
    nnU-Net), which keeps tiles with an absent class from dominating the loss.
    """

    def __init__(
        self,
        smooth: float = 1.0,
        class_weights: Sequence[float] | Tensor | None = None,
        include_background: bool = True,
        batch: bool = True,
    ):
        super().__init__()
        self.smooth = smooth
        self.include_background = include_background
        self.batch = batch
        self.register_buffer(
            "class_weights", None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        )

    def class_weights_for(self, target_onehot: Tensor) -> Tensor | None:
        return self.class_weights

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        probs, onehot = probabilities_and_onehot(logits, target)
        dice = soft_dice(probs, onehot, self.smooth, self.batch)
        weights = self.class_weights_for(onehot)
        if weights is not None:
            if weights.numel() != logits.shape[1]:
                raise ValueError(f"{weights.numel()} class weights given for {logits.shape[1]} classes")
            weights = _select_classes(weights, self.include_background)
        return 1.0 - _weighted_class_mean(_select_classes(dice, self.include_background), weights)


class FrequencyWeightedDiceLoss(DiceLoss):
    """Dice loss with class weights 1 / frequency ** power (inverse_frequency_weights, optionally capped at
    max_ratio times the smallest): from given class_counts (e.g. pixel counts over the training set), or, when none
    are given, from the pixel counts of each batch's target."""

    def __init__(
        self,
        class_counts: Sequence[float] | Tensor | None = None,
        smooth: float = 1.0,
        include_background: bool = True,
        batch: bool = True,
        power: float = 1.0,
        max_ratio: float | None = None,
    ):
        super().__init__(smooth=smooth, include_background=include_background, batch=batch)
        self.power, self.max_ratio = power, max_ratio
        if class_counts is not None:
            counts = torch.as_tensor(class_counts, dtype=torch.float32)
            self.class_weights = inverse_frequency_weights(counts, power, max_ratio)

    def class_weights_for(self, target_onehot: Tensor) -> Tensor:
        if self.class_weights is not None:
            return self.class_weights
        counts = target_onehot.detach().sum(dim=(0, *range(2, target_onehot.ndim)))
        return inverse_frequency_weights(counts, self.power, self.max_ratio)


def softmax_focal_loss(
    logits: Tensor, target: Tensor, gamma: float = 2.0, alpha: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """Multi-class focal loss (Lin et al. 2017): -sum_c alpha_c * t_c * (1 - p_c)^gamma * log p_c per pixel.

    target: class indices (N, *S) or one-hot / soft (N, C, *S); alpha: per-class weights (C,) or None.
    reduction 'mean' averages over pixels (and samples), 'sum' sums, 'none' returns (N, *S).
    """
    onehot = target_like(logits, target)
    log_p = F.log_softmax(logits.float(), dim=1)
    loss = -onehot * (1.0 - log_p.exp()).pow(gamma) * log_p
    if alpha is not None:
        alpha = torch.as_tensor(alpha, dtype=loss.dtype, device=loss.device)
        loss = loss * alpha.view(1, -1, *([1] * (loss.ndim - 2)))
    loss = loss.sum(1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class FocalLoss(nn.Module):
    """Focal loss: binary (C == 1) through torchvision.ops.sigmoid_focal_loss, multi-class as softmax focal.

    alpha: binary, the weight of the positive class (RetinaNet uses 0.25; None disables it);
    multi-class, a sequence of C per-class weights, or None.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | Sequence[float] | None = None):
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if logits.shape[1] == 1:
            target = target_like(logits, target)
            if self.alpha is not None and not isinstance(self.alpha, numbers.Real):
                raise ValueError(f"binary focal loss takes one alpha (weight of the positive class), got {self.alpha}")
            alpha = -1.0 if self.alpha is None else float(self.alpha)
            return sigmoid_focal_loss(logits.float(), target, alpha=alpha, gamma=self.gamma, reduction="mean")
        alpha = None
        if self.alpha is not None:
            alpha = torch.as_tensor(self.alpha, dtype=torch.float32)
            if alpha.numel() != logits.shape[1]:
                raise ValueError(f"multi-class focal loss needs {logits.shape[1]} alpha values, got {alpha.numel()}")
        return softmax_focal_loss(logits, target, gamma=self.gamma, alpha=alpha)


def tversky_index(
    probs: Tensor, target: Tensor, alpha: float = 0.7, beta: float = 0.3, smooth: float = 1.0, batch: bool = True
) -> Tensor:
    """Tversky index per class as in Abraham and Khan 2019: (TP + s) / (TP + alpha * FN + beta * FP + s).

    Note the convention: alpha weights false negatives and beta false positives (MONAI's TverskyLoss uses the
    opposite). alpha = beta = 0.5 gives soft Dice.
    """
    dims = _reduce_dims(probs, batch)
    tp = (probs * target).sum(dims)
    fn = ((1.0 - probs) * target).sum(dims)
    fp = (probs * (1.0 - target)).sum(dims)
    return (tp + smooth) / (tp + alpha * fn + beta * fp + smooth)


class TverskyLoss(nn.Module):
    """1 - Tversky index, averaged over classes (alpha weights false negatives, beta false positives)."""

    def __init__(
        self,
        alpha: float = 0.7,
        beta: float = 0.3,
        smooth: float = 1.0,
        include_background: bool = True,
        batch: bool = True,
    ):
        super().__init__()
        self.alpha, self.beta, self.smooth = alpha, beta, smooth
        self.include_background, self.batch = include_background, batch

    def per_class(self, logits: Tensor, target: Tensor) -> Tensor:
        probs, onehot = probabilities_and_onehot(logits, target)
        ti = tversky_index(probs, onehot, self.alpha, self.beta, self.smooth, self.batch)
        return 1.0 - _select_classes(ti, self.include_background)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.per_class(logits, target).mean()


class FocalTverskyLoss(TverskyLoss):
    """Focal Tversky loss (Abraham and Khan 2019): mean over classes of (1 - TI_c)^(1 / gamma).

    Paper defaults: alpha 0.7 (false negatives), beta 0.3 (false positives), gamma 4/3. The base is clamped
    away from 0 because d/dx x^(1/gamma) is infinite at 0 for gamma > 1 (a perfect empty prediction).
    """

    def __init__(
        self,
        alpha: float = 0.7,
        beta: float = 0.3,
        gamma: float = 4.0 / 3.0,
        smooth: float = 1.0,
        include_background: bool = True,
        batch: bool = True,
    ):
        super().__init__(alpha, beta, smooth, include_background, batch)
        self.gamma = gamma

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.per_class(logits, target).clamp_min(1e-6).pow(1.0 / self.gamma).mean()


class WeightedBCELoss(nn.Module):
    """BCE with logits and pos_weight (one number, or one per channel), on the module's target conventions.

    pos_weight > 1 raises the cost of missed foreground: the usual choice for sparse objects such as
    stress granules (pos_weight about background / foreground pixel ratio, or 10).
    """

    def __init__(self, pos_weight: float | Sequence[float] = 1.0):
        super().__init__()
        self.register_buffer("pos_weight", torch.as_tensor(pos_weight, dtype=torch.float32).reshape(-1))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        target = target_like(logits, target)
        pos_weight = self.pos_weight.to(logits.device).view(-1, *([1] * (logits.ndim - 2)))
        return F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=pos_weight)


def signed_distance_map(mask: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Signed distance to the boundary of a binary mask (Kervadec et al. 2019, their `one_hot2dist`).

    Outside the object: Euclidean distance to it (positive). Inside: -(distance to the background - 1), so the
    object's own boundary pixels are 0. An empty (or full) mask has no boundary and gives zeros.
    spacing: voxel size per axis for anisotropic data, e.g. (30, 8, 8) nm; distances are then in those units
    and the "- 1" becomes one step along the finest axis, so an isotropic spacing s gives s times the map.
    """
    inside = np.asarray(mask, dtype=bool)
    if not inside.any() or inside.all():
        return np.zeros(inside.shape, dtype=np.float32)
    outside = ~inside
    step = 1.0 if spacing is None else float(min(spacing))
    distance_out = ndimage.distance_transform_edt(outside, sampling=spacing)
    distance_in = ndimage.distance_transform_edt(inside, sampling=spacing)
    return (distance_out * outside - (distance_in - step) * inside).astype(np.float32)


def signed_distance_maps(target_onehot: Tensor, spacing: Sequence[float] | None = None) -> Tensor:
    """signed_distance_map for every sample and channel of (N, C, *S) targets (soft targets threshold at 0.5).

    Runs on the CPU with scipy; data loaders may compute it in their workers and pass it to BoundaryLoss.
    """
    masks = (target_onehot.detach() > 0.5).cpu().numpy()
    maps = np.stack([np.stack([signed_distance_map(m, spacing) for m in sample]) for sample in masks])
    return torch.from_numpy(maps).to(target_onehot.device)


class BoundaryLoss(nn.Module):
    """Boundary loss (Kervadec et al. 2019): mean of probability * signed distance map of the target.

    Minimal (negative) when the predicted foreground fills the objects and nothing else. Background (class 0)
    is left out for multi-class outputs unless include_background. Pass `dist_map` (N, C, *S) to reuse maps
    computed in the data loader; otherwise they are computed from the target on the CPU.
    The paper ramps its weight up against a region loss (Dice) during training.
    """

    extra_inputs = ("dist_map",)

    def __init__(self, include_background: bool = False, spacing: Sequence[float] | None = None):
        super().__init__()
        self.include_background = include_background
        self.spacing = spacing

    def forward(self, logits: Tensor, target: Tensor, dist_map: Tensor | None = None) -> Tensor:
        probs, onehot = probabilities_and_onehot(logits, target)
        if dist_map is None:
            dist_map = signed_distance_maps(onehot, self.spacing)
        if dist_map.shape != probs.shape:
            raise ValueError(f"dist_map shape {tuple(dist_map.shape)} does not match logits {tuple(probs.shape)}")
        if not self.include_background and probs.shape[1] > 1:
            probs, dist_map = probs[:, 1:], dist_map[:, 1:]
        return (probs * dist_map.to(probs)).mean()


class CombinedLoss(nn.Module):
    """Weighted sum of named losses: returns (total, {name: detached term}) so each term can be logged.

        loss = CombinedLoss({"dice": (DiceLoss(), 1.0), "focal": (FocalLoss(), 1.0)})
        total, terms = loss(logits, target)

    Extra inputs a term declares in `extra_inputs` (BoundaryLoss: dist_map) are passed on when given.
    `weights` may be changed during training, e.g. to ramp up the boundary term.
    """

    def __init__(self, terms: Mapping[str, tuple[nn.Module, float]]):
        super().__init__()
        if not terms:
            raise ValueError("CombinedLoss needs at least one term")
        self.terms = nn.ModuleDict({name: module for name, (module, _) in terms.items()})
        self.weights = {name: float(weight) for name, (_, weight) in terms.items()}

    def forward(self, logits: Tensor, target: Tensor, **extra: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        total = logits.new_zeros((), dtype=torch.float32)
        parts = {}
        for name, term in self.terms.items():
            inputs = {key: extra[key] for key in getattr(term, "extra_inputs", ()) if key in extra}
            value = term(logits, target, **inputs)
            total = total + self.weights[name] * value
            parts[name] = value.detach()
        return total, parts
