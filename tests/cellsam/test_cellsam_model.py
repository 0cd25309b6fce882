"""cellsam: data reading and checks, boxes from masks, SAM builders and official-format loading, CellFinder,
Hungarian matching and the set losses on hand-made cases."""

import itertools
import math

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from cellsam.data import (
    CellDataset,
    boxes_from_mask,
    find_pairs,
    read_image,
    read_mask,
    write_demo_dataset,
    xyxy_to_cxcywh,
)
from cellsam.model import (
    CellFinder,
    MaskLoss,
    SetCriterion,
    box_region,
    build_sam,
    decode_masks,
    encode,
    focal_class_cost,
    hungarian_match,
)

# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def test_demo_set_reads_back_with_a_few_hundred_touching_cells(tmp_path):
    root = write_demo_dataset(tmp_path / "demo", n_images=8, size=128)
    pairs = find_pairs(root / "images", root / "masks")
    assert [p.name for p in pairs] == [f"img_{i:04d}" for i in range(1, 9)]
    counts, touching = [], 0
    for pair in pairs:
        image, mask = read_image(pair.image), read_mask(pair.mask)
        assert image.shape == (128, 128, 3) and image.dtype == np.float32 and 0 <= image.min() and image.max() <= 255
        counts.append(len(np.unique(mask)) - 1)
        right, down = mask[:, 1:] != mask[:, :-1], mask[1:] != mask[:-1]
        touching += int(
            ((mask[:, 1:] > 0) & (mask[:, :-1] > 0) & right).sum() + ((mask[1:] > 0) & (mask[:-1] > 0) & down).sum()
        )
    assert sum(counts) > 150 and touching > 100  # many cells, and many share a border
    item = CellDataset(pairs[:2], 128, augment=True)[1]
    assert item["image"].shape == (3, 128, 128) and len(item["boxes"]) == len(np.unique(item["mask"])) - 1


def test_boxes_from_a_hand_made_mask():
    mask = np.zeros((10, 12), np.int32)
    mask[2:5, 3:7] = 1
    mask[6:10, 0:2] = 3  # ids need not be consecutive
    ids, boxes = boxes_from_mask(mask)
    assert ids.tolist() == [1, 3] and boxes.tolist() == [[3, 2, 7, 5], [0, 6, 2, 10]]
    cxcywh = xyxy_to_cxcywh(torch.from_numpy(boxes), width=12, height=10)
    assert torch.allclose(cxcywh[0], torch.tensor([5 / 12, 3.5 / 10, 4 / 12, 3 / 10]))


def test_bad_images_and_masks_are_named(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", np.zeros((16, 16), np.uint16))
    tifffile.imwrite(tmp_path / "images" / "b.tif", np.zeros((16, 16), np.uint16))
    np.save(tmp_path / "masks" / "a.npy", np.zeros((16, 16), np.int32))
    with pytest.raises(SystemExit, match=r"1 image\(s\) without a mask .* e.g. b.tif"):
        find_pairs(tmp_path / "images", tmp_path / "masks")
    np.save(tmp_path / "prob.npy", np.full((16, 16), 0.3, np.float32))
    with pytest.raises(SystemExit, match="prob.npy: not an integer label map"):
        read_mask(tmp_path / "prob.npy")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(SystemExit, match=r"rgb.png: a mask must be one integer label map \(H, W\)"):
        read_mask(tmp_path / "rgb.png")
    np.save(tmp_path / "small.npy", np.zeros((8, 16), np.int32))
    with pytest.raises(SystemExit, match=r"small.npy has shape \(8, 16\), its image a.tif has \(16, 16\)"):
        read_mask(tmp_path / "small.npy", (16, 16), tmp_path / "images" / "a.tif")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        find_pairs(tmp_path / "empty", tmp_path / "masks")
    assert np.array_equal(read_mask(tmp_path / "masks" / "a.npy"), np.zeros((16, 16)))
    two = np.stack([np.full((16, 16), 10, np.uint16), np.arange(256, dtype=np.uint16).reshape(16, 16)], -1)
    tifffile.imwrite(tmp_path / "two.tif", two)
    image = read_image(tmp_path / "two.tif")  # (nuclear, whole-cell) -> R, G, and an empty B
    assert image.shape == (16, 16, 3) and image[..., 2].max() == 0 and image[..., 1].max() == 255


# ----------------------------------------------------------------------------------------------------------------
# SAM
# ----------------------------------------------------------------------------------------------------------------


def test_an_official_format_vit_b_checkpoint_loads(tmp_path):
    """An official SAM file is a plain state dict of segment_anything's Sam; made here with random weights."""
    torch.manual_seed(0)
    official = build_sam("vit_b")
    torch.save(official.state_dict(), tmp_path / "sam_vit_b_01ec64.pth")
    loaded = build_sam("vit_b", checkpoint=tmp_path / "sam_vit_b_01ec64.pth")
    for name, tensor in official.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert official.image_encoder.pos_embed.shape == (1, 64, 64, 768)
    with pytest.raises(SystemExit, match="holds a vit_b image encoder, not vit_tiny: pass --sam_size vit_b"):
        build_sam("vit_tiny", checkpoint=tmp_path / "sam_vit_b_01ec64.pth")
    with pytest.raises(SystemExit, match="no such file"):
        build_sam("vit_b", checkpoint=tmp_path / "missing.pth")


def test_tiny_sam_encodes_and_box_prompts_train_the_neck():
    torch.manual_seed(0)
    sam = build_sam("vit_tiny")
    features, embedding = encode(sam, torch.rand(2, 3, 256, 256) * 255)
    assert features.shape == (2, 96, 32, 32) and embedding.shape == (2, 64, 32, 32)  # 8 px patches
    masks, iou = decode_masks(sam, embedding[:1], torch.tensor([[10.0, 20, 90, 100], [100, 100, 200, 180]]))
    assert masks.shape == (2, 128, 128) and iou.shape == (2,)
    masks.sum().backward()
    assert (
        sam.image_encoder.neck[0].weight.grad is not None
        and sam.mask_decoder.iou_prediction_head.layers[-1].weight.grad is None
    )  # masks only


def test_tiny_sam_conv_stem_is_a_stride_8_patch_embedding():
    """vit_tiny embeds patches with three stride-2 3x3 convolutions (group-normalised): a shift of the image by
    one patch (8 px) shifts every token the stem computes from inside the image by one; the official sizes keep
    SAM's single 16 x 16 projection, so their checkpoints load unchanged."""
    torch.manual_seed(0)
    stem = build_sam("vit_tiny").image_encoder.patch_embed.proj
    image = torch.rand(1, 3, 96, 96)
    tokens = stem(image)
    assert tokens.shape == (1, 96, 12, 12)
    shifted = stem(torch.roll(image, shifts=(8, 8), dims=(2, 3)))
    aligned = (shifted[..., 2:-1, 2:-1] - tokens[..., 1:-2, 1:-2]).abs().max()
    unaligned = (shifted[..., 2:-1, 2:-1] - tokens[..., 2:-1, 2:-1]).abs().max()
    assert aligned < 0.01 < 0.1 < unaligned  # aligned: only the group norm's image statistics differ (edges)
    assert isinstance(build_sam("vit_b").image_encoder.patch_embed.proj, torch.nn.Conv2d)


# ----------------------------------------------------------------------------------------------------------------
# CellFinder, matching, losses
# ----------------------------------------------------------------------------------------------------------------


def test_cellfinder_predicts_one_box_per_query_per_layer():
    finder = CellFinder(
        in_channels=96, hidden=32, heads=4, encoder_layers=1, decoder_layers=3, anchor_grid=4, patterns=2
    )
    out = finder(torch.randn(2, 96, 16, 16))
    assert out["logits"].shape == (2, 32) and out["boxes"].shape == (2, 32, 4) and len(out["aux"]) == 2
    assert (out["boxes"] > 0).all() and (out["boxes"] < 1).all()
    # untrained, each box sits on its anchor point, 1/8 of the image wide
    assert torch.allclose(out["boxes"][0, :, :2], finder.anchors, atol=1e-5)
    assert torch.allclose(out["boxes"][..., 2:], torch.full_like(out["boxes"][..., 2:], 1 / 8), atol=1e-5)
    assert out["logits"].sigmoid().max() < 0.1  # the focal-loss prior: "no cell" until trained


def test_box_region_grows_each_box_by_its_share_and_a_minimum():
    region = box_region(torch.tensor([[10.0, 20, 30, 28], [0, 0, 4, 4]]), 64, 0.5)
    ys, xs = np.nonzero(region[0].numpy())
    # 20 px wide, 8 px high: 10 px more left and right, 4 px (half the height) above and below
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (0, 39, 16, 31) and region[0].sum() == 40 * 16
    ys, xs = np.nonzero(region[1].numpy())
    assert (xs.max(), ys.max()) == (7, 7)  # a 4 px box grows by the 4 px minimum (and stops at the image edge)
    tight = box_region(torch.tensor([[10.0, 20, 30, 28]]), 64, 0.0, 2)
    assert tight.sum() == 24 * 12


def test_mask_loss_counts_only_the_region_and_matches_torchvision_and_common_dice():
    from torchvision.ops import sigmoid_focal_loss

    from common.losses import DiceLoss

    torch.manual_seed(0)
    logits, target = torch.randn(2, 16, 16), (torch.rand(2, 16, 16) > 0.7).float()
    region = torch.zeros(2, 16, 16, dtype=torch.bool)
    region[:, 4:12, 2:10] = True
    loss, terms = MaskLoss(focal_gamma=2.0, focal_loss_weight=3.0, dice_loss_weight=1.0)(logits, target, region)
    inside = region[:, None]
    focal = sigmoid_focal_loss(logits[:, None], target[:, None], alpha=-1, gamma=2.0, reduction="none")[inside].mean()
    # Dice of the region alone: the same as Dice of the 8 x 8 crops
    dice = DiceLoss(batch=False)(logits[:, None, 4:12, 2:10], target[:, None, 4:12, 2:10])
    assert terms["focal"] == pytest.approx(float(focal), rel=1e-5)
    assert terms["dice"] == pytest.approx(float(dice), rel=1e-4)
    assert float(loss) == pytest.approx(3 * float(focal) + float(dice), rel=1e-4)
    # pixels outside the region change nothing, and get no gradient
    changed = logits.clone().requires_grad_(True)
    with torch.no_grad():
        changed[:, 0] += 50
    total, _ = MaskLoss(focal_loss_weight=3.0)(changed, target, region)
    total.backward()
    assert float(total.detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert changed.grad[~region].abs().max() == 0
    # without a region: every pixel
    _, terms = MaskLoss()(logits, target)
    every = sigmoid_focal_loss(logits, target, alpha=-1, gamma=2.0, reduction="mean")
    assert terms["focal"] == pytest.approx(float(every), rel=1e-5)


def test_mask_loss_hard_negative_mining_by_hand():
    # one mask of 1 cell pixel and 5 background pixels; plain mining keeps the cell pixel and the
    # max(ratio x 1, 16) -> all 5 negatives here, so it equals the plain mean; with 20 negatives it keeps 16
    logits = torch.tensor([[[2.0, -1.0, 0.5, -3.0, 1.0, -2.0]]])
    target = torch.tensor([[[1.0, 0, 0, 0, 0, 0]]])
    per_pixel = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    _, terms = MaskLoss(focal_gamma=0.0, hard_negative_mining="plain")(logits, target)
    assert terms["focal"] == pytest.approx(float(per_pixel.mean()), rel=1e-5)
    logits = torch.cat([torch.tensor([3.0]), torch.linspace(-4, 4, 20)])[None, None]
    target = torch.zeros_like(logits)
    target[..., 0] = 1
    per_pixel = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")[0, 0]
    hardest = per_pixel[1:].sort(descending=True).values[:16]
    _, terms = MaskLoss(focal_gamma=0.0, hard_negative_mining="plain")(logits, target)
    assert terms["focal"] == pytest.approx(float(torch.cat([per_pixel[:1], hardest]).mean()), rel=1e-5)
    # weighted: each negative weighs its loss over the mean negative loss, the positive weighs 1
    weights = torch.cat([torch.ones(1), per_pixel[1:] / per_pixel[1:].mean()])
    _, terms = MaskLoss(focal_gamma=0.0, hard_negative_mining="weighted")(logits, target)
    assert terms["focal"] == pytest.approx(float((weights * per_pixel).sum() / weights.sum()), rel=1e-5)


def test_hungarian_matching_on_a_hand_made_case():
    targets = [torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.2, 0.3]])]
    boxes = torch.tensor([[[0.21, 0.2, 0.1, 0.1], [0.5, 0.5, 0.5, 0.5], [0.7, 0.61, 0.2, 0.3]]])
    rows, cols = hungarian_match(torch.zeros(1, 3), boxes, targets)[0]
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == {0: 0, 2: 1}
    # a confident query wins a close call: both queries lie 0.02 (L1) from target 0
    boxes = torch.tensor([[[0.21, 0.21, 0.1, 0.1], [0.19, 0.19, 0.1, 0.1]]])
    rows, cols = hungarian_match(torch.tensor([[-4.0, 4.0]]), boxes, targets[:1][0][:1][None])[0]
    assert rows.tolist() == [1] and cols.tolist() == [0]
    assert hungarian_match(torch.zeros(1, 3), boxes[:, :1].expand(1, 3, 4), [torch.zeros(0, 4)])[0][0].numel() == 0


def test_hungarian_matching_finds_the_cheapest_assignment():
    """Against brute force over every assignment, with the cost written out independently."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 6, generator=generator)
    centres, sizes = (
        torch.rand(1, 6, 2, generator=generator) * 0.6 + 0.2,
        torch.rand(1, 6, 2, generator=generator) * 0.2 + 0.05,
    )
    boxes = torch.cat([centres, sizes], -1)
    target = torch.cat(
        [torch.rand(4, 2, generator=generator) * 0.6 + 0.2, torch.rand(4, 2, generator=generator) * 0.2 + 0.05], -1
    )

    def corners(b):
        return torch.stack(
            [b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], -1
        )

    def giou(a, b):  # Rezatofighi et al. 2019, written out: IoU - (hull - union) / hull
        a, b = corners(a)[:, None], corners(b)[None]
        area_a, area_b = (
            (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]),
            (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]),
        )
        width = (torch.min(a[..., 2], b[..., 2]) - torch.max(a[..., 0], b[..., 0])).clamp(min=0)
        height = (torch.min(a[..., 3], b[..., 3]) - torch.max(a[..., 1], b[..., 1])).clamp(min=0)
        inter = width * height
        union = area_a + area_b - inter
        hull = (torch.max(a[..., 2], b[..., 2]) - torch.min(a[..., 0], b[..., 0])) * (
            torch.max(a[..., 3], b[..., 3]) - torch.min(a[..., 1], b[..., 1])
        )
        return inter / union - (hull - union) / hull

    p = logits[0].sigmoid()
    focal = 0.25 * (1 - p) ** 2 * -p.log() - 0.75 * p**2 * -(1 - p).log()
    cost = 2 * focal[:, None] + 5 * (boxes[0][:, None] - target[None]).abs().sum(-1) - 2 * giou(boxes[0], target)
    best = min(sum(cost[q, t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(6), 4))
    rows, cols = hungarian_match(logits, boxes, [target])[0]
    assert float(cost[rows, cols].sum()) == pytest.approx(float(best), rel=1e-5)
    assert torch.allclose(focal_class_cost(logits[0]), focal, atol=1e-5)


def test_set_losses_on_a_hand_made_case():
    """One true box, two queries. Query 0 is matched (the other is far away): its box [0, 0, 2, 2] against the
    true [1, 1, 3, 3] (in units of 0.1) has IoU 1/7 and a 3 x 3 hull, so GIoU = 1/7 - 2/9; L1 on (cx, cy, w, h)
    = 0.1 + 0.1 (the centres differ, the sizes agree)."""
    true = torch.tensor([[0.2, 0.2, 0.2, 0.2]])  # cxcywh of [0.1, 0.1, 0.3, 0.3]
    boxes = torch.tensor([[[0.1, 0.1, 0.2, 0.2], [0.9, 0.9, 0.05, 0.05]]])  # query 0: [0, 0, 0.2, 0.2]
    logits = torch.tensor([[1.0, -2.0]])
    criterion = SetCriterion(ce_loss_weight=2.0, bbox_loss_weight=5.0, giou_loss_weight=2.0)
    total, terms = criterion({"logits": logits, "boxes": boxes}, [true])
    p0, p1 = torch.sigmoid(torch.tensor(1.0)), torch.sigmoid(torch.tensor(-2.0))
    focal = 0.25 * (1 - p0) ** 2 * -math.log(p0) + 0.75 * p1**2 * -math.log(1 - p1)
    giou = 1 / 7 - 2 / 9
    assert terms["class"] == pytest.approx(float(focal), rel=1e-5)
    assert terms["bbox"] == pytest.approx(0.2, rel=1e-5)
    assert terms["giou"] == pytest.approx(1 - giou, rel=1e-5)
    assert float(total) == pytest.approx(2 * float(focal) + 5 * 0.2 + 2 * (1 - giou), rel=1e-5)
    # auxiliary layers add their own matched losses
    total_aux, _ = criterion({"logits": logits, "boxes": boxes, "aux": [{"logits": logits, "boxes": boxes}]}, [true])
    assert float(total_aux) == pytest.approx(2 * float(total), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# The pipeline on large images, box AP
# ----------------------------------------------------------------------------------------------------------------


def test_tiles_give_every_cell_once(monkeypatch):
    """A stand-in for CellFinder + SAM that returns the true cells of each tile (their ids are written in the
    image): tiled over an image four tiles wide, every cell comes back exactly once and whole, including those
    cut by a tile's edge."""
    import types

    import cellsam.model as cellsam_model
    from common.metrics import match_instances

    rng = np.random.default_rng(0)
    truth = np.zeros((300, 620), np.int32)
    yy, xx = np.mgrid[:300, :620]
    for index in range(1, 60):
        cy, cx, r = rng.integers(20, 280), rng.integers(20, 600), rng.integers(6, 18)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        truth[disc & (truth == 0)] = index
    image = np.repeat(truth[..., None].astype(np.float32), 3, -1)

    def tile_truth(sam, finder, tile, score_threshold, **kwargs):
        from skimage.measure import label

        return label(tile[0].numpy().astype(np.int32), connectivity=1), None, None  # pieces cut by the edge stay

    monkeypatch.setattr(cellsam_model, "predict_instances", tile_truth)
    sam = types.SimpleNamespace(image_encoder=types.SimpleNamespace(img_size=256))
    labels = cellsam_model.segment_image(sam, None, image, overlap=64)
    from skimage.measure import label

    expected = label(truth, connectivity=1)  # touching discs of different ids stay apart
    match = match_instances(expected, labels, 0.5)
    assert match.fp == 0 and match.fn == 0 and np.allclose(match.matched_iou, 1.0)


def test_box_average_precision_on_a_hand_made_case():
    from cellsam.evaluate import box_average_precision

    truth = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    # scores 0.9 hit, 0.8 miss, 0.7 hit: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP = 1/2 * 1 + 1/2 * 2/3
    boxes = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 31]])
    ap = box_average_precision([(boxes, torch.tensor([0.9, 0.8, 0.7]), truth)])
    assert ap == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert box_average_precision([(boxes[:1], torch.tensor([0.9]), truth)]) == pytest.approx(0.5)
    duplicate = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10]])  # a second box on a matched cell is a false positive
    assert box_average_precision([(duplicate, torch.tensor([0.9, 0.8]), truth[:1])]) == pytest.approx(1.0)
    assert box_average_precision([(duplicate, torch.tensor([0.8, 0.9]), truth[:1])]) == pytest.approx(1.0)
