"""CellSAM's two networks: SAM (segment_anything's modules) and CellFinder, a DETR-style cell detector on SAM's
image-encoder features; the Hungarian matcher and the set losses of stage 1; the mask losses of stage 2.

SAM sizes: vit_b, vit_l, vit_h with the official configurations (1024 px input; load the official checkpoint
file a user gives, e.g. sam_vit_b_01ec64.pth), and vit_tiny (a convolutional stem, 2 blocks, 96 wide, 256 px
input, a narrow mask decoder) for CPU demos and tests. `Sam.forward` runs under no_grad, so training calls the
parts directly: `encode` (image encoder, returning the ViT features before the neck for CellFinder and the neck's
embeddings for the mask decoder) and `decode_masks` (prompt encoder + mask decoder, box prompts).

CellFinder (after AnchorDETR, Wang et al. 2022): the ViT features projected to `hidden` channels, a
torch.nn.TransformerEncoder over them (sine positional encoding added), and a stack of
torch.nn.TransformerDecoderLayer whose queries are anchor points on a regular grid (x `patterns` embeddings per
point): each query predicts a cell probability and a box relative to its anchor. Every decoder layer predicts,
and each layer's prediction is matched and scored (auxiliary losses).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from skimage.segmentation import relabel_sequential
from torch import nn
from torch.nn import functional as F
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss, nms, sigmoid_focal_loss

from cellsam.data import tile_grid
from common.losses import BoundaryLoss, DiceLoss
from common.tiling import paste_objects

# the official configurations (segment_anything/build_sam.py), and a tiny one for CPUs
SAM_SIZES = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": [2, 5, 8, 11]},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": [5, 11, 17, 23]},
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": [7, 15, 23, 31]},
    "vit_tiny": {
        "embed_dim": 96,
        "depth": 2,
        "num_heads": 2,
        "global_attn_indexes": [1],
        "image_size": 256,
        "patch_size": 8,  # 32 x 32 tokens: small cells span several
        "window_size": 8,
        "prompt_dim": 64,
        "decoder_mlp": 256,
        "conv_stem": True,  # 3x3 convolutions instead of one 8x8 patch projection
    },  # fmt: skip
}


# ----------------------------------------------------------------------------------------------------------------
# SAM
# ----------------------------------------------------------------------------------------------------------------


def build_sam(size: str = "vit_b", checkpoint: str | Path | None = None) -> Sam:
    """A SAM of the given size; with `checkpoint`, the weights of an official SAM file (loaded with
    weights_only=True). A file of another size is an error that says which size it holds."""
    if size not in SAM_SIZES:
        raise SystemExit(f"--sam_size {size}: choose one of {', '.join(SAM_SIZES)}")
    c = SAM_SIZES[size]
    image_size, prompt_dim, patch = c.get("image_size", 1024), c.get("prompt_dim", 256), c.get("patch_size", 16)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=c["depth"], embed_dim=c["embed_dim"], img_size=image_size, mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=c["num_heads"], patch_size=patch, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=c["global_attn_indexes"], window_size=c.get("window_size", 14),
            out_chans=prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim, image_embedding_size=(image_size // patch, image_size // patch),
            input_image_size=(image_size, image_size), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=c.get("decoder_mlp", 2048),
                                          num_heads=8),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=min(256, prompt_dim * 4),
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )  # fmt: skip
    if c.get("conv_stem"):
        sam.image_encoder.patch_embed.proj = conv_stem(patch, c["embed_dim"])
    if checkpoint is not None:
        load_sam_weights(sam, checkpoint, size)
    return sam


def conv_stem(patch: int, width: int) -> nn.Sequential:
    """A convolutional patch embedding (Xiao et al. 2021, "Early convolutions help transformers see better"):
    log2(patch) 3x3 stride-2 convolutions, doubling the channels up to `width`, then a 1x1 projection. It gives a
    small ViT trained from scratch the local edges a single patch x patch projection learns slowly: cell borders
    for the masks, centres for the boxes."""
    layers, channels = [], 3
    steps = int(math.log2(patch))
    for i in range(steps):
        out = width // 2 ** (steps - 1 - i)
        layers += [nn.Conv2d(channels, out, 3, 2, 1, bias=False), nn.GroupNorm(1, out), nn.GELU()]
        channels = out
    return nn.Sequential(*layers, nn.Conv2d(channels, width, 1))


def load_sam_weights(sam: Sam, checkpoint: str | Path, size: str) -> None:
    path = Path(checkpoint)
    if not path.is_file():
        raise SystemExit(
            f"--sam_checkpoint {path}: no such file. Official files: sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, "
            f"sam_vit_h_4b8939.pth (segment-anything's model cards); download one on a machine with internet access"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SystemExit(
            f"--sam_checkpoint {path}: not a readable checkpoint ({type(error).__name__}: {error})"
        ) from None
    if isinstance(state, dict) and "model" in state and "image_encoder.pos_embed" not in state:
        state = state["model"]  # a checkpoint of ours (stage 2) also holds the SAM weights under "model"
    if isinstance(state, dict) and "image_encoder.pos_embed" not in state:
        from cellsam.published import describe_layout

        layout = describe_layout(state)
        hint = ": give it as --cellsam_checkpoint" if "published layout" in layout else ", not an official SAM file"
        raise SystemExit(f"--sam_checkpoint {path} holds {layout}{hint}")
    width = state.get("image_encoder.pos_embed", torch.zeros(0)).shape[-1] if isinstance(state, dict) else None
    expected = SAM_SIZES[size]["embed_dim"]
    if width != expected:
        holds = next((name for name, c in SAM_SIZES.items() if c["embed_dim"] == width), f"width {width}")
        raise SystemExit(f"--sam_checkpoint {path} holds a {holds} image encoder, not {size}: pass --sam_size {holds}")
    try:
        sam.load_state_dict(state)
    except RuntimeError as error:
        raise SystemExit(f"--sam_checkpoint {path} does not fit the {size} SAM: {str(error)[:300]}") from None


def encode(sam: Sam, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, 3, S, S) in 0..255 -> (ViT features (B, C, S/16, S/16) before the neck, for CellFinder;
    the neck's image embeddings (B, prompt_dim, S/16, S/16), for the mask decoder)."""
    encoder = sam.image_encoder
    x = encoder.patch_embed((images - sam.pixel_mean) / sam.pixel_std)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for block in encoder.blocks:
        x = block(x)
    features = x.permute(0, 3, 1, 2)
    return features, encoder.neck(features)


def stage2_modules(sam: Sam, train_parts: str) -> list:
    """The modules of a SAM that stage 2 trains: its neck (the paper's choice), its mask decoder, or both."""
    neck, decoder = sam.image_encoder.neck, sam.mask_decoder
    return {"neck": [neck], "mask_decoder": [decoder], "both": [neck, decoder]}[train_parts]


def decode_masks(sam: Sam, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's embedding (1, D, h, w) and its box prompts (N, 4) xyxy in input pixels -> mask logits
    (N, S/4, S/4) (SAM's low-resolution masks) and predicted IoU (N,); one mask per box."""
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    masks, iou = sam.mask_decoder(
        image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense, multimask_output=False,
    )  # fmt: skip
    return masks[:, 0], iou[:, 0]


# ----------------------------------------------------------------------------------------------------------------
# CellFinder
# ----------------------------------------------------------------------------------------------------------------


def build_cellfinder(sam: Sam, stage1) -> CellFinder:
    """CellFinder on `sam`'s image-encoder features with a Stage1Config's sizes."""
    s1 = stage1
    return CellFinder(sam.image_encoder.pos_embed.shape[-1], s1.hidden, s1.heads, s1.encoder_layers,
                      s1.decoder_layers, s1.anchor_grid, s1.patterns, s1.dropout)  # fmt: skip


def sine_encoding(points: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(..., 2) points in 0..1 -> (..., dim) sine/cosine features (DETR's positional encoding, half per axis)."""
    half = dim // 2
    frequencies = temperature ** (2 * (torch.arange(half // 2, device=points.device) / half))
    angles = points[..., None] * 2 * math.pi / frequencies  # (..., 2, half / 2)
    return torch.cat([angles.sin(), angles.cos()], -1).flatten(-2)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


class CellFinder(nn.Module):
    def __init__(self, in_channels=768, hidden=256, heads=8, encoder_layers=6, decoder_layers=6, anchor_grid=12,
                 patterns=3, dropout=0.1):  # fmt: skip
        super().__init__()
        self.hidden = hidden
        self.input_proj = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.GroupNorm(min(32, hidden // 4), hidden))
        layer = partial(nn.TransformerEncoderLayer, hidden, heads, 4 * hidden, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer(), encoder_layers, enable_nested_tensor=False)
        decoder_layer = partial(nn.TransformerDecoderLayer, hidden, heads, 4 * hidden, dropout, batch_first=True)
        self.decoder = nn.ModuleList(decoder_layer() for _ in range(decoder_layers))
        centres = (torch.arange(anchor_grid) + 0.5) / anchor_grid
        grid = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), -1).reshape(-1, 2)  # (G*G, 2) as (x, y)
        self.register_buffer("anchors", grid.repeat(patterns, 1))  # (Q, 2)
        self.pattern = nn.Embedding(patterns, hidden)
        self.patterns = patterns
        self.anchor_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.norm = nn.LayerNorm(hidden)
        self.class_head = nn.Linear(hidden, 1)
        self.box_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                      nn.Linear(hidden, 4))  # fmt: skip
        prior = 0.01  # the focal-loss prior (Lin et al. 2017): start predicting "no cell" everywhere
        nn.init.constant_(self.class_head.bias, -math.log((1 - prior) / prior))
        nn.init.zeros_(self.box_head[-1].weight)
        nn.init.zeros_(self.box_head[-1].bias)

    @property
    def num_queries(self) -> int:
        return len(self.anchors)

    def forward(self, features: torch.Tensor) -> dict:
        """features (B, C, h, w) -> {"logits": (B, Q), "boxes": (B, Q, 4) cx, cy, w, h in 0..1, "aux": [...] one
        such dict per earlier decoder layer}."""
        b, _, h, w = features.shape
        src = self.input_proj(features).flatten(2).transpose(1, 2)  # (B, h*w, hidden)
        ys, xs = torch.meshgrid((torch.arange(h, device=src.device) + 0.5) / h,
                                (torch.arange(w, device=src.device) + 0.5) / w, indexing="ij")  # fmt: skip
        pos = sine_encoding(torch.stack([xs, ys], -1).reshape(-1, 2), self.hidden)[None]
        memory = self.encoder(src + pos) + pos
        query_pos = self.anchor_mlp(sine_encoding(self.anchors, self.hidden))[None]  # (1, Q, hidden)
        # each query starts from the encoded features at its anchor point (plus its pattern), so it sees its
        # neighbourhood from the first layer on: DETR-style detectors then converge in far fewer steps (as
        # Efficient DETR and two-stage Deformable DETR initialise queries from the encoder)
        grid = (self.anchors * 2 - 1)[None, :, None].expand(b, -1, -1, -1)  # (B, Q, 1, 2) in -1..1, (x, y)
        memory_map = memory.transpose(1, 2).reshape(b, self.hidden, h, w)
        content = F.grid_sample(memory_map, grid, align_corners=False)[..., 0].transpose(1, 2)  # (B, Q, hidden)
        patterns = self.pattern.weight.repeat_interleave(len(self.anchors) // self.patterns, 0)[None]
        queries = content + patterns
        outputs = []
        # each layer refines the box of the layer before (in logit space; Deformable DETR's iterative box
        # refinement): the first starts at its anchor point with width and height 1/8
        reference = torch.cat([inverse_sigmoid(self.anchors), torch.full_like(self.anchors, -math.log(7))], -1)[None]
        for layer in self.decoder:
            queries = layer(queries + query_pos, memory)
            state = self.norm(queries)
            boxes = torch.sigmoid(self.box_head(state) + reference)
            reference = inverse_sigmoid(boxes.detach())
            outputs.append({"logits": self.class_head(state)[..., 0], "boxes": boxes})
        return {**outputs[-1], "aux": outputs[:-1]}


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: Hungarian matching and set losses
# ----------------------------------------------------------------------------------------------------------------


def xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def focal_class_cost(logits: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Cost of calling each query a cell (Deformable DETR's matching cost): the focal loss of "cell" minus the
    focal loss of "no cell", per query. (Q,)"""
    prob = logits.sigmoid()
    positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    return positive - negative


@torch.no_grad()
def hungarian_match(logits, boxes, targets, class_weight=2.0, bbox_weight=5.0, giou_weight=2.0, alpha=0.25, gamma=2.0):
    """Per image, the one-to-one assignment of queries to true boxes of least total cost
    class_weight * focal cost + bbox_weight * L1(cx, cy, w, h) + giou_weight * -GIoU (scipy's Hungarian
    solver). logits (B, Q), boxes (B, Q, 4) cxcywh, targets: list of (K_i, 4) cxcywh.
    Returns a list of (query indices, target indices) int64 tensors."""
    matches = []
    for image_logits, image_boxes, target in zip(logits, boxes, targets, strict=True):
        if len(target) == 0:
            matches.append((torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)))
            continue
        image_boxes, target = image_boxes.float(), target.float().to(image_boxes.device)
        cost = (
            class_weight * focal_class_cost(image_logits.float(), alpha, gamma)[:, None]
            + bbox_weight * torch.cdist(image_boxes, target, p=1)
            - giou_weight * generalized_box_iou(xyxy(image_boxes), xyxy(target))
        )  # fmt: skip
        if not torch.isfinite(cost).all():
            raise SystemExit(
                "CellFinder's outputs are not finite (NaN or inf): lower --learning_rate_s1, or check the images"
            )
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        matches.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return matches


class SetCriterion(nn.Module):
    """DETR's set loss with CellSAM's terms: ce_loss_weight x sigmoid focal loss over all queries (matched ones are
    cells), bbox_loss_weight x L1 and giou_loss_weight x GIoU loss over matched pairs; each divided by the number of
    true boxes, and summed over the final and every auxiliary decoder layer (each matched on its own)."""

    def __init__(self, ce_loss_weight=2.0, bbox_loss_weight=5.0, giou_loss_weight=2.0, alpha=0.25, gamma=2.0,
                 one_to_many=1, cell_class=1):  # fmt: skip
        super().__init__()
        self.one_to_many, self.cell_class = one_to_many, cell_class
        self.weights = {"class": ce_loss_weight, "bbox": bbox_loss_weight, "giou": giou_loss_weight}
        self.alpha, self.gamma = alpha, gamma

    def layer_losses(self, output: dict, targets: list[torch.Tensor], num_boxes: float) -> dict:
        logits, boxes = output["logits"].float(), output["boxes"].float()
        # (B, Q) one cell score per query, or (B, Q, classes) as the published CellFinder: the cell_class column
        # is matched and learns "cell"; every other column learns "no cell" (AnchorDETR's one-hot focal loss)
        cell = logits if logits.dim() == 2 else logits[..., self.cell_class]
        matches = hungarian_match(cell, boxes, targets, *self.weights.values(), self.alpha, self.gamma)
        labels = torch.zeros_like(logits)
        matched_pred, matched_true = [], []
        for b, (rows, cols) in enumerate(matches):
            if logits.dim() == 2:
                labels[b, rows] = 1
            else:
                labels[b, rows, self.cell_class] = 1
            matched_pred.append(boxes[b, rows])
            matched_true.append(targets[b].to(boxes.device)[cols])
        pred, true = torch.cat(matched_pred), torch.cat(matched_true).float()
        focal = sigmoid_focal_loss(logits, labels, self.alpha, self.gamma, reduction="sum") / num_boxes
        l1 = F.l1_loss(pred, true, reduction="sum") / num_boxes
        giou = generalized_box_iou_loss(xyxy(pred), xyxy(true), reduction="sum") / num_boxes
        return {"class": focal, "bbox": l1, "giou": giou}

    def forward(self, outputs: dict, targets: list[torch.Tensor], num_boxes: float | None = None):
        """(total, {"class", "bbox", "giou"} of the final layer as floats). With one_to_many = k > 1 the earlier
        (auxiliary) layers match each true box k times (H-DETR's hybrid matching, Jia et al. 2023): k times the
        positive queries train the shared features and heads, while the final layer stays one-to-one."""
        num_boxes = max(float(sum(len(t) for t in targets)) if num_boxes is None else num_boxes, 1.0)
        total, final = 0.0, None
        for layer, output in enumerate([outputs, *outputs.get("aux", [])]):
            if layer and self.one_to_many > 1:
                repeated = [t.repeat(self.one_to_many, 1) for t in targets]
                terms = self.layer_losses(output, repeated, num_boxes * self.one_to_many)
            else:
                terms = self.layer_losses(output, targets, num_boxes)
            total = total + sum(self.weights[k] * v for k, v in terms.items())
            final = final or {k: float(v.detach()) for k, v in terms.items()}
        return total, final


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: mask losses
# ----------------------------------------------------------------------------------------------------------------


class MaskLoss(nn.Module):
    """focal_loss_weight x sigmoid focal loss (gamma) + dice_loss_weight x Dice + boundary_loss_weight x boundary
    loss (Kervadec et al. 2019), of box-prompted mask logits against each cell's mask.

    Online hard negative mining on the focal term (hard_negative_mining): "plain" keeps every cell pixel and the
    negative_ratio x as many background pixels of highest loss (Shrivastava et al. 2016); "weighted" keeps all
    pixels but weights each background pixel by its loss relative to the mean background loss, so easy background
    counts less; "none" averages over every pixel."""

    def __init__(self, focal_gamma=2.0, focal_loss_weight=20.0, dice_loss_weight=1.0, boundary_loss_weight=0.0,
                 hard_negative_mining="none", negative_ratio=3.0):  # fmt: skip
        super().__init__()
        self.gamma, self.mining, self.ratio = focal_gamma, hard_negative_mining, negative_ratio
        self.weights = {"focal": focal_loss_weight, "dice": dice_loss_weight, "boundary": boundary_loss_weight}
        self.dice, self.boundary = DiceLoss(batch=False), BoundaryLoss()

    def focal(self, logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        per_pixel = sigmoid_focal_loss(logits, target, alpha=-1, gamma=self.gamma, reduction="none").flatten(1)
        region = region.flatten(1)
        positive = (target.flatten(1) > 0.5) & region
        if self.mining == "none":
            return (per_pixel * region).sum() / region.sum().clamp_min(1)
        negative = region & ~positive
        negative_loss = per_pixel.masked_fill(~negative, 0)
        if self.mining == "weighted":
            mean_negative = negative_loss.sum(1, keepdim=True) / negative.sum(1, keepdim=True).clamp_min(1)
            weights = torch.where(
                positive, torch.ones_like(per_pixel), (negative_loss / mean_negative.clamp_min(1e-12)).detach()
            )
            return (weights * per_pixel).sum() / weights.sum().clamp_min(1)
        kept = []
        for row, is_positive, is_negative, negatives in zip(per_pixel, positive, negative, negative_loss, strict=True):
            k = int(min(is_negative.sum(), max(self.ratio * is_positive.sum(), 16)))
            kept.append(torch.cat([row[is_positive], negatives.topk(k).values]))
        return torch.cat(kept).mean()

    def forward(self, logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None = None):
        """logits and target (N, H, W) -> (total, {"focal", "dice", "boundary"} floats). region (N, H, W) bool:
        the pixels each mask is scored on (all where None); the pipeline keeps a mask only inside its box, so
        training scores it near its box, where the cell is a large share of the pixels, rather than on a whole
        image that is almost all background."""
        logits, target = logits.float()[:, None], target.float()[:, None]
        region = torch.ones_like(target, dtype=torch.bool) if region is None else region[:, None].bool()
        terms = {"focal": self.focal(logits, target, region)}
        # outside the region: probability 0 against target 0, so those pixels add nothing to Dice or boundary
        logits, target = logits.masked_fill(~region, -1e4), target * region
        terms["dice"] = self.dice(logits, target)
        if self.weights["boundary"]:
            terms["boundary"] = self.boundary(logits, target)
        total = sum(self.weights[k] * v for k, v in terms.items())
        return total, {k: float(v.detach()) for k, v in terms.items()}


# ----------------------------------------------------------------------------------------------------------------
# The pipeline: boxes, then masks, then one label image
# ----------------------------------------------------------------------------------------------------------------


def box_region(boxes: torch.Tensor, size: int, margin: float, minimum: float = 4) -> torch.Tensor:
    """(N, size, size) bool: each xyxy box (N, 4) grown on every side by margin x its side, at least `minimum` px."""
    side = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    x0, y0, x1, y1 = (boxes + (side * margin).clamp_min(minimum) * boxes.new_tensor([-1, -1, 1, 1])).unbind(1)
    pixels = torch.arange(size, device=boxes.device) + 0.5
    rows = (pixels >= y0[:, None]) & (pixels < y1[:, None])  # (N, size)
    columns = (pixels >= x0[:, None]) & (pixels < x1[:, None])
    return rows[:, :, None] & columns[:, None, :]


@torch.no_grad()
def predict_instances(sam, finder, image: torch.Tensor, score_threshold=0.4, nms_iou=0.5, min_size=16):
    """One image (3, S, S) in 0..255 -> (label image (S, S) int32, boxes (K, 4) xyxy pixels, scores (K,)).
    CellFinder's boxes above score_threshold, non-maximum suppression at nms_iou, a SAM mask per box (cut to its
    box, 2 px wider on each side), painted from the least to the most confident so the most confident wins
    overlaps; pieces under min_size pixels are dropped."""
    size = image.shape[-1]
    features, embedding = encode(sam, image[None])
    out = finder(features)
    scores = out["logits"][0].sigmoid()
    boxes = (xyxy(out["boxes"][0]) * size).clamp(0, size)
    keep = scores > score_threshold
    boxes, scores = boxes[keep], scores[keep]
    keep = nms(boxes, scores, nms_iou)
    boxes, scores = boxes[keep], scores[keep]
    labels = torch.zeros((size, size), dtype=torch.int32, device=image.device)
    if len(boxes):
        logits = torch.cat([decode_masks(sam, embedding, chunk)[0] for chunk in boxes.split(64)])
        masks = F.interpolate(logits[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0] > 0
        masks &= box_region(boxes, size, 0.0, 2)  # each mask cut to its box
        for index in scores.argsort().tolist():  # least confident first
            labels[masks[index]] = index + 1
    labels = labels.cpu().numpy()
    sizes = np.bincount(labels.ravel())
    labels[sizes[labels] < min_size] = 0
    return relabel_sequential(labels)[0].astype(np.int32), boxes.cpu(), scores.cpu()


def segment_image(sam, finder, image, score_threshold=0.4, overlap=64, device="cpu", labels=None,
                  on_cells=None) -> np.ndarray:  # fmt: skip
    """A label image (H, W) int32 for an image (H, W, 3) float 0..255 of any size, at its own pixel scale: tiles of
    SAM's input size (tile_and_stitch, which also says what `image`, `labels` and `on_cells` may be), each through
    predict_instances."""

    def segment(tile: np.ndarray) -> np.ndarray:
        tile = torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1))).float().to(device)
        return predict_instances(sam, finder, tile, score_threshold)[0]

    return tile_and_stitch(image, sam.image_encoder.img_size, overlap, segment, labels, on_cells)


def tile_and_stitch(image, size: int, overlap: int, segment, labels=None, on_cells=None) -> np.ndarray:
    """One label image (H, W) int32 from `segment(tile) -> labels` on tiles (size, size, C) overlapping by `overlap`
    px (one padded tile for a small image); each tile keeps the cells whose centre lies in its core (tile_grid), so
    a cell cut by one tile's edge is taken whole from its neighbour, and cells are pasted where no earlier cell
    is (common.tiling.paste_objects).

    Memory is one tile's: `image` may be any array that reads a region when sliced (a NumPy array, or a large
    TIFF's zarr view), and `labels` any (H, W) integer array written a region at a time (a zarr array on disk);
    a new NumPy array unless given. on_cells(window, y0, x0, ids) is called with each tile's new cells."""
    h, w = image.shape[:2]
    labels = np.zeros((h, w), np.int32) if labels is None else labels
    count = 0
    for y0, x0, core_y, core_x in tile_grid(h, w, size, overlap):
        tile = np.asarray(image[y0 : y0 + size, x0 : x0 + size])
        pad = ((0, size - tile.shape[0]), (0, size - tile.shape[1])) + ((0, 0),) * (tile.ndim - 2)
        tile_labels = segment(np.pad(tile, pad))
        window = np.asarray(labels[y0 : y0 + size, x0 : x0 + size])
        pasted = paste_objects(window, tile_labels, (core_y, core_x), count + 1)
        if pasted:
            labels[y0 : y0 + size, x0 : x0 + size] = window
            count += len(pasted)
            if on_cells is not None:
                on_cells(window, y0, x0, [i for i, _ in pasted])
    return labels


def window_size(model) -> int:
    """The pixels one pass of a model sees: the published CellSAM's window (resized to its input), this folder's
    model's input size (images at their own pixel scale)."""
    return (model.window if model.architecture == "published" else None) or model.input_size


@torch.no_grad()
def detect_tiled(model, image: np.ndarray, overlap: int = 64, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """CellFinder's boxes (xyxy image px) and scores on a whole image of any size: one pass where it fits the
    model's window, else every tile of tile_grid, keeping the boxes whose centre lies in the tile's core (as
    tile_and_stitch keeps cells) and that do not touch a side the tile shares with another (a cell cut there is
    found whole in the neighbour), so each cell of the image is counted once."""
    h, w = image.shape[:2]
    window = window_size(model)
    if max(h, w) <= window:
        boxes, scores, _ = model.detect(image, device)
        return boxes, scores
    padded = np.pad(image, ((0, max(0, window - h)), (0, max(0, window - w)), (0, 0)))
    all_boxes, all_scores = [], []
    for y0, x0, core_y, core_x in tile_grid(h, w, window, overlap):
        boxes, scores, _ = model.detect(padded[y0 : y0 + window, x0 : x0 + window], device)
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        keep = (cx >= core_x[0]) & (cx < core_x[1]) & (cy >= core_y[0]) & (cy < core_y[1])
        if x0 > 0:  # sides shared with another tile: a box touching one is a cut cell
            keep &= boxes[:, 0] >= 1
        if y0 > 0:
            keep &= boxes[:, 1] >= 1
        if x0 + window < padded.shape[1]:
            keep &= boxes[:, 2] <= window - 1
        if y0 + window < padded.shape[0]:
            keep &= boxes[:, 3] <= window - 1
        all_boxes.append(boxes[keep] + boxes.new_tensor([x0, y0, x0, y0]))
        all_scores.append(scores[keep])
    boxes = torch.cat(all_boxes)
    boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                         boxes[:, 3].clamp(0, h)], 1)  # fmt: skip
    return boxes, torch.cat(all_scores)


# ----------------------------------------------------------------------------------------------------------------
# The two architectures behind one interface (train.py, evaluate.py and visualize.py use only this)
# ----------------------------------------------------------------------------------------------------------------


class SharedEncoderCellSAM(nn.Module):
    """This folder's CellSAM: CellFinder on the features of the one SAM whose neck and mask decoder draw the
    masks; any SAM size (vit_b/l/h from an official SAM file, vit_tiny from scratch for CPUs). Images go in as
    read_image gives them (float 0..255, at their own pixel scale). The published CellSAM (published.CellSAM) has
    the same methods."""

    architecture = "shared_encoder"

    def __init__(self, sam: Sam, finder: CellFinder):
        super().__init__()
        self.sam, self.finder = sam, finder

    @property
    def input_size(self) -> int:
        return self.sam.image_encoder.img_size

    @property
    def mask_sam(self) -> Sam:
        return self.sam

    @property
    def parts(self) -> dict:
        """The pieces checkpoints name (best_model_s1.pth holds "finder" and, when trained, "image_encoder")."""
        return {"finder": self.finder, "image_encoder": self.sam.image_encoder,
                "prompt_encoder": self.sam.prompt_encoder, "mask_decoder": self.sam.mask_decoder}  # fmt: skip

    def finder_forward(self, images: torch.Tensor) -> dict:
        features, _ = encode(self.sam, images)
        return self.finder(features)

    def mask_input(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def freeze_for_stage1(self, stage1_type: str) -> dict:
        """Only what stage 1 trains keeps gradients: CellFinder, and the image encoder without its neck
        (image_encoder) or with it (all_backbones). Returns the parts to train and save."""
        self.requires_grad_(False)
        self.finder.requires_grad_(True)
        for name, parameter in self.sam.image_encoder.named_parameters():
            in_neck = name.startswith("neck.")
            parameter.requires_grad_(stage1_type == "all_backbones" or (stage1_type == "image_encoder" and not in_neck))
        trained = {"finder": self.finder}
        if stage1_type != "cellfinder":
            trained["image_encoder"] = self.sam.image_encoder
        return trained

    def stage2_parts(self, train_parts: str) -> tuple[list, dict]:
        """(the modules stage 2 trains, the parts it saves: the prompt encoder too, whose random Fourier features
        and point embeddings the masks depend on)."""
        saved = ("image_encoder", "prompt_encoder", "mask_decoder")
        return stage2_modules(self.sam, train_parts), {k: self.parts[k] for k in saved}

    def read_image(self, path: Path) -> np.ndarray:
        from cellsam.data import read_image

        return read_image(path)

    @torch.no_grad()
    def segment(self, image, score_threshold=0.4, overlap=64, device="cpu", labels=None, on_cells=None):
        return segment_image(self.sam, self.finder, image, score_threshold, overlap, device, labels, on_cells)

    def large_image(self, path: Path, gamma: float = 1.0):
        """A TIFF too large to hold, read a tile at a time and normalised as read_image (with the gamma)."""
        from cellsam.data import LargeImage, large_image_preparer

        image = LargeImage(path)
        image.prepare = large_image_preparer(image.sample(), path, gamma)
        return image

    def kept_boxes(self, scores: torch.Tensor, score_threshold: float) -> torch.Tensor:
        return scores > score_threshold

    @torch.no_grad()
    def detect(self, image: np.ndarray, device="cpu") -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """CellFinder's boxes (xyxy pixels) and scores on the image padded or cut to SAM's input size (its
        top-left), and the (h, w) of the image they cover."""
        size = self.input_size
        tile = np.zeros((size, size, 3), np.float32)
        h, w = min(size, image.shape[0]), min(size, image.shape[1])
        tile[:h, :w] = image[:h, :w]
        out = self.finder_forward(torch.from_numpy(tile.transpose(2, 0, 1))[None].to(device))
        return (xyxy(out["boxes"][0]) * size).cpu(), out["logits"][0].sigmoid().cpu(), (h, w)
