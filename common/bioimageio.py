"""The rdf.yaml of a bioimage.io model package (spec 0.5: https://bioimage.io/docs), for a 2D network with a
batch axis, named channels and y, x of any size in steps of a given multiple, whose outputs keep the input's
y, x. Pure: the domain writes the package (rdf.yaml, weights, test tensors, cover, README.md) next to its export.
bioimageio.core's `bioimageio test rdf.yaml` then runs the weights on the test input and compares the output.
"""

from __future__ import annotations

FORMAT_VERSION = "0.5.4"


def space_axes(multiple: int, minimum: int, reference: str | None = None) -> list[dict]:
    """y and x: sizes minimum + k * multiple for an input, or the size of `reference`'s y, x for an output."""
    if reference is not None:
        return [{"type": "space", "id": axis, "size": {"tensor_id": reference, "axis_id": axis}} for axis in "yx"]
    return [{"type": "space", "id": axis, "size": {"min": minimum, "step": multiple}} for axis in "yx"]


def model_rdf(
    name: str, description: str, input_channels: list[str], outputs: dict[str, list[str]], multiple: int,
    minimum: int, torch_version: str, opset: int, cite: list[dict], tags: list[str], authors: list[str],
    license_id: str = "MIT",
) -> dict:  # fmt: skip
    """The rdf.yaml content. The package holds model.pt (TorchScript), model.onnx, test_input.npy, one
    test_<output>.npy per output, cover.png and README.md (with a '# Validation' section, as the spec asks).
    Channel names are free text; bioimage.io ids must be lower-case identifiers, so they are made so."""

    def channel_axis(names: list[str]) -> dict:
        return {"type": "channel", "channel_names": [_identifier(n) for n in names]}

    return {
        "type": "model",
        "format_version": FORMAT_VERSION,
        "name": name,
        "description": description,
        "authors": [{"name": a} for a in authors],
        "cite": cite,
        "license": license_id,
        "documentation": "README.md",
        "covers": ["cover.png"],
        "tags": tags,
        "inputs": [
            {
                "id": "input",
                "axes": [{"type": "batch"}, channel_axis(input_channels), *space_axes(multiple, minimum)],
                "test_tensor": {"source": "test_input.npy"},
                "data": {"type": "float32"},
            }
        ],  # fmt: skip
        "outputs": [
            {
                "id": key,
                "axes": [{"type": "batch"}, channel_axis(names), *space_axes(multiple, minimum, "input")],
                "test_tensor": {"source": f"test_{key}.npy"},
                "data": {"type": "float32"},
            }
            for key, names in outputs.items()
        ],  # fmt: skip
        "weights": {
            "torchscript": {"source": "model.pt", "pytorch_version": torch_version.split("+")[0]},
            "onnx": {"source": "model.onnx", "opset_version": opset},
        },
    }


def _identifier(name: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    while "__" in out:
        out = out.replace("__", "_")
    return out or "channel"
