"""The published CellSAM's CellFinder: AnchorDETR (Wang et al. 2022, "Anchor DETR: Query Design for
Transformer-Based Detector") with row-column decoupled attention (RCDA), on its own SAM ViT image encoder without
the neck, in the parameter layout of vanvalenlab/cellSAM (`cellfinder.decode_head.*`), so its released weights
load into it and what we train loads back into cellSAM.

Sizes as cellSAM's modelconfig.yaml: 6 encoder + 6 decoder layers, hidden 256, 8 heads, feed-forward 1024, no
dropout, 3,500 learned query positions x 1 pattern, 2 classes (sigmoid scores; either column counts as a cell at
inference), one feature level. The class head and the box head are one module each, shared by every decoder layer
(the state dict lists them once per layer, as AnchorDETR does).

RCDA: attention over the H x W feature map factorised into a row softmax (over the W columns, keys averaged over
the rows) and a column softmax (over the H rows, keys averaged over the columns); output(q) = sum_{h,w}
A_col(q, h) A_row(q, w) V(h, w). One in_proj of 5 x hidden rows holds W_q_row, W_q_col, W_k_row, W_k_col, W_v.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F


def sine_1d(pos: torch.Tensor, dim: int = 256, temperature: float = 10000.0) -> torch.Tensor:
    """(...,) positions in 0..1 -> (..., dim): [sin(2 pi p / T^(2i/dim)), cos(...)] interleaved (AnchorDETR)."""
    index = torch.arange(dim, dtype=torch.float32, device=pos.device)
    angles = pos[..., None] * 2 * math.pi / temperature ** (2 * (index // 2) / dim)
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), -1).flatten(-2)


def sine_2d(points: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """(..., 2) points (x, y) in 0..1 -> (..., dim): the y features, then the x features, dim / 2 each."""
    return torch.cat([sine_1d(points[..., 1], dim // 2), sine_1d(points[..., 0], dim // 2)], -1)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class RowColumnAttention(nn.Module):
    """Multi-head RCDA. forward(query_row, query_col (B, L, E), key_row, key_col, value (B, H, W, E)) -> (B, L, E)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.dim, self.heads, self.dropout = dim, heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(5 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(5 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query_row, query_col, key_row, key_col, value):
        b, length, dim = query_row.shape
        _, h, w, _ = value.shape
        heads, d = self.heads, dim // self.heads
        weights, biases = self.in_proj_weight.chunk(5), self.in_proj_bias.chunk(5)
        scale = d**-0.5
        q_row = F.linear(query_row, weights[0], biases[0]) * scale
        q_col = F.linear(query_col, weights[1], biases[1]) * scale
        k_row = F.linear(key_row, weights[2], biases[2]).mean(1)  # (B, W, E): each column, averaged over rows
        k_col = F.linear(key_col, weights[3], biases[3]).mean(2)  # (B, H, E)
        v = F.linear(value, weights[4], biases[4])

        def split(x):  # (B, N, E) -> (B * heads, N, d)
            return x.reshape(b, -1, heads, d).transpose(1, 2).reshape(b * heads, -1, d)

        attn_row = torch.softmax(split(q_row) @ split(k_row).transpose(1, 2), -1)  # (B * heads, L, W)
        attn_col = torch.softmax(split(q_col) @ split(k_col).transpose(1, 2), -1)  # (B * heads, L, H)
        attn_row = F.dropout(attn_row, self.dropout, self.training)
        attn_col = F.dropout(attn_col, self.dropout, self.training)
        v = v.reshape(b, h, w, heads, d).permute(0, 3, 1, 2, 4).reshape(b * heads, h, w, d)
        if h < w:  # the shorter side last (AnchorDETR's order; the same sum either way)
            over_columns = (attn_row @ v.transpose(1, 2).reshape(b * heads, w, h * d)).reshape(b * heads, length, h, d)
            out = (attn_col[:, :, None, :] @ over_columns)[:, :, 0]
        else:
            over_rows = (attn_col @ v.reshape(b * heads, h, w * d)).reshape(b * heads, length, w, d)
            out = (attn_row[:, :, None, :] @ over_rows)[:, :, 0]
        out = out.reshape(b, heads, length, d).transpose(1, 2).reshape(b, length, dim)
        return self.out_proj(out)


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm2(x + self.dropout3(self.linear2(self.dropout2(F.relu(self.linear1(x))))))


class EncoderLayer(nn.Module):
    """RCDA self-attention over the feature map (row and column position embeddings added to queries and keys)."""

    def __init__(self, dim, ffn, heads, dropout):
        super().__init__()
        self.self_attn = RowColumnAttention(dim, heads, dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn, dropout)

    def forward(self, src, pos_row, pos_col):
        """src (B, H, W, C); pos_row (B, H, W, C) varies along W, pos_col along H."""
        b, h, w, c = src.shape
        attended = self.self_attn(
            (src + pos_row).reshape(b, h * w, c), (src + pos_col).reshape(b, h * w, c), src + pos_row,
            src + pos_col, src,
        ).reshape(b, h, w, c)  # fmt: skip
        return self.ffn(self.norm1(src + self.dropout1(attended)))


class DecoderLayer(nn.Module):
    """Query self-attention (torch's multi-head attention), then RCDA cross-attention into the feature map; the
    queries' positions enter as sine embeddings of their anchor points through the shared adapt MLPs."""

    def __init__(self, dim, ffn, heads, dropout):
        super().__init__()
        self.cross_attn = RowColumnAttention(dim, heads, dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn, dropout)

    def forward(self, tgt, anchors, memory, pos_row, pos_col, adapt_pos2d, adapt_pos1d):
        query_pos = adapt_pos2d(sine_2d(anchors, tgt.shape[-1]))
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, q, tgt, need_weights=False)[0]))
        dim = tgt.shape[-1]
        query_x = adapt_pos1d(sine_1d(anchors[..., 0], dim))
        query_y = adapt_pos1d(sine_1d(anchors[..., 1], dim))
        attended = self.cross_attn(tgt + query_x, tgt + query_y, memory + pos_row, memory + pos_col, memory)
        return self.ffn(self.norm1(tgt + self.dropout1(attended)))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int, layers: int):
        super().__init__()
        sizes = [dim] + [hidden] * (layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:] + [out], strict=True))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class Transformer(nn.Module):
    def __init__(self, num_classes=2, dim=256, heads=8, encoder_layers=6, decoder_layers=6, ffn=1024, dropout=0.0,
                 num_query_position=3500, num_query_pattern=1):  # fmt: skip
        super().__init__()
        self.d_model = dim
        self.encoder_layers = nn.ModuleList(EncoderLayer(dim, ffn, heads, dropout) for _ in range(encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(dim, ffn, heads, dropout) for _ in range(decoder_layers))
        self.pattern = nn.Embedding(num_query_pattern, dim)
        self.position = nn.Embedding(num_query_position, 2)  # learned anchor points (x, y) in 0..1
        self.adapt_pos2d = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.adapt_pos1d = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        class_embed, bbox_embed = nn.Linear(dim, num_classes), MLP(dim, dim, 4, 3)
        prior = 0.01  # focal-loss prior (Lin et al. 2017): every query starts as "no cell"
        nn.init.constant_(class_embed.bias, -math.log((1 - prior) / prior))
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
        nn.init.uniform_(self.position.weight, 0, 1)
        # one head of each kind, listed once per decoder layer (the same module: AnchorDETR shares them)
        self.class_embed = nn.ModuleList([class_embed] * decoder_layers)
        self.bbox_embed = nn.ModuleList([bbox_embed] * decoder_layers)

    def forward(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, C, H, W) -> class logits (layers, B, Q, classes) and boxes (layers, B, Q, 4) cx, cy, w, h."""
        b, c, h, w = src.shape
        patterns, positions = len(self.pattern.weight), len(self.position.weight)
        anchors = self.position.weight[None].repeat(b, patterns, 1)  # (B, Q, 2)
        tgt = self.pattern.weight.reshape(1, patterns, 1, c).repeat(b, 1, positions, 1).reshape(b, -1, c)
        # token centres in 0..1: (k - 0.5) / n
        ys = (torch.arange(h, dtype=torch.float32, device=src.device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=src.device) + 0.5) / w
        pos_row = self.adapt_pos1d(sine_1d(xs, c))[None, None].expand(b, h, w, c)  # varies along W
        pos_col = self.adapt_pos1d(sine_1d(ys, c))[None, :, None].expand(b, h, w, c)  # varies along H
        memory = src.permute(0, 2, 3, 1)
        for layer in self.encoder_layers:
            memory = layer(memory, pos_row, pos_col)
        classes, boxes = [], []
        reference = inverse_sigmoid(anchors)
        for index, layer in enumerate(self.decoder_layers):
            tgt = layer(tgt, anchors, memory, pos_row, pos_col, self.adapt_pos2d, self.adapt_pos1d)
            box = self.bbox_embed[index](tgt)
            box = torch.cat([box[..., :2] + reference, box[..., 2:]], -1)  # centre relative to the anchor
            classes.append(self.class_embed[index](tgt))
            boxes.append(box.sigmoid())
        return torch.stack(classes), torch.stack(boxes)


class ViTBody(nn.Module):
    """A SAM image encoder without its neck: patch embedding, absolute position embedding, blocks; (B, 3, S, S) ->
    (B, embed_dim, S / patch, S / patch)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.patch_embed, self.pos_embed, self.blocks = encoder.patch_embed, encoder.pos_embed, encoder.blocks

    def forward(self, x):
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 3, 1, 2)


class Backbone(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body


class AnchorDETR(nn.Module):
    """images (B, 3, S, S), already preprocessed -> {"pred_logits": (B, Q, classes), "pred_boxes": (B, Q, 4),
    "aux_outputs": [the same for each earlier decoder layer]}."""

    def __init__(self, body: nn.Module, in_channels: int, transformer: Transformer):
        super().__init__()
        dim = transformer.d_model
        self.transformer = transformer
        self.input_proj = nn.ModuleList([nn.Sequential(nn.Conv2d(in_channels, dim, 1), nn.GroupNorm(32, dim))])
        nn.init.xavier_uniform_(self.input_proj[0][0].weight)
        nn.init.zeros_(self.input_proj[0][0].bias)
        self.backbone = Backbone(body)

    def forward(self, images: torch.Tensor) -> dict:
        classes, boxes = self.transformer(self.input_proj[0](self.backbone.body(images)))
        aux = [{"pred_logits": c, "pred_boxes": b} for c, b in zip(classes[:-1], boxes[:-1], strict=True)]
        return {"pred_logits": classes[-1], "pred_boxes": boxes[-1], "aux_outputs": aux}


class CellFinderHead(nn.Module):
    """cellSAM's `cellfinder` wrapper: only `decode_head` (so the keys read cellfinder.decode_head.*)."""

    def __init__(self, decode_head: AnchorDETR):
        super().__init__()
        self.decode_head = decode_head

    def forward(self, images):
        return self.decode_head(images)


def build_anchor_detr(encoder: nn.Module, in_channels: int, sizes: dict) -> CellFinderHead:
    """CellFinder on a deep copy of `encoder` (a SAM ImageEncoderViT; its neck is left out)."""
    transformer = Transformer(
        num_classes=sizes["num_classes"], dim=sizes["hidden_dim"], heads=sizes["nheads"],
        encoder_layers=sizes["enc_layers"], decoder_layers=sizes["dec_layers"], ffn=sizes["dim_feedforward"],
        dropout=sizes["dropout"], num_query_position=sizes["num_query_position"],
        num_query_pattern=sizes["num_query_pattern"],
    )  # fmt: skip
    return CellFinderHead(AnchorDETR(ViTBody(copy.deepcopy(encoder)), in_channels, transformer))
