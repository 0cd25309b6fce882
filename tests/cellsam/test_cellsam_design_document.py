"""Every Python example of the user's design document for this folder runs as written.

The document (../shared/seeds/002_fbf1ed802cdb0206.txt, vendored as data/design_document.md) is read block by
block; the one change is `cellsam` in place of `segmentation.training` (and of `segmentation.training.utils`).
The blocks run in order in one namespace, as a reader pastes them into one notebook, from a folder that holds
tiny synthetic data at the document's own paths (path/to/images, path/to/masks). Only the names the document
leaves to the reader are given beforehand (base_config, img_path, mask_path, output_name, kwargs,
total_epochs_s1, total_epochs_s2). Epochs and model size shrink through the documented override
CELLSAM_OVERRIDES (config.py), searches through CELLSAM_MAX_TRIALS (search.py); the text is not edited."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

HERE = Path(__file__).resolve().parent
DOCUMENT = HERE / "data" / "design_document.md"
SEED = HERE.parents[2] / "shared" / "seeds" / "002_fbf1ed802cdb0206.txt"
TINY = {
    "sam_size": "vit_tiny", "num_workers": 0, "figures": False,
    "stage1_config": {"total_epochs": 1, "hidden": 32, "heads": 2, "encoder_layers": 1, "decoder_layers": 1,
                      "anchor_grid": 4},
    "stage2_config": {"total_epochs": 1, "max_prompts": 4},
}  # fmt: skip


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def as_cellsam(block: str) -> str:
    return block.replace("segmentation.training.utils", "cellsam").replace("segmentation.training", "cellsam")


def test_the_vendored_document_is_the_users():
    if not SEED.is_file():
        pytest.skip("the user's documents are not beside this checkout")
    assert DOCUMENT.read_text() == SEED.read_text()


def test_every_python_example_of_the_document_runs(tmp_path, monkeypatch):
    from cellsam import ExperimentConfig
    from cellsam.data import write_demo_dataset

    blocks = python_blocks(DOCUMENT.read_text())
    assert len(blocks) == 17 and sum("finetune(" in b for b in blocks) == 3
    write_demo_dataset(tmp_path / "path" / "to", n_images=6, size=96)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CELLSAM_OVERRIDES", json.dumps(TINY))
    monkeypatch.setenv("CELLSAM_MAX_TRIALS", "2")
    namespace = {
        "base_config": ExperimentConfig(img_path="path/to/images", mask_path="path/to/masks", output_name="base"),
        "img_path": "path/to/images", "mask_path": "path/to/masks", "output_name": "migrated", "kwargs": {},
        "total_epochs_s1": 3, "total_epochs_s2": 3,
    }  # fmt: skip
    for i, block in enumerate(blocks):
        try:
            exec(compile(as_cellsam(block), f"<design document block {i + 1}>", "exec"), namespace)
        except BaseException as error:
            raise AssertionError(f"block {i + 1} fails:\n{block}\n{type(error).__name__}: {error}") from error

    # what the examples made, and that each reached the model
    output = tmp_path / "output"
    experiments = {p.name: p for p in output.iterdir() if (p / "experiment_config.json").is_file()}
    assert set(experiments) == {"my_experiment", "advanced_experiment", "quick_test", "migrated", "migrated_2"}
    folds = {name: json.loads((p / "results" / "aggregated_results.json").read_text())["folds"]
             for name, p in experiments.items()}  # fmt: skip
    assert folds == {"my_experiment": 5, "advanced_experiment": 5, "quick_test": 1, "migrated": 1, "migrated_2": 1}
    advanced = json.loads((experiments["advanced_experiment"] / "experiment_config.json").read_text())
    s1, s2 = advanced["stage1_config"], advanced["stage2_config"]
    assert (s1["stage1_type"], s1["ce_loss_weight"], s1["bbox_loss_weight"], s1["giou_loss_weight"]) == (
        "all_backbones", 2, 10, 5)  # fmt: skip
    assert (s2["learning_rate"], s2["focal_loss_weight"], s2["dice_loss_weight"], s2["boundary_loss_weight"]) == (
        5e-5, 2.0, 1.5, 0.5)  # fmt: skip
    assert s2["online_hard_negative_mining"] and advanced["stain_transform"] and advanced["gamma"] == 2.4
    assert advanced["sam_size"] == "vit_tiny" and s1["total_epochs"] == 1  # the override, not the text
    log = (experiments["advanced_experiment"] / "logs" / "experiment.log").read_text()
    assert "stage 1 epoch 1 step 1/" in log  # debug=True: step by step
    figures = {p.name for p in (experiments["advanced_experiment"] / "results" / "fold_1" / "visualizations").iterdir()}
    assert {"stage1_boxes_epoch_001.png", "stage2_masks_epoch_001.png"} <= figures  # debug: each epoch
    search = pd.read_csv(output / "hp_search" / "search_results.csv")
    assert sorted(search["study"]) == ["cellsam_grid", "cellsam_grid", "cellsam_random", "cellsam_random"]
    assert (search["state"] == "complete").all()
    metrics = json.loads((output / "metrics" / "metrics.json").read_text())
    assert metrics == [{"epoch": 1, "loss": 0.5, "f1": 0.8}]
    assert namespace["config"].debug is True and namespace["results"]["folds"] == 1
