"""Networks, loss, sliding-window inference and watershed decoding for hydra_lv.

rsunet: the residual symmetric U-Net of the connectomics tutorial (Lee et al. 2017, "Superhuman accuracy on the
SNEMI3D connectomics challenge"; pytorch_connectomics' rsunet): each level a pre-convolution, a pre-activation
residual block (3 x 3 x 3) and a post-convolution; the pre- and post-convolutions (1, 3, 3) at the levels where z
is still coarse (its voxel at least twice the in-plane one, from data.resolution), 3 x 3 x 3 beyond; pooling
(1, 2, 2) so z (30 nm sections) is never downsampled; trilinear in-plane upsampling followed by a 1 x 1 x 1
convolution (no transposed convolutions, so no checkerboard), additive skips. `filters` sets depth and width,
model.rsunet_norm the normalisation.
unet3d: a plain 3D U-Net (two conv-BN-ReLU per level, concatenated skips), the same in-plane-only pooling.
monai_unet: MONAI's UNet with in-plane strides. mednext: MONAI's MedNeXt (S, B, M or L) made anisotropic: no z
downsampling and (1, k, k) kernels while z is coarse, as nnU-Net plans strides and kernels from the voxel size.
All output 3 channels: binary, boundary (logits) and distance (tanh gives -1..1). With model.deep_supervision
(rsunet, mednext), training also returns the 3 channels at each coarser decoder scale.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from itertools import product

import numpy as np
import torch
from scipy import ndimage
from skimage.segmentation import relabel_sequential, watershed
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from common.losses import DiceLoss
from hydra_lv.data import DataError, scale_intensity

ARCHITECTURES = ("rsunet", "unet3d", "monai_unet", "mednext")
NORMS = ("batch", "sync_batch", "group", "instance", "none")
# MedNeXt's sizes (Roy et al. 2023, table 1): expansion ratios of the encoder, bottleneck and decoder, blocks per
# level (encoder, bottleneck, decoder); 4 downsamplings
MEDNEXT_SIZES = {
    "S": (2, 2, 2, (2, 2, 2, 2), 2, (2, 2, 2, 2)),
    "B": ((2, 3, 4, 4), 4, (4, 4, 3, 2), (2, 2, 2, 2), 2, (2, 2, 2, 2)),
    "M": ((2, 3, 4, 4), 4, (4, 4, 3, 2), (3, 4, 4, 4), 4, (4, 4, 4, 3)),
    "L": ((3, 4, 8, 8), 8, (8, 8, 4, 3), (3, 4, 8, 8), 8, (8, 8, 4, 3)),
}
MEDNEXT_LEVELS = 4


# ----------------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------------


def conv(cin: int, cout: int, kernel=(3, 3, 3)) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel, padding=tuple(k // 2 for k in kernel), bias=False)


def norm_layer(kind: str, channels: int) -> nn.Module:
    """model.rsunet_norm: batch (sync_batch: converted to SyncBatchNorm under DDP), group (8 groups, or as many
    as divide the channels), instance (with affine weights), none."""
    if kind in ("batch", "sync_batch"):
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.Identity()


def coarse_z(resolution, level: int, z_pooled: int = 0) -> bool:
    """Is z at this level at least twice the in-plane voxel size (in-plane halved per level, z per z pooling)?"""
    z, y, x = (float(r) for r in resolution)
    return z * 2**z_pooled >= 2 * min(y, x) * 2**level


class NormActConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel, norm: str):
        super().__init__(norm_layer(norm, cin), nn.ReLU(inplace=True), conv(cin, cout, kernel))


class ResBlock(nn.Module):
    """x + (norm-ReLU-conv) twice (He et al. 2016, identity mappings)."""

    def __init__(self, channels: int, kernel, norm: str):
        super().__init__()
        self.body = nn.Sequential(NormActConv(channels, channels, kernel, norm),
                                  NormActConv(channels, channels, kernel, norm))  # fmt: skip

    def forward(self, x):
        return x + self.body(x)


class ConvBlock(nn.Sequential):
    """An RSUNet level: pre-convolution and post-convolution of `kernel` ((1, 3, 3) where z is coarse), and
    between them a 3 x 3 x 3 residual block, which carries the level's z context."""

    def __init__(self, cin: int, cout: int, kernel, norm: str):
        super().__init__()
        self.pre = NormActConv(cin, cout, kernel, norm)
        self.res = ResBlock(cout, (3, 3, 3), norm)
        self.post = NormActConv(cout, cout, kernel, norm)


class UpBlock(nn.Module):
    """Trilinear upsampling (1, 2, 2), a 1 x 1 x 1 convolution to the upper level's width, then the skip added."""

    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__()
        self.project = NormActConv(cin, cout, (1, 1, 1), norm)

    def forward(self, x, skip):
        x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.project(x) + skip


class RSUNet(nn.Module):
    def __init__(self, in_channels=1, out_channels=3, filters=(32, 64, 128, 256, 512), norm="batch",
                 deep_supervision=False, resolution=(30, 8, 8)):  # fmt: skip
        super().__init__()
        kernels = [(1, 3, 3) if coarse_z(resolution, level) else (3, 3, 3) for level in range(len(filters))]
        self.embed = conv(in_channels, filters[0], (1, 5, 5))  # in-plane context first, as in the tutorial
        self.pool = nn.MaxPool3d((1, 2, 2))
        self.down = nn.ModuleList(
            ConvBlock(filters[max(i - 1, 0)], width, kernels[i], norm) for i, width in enumerate(filters)
        )
        levels = range(len(filters) - 2, -1, -1)  # the decoder, deepest first
        self.up = nn.ModuleList(UpBlock(filters[i + 1], filters[i], norm) for i in levels)
        self.up_blocks = nn.ModuleList(ConvBlock(filters[i], filters[i], kernels[i], norm) for i in levels)
        self.head = nn.Sequential(norm_layer(norm, filters[0]), nn.ReLU(inplace=True),
                                  nn.Conv3d(filters[0], out_channels, 1))  # fmt: skip
        # deep supervision: a head on every decoder level but the last (the last is self.head)
        self.aux_heads = nn.ModuleList(
            nn.Conv3d(filters[i], out_channels, 1) for i in list(levels)[:-1]
        ) if deep_supervision else None  # fmt: skip

    def forward(self, x):
        x = self.embed(x)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        aux = []
        for k, (up, block, skip) in enumerate(zip(self.up, self.up_blocks, reversed(skips[:-1]), strict=True)):
            x = block(up(x, skip))
            if self.aux_heads is not None and self.training and k < len(self.aux_heads):
                aux.append(self.aux_heads[k](x))
        out = self.head(x)
        return (out, *aux[::-1]) if aux else out  # full resolution first, then coarser


class UNet3D(nn.Module):
    def __init__(self, in_channels=1, out_channels=3, filters=(32, 64, 128, 256, 512)):
        super().__init__()

        def double(cin, cout):
            return nn.Sequential(
                conv(cin, cout), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
                conv(cout, cout), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
            )  # fmt: skip

        self.down = nn.ModuleList(double(in_channels if i == 0 else filters[i - 1], f) for i, f in enumerate(filters))
        self.pool = nn.MaxPool3d((1, 2, 2))
        levels = range(len(filters) - 1, 0, -1)
        self.up = nn.ModuleList(
            nn.ConvTranspose3d(filters[i], filters[i - 1], (1, 2, 2), stride=(1, 2, 2)) for i in levels
        )
        self.up_blocks = nn.ModuleList(double(2 * filters[i - 1], filters[i - 1]) for i in levels)
        self.head = nn.Conv3d(filters[0], out_channels, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for up, block, skip in zip(self.up, self.up_blocks, reversed(skips[:-1]), strict=True):
            x = block(torch.cat([up(x), skip], 1))
        return self.head(x)


def mednext_z_pools(resolution, levels: int = MEDNEXT_LEVELS) -> list[bool]:
    """For each downsampling of MedNeXt: does it halve z too? Not while z is coarse (nnU-Net's rule: an axis is
    pooled once its voxel is under twice the finest one), so 30 x 8 x 8 nm pools in-plane first, then all three."""
    pools, z_pooled = [], 0
    for level in range(levels):
        pool = not coarse_z(resolution, level, z_pooled)
        pools.append(pool)
        z_pooled += pool
    return pools


class CropFrontZ(nn.Module):
    """MONAI's up-block pads one voxel in front of every axis after its stride-2 transposed convolution; where z
    is not upsampled that voxel is surplus."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)[:, :, 1:]


def anisotropic(layer: nn.Conv3d | nn.ConvTranspose3d, stride_z: bool, kernel_z: bool) -> nn.Module:
    """The layer again with stride 1 in z where z is not resampled and kernel 1 in z where z is coarse."""
    k, s = list(layer.kernel_size), list(layer.stride)
    if not kernel_z:
        k[0] = 1
    if not stride_z:
        s[0] = 1
    if tuple(k) == layer.kernel_size and tuple(s) == layer.stride:
        return layer
    kind = type(layer)
    return kind(layer.in_channels, layer.out_channels, tuple(k), tuple(s), tuple(n // 2 for n in k),
                groups=layer.groups, bias=layer.bias is not None)  # fmt: skip


def build_mednext(in_channels, out_channels, init_filters, size, deep_supervision, resolution, kernel=3):
    from monai.networks.nets import MedNeXt

    size = str(size).upper()
    if size not in MEDNEXT_SIZES:
        raise DataError(f"model.mednext_size={size}: choose one of {', '.join(MEDNEXT_SIZES)}")
    enc, bottleneck, dec, down, mid, up = MEDNEXT_SIZES[size]
    net = MedNeXt(
        spatial_dims=3, init_filters=init_filters, in_channels=in_channels, out_channels=out_channels,
        encoder_expansion_ratio=enc, decoder_expansion_ratio=dec, bottleneck_expansion_ratio=bottleneck,
        kernel_size=kernel, deep_supervision=deep_supervision, use_residual_connection=True, blocks_down=down,
        blocks_bottleneck=mid, blocks_up=up, norm_type="group",
    )  # fmt: skip
    pools = mednext_z_pools(resolution)
    z_pooled = 0
    for level in range(MEDNEXT_LEVELS + 1):  # encoder stage, its down block; bottleneck; decoder stage, up block
        kernel_z = not coarse_z(resolution, level, z_pooled)
        stages = [net.enc_stages[level], net.dec_stages[MEDNEXT_LEVELS - 1 - level]] if level < MEDNEXT_LEVELS else [
            net.bottleneck]  # fmt: skip
        for stage in stages:
            for block in stage:
                block.conv1 = anisotropic(block.conv1, True, kernel_z)
        if level < MEDNEXT_LEVELS:
            down_block = net.down_blocks[level]
            down_block.conv1 = anisotropic(down_block.conv1, pools[level], kernel_z)
            down_block.res_conv = anisotropic(down_block.res_conv, pools[level], True)
            index = MEDNEXT_LEVELS - 1 - level
            up_block = net.up_blocks[index]
            up_block.conv1 = anisotropic(up_block.conv1, pools[level], kernel_z)
            up_block.res_conv = anisotropic(up_block.res_conv, pools[level], True)
            if not pools[level]:
                net.up_blocks[index] = CropFrontZ(up_block)
            z_pooled += pools[level]
    return net


def build_model(architecture: str, in_channels: int = 1, out_channels: int = 3, filters=(32, 64, 128, 256, 512),
                norm: str = "batch", deep_supervision: bool = False, mednext_size: str = "S",
                resolution=(30, 8, 8)):  # fmt: skip
    """rsunet, unet3d, monai_unet (MONAI's UNet with in-plane strides) or mednext (MONAI's MedNeXt, anisotropic;
    filters[0] is its first width)."""
    if architecture not in ARCHITECTURES:
        raise DataError(f"model.architecture={architecture}: unknown; choose one of {', '.join(ARCHITECTURES)}")
    if norm not in NORMS:
        raise DataError(f"model.rsunet_norm={norm}: choose one of {', '.join(NORMS)}")
    if deep_supervision and architecture not in ("rsunet", "mednext"):
        raise DataError(f"model.deep_supervision=true: rsunet and mednext have it, not {architecture}")
    filters = tuple(int(f) for f in filters)
    if architecture == "monai_unet":
        from monai.networks.nets import UNet

        strides = [(1, 2, 2)] * (len(filters) - 1)
        return UNet(3, in_channels, out_channels, filters, strides, num_res_units=2, norm="batch")
    if architecture == "mednext":
        return build_mednext(in_channels, out_channels, filters[0], mednext_size, deep_supervision, resolution)
    if architecture == "rsunet":
        return RSUNet(in_channels, out_channels, filters, norm, deep_supervision, resolution)
    return UNet3D(in_channels, out_channels, filters)


def model_from_config(cfg: dict) -> nn.Module:
    """The network of a run's config (model.* and data.resolution); keys a config written before them lacks take
    their defaults."""
    m = cfg["model"]
    return build_model(
        m["architecture"], m["in_channels"], m["out_channels"], m["filters"], m.get("rsunet_norm", "batch"),
        bool(m.get("deep_supervision", False)), m.get("mednext_size", "S"), cfg["data"].get("resolution", (30, 8, 8)),
    )  # fmt: skip


def load_weights(model: nn.Module, state: dict, path) -> None:
    """The checkpoint's weights into the network its config builds; a checkpoint of an older layout (the rsunet
    before pre/post convolutions and 1 x 1 x 1 upsampling, December 2026) is a clear error, not a key dump."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        missing = len(set(model.state_dict()) - set(state))
        raise DataError(
            f"{path}: its weights do not fit the network its config describes ({missing} tensors missing; "
            f"{str(error).splitlines()[0]}). It was written by an older version of {type(model).__name__} in this "
            f"repository: retrain, or test it with the commit that trained it"
        ) from None


def size_multiples(cfg: dict) -> tuple[int, int, int]:
    """A window's (z, y, x) must be multiples of these: one halving per level in-plane (and in z where mednext
    pools it)."""
    m = cfg["model"]
    if m["architecture"] == "mednext":
        pools = mednext_z_pools(cfg["data"].get("resolution", (30, 8, 8)))
        return 2 ** sum(pools), 2**MEDNEXT_LEVELS, 2**MEDNEXT_LEVELS
    multiple = 2 ** (len(m["filters"]) - 1)
    return 1, multiple, multiple


def pick_device() -> torch.device:
    """CUDA, then Apple MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


PRECISIONS = ("auto", "32", "bf16", "16")


def precision_setting(device, precision) -> tuple[bool, torch.dtype | None]:
    """optimization.precision as (autocast on, dtype) for train.mixed_precision: auto (on for GPUs, bf16 where the
    GPU has it, else fp16 with the loss scaler; off on the CPU), 32 (off), bf16 (fp16 on a GPU without bf16), 16
    (fp16 with the loss scaler)."""
    precision = str(precision).lower().removesuffix("-mixed")
    if precision not in PRECISIONS:
        raise SystemExit(f"optimization.precision={precision}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return device.type != "cpu", None
    if precision == "bf16":
        bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
        return True, torch.bfloat16 if bf16 else torch.float16
    return precision == "16", torch.float16 if precision == "16" else None


def use_channels_last(device, cfg) -> bool:
    """optimization.channels_last: auto (on for CPU and CUDA: 1.16x per training step on a 2-core CPU,
    benchmarks/RESULTS.md; MPS unmeasured), true or false. A config written before the key existed means auto."""
    setting = cfg["optimization"].get("channels_last", "auto")
    return device.type in ("cpu", "cuda") if str(setting).lower() == "auto" else bool(setting)


# ----------------------------------------------------------------------------------------------------------------
# Loss: the tutorial's three terms, counted only inside the valid mask
# ----------------------------------------------------------------------------------------------------------------


class HydraLoss(nn.Module):
    """weights[0] * (Dice + BCE)(binary) + weights[1] * (Dice + BCE)(boundary) + weights[2] * MSE(tanh(distance)).
    Voxels outside the valid mask (weight 0) do not count: their
    logits are set to -1e4 (probability 0) for the Dice term, and they carry zero weight in BCE and MSE. The MSE
    weights foreground voxels 3 : 1 over background, so thin vesicles are not drowned by the background's -1.

    Deep supervision (output a tuple: full resolution, then coarser scales): the same loss at scale k, on the
    targets brought to its size (nearest voxel; the boundary by max-pooling, so thin contours survive), weighted
    1 / 2^k as pytorch_connectomics weights its scales, and summed. The terms returned are those of the full
    resolution (train_loss_0..2); the total includes every scale."""

    def __init__(self, weights=(1.0, 1.0, 3.0)):
        super().__init__()
        self.weights = [float(w) for w in weights]
        self.dice = DiceLoss(smooth=1.0)

    def forward(self, output, target, valid):
        if not isinstance(output, (tuple, list)):
            return self.single(output, target, valid)
        total, terms = self.single(output[0], target, valid)
        for k, coarse in enumerate(output[1:], start=1):
            size = coarse.shape[2:]
            resized = torch.cat([F.interpolate(target[:, :1], size=size, mode="nearest"),
                                 F.adaptive_max_pool3d(target[:, 1:2], size),
                                 F.interpolate(target[:, 2:3], size=size, mode="nearest")], 1)  # fmt: skip
            total = total + self.single(coarse, resized, F.interpolate(valid, size=size, mode="nearest"))[0] / 2**k
        return total, terms

    def single(self, output, target, valid):
        output = output.float()
        terms = {}
        for channel, name in ((0, "binary"), (1, "boundary")):
            logits, truth = output[:, channel : channel + 1], target[:, channel : channel + 1]
            dice = self.dice(torch.where(valid > 0, logits, torch.full_like(logits, -1e4)), truth * valid)
            bce = F.binary_cross_entropy_with_logits(logits, truth, weight=valid, reduction="sum")
            terms[name] = dice + bce / valid.sum().clamp_min(1)
        distance, truth = torch.tanh(output[:, 2:3]), target[:, 2:3]
        weight = valid * (1 + 2 * (truth > 0).float())
        terms["distance"] = (weight * (distance - truth) ** 2).sum() / weight.sum().clamp_min(1)
        total = sum(w * term for w, term in zip(self.weights, terms.values(), strict=True))
        return total, {name: float(term.detach()) for name, term in terms.items()}


# ----------------------------------------------------------------------------------------------------------------
# Sliding-window inference, chunk by chunk
# ----------------------------------------------------------------------------------------------------------------


def window_starts(size: int, window: int, step: int) -> list[int]:
    """Start of every window along one axis: a regular grid, plus one flush with the end."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def blending_weights(window, mode: str = "gaussian") -> np.ndarray:
    """Gaussian importance map (sigma = window / 8, as nnU-Net and MONAI), floored at a small positive value so
    every voxel of a window counts a little; or constant."""
    if mode == "constant":
        return np.ones(window, np.float32)
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (n / 8)) ** 2) for n in window]
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights = weights / weights.max()
    return np.maximum(weights, 1e-3).astype(np.float32)


@torch.no_grad()
def predict_windows(model, windows: torch.Tensor, tta: bool, ctx=None) -> torch.Tensor:
    """Sigmoid of binary and boundary, tanh of distance; tta: the mean over flips of x, y, z and x+y (and none).
    ctx: train.mixed_precision's autocast context (None: fp32)."""
    flips = [()] + ([(-1,), (-2,), (-3,), (-1, -2)] if tta else [])
    ctx = nullcontext() if ctx is None else ctx
    total = 0
    for dims in flips:
        view = windows.flip(dims) if dims else windows
        with ctx:
            out = model(view).float()
        out = out.flip(dims) if dims else out
        total = total + torch.cat([torch.sigmoid(out[:, :2]), torch.tanh(out[:, 2:3])], 1)
    return total / len(flips)


def sliding_window_inference(
    model, volume, window, overlap=0.25, batch_size=4, tta=False, blending="gaussian", device="cpu", write=None,
    ctx=None, progress=False, scale=None,
):  # fmt: skip
    """Predict a whole (z, y, x) volume (a NumPy array or an h5py dataset: uint8, or float in 0..1, or any
    intensities with `scale`, the (offset, span) of data.intensity_scale) window by window; overlapping windows are
    averaged with `blending` weights.

    Streaming along z: the windows go row by row (one row = all windows at one z start). Once a row is done, the
    sections before the next row's start can get no more contributions: they are final, go to
    `write(z0, z1, output)` (output (3, z1 - z0, y, x) float32) and leave memory. So every window runs once, and
    memory holds one window-depth slab of input and of the accumulated output (about 20 bytes per voxel of a
    window-deep slab, on the CPU) however deep the volume is. Without `write`, the whole output is returned.
    A volume smaller than the window is mirrored up to it. ctx: the autocast context (None: fp32); progress: a
    tqdm bar over the windows."""
    if not 0 <= overlap < 1:
        raise SystemExit(f"inference.overlap={overlap}: must be at least 0 and below 1")
    shape = tuple(volume.shape)
    window = tuple(int(w) for w in window)
    steps = [max(1, int(w * (1 - overlap))) for w in window]
    starts = [window_starts(n, w, s) for n, w, s in zip(shape, window, steps, strict=True)]
    plane = [max(n, w) for n, w in zip(shape[1:], window[1:], strict=True)]  # sections padded up to a window
    weights = blending_weights(window, blending)
    result = None if write is not None else np.zeros((3, *shape), np.float32)
    z_starts = starts[0]
    done = 0  # sections [0, done) are written; the accumulators hold sections [done, done + their depth)
    accumulated = np.zeros((3, 0, *plane), np.float32)
    norm = np.zeros((0, *plane), np.float32)
    positions = list(product(starts[1], starts[2]))
    bar = tqdm(total=len(z_starts) * len(positions), desc="windows", unit="window", disable=not progress, leave=False)
    for row, z in enumerate(z_starts):
        slab = np.asarray(volume[z : min(z + window[0], shape[0])], dtype=np.float32)
        if scale is not None:  # the volume's stretch, as training read it (data.intensity_scale)
            slab = scale_intensity(slab, scale)
        elif np.issubdtype(volume.dtype, np.integer):
            slab /= 255.0
        short = [window[0] - slab.shape[0]] + [p - n for p, n in zip(plane, shape[1:], strict=True)]
        if any(short):  # a volume smaller than the window: mirrored up to it
            slab = np.pad(slab, [(0, n) for n in short], mode="reflect" if min(slab.shape) > 1 else "edge")
        grow = z + window[0] - (done + norm.shape[0])
        if grow > 0:
            accumulated = np.concatenate([accumulated, np.zeros((3, grow, *plane), np.float32)], 1)
            norm = np.concatenate([norm, np.zeros((grow, *plane), np.float32)], 0)
        slab = torch.from_numpy(slab).to(device)
        for b in range(0, len(positions), batch_size):
            batch = positions[b : b + batch_size]
            windows = torch.stack([slab[:, y : y + window[1], x : x + window[2]] for y, x in batch])[:, None]
            out = predict_windows(model, windows, tta, ctx).cpu().numpy()
            bar.update(len(batch))
            for (y, x), o in zip(batch, out, strict=True):
                box = (slice(z - done, z - done + window[0]), slice(y, y + window[1]), slice(x, x + window[2]))
                accumulated[(slice(None), *box)] += o * weights
                norm[box] += weights
        final = z_starts[row + 1] if row + 1 < len(z_starts) else shape[0]
        output = accumulated[:, : final - done, : shape[1], : shape[2]] / norm[: final - done, : shape[1], : shape[2]]
        if write is None:
            result[:, done:final] = output
        else:
            write(done, final, output)
        accumulated, norm = accumulated[:, final - done :], norm[final - done :]
        done = final
    bar.close()
    return result


# ----------------------------------------------------------------------------------------------------------------
# Decoding: seeded watershed on the distance map
# ----------------------------------------------------------------------------------------------------------------


def drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Labels with every object under min_size voxels set to 0. (scikit-image's remove_small_objects changed
    its size keyword in 0.26; we support 0.22 on.)"""
    small = np.bincount(labels.ravel()) < min_size
    small[0] = False
    labels[small[labels]] = 0
    return labels


def decode_instances(
    binary, boundary, distance, seed_binary=0.9, seed_contour=0.8, seed_distance=0.5, foreground=0.85,
    min_seed_size=16, min_object_size=64,
) -> np.ndarray:  # fmt: skip
    """Instance ids (uint32) from the three probability maps (0..1; distance -1..1), as in the connectomics
    tutorial: seeds are connected regions where binary > seed_binary, boundary < seed_contour and distance >
    seed_distance, those under min_seed_size voxels dropped; the foreground is binary > foreground; a watershed
    of the negated distance grows the seeds through it; objects under min_object_size voxels are removed."""
    seeds_mask = (binary > seed_binary) & (boundary < seed_contour) & (distance > seed_distance)
    seeds, n = ndimage.label(seeds_mask)
    seeds = drop_small(seeds, min_seed_size) if n else seeds
    mask = binary > foreground
    labels = drop_small(watershed_by_component(-np.asarray(distance, np.float32), seeds, mask), min_object_size)
    return relabel_sequential(labels)[0].astype(np.uint32)


def watershed_by_component(image: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """scikit-image's watershed, run on each connected part of the mask inside its bounding box. A flood never
    crosses the mask, so this is one watershed of the whole volume but for ties (voxels at equal distance from
    two seeds may go the other way: 175 of 1.3 million foreground voxels in the benchmark); the priority queue
    stays as small as one cluster of vesicles, and the time grows linearly with the volume (one queue for the
    whole volume grew as voxels^1.3, benchmarks/RESULTS.md)."""
    parts, _ = ndimage.label(mask)
    labels = np.zeros(mask.shape, np.int32)
    for index, box in enumerate(ndimage.find_objects(parts), start=1):
        inside = parts[box] == index
        seeds = np.where(inside, markers[box], 0)
        if seeds.any():
            labels[box][inside] = watershed(image[box], markers=seeds, mask=inside)[inside]
    return labels


def connected_components_baseline(binary, threshold=0.5, min_object_size=64) -> np.ndarray:
    """The baseline: threshold the binary map and label its 3D connected components (touching vesicles merge)."""
    labels = drop_small(ndimage.label(binary > threshold)[0], min_object_size)
    return relabel_sequential(labels)[0].astype(np.uint32)
