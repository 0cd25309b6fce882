"""Attention U-Net with a ResNet encoder for PanNuke, and the steps from its outputs to nucleus instances.

Outputs of `AttentionUNet` (a dict):
- "seg":  (N, 6, H, W) logits: background + Neoplastic, Inflammatory, Connective, Dead, Epithelial.
- "dist": (N, 1, H, W) logits of the distance-to-boundary map: inside each nucleus, the distance to the nearest
  pixel outside that nucleus, divided by the nucleus' own maximum (1 at its centre, falling to 0 at its edge),
  0 on background.

Why a distance map and not a boundary class: PanNuke nuclei are 5-30 px wide and touch in clusters
(inflammatory, epithelial). A boundary class 1-2 px thick is a few percent of the pixels, so it is learned
late and breaks easily, and a single missed boundary pixel merges two nuclei. The normalised distance map is
a smooth regression target present on every nucleus pixel; its peaks give one watershed seed per nucleus even
where nuclei touch, and it is the landscape the watershed floods (as in HoVer-Net's and the connectomics
distance-transform decoders). Normalising per nucleus keeps small (inflammatory) and large (neoplastic) nuclei
on one 0..1 scale, so one seed threshold fits all classes.

Instances (`instances_from_outputs`): foreground = argmax class != background (small holes filled); seeds =
connected components of distance > seed_threshold inside the foreground; a marker-controlled watershed
(scikit-image) on the negated distance splits the foreground into nuclei; each nucleus then takes the majority
class of its pixels, as HoVer-Net assigns types. This differs from per-class connected components split by the
watershed in one way, on purpose: a nucleus whose pixels are predicted as two classes stays one nucleus of
its majority class instead of becoming two fragments that both fail IoU > 0.5; two touching nuclei of
different classes are still separated when the distance map gives each its own seed.
"""

from __future__ import annotations

import math
import urllib.error
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from scipy import ndimage
from skimage.segmentation import relabel_sequential, watershed
from torch import Tensor, nn
from tqdm import tqdm

NUM_CLASSES = 6  # background + the five PanNuke nucleus types
DOMAIN = "pannuke"  # the tag of this folder's checkpoints
ARCHITECTURE = "attention_unet"
ENCODERS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V2),
}
# ImageNet statistics of the encoder are not used: tiles are CLAHE + z-scored per tile (pannuke/data.py).


def load_encoder_weights(encoder: nn.Module, name: str, weights: str) -> None:
    """`weights`: "imagenet" (torchvision's weights API: the torch hub cache, else a download), "none", or the
    path of a state dict of the torchvision ResNet (its `fc` layer may be missing)."""
    if weights == "none":
        return
    if weights == "imagenet":
        spec = ENCODERS[name][1]
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(spec.url).name
        try:
            state = spec.get_state_dict(progress=False, check_hash=True)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            raise SystemExit(
                f"could not get the ImageNet weights of {name} ({error}).\n"
                f"  Offline? Download {spec.url}\n"
                f"  on a machine with internet access and copy it to {cached}, or pass --encoder_weights PATH to the\n"
                f"  file, or --encoder_weights none to train from scratch."
            ) from None
    else:
        path = Path(weights)
        if not path.is_file():
            raise SystemExit(f"--encoder_weights {weights}: no such file (expected imagenet, none, or a .pth path)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise SystemExit(f"--encoder_weights {path}: not a loadable state dict ({error})") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise SystemExit(
            f"--encoder_weights {weights}: not a torchvision {name} state dict "
            f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)"
        )


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def conv1x1_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))


class AttentionGate(nn.Module):
    """Additive attention gate of Oktay et al. 2018: alpha = sigmoid(psi(relu(W_x x + W_g g))), output x * alpha.

    g is the coarser decoder feature (the gating signal), x the encoder skip; alpha is one weight per skip pixel.
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int):
        super().__init__()
        self.w_x = conv1x1_bn(skip_channels, inter_channels)
        self.w_g = conv1x1_bn(gate_channels, inter_channels)
        self.psi = nn.Sequential(nn.Conv2d(inter_channels, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        g = F.interpolate(self.w_g(g), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x * self.psi(F.relu(self.w_x(x) + g))


class DecoderBlock(nn.Module):
    """Upsample x2, gate the skip with the upsampled feature, concatenate, two 3x3 convs, dropout."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.gate = AttentionGate(skip_channels, in_channels, max(skip_channels // 2, 8)) if skip_channels else None
        self.convs = nn.Sequential(
            conv_bn_relu(in_channels + skip_channels, out_channels), conv_bn_relu(out_channels, out_channels)
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        size = skip.shape[-2:] if skip is not None else tuple(2 * s for s in x.shape[-2:])
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, self.gate(skip, x)], dim=1)
        return self.dropout(self.convs(x))


class AttentionUNet(nn.Module):
    """U-Net decoder with attention-gated skips on a torchvision ResNet encoder (strides 2, 4, 8, 16, 32).

    The constructor arguments are stored in checkpoints (`model_args`), so evaluate.py and visualize.py rebuild
    the same network. Input height and width must be multiples of 32.
    """

    def __init__(
        self,
        encoder: str = "resnet34",
        encoder_weights: str = "none",
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.1,
        decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
    ):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r}; choose one of {sorted(ENCODERS)}")
        resnet = ENCODERS[encoder][0](weights=None)
        load_encoder_weights(resnet, encoder, encoder_weights)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu)  # stride 2
        self.pool = resnet.maxpool
        self.layers = nn.ModuleList([resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4])  # 4, 8, 16, 32
        widths = [64] + [self._out_channels(layer) for layer in self.layers]
        skips = widths[-2::-1] + [0]  # stride 16, 8, 4, 2 skips, then full resolution without a skip
        blocks, channels = [], widths[-1]
        for skip, out in zip(skips, decoder_channels, strict=True):
            blocks.append(DecoderBlock(channels, skip, out, dropout))
            channels = out
        self.decoder = nn.ModuleList(blocks)
        self.seg_head = nn.Conv2d(channels, num_classes, 1)
        self.dist_head = nn.Conv2d(channels, 1, 1)

    @staticmethod
    def _out_channels(layer: nn.Sequential) -> int:
        last = layer[-1]
        return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = [self.stem(x)]
        y = self.pool(features[0])
        for layer in self.layers:
            y = layer(y)
            features.append(y)
        skips = features[-2::-1] + [None]
        for block, skip in zip(self.decoder, skips, strict=True):
            y = block(y, skip)
        return {"seg": self.seg_head(y), "dist": self.dist_head(y)}


def build_model(model_args: dict) -> AttentionUNet:
    return AttentionUNet(**model_args)


# ----------------------------------------------------------------------------------------------------------------
# Inference: TTA, tiled prediction, instances
# ----------------------------------------------------------------------------------------------------------------

# The eight symmetries of a square tile, as training augments (RandomRotate90, HorizontalFlip): k quarter turns,
# each without and with a horizontal flip.
TTA_TRANSFORMS = tuple((k, flip) for k in range(4) for flip in (False, True))


def _forward_transform(x: Tensor, k: int, flip: bool) -> Tensor:
    return torch.rot90(x.flip(-1) if flip else x, k, dims=(-2, -1))


def _inverse_transform(y: Tensor, k: int, flip: bool) -> Tensor:
    y = torch.rot90(y, -k, dims=(-2, -1))
    return y.flip(-1) if flip else y


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, tta: bool = False, ctx=None) -> tuple[Tensor, Tensor]:
    """Class probabilities (N, 6, H, W) and distance map (N, 1, H, W) in 0..1; with tta, averaged over the eight
    flips and quarter turns of TTA_TRANSFORMS. ctx: the autocast context each forward pass runs in (train.py's
    mixed_precision); None: full precision."""
    transforms = TTA_TRANSFORMS if tta else ((0, False),)
    probs = dist = 0
    for k, flip in transforms:
        with nullcontext() if ctx is None else ctx:
            out = model(_forward_transform(images, k, flip))
        probs = probs + _inverse_transform(out["seg"].float().softmax(1), k, flip)
        dist = dist + _inverse_transform(out["dist"].float().sigmoid(), k, flip)
    return probs / len(transforms), dist / len(transforms)


def _window_weights(size: int) -> np.ndarray:
    """Raised-cosine blending weights of a tile (never exactly 0, so image borders keep their weight)."""
    ramp = np.sin(np.linspace(0.0, math.pi, size + 2)[1:-1]) ** 2
    return np.outer(ramp, ramp).astype(np.float32) + 1e-3


@torch.no_grad()
def predict_tiled(
    model: nn.Module,
    image: Tensor,
    tile: int = 256,
    overlap: int = 64,
    tta: bool = False,
    batch_size: int = 8,
    zscore_tiles: bool = True,
    ctx=None,
) -> tuple[Tensor, Tensor]:
    """predict() on an image of any size (1, 3, H, W) by overlapping tiles blended with cosine weights.

    With zscore_tiles, each tile is z-scored per channel on its own, as training tiles are (pannuke/data.py),
    so `image` is the CLAHE'd image as float 0..255. Tiles run on the model's device; the blended
    (1, 6, H, W) probabilities and (1, 1, H, W) distance map are accumulated on the CPU, so GPU memory does not
    limit the image size (CPU memory does: about 40 bytes per pixel, 16 GB for a 20,000 px square). ctx: as in
    predict(). A progress bar counts the tiles of an image that needs more than one batch of them.
    """
    if tile % 32 or not 0 <= overlap < tile:
        raise ValueError(f"tile {tile} must be a multiple of 32 and overlap {overlap} in 0..tile-1")
    device = next(model.parameters()).device
    image = image.float().cpu()
    _, _, h, w = image.shape
    pad_h, pad_w = max(tile - h, 0), max(tile - w, 0)
    if pad_h or pad_w:
        # reflect where the image is large enough; otherwise the image mean
        if pad_h < h and pad_w < w:
            image = F.pad(image, (0, pad_w, 0, pad_h), mode="reflect")
        else:
            mean = image.mean((-2, -1), keepdim=True)
            image = F.pad(image - mean, (0, pad_w, 0, pad_h)) + mean
    ph, pw = image.shape[-2:]
    step = tile - overlap
    ys = sorted({*range(0, ph - tile, step), ph - tile})
    xs = sorted({*range(0, pw - tile, step), pw - tile})
    corners = [(y, x) for y in ys for x in xs]
    weight = torch.from_numpy(_window_weights(tile))
    probs = torch.zeros((1, NUM_CLASSES, ph, pw))
    dist = torch.zeros((1, 1, ph, pw))
    norm = torch.zeros((1, 1, ph, pw))
    bar = tqdm(total=len(corners), desc="tiles", unit="tile", leave=False, disable=len(corners) <= batch_size)
    for start in range(0, len(corners), batch_size):
        batch = corners[start : start + batch_size]
        crops = torch.cat([image[..., y : y + tile, x : x + tile] for y, x in batch])
        if zscore_tiles:
            mean = crops.mean((-2, -1), keepdim=True)
            crops = (crops - mean) / crops.std((-2, -1), keepdim=True, unbiased=False).clamp_min(1e-6)
        p, d = predict(model, crops.to(device), tta, ctx)
        p, d = p.cpu(), d.cpu()
        for i, (y, x) in enumerate(batch):
            probs[..., y : y + tile, x : x + tile] += p[i] * weight
            dist[..., y : y + tile, x : x + tile] += d[i] * weight
            norm[..., y : y + tile, x : x + tile] += weight
        bar.update(len(batch))
    bar.close()
    return (probs / norm)[..., :h, :w], (dist / norm)[..., :h, :w]


def fill_small_holes(mask: np.ndarray, max_size: int = 30) -> np.ndarray:
    """Fill holes of at most max_size pixels (pale chromatin inside a nucleus), not larger enclosed regions
    such as gland lumens or stroma ringed by touching nuclei."""
    holes, n = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    if n == 0:
        return mask
    small = np.bincount(holes.ravel()) <= max_size
    small[0] = False
    return mask | small[holes]


def instances_from_outputs(
    probs: np.ndarray, dist: np.ndarray, seed_threshold: float = 0.5, min_size: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus instances of one image from its class probabilities (6, H, W) and distance map (H, W).

    Returns (instances, classes): an int32 label image (0 = background, 1..K) and the class (1..5) of each
    instance (classes[k-1] for label k).
    """
    semantic = probs.argmax(0)
    foreground = fill_small_holes(semantic > 0)
    seeds, _ = ndimage.label((dist > seed_threshold) & foreground)
    # Foreground components with no seed (small or faint nuclei) become their own seed.
    components, n_components = ndimage.label(foreground)
    if n_components:
        seeded = np.zeros(n_components + 1, dtype=bool)
        seeded[np.unique(components[seeds > 0])] = True
        unseeded = ~seeded[components] & foreground
        extra, _ = ndimage.label(unseeded)
        seeds[unseeded] = extra[unseeded] + seeds.max()
    instances = watershed(-dist, seeds, mask=foreground).astype(np.int32)
    # Drop specks, renumber 1..K (0 stays background even on a tile without background).
    areas = np.bincount(instances.ravel())
    small = areas < min_size
    small[0] = True
    instances[small[instances]] = 0
    instances = relabel_sequential(instances)[0].astype(np.int32)
    n = int(instances.max())
    if n == 0:
        return instances, np.zeros(0, dtype=np.int64)
    # Majority class over each nucleus' pixels; background votes (filled holes) do not count.
    votes = np.zeros((n + 1, NUM_CLASSES), dtype=np.int64)
    np.add.at(votes, (instances.ravel(), semantic.ravel()), 1)
    return instances, votes[1:, 1:].argmax(1) + 1


def pannuke_masks(instances: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(H, W, 6) PanNuke-layout mask: channel c-1 holds the instances of class c with their ids, channel 5
    is the background (1 where no nucleus), as in the official masks.npy."""
    out = np.zeros((*instances.shape, 6), dtype=np.int32)
    class_of = np.concatenate([[0], classes])[instances]
    for c in range(1, NUM_CLASSES):
        inside = class_of == c
        out[..., c - 1][inside] = instances[inside]
    out[..., 5] = instances == 0
    return out


# ----------------------------------------------------------------------------------------------------------------
# Devices and checkpoints (shared by train.py, evaluate.py, visualize.py)
# ----------------------------------------------------------------------------------------------------------------


def ema_average(decay: float):
    """EMA for AveragedModel's multi_avg_fn, with timm's warm-up decay min(decay, (1 + n) / (10 + n)) so early
    averages are not dominated by the random initial weights."""

    def update(ema_params, current_params, num_averaged):
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        for ema, current in zip(ema_params, current_params, strict=True):
            if ema.is_floating_point():
                ema.lerp_(current, 1.0 - d)  # ema += (1 - d) * (current - ema)
            else:  # BatchNorm's num_batches_tracked: copied
                ema.copy_(current)

    return update


def pick_device() -> torch.device:
    """CUDA, then Apple MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def find_checkpoint(path: str | Path, name: str = "best.pth") -> Path:
    """A checkpoint file, or `name` inside a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise SystemExit(f"{path}: no such checkpoint (give a run folder holding {name}, or a .pth file)")
    return path


def checkpoint_dict(args, model_args: dict, model: dict, **more) -> dict:
    """What train.py saves, as plain data: load_checkpoint rebuilds the network from domain, arch and model_args."""
    stored = {"domain": DOMAIN, "arch": ARCHITECTURE, "model_args": model_args, "model": model}
    return {**stored, **more, "args": vars(args)}


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the network from the arguments stored in a pannuke checkpoint and load its weights (weights_only)."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SystemExit(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("domain") != DOMAIN:
        found = checkpoint.get("domain", "no domain recorded") if isinstance(checkpoint, dict) else type(checkpoint)
        raise SystemExit(f"{path} is not a pannuke checkpoint (domain: {found})")
    if checkpoint.get("arch") != ARCHITECTURE:
        raise SystemExit(f"{path} holds a {checkpoint.get('arch')!r} network; this script builds {ARCHITECTURE!r}")
    model = build_model(checkpoint["model_args"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise SystemExit(f"{path}: weights do not fit the network stored with them ({error})") from None
    return model.to(device).eval(), checkpoint
