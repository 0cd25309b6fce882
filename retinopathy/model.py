"""torchvision classifiers for diabetic-retinopathy grading: building them (pretrained or not), freezing the
backbone for stage 1, and loading checkpoints in evaluate.py and visualize.py."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "efficientnet_b0", "efficientnet_b3", "efficientnet_b5")


def head_of(model: nn.Module) -> nn.Linear:
    return model.fc if hasattr(model, "fc") else model.classifier[-1]


def build_classifier(name: str, num_classes: int = 5, pretrained: bool = False) -> nn.Module:
    """A torchvision ResNet or EfficientNet with a new num_classes head. pretrained: ImageNet weights from the
    torch hub cache (downloaded once); offline without the file, a message says where it goes."""
    if name not in MODELS:
        raise SystemExit(f"--model-name {name}: choose one of {', '.join(MODELS)}")
    weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise SystemExit(
            f"could not load the ImageNet weights of {name} ({error}).\n  Offline? Download {weights.url}\n"
            f"  on a machine with internet access and copy it to {cached}, or train from scratch with --no-pretrained."
        ) from None
    old = head_of(model)
    new = nn.Linear(old.in_features, num_classes)
    if hasattr(model, "fc"):
        model.fc = new
    else:
        model.classifier[-1] = new
    return model


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Stage 1 (trainable=False): only the new head learns. (train.py also keeps the frozen BatchNorm layers in
    eval mode, so their running statistics stay as pretrained.)"""
    head = set(head_of(model).parameters())
    for parameter in model.parameters():
        if parameter not in head:
            parameter.requires_grad_(trainable)


def pick_device() -> torch.device:
    """CUDA, then Apple MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the classifier from the arguments stored in a retinopathy checkpoint and load its weights."""
    path = Path(path)
    if path.is_dir():
        path = path / "best_model.pth"
    if not path.is_file():
        raise SystemExit(f"{path}: no such checkpoint (give best_model.pth or a folder holding it)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SystemExit(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("domain") != "retinopathy":
        found = checkpoint.get("domain", "no domain recorded") if isinstance(checkpoint, dict) else type(checkpoint)
        raise SystemExit(f"{path} is not a retinopathy checkpoint (domain: {found})")
    model = build_classifier(**checkpoint["model_args"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise SystemExit(f"{path}: weights do not fit the network stored with them ({error})") from None
    return model.to(device).eval(), checkpoint


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Softmax probabilities (N, C) in fp32. tta: the mean over the image and its horizontal, vertical and double
    flip (a fundus photo has no preferred orientation, so the model saw all four in training)."""
    views = [images]
    if tta:
        views += [images.flip(-1), images.flip(-2), images.flip(-1, -2)]
    # fp32, as validation in training without --mixed-precision: the scores match the ones training reported
    return torch.stack([model(view).float().softmax(1) for view in views]).mean(0)


def last_conv_block(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM looks at: the last convolutional block before global pooling."""
    return model.layer4 if hasattr(model, "layer4") else model.features[-1]


def grad_cam(model: nn.Module, images: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): ReLU(sum_k alpha_k A_k) with alpha_k the spatial mean of d score_c / d A_k,
    for the predicted class (or `classes`), upsampled to the image and scaled to 0..1 per image. (N, H, W)."""
    store = {}
    layer = last_conv_block(model)
    hook = layer.register_forward_hook(lambda module, inputs, output: store.update(activations=output))
    try:
        model.eval()
        with torch.enable_grad():
            images = images.detach().requires_grad_(True)  # gradients flow to the layer even with frozen weights
            logits = model(images)
            classes = logits.argmax(1) if classes is None else classes
            score = logits.gather(1, classes.view(-1, 1)).sum()
            (gradients,) = torch.autograd.grad(score, store["activations"])
    finally:
        hook.remove()
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * store["activations"]).sum(1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.clamp_min(1e-12)
    return cam / peak.view(-1, 1, 1)
