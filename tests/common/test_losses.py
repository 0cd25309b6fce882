"""Losses: hand-computed values, empty masks, gradient direction, 2D/3D, and agreement with MONAI."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss as MonaiDiceLoss
from monai.losses import FocalLoss as MonaiFocalLoss
from monai.losses import TverskyLoss as MonaiTverskyLoss

from common.losses import (
    BoundaryLoss,
    CombinedLoss,
    DiceLoss,
    FocalLoss,
    FocalTverskyLoss,
    FrequencyWeightedDiceLoss,
    TverskyLoss,
    WeightedBCELoss,
    inverse_frequency_weights,
    signed_distance_map,
    signed_distance_maps,
)

SHAPES = {"2d": (2, 12, 10), "3d": (2, 4, 8, 6)}  # (N, *spatial)


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p))


def binary_case():
    """probs 0.8, 0.2, 0.6, 0.1 against target 1, 0, 1, 1 (N=1, C=1, 1x4)."""
    probs = torch.tensor([0.8, 0.2, 0.6, 0.1])
    target = torch.tensor([1.0, 0.0, 1.0, 1.0])
    return logit(probs).float().view(1, 1, 1, 4), target.view(1, 1, 1, 4), probs, target


def random_case(num_classes, spatial, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, *size = spatial
    logits = torch.randn((n, num_classes, *size), generator=g) * 2
    if num_classes == 1:
        target = (torch.rand((n, 1, *size), generator=g) > 0.7).float()
    else:
        target = torch.randint(0, num_classes, (n, *size), generator=g)
    return logits, target


def monai_target(target, num_classes):
    """MONAI wants (N, 1, *S) indices with to_onehot_y, or the binary mask with a channel."""
    return target if num_classes == 1 else target.unsqueeze(1)


# ---------------------------------------------------------------------------------------------------- Dice


def test_dice_hand_computed_binary():
    logits, target, *_ = binary_case()
    # intersection 0.8 + 0.6 + 0.1 = 1.5, sum p = 1.7, sum g = 3, smooth 1: 1 - (3 + 1) / (4.7 + 1)
    assert DiceLoss(smooth=1.0)(logits, target).item() == pytest.approx(1 - 4 / 5.7, abs=1e-6)
    assert DiceLoss(smooth=0.0)(logits, target).item() == pytest.approx(1 - 3 / 4.7, abs=1e-6)


def test_dice_hand_computed_multiclass_with_index_and_onehot_targets():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.25, 0.25]])  # 4 pixels
    logits = torch.log(probs).T.reshape(1, 3, 1, 4)
    target = torch.tensor([0, 1, 2, 1]).view(1, 1, 4)
    # class 0: I=0.7, P=1.5, G=1; class 1: I=1.05, P=1.45, G=2; class 2: I=0.6, P=1.05, G=1
    expected = [2 * 0.7 / 2.5, 2 * 1.05 / 3.45, 2 * 0.6 / 2.05]
    loss = DiceLoss(smooth=0.0)(logits, target)
    assert loss.item() == pytest.approx(1 - np.mean(expected), abs=1e-6)
    onehot = F.one_hot(target, 3).movedim(-1, 1).float()
    assert DiceLoss(smooth=0.0)(logits, onehot).item() == pytest.approx(loss.item(), abs=1e-7)
    fg = DiceLoss(smooth=0.0, include_background=False)(logits, target)
    assert fg.item() == pytest.approx(1 - np.mean(expected[1:]), abs=1e-6)
    weighted = DiceLoss(smooth=0.0, class_weights=[1.0, 2.0, 1.0])(logits, target)
    assert weighted.item() == pytest.approx(1 - (expected[0] + 2 * expected[1] + expected[2]) / 4, abs=1e-6)


@pytest.mark.filterwarnings("ignore:single channel prediction")
@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("num_classes", [1, 4])
@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("include_background", [True, False])
def test_dice_matches_monai(dims, num_classes, batch, include_background):
    logits, target = random_case(num_classes, SHAPES[dims])
    ours = DiceLoss(smooth=1.0, batch=batch, include_background=include_background)(logits, target)
    monai = MonaiDiceLoss(
        sigmoid=num_classes == 1,
        softmax=num_classes > 1,
        to_onehot_y=num_classes > 1,
        batch=batch,
        include_background=include_background,
        smooth_nr=1.0,
        smooth_dr=1.0,
    )(logits, monai_target(target, num_classes))
    assert ours.item() == pytest.approx(monai.item(), abs=1e-5)


def test_dice_class_weights_match_monai_up_to_normalisation():
    logits, target = random_case(4, SHAPES["2d"])
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0])
    ours = DiceLoss(class_weights=weights)(logits, target)
    # MONAI multiplies each class's loss by its weight and takes the plain mean; ours is the weighted mean.
    monai = MonaiDiceLoss(softmax=True, to_onehot_y=True, batch=True, weight=weights, smooth_nr=1.0, smooth_dr=1.0)(
        logits, target.unsqueeze(1)
    )
    assert ours.item() == pytest.approx(monai.item() * 4 / weights.sum().item(), abs=1e-5)


def test_inverse_frequency_weights():
    w = inverse_frequency_weights(torch.tensor([1.0, 3.0]))
    assert w.tolist() == pytest.approx([0.75, 0.25])
    # an absent class takes the largest finite weight instead of infinity
    w = inverse_frequency_weights(torch.tensor([2.0, 0.0, 4.0]))
    assert w.tolist() == pytest.approx([0.4, 0.4, 0.2])
    assert inverse_frequency_weights(torch.zeros(3)).tolist() == pytest.approx([1 / 3] * 3)


def test_frequency_weighted_dice_uses_batch_or_given_counts():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.25, 0.25]])
    logits = torch.log(probs).T.reshape(1, 3, 1, 4)
    target = torch.tensor([0, 1, 2, 1]).view(1, 1, 4)
    dice = np.array([2 * 0.7 / 2.5, 2 * 1.05 / 3.45, 2 * 0.6 / 2.05])
    w = np.array([1.0, 0.5, 1.0]) / 2.5  # batch counts 1, 2, 1
    assert FrequencyWeightedDiceLoss(smooth=0.0)(logits, target).item() == pytest.approx(1 - (w * dice).sum(), abs=1e-6)
    w = np.array([1 / 10, 1 / 5, 1 / 20]) / (1 / 10 + 1 / 5 + 1 / 20)
    given = FrequencyWeightedDiceLoss(class_counts=[10, 5, 20], smooth=0.0)(logits, target)
    assert given.item() == pytest.approx(1 - (w * dice).sum(), abs=1e-6)


# ---------------------------------------------------------------------------------------------------- Focal


def test_binary_focal_hand_computed():
    logits, target, probs, t = binary_case()
    p_t = torch.where(t > 0, probs, 1 - probs)
    expected = (-((1 - p_t) ** 2) * torch.log(p_t)).mean()
    assert FocalLoss(gamma=2.0)(logits, target).item() == pytest.approx(expected.item(), abs=1e-6)
    alpha_t = torch.where(t > 0, 0.25, 0.75)
    expected_alpha = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).mean()
    assert FocalLoss(gamma=2.0, alpha=0.25)(logits, target).item() == pytest.approx(expected_alpha.item(), abs=1e-6)


def test_softmax_focal_gamma_zero_is_cross_entropy():
    logits, target = random_case(5, SHAPES["3d"])
    assert FocalLoss(gamma=0.0)(logits, target).item() == pytest.approx(
        F.cross_entropy(logits, target).item(), abs=1e-5
    )


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("alpha", [None, [0.1, 0.2, 0.3, 0.4]])
def test_softmax_focal_matches_monai(dims, alpha):
    logits, target = random_case(4, SHAPES[dims])
    ours = FocalLoss(gamma=2.0, alpha=alpha)(logits, target)
    monai = MonaiFocalLoss(gamma=2.0, alpha=alpha, use_softmax=True, to_onehot_y=True)(logits, target.unsqueeze(1))
    # MONAI's 'mean' also averages over the class dimension; ours sums classes per pixel.
    assert ours.item() == pytest.approx(monai.item() * 4, rel=1e-5)


@pytest.mark.parametrize("dims", SHAPES)
def test_binary_focal_matches_monai(dims):
    logits, target = random_case(1, SHAPES[dims])
    ours = FocalLoss(gamma=2.0, alpha=0.25)(logits, target)
    monai = MonaiFocalLoss(gamma=2.0, alpha=0.25)(logits, target)
    assert ours.item() == pytest.approx(monai.item(), rel=1e-5)


def test_binary_focal_accepts_numpy_alpha():
    logits, target = random_case(1, SHAPES["2d"])
    assert FocalLoss(alpha=np.float32(0.25))(logits, target).item() == pytest.approx(
        FocalLoss(alpha=0.25)(logits, target).item()
    )


def test_loss_weights_follow_the_logits_device():
    """Buffers made on the CPU are moved to the logits' device (meta stands in for a GPU here)."""
    logits = torch.zeros(2, 1, 4, 4, device="meta")
    target = torch.zeros(2, 1, 4, 4, device="meta")
    assert WeightedBCELoss(pos_weight=10)(logits, target).device.type == "meta"
    assert DiceLoss(class_weights=[1.0])(logits, target).device.type == "meta"


def test_focal_rejects_wrong_alpha():
    logits, target = random_case(3, SHAPES["2d"])
    with pytest.raises(ValueError, match="3 alpha values"):
        FocalLoss(alpha=[0.5, 0.5])(logits, target)


# ---------------------------------------------------------------------------------------------------- Tversky


def test_tversky_hand_computed():
    logits, target, *_ = binary_case()
    # TP = 1.5, FN = 0.2 + 0.4 + 0.9 = 1.5, FP = 0.2 (alpha weights FN, beta FP; Abraham and Khan 2019)
    ti = (1.5 + 1) / (1.5 + 0.7 * 1.5 + 0.3 * 0.2 + 1)
    assert TverskyLoss(alpha=0.7, beta=0.3)(logits, target).item() == pytest.approx(1 - ti, abs=1e-6)
    ftl = FocalTverskyLoss(alpha=0.7, beta=0.3, gamma=4 / 3)(logits, target)
    assert ftl.item() == pytest.approx((1 - ti) ** 0.75, abs=1e-6)
    assert FocalTverskyLoss(gamma=1.0)(logits, target).item() == pytest.approx(1 - ti, abs=1e-6)


def test_tversky_half_half_is_dice():
    logits, target = random_case(3, SHAPES["2d"])
    tversky = TverskyLoss(alpha=0.5, beta=0.5, smooth=0.0)(logits, target)
    assert tversky.item() == pytest.approx(DiceLoss(smooth=0.0)(logits, target).item(), abs=1e-6)


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("num_classes", [1, 3])
def test_tversky_matches_monai(dims, num_classes):
    logits, target = random_case(num_classes, SHAPES[dims])
    ours = TverskyLoss(alpha=0.7, beta=0.3, batch=True)(logits, target)
    monai = MonaiTverskyLoss(  # MONAI's alpha weights false positives, beta false negatives: swapped
        sigmoid=num_classes == 1,
        softmax=num_classes > 1,
        to_onehot_y=num_classes > 1,
        alpha=0.3,
        beta=0.7,
        smooth_nr=1.0,
        smooth_dr=1.0,
        batch=True,
    )(logits, monai_target(target, num_classes))
    assert ours.item() == pytest.approx(monai.item(), abs=1e-5)


# ---------------------------------------------------------------------------------------------------- BCE


def test_weighted_bce_hand_computed():
    logits, target, probs, t = binary_case()
    expected = -(10 * t * torch.log(probs) + (1 - t) * torch.log(1 - probs)).mean()
    assert WeightedBCELoss(pos_weight=10)(logits, target).item() == pytest.approx(expected.item(), abs=1e-6)
    plain = F.binary_cross_entropy_with_logits(logits, target)
    assert WeightedBCELoss(pos_weight=1)(logits, target.view(1, 1, 4)).item() == pytest.approx(plain.item(), abs=1e-7)


# ---------------------------------------------------------------------------------------------------- Boundary


def test_signed_distance_map_hand_computed():
    mask = np.array([[0, 0, 1, 1, 1, 0]], dtype=bool)
    np.testing.assert_allclose(signed_distance_map(mask), [[2, 1, 0, -1, 0, 1]])
    assert not signed_distance_map(np.zeros((4, 4), bool)).any()
    assert not signed_distance_map(np.ones((4, 4), bool)).any()


def test_signed_distance_map_3d_spacing():
    mask = np.zeros((6, 5, 5), bool)
    mask[2:4, 1:4, 1:4] = True
    # isotropic spacing scales the map
    np.testing.assert_allclose(signed_distance_map(mask, spacing=(2, 2, 2)), 2 * signed_distance_map(mask))
    # anisotropic (30, 8, 8) nm: distances along z count 30 per section, in-plane 8 per pixel
    phi = signed_distance_map(mask, spacing=(30, 8, 8))
    np.testing.assert_allclose(phi[:, 2, 2], [60, 30, -8, -8, 30, 60])  # nearest background in-plane: 16 nm
    np.testing.assert_allclose(phi[2, 2, :], [8, 0, -8, 0, 8])


def test_boundary_loss_rewards_the_right_mask():
    target = torch.zeros(1, 16, 16, dtype=torch.long)
    target[0, 4:10, 5:12] = 1
    loss = BoundaryLoss()
    exact = torch.where(F.one_hot(target, 2).movedim(-1, 1) > 0, 8.0, -8.0)
    shifted = torch.roll(exact, shifts=3, dims=-1)
    assert loss(exact, target) < loss(shifted, target)
    # the value is the mean of p * phi over the foreground channel
    phi = torch.from_numpy(signed_distance_map(target[0].numpy() == 1))
    probs = torch.softmax(exact, 1)[0, 1]
    assert loss(exact, target).item() == pytest.approx((probs * phi).mean().item(), abs=1e-6)


def test_boundary_loss_uses_given_distance_maps():
    logits, target = random_case(3, SHAPES["2d"])
    onehot = F.one_hot(target, 3).movedim(-1, 1).float()
    maps = signed_distance_maps(onehot)
    assert BoundaryLoss()(logits, target, dist_map=maps).item() == pytest.approx(BoundaryLoss()(logits, target).item())
    with pytest.raises(ValueError, match="dist_map shape"):
        BoundaryLoss()(logits, target, dist_map=maps[:, :2])


# ---------------------------------------------------------------------------------------------------- all losses

ALL_LOSSES = {
    "dice": DiceLoss,
    "frequency_dice": FrequencyWeightedDiceLoss,
    "focal": FocalLoss,
    "tversky": TverskyLoss,
    "focal_tversky": FocalTverskyLoss,
    "bce": lambda: WeightedBCELoss(pos_weight=10),
    "boundary": BoundaryLoss,
}


# BCE is a binary / multi-label loss: only with one channel
LOSS_CASES = [(name, c) for name in ALL_LOSSES for c in (1, 3) if not (name == "bce" and c > 1)]


@pytest.mark.parametrize("name,num_classes", LOSS_CASES)
@pytest.mark.parametrize("dims", SHAPES)
def test_empty_mask_is_finite_and_pushes_foreground_down(name, dims, num_classes):
    logits, _ = random_case(num_classes, SHAPES[dims])
    logits.requires_grad_(True)
    n, _, *size = logits.shape
    target = torch.zeros((n, 1, *size)) if num_classes == 1 else torch.zeros((n, *size), dtype=torch.long)
    loss = ALL_LOSSES[name]()(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    if name == "boundary":
        # no boundary in an empty mask: the distance map is zero and so is the gradient
        assert loss.item() == 0 and not logits.grad.any()
        return
    # descending the gradient must lower the foreground scores
    foreground_grad = logits.grad[:, 0] if num_classes == 1 else logits.grad[:, 1:].sum(1) - logits.grad[:, 0]
    assert foreground_grad.sum() > 0


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_perfect_prediction_on_empty_mask_has_no_nan(name):
    logits = torch.full((2, 1, 8, 8), -30.0, requires_grad=True)
    loss = ALL_LOSSES[name]()(logits, torch.zeros(2, 1, 8, 8))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name,num_classes", LOSS_CASES)
def test_a_gradient_step_lowers_the_loss(name, num_classes):
    logits, target = random_case(num_classes, SHAPES["2d"], seed=3)
    logits.requires_grad_(True)
    loss_fn = ALL_LOSSES[name]()
    before = loss_fn(logits, target)
    before.backward()
    with torch.no_grad():
        after = loss_fn(logits - 0.5 * logits.grad / logits.grad.abs().max(), target)
    assert after < before


def test_bf16_logits_give_float32_loss():
    logits, target = random_case(3, SHAPES["2d"])
    for loss_fn in (DiceLoss(), FocalLoss(), FocalTverskyLoss()):
        full = loss_fn(logits, target)
        half = loss_fn(logits.bfloat16(), target)
        assert half.dtype == torch.float32
        assert half.item() == pytest.approx(full.item(), abs=2e-2)


def test_shape_mismatch_is_a_clear_error():
    logits, _ = random_case(3, SHAPES["2d"])
    with pytest.raises(ValueError, match="does not match logits"):
        DiceLoss()(logits, torch.zeros(2, 5, 5, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------- combinator


def test_combined_loss_sums_weighted_terms_and_reports_each():
    logits, target = random_case(3, SHAPES["2d"])
    maps = signed_distance_maps(F.one_hot(target, 3).movedim(-1, 1).float())
    combined = CombinedLoss({"dice": (DiceLoss(), 1.0), "focal": (FocalLoss(), 0.5), "boundary": (BoundaryLoss(), 2.0)})
    total, parts = combined(logits, target, dist_map=maps)
    assert set(parts) == {"dice", "focal", "boundary"}
    expected = DiceLoss()(logits, target) + 0.5 * FocalLoss()(logits, target) + 2.0 * BoundaryLoss()(logits, target)
    assert total.item() == pytest.approx(expected.item(), abs=1e-6)
    assert parts["focal"].item() == pytest.approx(FocalLoss()(logits, target).item())
    assert not parts["dice"].requires_grad
    combined.weights["boundary"] = 0.0
    total, _ = combined(logits, target)
    assert total.item() == pytest.approx(
        (DiceLoss()(logits, target) + 0.5 * FocalLoss()(logits, target)).item(), abs=1e-6
    )
    with pytest.raises(ValueError):
        CombinedLoss({})


def test_losses_train_a_tiny_model():
    """A 1x1 conv trained with Dice + Focal separates bright from dark pixels: the losses point the right way."""
    torch.manual_seed(0)
    image = torch.rand(4, 1, 16, 16)
    target = (image > 0.5).long().squeeze(1)
    model = torch.nn.Conv2d(1, 2, 1)
    loss_fn = CombinedLoss({"dice": (DiceLoss(), 1.0), "focal": (FocalLoss(), 1.0)})
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(100):
        optimizer.zero_grad()
        loss, _ = loss_fn(model(image), target)
        loss.backward()
        optimizer.step()
    accuracy = (model(image).argmax(1) == target).float().mean().item()
    assert accuracy > 0.97
    assert math.isfinite(loss.item())


def test_target_forms_give_the_same_loss():
    """Class indices (N, *S), indices with a channel (N, 1, *S) as MONAI gives them, float indices, one-hot."""
    logits, target = random_case(3, SHAPES["2d"])
    expected = FocalLoss()(logits, target).item()
    for form in (target.unsqueeze(1), target.float(), F.one_hot(target, 3).movedim(-1, 1)):
        assert FocalLoss()(logits, form).item() == pytest.approx(expected)
        assert DiceLoss()(logits, form).item() == pytest.approx(DiceLoss()(logits, target).item())


def test_focal_loss_on_image_classification_logits():
    """(N, C) logits with (N,) labels: gamma 0 is cross entropy; with gamma and alpha, the formula by hand."""
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 5), torch.randint(0, 5, (16,))
    assert FocalLoss(gamma=0.0)(logits, labels) == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-6)
    alpha = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])
    p = logits.softmax(1)[torch.arange(16), labels]
    by_hand = (-alpha[labels] * (1 - p) ** 2 * p.log()).mean()
    assert FocalLoss(gamma=2.0, alpha=alpha.tolist())(logits, labels) == pytest.approx(float(by_hand), rel=1e-5)


def test_inverse_frequency_weights_square_root_and_cap_by_hand():
    # counts 1, 4, 100: 1 / sqrt = 1, 0.5, 0.1
    w = inverse_frequency_weights(torch.tensor([1.0, 4.0, 100.0]), power=0.5)
    assert w.tolist() == pytest.approx([1 / 1.6, 0.5 / 1.6, 0.1 / 1.6])
    # capped at 3x the smallest weight: 0.3, 0.3, 0.1
    w = inverse_frequency_weights(torch.tensor([1.0, 4.0, 100.0]), power=0.5, max_ratio=3.0)
    assert w.tolist() == pytest.approx([0.3 / 0.7, 0.3 / 0.7, 0.1 / 0.7])
    given = FrequencyWeightedDiceLoss(class_counts=[1.0, 4.0, 100.0], power=0.5, max_ratio=3.0)
    assert given.class_weights.tolist() == pytest.approx([0.3 / 0.7, 0.3 / 0.7, 0.1 / 0.7])
