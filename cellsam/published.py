"""The published CellSAM (vanvalenlab/cellSAM) in its own parameter layout: load its released weights
(cellsam_general.pt / cellsam_extra.pt), segment as it does, fine-tune it with train.py, and write the result back
as a plain state dict that cellSAM's `get_local_model()`, its napari plugin and its whole-slide pipeline load.

    from cellsam.published import get_local_model, segment_cellular_image
    model = get_local_model("cellsam_general.pt")
    mask, embedding, boxes = segment_cellular_image(image, model, device="cpu")

The module `CellSAM` holds three parts, as published: `model` (SAM ViT-B), `model_cp` (a second SAM ViT-B whose
image encoder, prompt encoder and mask decoder make the masks) and `cellfinder.decode_head` (AnchorDETR on its own
ViT-B image encoder without the neck, see anchor_detr.py). `vit_tiny` builds the same layout at the width of this
folder's tiny SAM, for CPU tests.

Inference, as cellSAM's segment_cellular_image:
1. the image to (H, W, 3) with its channels last and in the last slots ((blank, nuclear, whole-cell) for 2
   channels, (0, 0, grey) for one); with normalize: each channel clipped at its 99.9th percentile of non-zero
   values, rescaled to 0..1 and equalised by CLAHE (kernel 128);
2. resized to 1024 x 1024 (bilinear, antialiased);
3. CellFinder's input: 8-bit (x 255, truncated), SAM's pixel normalisation, ImageNet's, each channel min-max
   scaled to 0..1, an empty green channel filled from the blue one (and the reverse);
   the masks' input: clipped to the 0th..99.5th percentile of its non-zero values and rescaled, ImageNet's
   normalisation, min-max per channel, then SAM's normalisation in the image encoder of `model_cp`;
4. boxes: the Q most confident of the Q x classes (query, class) scores, kept above 0.66 x bbox_threshold + 0.33
   x the mean of the two k-means cluster centres of those scores (bbox_threshold alone when k-means fails);
5. one mask per box from `model_cp`, dropped when its predicted IoU is below 0.5; logits upsampled to the image,
   sigmoid > 0.4; the label image numbers the kept masks 1..K in box order and a later (less confident) mask
   wins a pixel two masks claim;
6. holes filled and cells under 25 px removed (renumbered 1..K), then optionally `postprocess` (per-cell
   morphological smoothing) and `remove_boundaries` (a one-pixel gap between touching cells).
"""

from __future__ import annotations

import copy
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.exposure import equalize_adapthist, rescale_intensity
from torch import nn
from torchvision.transforms.v2 import functional as TF

from cellsam.anchor_detr import build_anchor_detr
from cellsam.model import SAM_SIZES, build_sam, decode_masks, encode, stage2_modules, tile_and_stitch

# cellSAM's modelconfig.yaml, and the same layout at vit_tiny's width for CPU tests
CELLFINDER_SIZES = {
    "vit_b": {"enc_layers": 6, "dec_layers": 6, "dim_feedforward": 1024, "hidden_dim": 256, "dropout": 0.0,
              "nheads": 8, "num_query_position": 3500, "num_query_pattern": 1, "num_classes": 2},
    "vit_tiny": {"enc_layers": 1, "dec_layers": 2, "dim_feedforward": 128, "hidden_dim": 64, "dropout": 0.0,
                 "nheads": 4, "num_query_position": 300, "num_query_pattern": 1, "num_classes": 2},
}  # fmt: skip
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PARTS = ("model.", "model_cp.", "cellfinder.")


class CellSAM(nn.Module):
    """The published CellSAM's modules: state_dict() has cellSAM's keys and shapes (1,041 for vit_b).
    With `sam_checkpoint` (an official SAM file), all three image encoders, the prompt encoders and the mask
    decoders start from SAM's weights, as CellSAM itself was trained."""

    def __init__(self, sam_size: str = "vit_b", sam_checkpoint: str | Path | None = None):
        super().__init__()
        if sam_size not in CELLFINDER_SIZES:
            raise SystemExit(
                f"--sam_size {sam_size}: the published CellSAM is vit_b (vit_tiny for tests); "
                "vit_l and vit_h train with --architecture shared_encoder"
            )
        self.sam_size = sam_size
        self.model = build_sam(sam_size, sam_checkpoint)
        width = SAM_SIZES[sam_size]["embed_dim"]
        self.cellfinder = build_anchor_detr(self.model.image_encoder, width, CELLFINDER_SIZES[sam_size])
        self.model_cp = copy.deepcopy(self.model)
        self.bbox_threshold, self.iou_threshold, self.mask_threshold = 0.4, 0.5, 0.4
        # cellSAM's "adv_mode": masks from model_cp, ImageNet + min-max input steps for both branches; a file
        # without model_cp runs on `model` without them (its load_state_dict rule), and is trained and exported so
        self.adv_mode = True
        # an image larger than `window` px (default: the input size) is cut into windows, each resized to the input
        # size; a smaller one is resized whole (cellSAM's wsi.py uses 512 px windows)
        self.window = None

    @property
    def input_size(self) -> int:
        return self.model.image_encoder.img_size

    @property
    def mask_sam(self):
        return self.model_cp if self.adv_mode else self.model

    # the interface train.py, evaluate.py and visualize.py use (model.SharedEncoderCellSAM has the same); images
    # go in as read_image gives them: normalize_image's 0..1 on a 0..255 scale, resized to the input size

    architecture = "published"

    @property
    def parts(self) -> dict:
        """The pieces stage checkpoints name: what each stage trains (and the prompt encoder), not the frozen
        encoders, which the run rebuilds from its starting file. mask_sam.*: model_cp, or `model` for a file
        without model_cp."""
        head, sam = self.cellfinder.decode_head, self.mask_sam
        return {"cellfinder.transformer": head.transformer, "cellfinder.input_proj": head.input_proj,
                "cellfinder.backbone": head.backbone.body, "mask_sam.image_encoder": sam.image_encoder,
                "mask_sam.neck": sam.image_encoder.neck, "mask_sam.prompt_encoder": sam.prompt_encoder,
                "mask_sam.mask_decoder": sam.mask_decoder}  # fmt: skip

    def finder_forward(self, images: torch.Tensor) -> dict:
        """{"logits": (B, Q, classes), "boxes": (B, Q, 4), "aux": [the same per earlier decoder layer]}."""
        out = self.cellfinder(finder_input(images / 255, self.model, self.adv_mode))
        aux = [{"logits": a["pred_logits"], "boxes": a["pred_boxes"]} for a in out["aux_outputs"]]
        return {"logits": out["pred_logits"], "boxes": out["pred_boxes"], "aux": aux}

    def mask_input(self, images: torch.Tensor) -> torch.Tensor:
        return mask_input(images / 255, self.adv_mode)

    def freeze_for_stage1(self, stage1_type: str) -> dict:
        """cellfinder: CellFinder's transformer, heads and input projection; image_encoder: also CellFinder's
        own image encoder (backbone.body); all_backbones: also the masks' image encoder, which then learns from the
        mask loss of true-box prompts beside the box loss (train.py). Returns the parts to train and save."""
        names = ["cellfinder.transformer", "cellfinder.input_proj"]
        names += {"cellfinder": [], "image_encoder": ["cellfinder.backbone"],
                  "all_backbones": ["cellfinder.backbone", "mask_sam.image_encoder"]}[stage1_type]  # fmt: skip
        self.requires_grad_(False)
        trained = {name: self.parts[name] for name in names}
        for module in trained.values():
            module.requires_grad_(True)
        return trained

    def stage2_parts(self, train_parts: str) -> tuple[list, dict]:
        saved = ("mask_sam.neck", "mask_sam.prompt_encoder", "mask_sam.mask_decoder")
        return stage2_modules(self.mask_sam, train_parts), {name: self.parts[name] for name in saved}

    def read_image(self, path: Path) -> np.ndarray:
        """(H, W, 3) float32: format_image_shape and normalize_image, on a 0..255 scale."""
        from cellsam.data import DataError, read_array

        array = read_array(path)
        if array.ndim == 3 and array.shape[-1] == 4:  # RGBA: drop alpha
            array = array[..., :3]
        try:
            return (normalize_image(array.astype(np.float64)) * 255).astype(np.float32)
        except ValueError as error:
            raise DataError(f"{path}: {error}") from None

    @torch.no_grad()
    def segment(self, image, score_threshold=0.4, overlap=64, device="cpu", labels=None, on_cells=None):
        return segment_tiled(image, self, self.window, overlap, score_threshold, device, 1 / 255, labels, on_cells)

    def large_image(self, path: Path, gamma: float = 1.0):
        """A TIFF too large to hold, read a window at a time and normalised as normalize_image does the whole
        image: each channel clipped at the 99.9th percentile of its non-zero values and stretched by its range,
        both of a strided sample of the whole image, then CLAHE (kernel 128) on the window itself."""
        from cellsam.data import LargeImage

        image = LargeImage(path)
        sample = format_image_shape(image.sample()).astype(np.float64)
        bounds = []
        for c in range(3):
            channel = sample[..., c]
            nonzero = channel[channel != 0]
            top = np.percentile(nonzero, 99.9) if len(nonzero) else 0.0
            bounds.append((min(channel.min(), top), top))

        def prepare(region: np.ndarray) -> np.ndarray:
            region = format_image_shape(region)
            out = np.zeros_like(region)
            for c, (low, top) in enumerate(bounds):
                if top <= low:
                    continue
                channel = (np.clip(region[..., c], low, top) - low) / (top - low)
                out[..., c] = equalize_adapthist(channel, kernel_size=128)
            out = 255.0 * out**gamma if gamma != 1.0 else 255.0 * out
            return out.astype(np.float32)

        image.prepare = prepare
        return image

    @torch.no_grad()
    def detect(self, image: np.ndarray, device="cpu") -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """CellFinder's ranked boxes (xyxy image pixels) and scores, each query once (at its best class), on the
        whole image when it fits one window (resized to the input size, as segment_cellular_image), else on its
        top-left window; and the (h, w) they cover."""
        size, window = self.input_size, self.window or self.input_size
        h, w = image.shape[:2]
        if max(h, w) > window:
            h, w = min(h, window), min(w, window)
        x = torch.from_numpy(np.ascontiguousarray(image[:h, :w].transpose(2, 0, 1)))[None].float().to(device)
        out = self.cellfinder(finder_input(resize_to_input(x / 255, size), self.model, self.adv_mode))
        scores, boxes, queries = ranked_detections(out, size, with_queries=True)
        first = np.sort(np.unique(queries.cpu().numpy(), return_index=True)[1])
        first = torch.from_numpy(first).to(scores.device)
        scale = boxes.new_tensor([w / size, h / size, w / size, h / size])
        return (boxes[first] * scale).cpu(), scores[first].cpu(), (h, w)

    def kept_boxes(self, scores: torch.Tensor, score_threshold: float) -> torch.Tensor:
        """Which of detect's boxes the pipeline keeps (cellSAM's dynamic threshold)."""
        return kept_scores(scores, score_threshold)


# ----------------------------------------------------------------------------------------------------------------
# Input steps (cellSAM's utils.normalize_image, sam_bbox_preprocessing and prep_2)
# ----------------------------------------------------------------------------------------------------------------


def format_image_shape(img: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) with C <= 3 (or channels first: the smallest axis is the channel axis) -> (H, W, 3)
    float64, the channels in the last slots."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[..., None]
    elif img.ndim == 3:
        channel = int(np.argmin(img.shape))
        img = np.moveaxis(img, channel, -1)
    else:
        raise ValueError(f"expected an image (H, W) or (H, W, C), found shape {img.shape}")
    if img.shape[-1] > 3:
        raise ValueError(f"at most three channels, found {img.shape[-1]} (shape {img.shape})")
    out = np.zeros((*img.shape[:2], 3))
    out[..., 3 - img.shape[-1] :] = img
    return out


def normalize_image(image: np.ndarray) -> np.ndarray:
    """Each channel clipped at the 99.9th percentile of its non-zero values, rescaled to 0..1 and equalised by
    CLAHE (kernel 128); a constant channel becomes 0. (H, W, 3) float64."""
    image = format_image_shape(image)
    out = np.zeros_like(image)
    for c in range(3):
        channel = image[..., c].copy()
        nonzero = channel[channel != 0]
        if len(nonzero):
            channel = np.minimum(channel, np.percentile(nonzero, 99.9))
        else:
            channel[:] = 0
        if (channel == channel.flat[0]).all():
            continue
        out[..., c] = equalize_adapthist(rescale_intensity(channel, out_range=(0.0, 1.0)), kernel_size=128)
    return out


def min_max(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each (image, channel) of (B, C, H, W) scaled to 0..1: (x - min) / (max - min + eps) (kornia's)."""
    low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return (x - low) / (high - low + eps)


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    return TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))


def resize_to_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size): torchvision's bilinear, antialiased resize (aspect ratio not kept)."""
    if images.shape[-2:] == (size, size):
        return images
    return TF.resize(images, [size, size], antialias=True)


def finder_input(images: torch.Tensor, sam, adv_mode: bool = True) -> torch.Tensor:
    """(B, 3, S, S) images in 0..1 -> CellFinder's input."""
    x = (images * 255).to(torch.uint8).float()  # to an 8-bit image, as cellSAM does through PIL (truncating)
    x = (x - sam.pixel_mean) / sam.pixel_std
    if not adv_mode:
        return x
    x = min_max(imagenet_normalize(x))
    green_empty = x[:, 1].amax((1, 2)) == 0
    x[:, 1] = torch.where(green_empty[:, None, None], x[:, 2], x[:, 1])
    blue_empty = x[:, 2].amax((1, 2)) == 0
    x[:, 2] = torch.where(blue_empty[:, None, None], x[:, 1], x[:, 2])
    return x


def mask_input(images: torch.Tensor, adv_mode: bool = True) -> torch.Tensor:
    """(B, 3, S, S) images in 0..1 -> the masks' image encoder input on SAM's 0..255 scale (encode() applies SAM's
    pixel normalisation): each image clipped to the 0th..99.5th percentile of its non-zero values (all channels
    together) and rescaled to 0..1, then ImageNet's normalisation and min-max per channel."""
    out = []
    for image in images:
        nonzero = image[image != 0]
        if len(nonzero):
            low, high = torch.quantile(nonzero.float(), torch.tensor([0.0, 0.995], device=image.device))
            image = image.clamp(low, high)
            image = (image - low) / (high - low) if high > low else image
        out.append(image)
    x = torch.stack(out)
    if adv_mode:
        x = min_max(imagenet_normalize(x))
    return x * 255


# ----------------------------------------------------------------------------------------------------------------
# Boxes, masks and the label image
# ----------------------------------------------------------------------------------------------------------------


def ranked_detections(outputs: dict, size: int, with_queries: bool = False):
    """AnchorDETR's outputs for one image -> (scores (Q,), boxes (Q, 4) xyxy in input pixels): the Q most
    confident of the Q x classes (query, class) scores, most confident first (cellSAM's PostProcess; a query can
    appear once per class). with_queries: also each entry's query index."""
    prob = outputs["pred_logits"][0].sigmoid()  # (Q, C)
    scores, index = prob.flatten().topk(prob.shape[0])
    queries = index // prob.shape[1]
    cx, cy, w, h = outputs["pred_boxes"][0][queries].unbind(-1)
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * size
    return (scores, boxes, queries) if with_queries else (scores, boxes)


def box_score_threshold(scores: np.ndarray, bbox_threshold: float) -> float:
    """cellSAM's dynamic threshold: 0.66 x bbox_threshold + 0.33 x the mean of the two cluster centres of a
    k-means (k = 2, scikit-learn, random_state 42) on all scores; bbox_threshold alone for one score or when
    k-means fails."""
    from sklearn.cluster import KMeans

    scores = np.asarray(scores, dtype=np.float32).reshape(-1, 1)
    if len(scores) <= 1:
        return bbox_threshold
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fewer distinct scores than clusters: the centres coincide
            centres = KMeans(n_clusters=2, random_state=42).fit(scores).cluster_centers_
        return 0.66 * bbox_threshold + 0.33 * float(np.mean(centres))
    except Exception:  # noqa: BLE001 (cellSAM falls back to bbox_threshold on any k-means failure)
        return bbox_threshold


def kept_scores(scores: torch.Tensor, bbox_threshold: float) -> torch.Tensor:
    """Which scores pass cellSAM's dynamic threshold (all of them where it is not positive), (N,) bool."""
    threshold = box_score_threshold(scores.cpu().numpy(), bbox_threshold)
    return scores > threshold if threshold > 0 else torch.ones_like(scores, dtype=torch.bool)


def select_boxes(scores: torch.Tensor, boxes: torch.Tensor, bbox_threshold: float) -> torch.Tensor:
    return boxes[kept_scores(scores, bbox_threshold)]


def paint_labels(masks, shape) -> np.ndarray:
    """Boolean masks in box order -> one label image: mask k gets label k (1-based), a later mask wins the pixels
    it shares with an earlier one (cellSAM's max over k x mask_k)."""
    labels = np.zeros(shape, np.int32)
    for k, mask in enumerate(masks, start=1):
        labels[np.asarray(mask, bool)] = k
    return labels


@torch.no_grad()
def masks_from_boxes(model: CellSAM, embedding, boxes, image_shape, chunk: int = 16):
    """(kept boolean masks (K, H, W) as a list of numpy arrays, kept index (N,) bool): one mask per box (N, 4)
    xyxy in input pixels; a mask whose predicted IoU is below model.iou_threshold is dropped."""
    sam, size = model.mask_sam, model.input_size
    masks, kept = [], []
    for part in boxes.split(chunk) if len(boxes) else ():
        logits, iou = decode_masks(sam, embedding, part)
        keep = iou >= model.iou_threshold
        kept.append(keep.cpu())
        if keep.any():
            logits = sam.postprocess_masks(logits[keep][:, None], (size, size), tuple(image_shape))[:, 0]
            masks += list((torch.sigmoid(logits) > model.mask_threshold).cpu().numpy())
    return masks, torch.cat(kept) if kept else torch.zeros(0, dtype=torch.bool)


def fill_holes_and_remove_small_masks(labels: np.ndarray, min_size: int = 15) -> np.ndarray:
    """Each cell, in label order: removed when under min_size pixels, else its holes filled and renumbered
    1..K (cellpose's rule, as cellSAM applies it with min_size 25). Changes `labels` in place and returns it."""
    kept = 0
    for index, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None:
            continue
        cell = labels[found] == index
        if min_size > 0 and cell.sum() < min_size:
            labels[found][cell] = 0
        elif cell.any():
            kept += 1
            labels[found][ndimage.binary_fill_holes(cell)] = kept
    return labels


def postprocess_predictions(labels: np.ndarray) -> np.ndarray:
    """cellSAM's optional per-cell smoothing: holes and islands under 20 px removed, opening and closing, a
    closing by a disk of 10 and a Gaussian (sigma 3) > 0.5; later labels win overlaps. As published, the first
    cell is opened and closed with a disk of 2 and every later one with a disk of 10."""
    from segment_anything.utils.amg import remove_small_regions
    from skimage.morphology import binary_closing, binary_dilation, binary_erosion, binary_opening, disk

    values = np.unique(labels)[1:]
    if not len(values):
        return labels
    out, footprint = np.zeros_like(labels), disk(2)
    for value in values:
        cell, _ = remove_small_regions(labels == value, 20, mode="holes")
        cell, _ = remove_small_regions(cell, 20, mode="islands")
        cell = binary_closing(binary_opening(cell, footprint), footprint)
        footprint = disk(10)
        cell = binary_erosion(binary_dilation(cell, footprint), footprint)
        cell = ndimage.gaussian_filter(cell.astype(np.float32), sigma=3) > 0.5
        out = np.maximum(out, cell.astype(labels.dtype) * value)
    return out


def subtract_boundaries(labels: np.ndarray) -> np.ndarray:
    """Zero a pixel whose left neighbour or whose lower neighbour has another label (cellSAM's one-pixel outline)."""
    outline = np.zeros(labels.shape, bool)
    outline[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    outline[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return np.where(outline, 0, labels)


@torch.no_grad()
def predict(model: CellSAM, image: np.ndarray, bounding_boxes=None, device="cpu"):
    """An image (H, W, 3), normalised (0..1) -> (label image (H, W) int32 before the clean-up, embedding
    (1, 256, 64, 64), kept boxes (K, 4) xyxy in image pixels, all box scores most confident first or None)."""
    h, w = image.shape[:2]
    size = model.input_size
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()[None].to(device)
    x = resize_to_input(x, size)
    _, embedding = encode(model.mask_sam, mask_input(x, model.adv_mode))
    scale = torch.tensor([size / w, size / h, size / w, size / h], device=device)
    scores = None
    if bounding_boxes is None:
        scores, boxes = ranked_detections(model.cellfinder(finder_input(x, model.model, model.adv_mode)), size)
        boxes = select_boxes(scores, boxes, model.bbox_threshold)
    else:
        boxes = torch.as_tensor(np.asarray(bounding_boxes, np.float32), device=device).reshape(-1, 4) * scale
    masks, kept = masks_from_boxes(model, embedding, boxes, (h, w))
    return paint_labels(masks, (h, w)), embedding, (boxes[kept.to(boxes.device)] / scale).cpu().numpy(), scores


def segment_cellular_image(img, model, normalize=True, postprocess=False, remove_boundaries=False,
                           bounding_boxes=None, bbox_threshold=0.4, fast=False, device="cpu"):  # fmt: skip
    """cellSAM's segment_cellular_image: an image (H, W) or (H, W, C) -> (mask (H, W) int32 cell labels, the
    image embedding as numpy, the kept boxes (K, 4) xyxy in image pixels; None and None where no mask is kept).
    bounding_boxes: your own boxes (N, 4) xyxy in image pixels instead of CellFinder's. fast: accepted for
    cellSAM's signature; the boxes are always decoded in batches here (the same masks, to float rounding)."""
    if "cuda" in str(device) and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA GPU here; use device='cpu'")
    model = model.eval().to(device)
    model.bbox_threshold = bbox_threshold
    img = format_image_shape(img)
    if normalize:
        img = normalize_image(img)
    if not img.any():  # a blank image has no cells (cellSAM's percentile step fails on it)
        warnings.warn("No cells detected in the image (it is blank).", stacklevel=2)
        return np.zeros(img.shape[:2], np.int32), None, None
    labels, embedding, boxes, _ = predict(model, img, bounding_boxes, device)
    if not len(boxes):
        warnings.warn("No cells detected in the image.", stacklevel=2)
        return np.zeros(img.shape[:2], np.int32), None, None
    if postprocess:
        labels = postprocess_predictions(labels)
    labels = fill_holes_and_remove_small_masks(labels, min_size=25)
    if remove_boundaries:
        labels = subtract_boundaries(labels)
    return labels.astype(np.int32), embedding.cpu().numpy(), boxes


def segment_tiled(image, model, window: int | None = None, overlap: int = 64, bbox_threshold=0.4, device="cpu",
                  scale: float = 1.0, labels=None, on_cells=None) -> np.ndarray:  # fmt: skip
    """An image (H, W, 3) already normalised to 0..1 (normalize_image) -> label image (H, W) int32. One that fits
    one window (default: the model's input size, 1024 px) is segmented whole, as segment_cellular_image does; a
    larger one in windows of `window` px overlapping by `overlap` px, each resized to the input size as
    segment_cellular_image resizes any image, with this folder's rule for the seams (each cell from the window
    whose core holds its centre; see model.tile_and_stitch). cellSAM's wsi.py also tiles slides, in 512 px windows
    (400 px blocks + 56 px overlap): window=512 sees cells at its scale. `scale` multiplies the pixels first (1/255
    for read_image's 0..255); `image`, `labels` and `on_cells` as tile_and_stitch takes them (a LargeImage and a
    zarr array for an image too large to hold)."""
    window = window or model.input_size

    def segment(tile):
        tile = tile * scale if scale != 1.0 else tile
        return segment_cellular_image(tile, model, normalize=False, bbox_threshold=bbox_threshold, device=device)[0]

    if max(image.shape[:2]) <= window and labels is None:
        return segment(np.asarray(image[:, :]))
    return tile_and_stitch(image, window, overlap, segment, labels, on_cells)


# ----------------------------------------------------------------------------------------------------------------
# Files: load a released or fine-tuned model, write one back
# ----------------------------------------------------------------------------------------------------------------


RELEASED = ("cellsam_general", "cellsam_extra")
CACHE = Path.home() / ".deepcell" / "models"  # where cellSAM's get_model() unpacks its downloads


def released_path(name: str, version: str = "1.2") -> Path:
    """A released model's file in cellSAM's download cache: ~/.deepcell/models/cellsam_v<version>/<name>.pt."""
    return CACHE / f"cellsam_v{version}" / f"{name}.pt"


def read_state_dict(path: str | Path, flag: str = "--cellsam_checkpoint") -> dict:
    """A checkpoint file's dict of tensors (weights_only=True); a missing, cut or unreadable file is a SystemExit
    that names it. "cellsam_general" or "cellsam_extra" name the released file in cellSAM's download cache. A
    {"state_dict": ...} wrapper is taken off, as cellSAM's load_state_dict does."""
    if str(path) in RELEASED and not Path(path).is_file():
        path = released_path(str(path))
    path = Path(path)
    if not path.is_file():
        raise SystemExit(
            f"{flag} {path}: no such file. cellSAM's released models are cellsam_general.pt and cellsam_extra.pt: "
            f"cellSAM's get_model() downloads them (with a users.deepcell.org API key) into {CACHE}/cellsam_v1.2/; "
            "nothing is downloaded here, give the file's path"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise SystemExit(
            f"{flag} {path}: holds Python objects beyond tensors, which weights-only loading refuses (a training "
            f"framework's checkpoint?); save its model.state_dict() with torch.save ({str(error)[:160]})"
        ) from None
    except Exception as error:  # noqa: BLE001 (a cut file raises several kinds)
        raise SystemExit(
            f"{flag} {path}: not a readable PyTorch checkpoint, maybe cut short or not a model file "
            f"({type(error).__name__}: {str(error)[:200]})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and not any(str(k).startswith("model.") for k in state):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SystemExit(f"{flag} {path}: holds a {type(state).__name__}, not a state dict")
    odd = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd and not {"modules", "domain"} & set(state):
        raise SystemExit(
            f"{flag} {path}: not a state dict of tensors ({odd[0]} holds a {type(state[odd[0]]).__name__})"
        )
    return state


def describe_layout(state: dict) -> str:
    """What a state dict holds, in words, with the flag that takes it."""
    keys = [str(k) for k in state]
    if any(k.startswith(PARTS) for k in keys):
        width = next((v.shape[-1] for k, v in state.items() if str(k).endswith("image_encoder.pos_embed")), None)
        size = next((n for n, c in SAM_SIZES.items() if c["embed_dim"] == width), f"width {width}")
        return f"a CellSAM in the published layout ({size} image encoders)"
    if "image_encoder.pos_embed" in state:
        width = state["image_encoder.pos_embed"].shape[-1]
        size = next((n for n, c in SAM_SIZES.items() if c["embed_dim"] == width), f"width {width}")
        return f"an official SAM checkpoint ({size}): give it as --sam_checkpoint"
    if "modules" in state or "domain" in state:
        return (
            "a stage checkpoint of cellsam/train.py (best_model_s1/s2.pth, last_s*.pth): evaluate its experiment "
            "with cellsam/evaluate.py; a published-layout run also writes models/fold_X/cellsam_finetuned.pt"
        )
    shown = ", ".join(keys[:3]) or "no keys"
    return f"no CellSAM or SAM layout (keys such as {shown})"


def checked_state(path, expected: dict, sam_size: str, allow_missing: bool = False,
                  flag="--cellsam_checkpoint") -> tuple[dict, list[str], bool]:  # fmt: skip
    """(the state to load, notes on what was filled in or left out, adv_mode) for a published-layout file, given
    the expected {key: shape}. Refused with a message that names the file: another layout, keys outside the
    layout, shapes of another size. A file without model_cp takes it from `model` (cellSAM's rule; masks then come
    from `model` and adv_mode is off), one without model takes it from model_cp (unused but for its place in the
    layout). Other missing keys are refused unless allow_missing, which loads what the file has and lists what it
    lacks."""
    state = read_state_dict(path, flag)
    layout = describe_layout(state)
    if not layout.startswith("a CellSAM in the published layout"):
        raise SystemExit(f"{flag} {path} holds {layout}, not a CellSAM in the published layout")
    if "(width None image encoders)" not in layout and f"({sam_size} image encoders)" not in layout:
        hint = "; pass --sam_size vit_tiny" if "vit_tiny" in layout else ""
        raise SystemExit(f"{flag} {path} holds {layout}, not {sam_size}{hint}")
    extra = [str(k) for k in state if k not in expected]
    if extra:
        raise SystemExit(
            f"{flag} {path}: {len(extra)} key(s) outside the published CellSAM layout, e.g. {', '.join(extra[:3])}"
        )
    wrong = [(k, tuple(v.shape), tuple(expected[k])) for k, v in state.items() if tuple(v.shape) != tuple(expected[k])]
    if wrong:
        k, found, want = wrong[0]
        raise SystemExit(f"{flag} {path}: {len(wrong)} shape(s) differ from the published layout, e.g. {k} is "
                         f"{found}, expected {want}")  # fmt: skip
    state, notes, adv_mode = dict(state), [], True
    has = {part: any(k.startswith(part) for k in state) for part in PARTS}
    if not has["model_cp."] and has["model."]:
        state.update({"model_cp." + k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")})
        adv_mode = False
        notes.append("no model_cp: masks come from `model` (cellSAM's rule for such files)")
    if not has["model."] and has["model_cp."]:
        state.update({"model." + k[len("model_cp.") :]: v for k, v in state.items() if k.startswith("model_cp.")})
        notes.append("no model: filled from model_cp")
    missing = [k for k in expected if k not in state]
    if missing and not allow_missing:
        raise SystemExit(
            f"{flag} {path}: lacks {len(missing)} of the {len(expected)} published keys, e.g. "
            f"{', '.join(missing[:3])}; pass --allow_missing_keys to load what it has (the rest stays as built)"
        )
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        notes.append(f"lacks {len(missing)} key(s), left as built: {shown}")
    return state, notes, adv_mode


def published_shapes(sam_size: str = "vit_b") -> dict:
    """{key: shape} of the published layout, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in CellSAM(sam_size).state_dict().items()}


def check_cellsam_checkpoint(path, sam_size: str = "vit_b", allow_missing: bool = False) -> None:
    """Everything load_cellsam_weights refuses, refused before an experiment writes anything."""
    checked_state(path, published_shapes(sam_size), sam_size, allow_missing)


def load_cellsam_weights(model: CellSAM, path, allow_missing: bool = False, log=print,
                         flag="--cellsam_checkpoint") -> None:  # fmt: skip
    """The weights of a published-layout file into `model` (see checked_state)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state, notes, model.adv_mode = checked_state(path, expected, model.sam_size, allow_missing, flag)
    model.load_state_dict(state, strict=False)
    log(f"loaded {path}: {len(state)} published keys" + "".join(f"; {n}" for n in notes))


def get_local_model(model_path: str | Path, sam_size: str = "vit_b") -> CellSAM:
    """cellSAM's get_local_model: a CellSAM from a local released or fine-tuned file, as published (what the file
    lacks stays as built and is listed)."""
    model = CellSAM(sam_size)
    try:
        load_cellsam_weights(model, model_path, allow_missing=True, log=lambda m: warnings.warn(m, stacklevel=3),
                             flag="model_path")  # fmt: skip
    except SystemExit as error:  # the scripts exit with the message; Python callers get an exception
        raise (FileNotFoundError if not Path(model_path).is_file() else ValueError)(str(error)) from None
    return model.eval()


def get_model(model: str = "cellsam_general", version: str = "1.2") -> CellSAM:
    """cellSAM's get_model, offline: a released model from cellSAM's download cache (see released_path); a clear
    error where it has not been downloaded."""
    if model not in RELEASED:
        raise ValueError(f"model {model!r}: choose one of {', '.join(RELEASED)}")
    return get_local_model(released_path(model, version))


def save_published(model: CellSAM, path: str | Path) -> Path:
    """model.state_dict() as a plain dict of CPU tensors, written atomically: cellSAM's get_local_model(path)
    loads it (napari plugin: put it where get_model() looks, see cellsam/README.md)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if not model.adv_mode:  # loaded from a file without model_cp, trained as such: cellSAM runs it so again
        state = {k: v for k, v in state.items() if not k.startswith("model_cp.")}
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path
