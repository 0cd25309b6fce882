"""A trained network made ready to leave the repository (every domain's `evaluate.py --export DIR`): traced to
TorchScript, exported to ONNX, both checked against PyTorch, and described in a JSON that says what goes in and
what comes out. The domain writes the three files:

    DIR/model.pt     TorchScript (torch.jit.load, no code of ours needed)
    DIR/model.onnx   ONNX (opset 18, any batch size): onnxruntime, OpenCV's dnn, Fiji's deepImageJ, ...
    DIR/model.json   the input it expects (shape, channels, normalisation, tile size, scale) and its outputs

The exported network includes the output activations (probabilities, not logits), so a user of the files needs
only the preprocessing model.json states.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

ONNX_TOLERANCE = 1e-4
INSTALL = "pip install -r requirements-export.txt (onnx, onnxscript, onnxruntime)"


class Deployed(nn.Module):
    """The network followed by `head` (its outputs as the user reads them: a tensor or a tuple of tensors)."""

    def __init__(self, model: nn.Module, head: Callable):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x):
        return self.head(self.model(x))


def _outputs(out) -> list[np.ndarray]:
    return [o.detach().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]


def exported_graph(
    net: nn.Module, examples: tuple, input_names: list[str], output_names: list[str], dynamic_shapes: tuple,
    check_feeds: dict | None = None,
) -> tuple[torch.jit.ScriptModule, bytes, list[np.ndarray], dict]:  # fmt: skip
    """(TorchScript module, ONNX file bytes, PyTorch's outputs on `examples`, the checks) of a network with one or
    more inputs. onnxruntime runs the ONNX graph on check_feeds (default: each example twice along its first
    axis, which must be free) and the leading part of each output must equal PyTorch's within ONNX_TOLERANCE."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter builds the graph with it)
    except ImportError as error:
        raise SystemExit(f"--export needs {error.name}: {INSTALL}") from None
    net = net.eval().float()
    examples = tuple(x.float() for x in examples)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.10+ calls TorchScript deprecated (it runs); exporter chatter
        reference = _outputs(net(*examples))
        traced = torch.jit.trace(net, examples, check_trace=False)
        script = _outputs(traced(*examples))
        program = torch.onnx.export(
            net, examples, None, dynamo=True, input_names=input_names, output_names=output_names,
            dynamic_shapes=dynamic_shapes, opset_version=18, verbose=False,
        )  # fmt: skip
    onnx_bytes = program.model_proto.SerializeToString()
    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    feeds = check_feeds or {n: np.concatenate([x.numpy()] * 2) for n, x in zip(input_names, examples, strict=True)}
    onnx_out = session.run(None, feeds)
    onnx_diff = max(
        float(np.abs(o[tuple(slice(0, n) for n in r.shape)] - r).max())
        for o, r in zip(onnx_out, reference, strict=True)
    )
    script_diff = max(float(np.abs(o - r).max()) for o, r in zip(script, reference, strict=True))
    if onnx_diff > ONNX_TOLERANCE:
        raise SystemExit(f"--export: onnxruntime differs from PyTorch by {onnx_diff:.2e} (> {ONNX_TOLERANCE})")
    checks = {"onnxruntime_max_abs_difference": onnx_diff, "torchscript_max_abs_difference": script_diff,
              "on": ", ".join(f"{n} of shape {list(x.shape)}" for n, x in zip(input_names, examples, strict=True)),
              "onnxruntime": onnxruntime.__version__}  # fmt: skip
    return traced, onnx_bytes, reference, checks


def deployable(
    model: nn.Module, head: Callable, example: torch.Tensor, description: dict, output_names: list[str],
    spatial_multiple: int | None = None,
) -> tuple[torch.jit.ScriptModule, bytes, dict, list[np.ndarray]]:  # fmt: skip
    """(TorchScript module, ONNX file bytes, model.json dict, the outputs on `example`) of model + head on inputs
    shaped like `example`: the batch axis is free, and with spatial_multiple so are the spatial axes (any multiple
    of it). The ONNX graph is run with onnxruntime on two copies of `example` and must agree with PyTorch within
    ONNX_TOLERANCE. description: what model.json says beyond shapes (domain, input channels and
    normalisation, tile size, scale, and under "outputs" a dict of each output's meaning)."""
    net, example = Deployed(model.eval().float(), head).eval(), example.float()
    traced, onnx_bytes, reference, checks = exported_graph(
        net, (example,), ["input"], output_names, (dynamic_axes(example, spatial_multiple),)
    )
    meanings = description.get("outputs", {})
    spatial = [f"{axis} (a multiple of {spatial_multiple})" for axis in "zyx"[-(example.ndim - 2) :]] * bool(
        spatial_multiple)  # fmt: skip
    spec = {
        **description,
        "files": {"torchscript": "model.pt", "onnx": "model.onnx"},
        "input": {
            **description.get("input", {}),
            "name": "input",
            "dtype": "float32",
            "shape": ["batch", example.shape[1], *(spatial or example.shape[2:])],
        },  # fmt: skip
        "outputs": [
            {"name": name, "shape": ["batch", r.shape[1], *(spatial or r.shape[2:])], **meanings.get(name, {})}
            for name, r in zip(output_names, reference, strict=True)
        ],  # fmt: skip
        "checked": checks,
        "exported": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
    }
    return traced, onnx_bytes, spec, reference


def dynamic_axes(example: torch.Tensor, spatial_multiple: int | None) -> dict:
    """torch.export's dynamic shapes of the input: the batch, and each spatial axis as a multiple of
    spatial_multiple (at least one)."""
    axes = {0: torch.export.Dim("batch", min=1)}
    if spatial_multiple:
        for axis, name in zip(range(2, example.ndim), "zyx"[-(example.ndim - 2) :], strict=True):
            axes[axis] = spatial_multiple * torch.export.Dim(f"{name}_blocks", min=1, max=1024)
    return axes
