"""The user's training guide for retinopathy (../shared/seeds/003_efcd97165fdef485.txt, vendored as
data/design_document.md): its commands resolve to what it describes, its tables are our defaults, its files land
where it says and its console output has the lines it shows.

The guide's ml/train.py and ml/evaluate.py are retinopathy/train.py and retinopathy/evaluate.py. Commands run from a
folder holding a small synthetic APTOS set at ml/data (where the guide's commands look), with only the network, the
epochs, the image size and the batch shrunk and no ImageNet download."""

import json
import re
import shlex
from pathlib import Path

import pytest

from retinopathy import evaluate as fundus_evaluate
from retinopathy import train as fundus_train
from retinopathy.data import write_demo_dataset

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DOCUMENT = HERE / "data" / "design_document.md"
SEED = REPO.parent / "shared" / "seeds" / "003_efcd97165fdef485.txt"
PARSERS = {"ml/train.py": fundus_train.parse_args, "ml/evaluate.py": fundus_evaluate.parse_args}
DATA = {"labels_csv": "ml/data/train.csv", "img_dir": "ml/data/train_images"}
# What every training command of the guide runs besides its own flags: the guide's tables
TABLES = {"pretrained": True, "two_stage": True, "advanced_aug": True, "medical_preprocess": True,
          "mixed_precision": True, "num_classes": 5, "val_split": 0.2, "random_seed": 42}  # fmt: skip
EXPECTED = [  # the guide's training commands in order, with the values each sets
    ("quick start", {"save_dir": "ml/models", "model_name": "resnet50", "loss": "focal", "epochs_stage1": 5,
                     "epochs_stage2": 25, "batch_size": 32}),
    ("advanced", {"save_dir": "ml/models/efficientnet_b3", "model_name": "efficientnet_b3", "epochs_stage1": 10,
                  "epochs_stage2": 40, "batch_size": 16, "image_size": 300}),
    ("strategy 1", {"save_dir": "ml/models", "model_name": "resnet50", "epochs_stage1": 3, "epochs_stage2": 10,
                    "batch_size": 32}),
    ("strategy 2", {"save_dir": "ml/models/efficientnet_b3_focal", "model_name": "efficientnet_b3", "focal_gamma": 2.0,
                    "epochs_stage1": 8, "epochs_stage2": 35, "batch_size": 24, "lr_stage1": 1e-3, "lr_stage2": 5e-5,
                    "image_size": 300, "patience": 12}),
    ("strategy 3", {"save_dir": "ml/models/efficientnet_b5_focal", "model_name": "efficientnet_b5", "focal_gamma": 2.5,
                    "epochs_stage1": 10, "epochs_stage2": 50, "batch_size": 12, "lr_stage2": 3e-5,
                    "weight_decay": 1.5e-4, "image_size": 456, "patience": 15}),
    ("strategy 4", {"model_name": "resnet50", "epochs_stage1": 5, "epochs_stage2": 15, "batch_size": 8,
                    "num_workers": 0}),
    ("research", {"model_name": "efficientnet_b3", "random_seed": 42, "epochs_stage1": 8, "epochs_stage2": 35,
                  "batch_size": 24}),
    ("summary", {"model_name": "efficientnet_b3", "loss": "focal", "epochs_stage2": 25, "image_size": 224}),
]  # fmt: skip
EVALUATIONS = [
    {**DATA, "model_path": "ml/models/efficientnet_b3_focal/best_model.pth", "output_dir": "results"},
    {"labels_csv": None, "img_dir": None, "model_path": "ml/models/best_model.pth", "output_dir": "results"},
    {"labels_csv": None, "img_dir": None, "model_path": "ml/models/best_model.pth", "output_dir": "results"},
]
SHRUNK = ["--model-name", "resnet18", "--no-pretrained", "--image-size", "32", "--epochs-stage1", "1",
          "--epochs-stage2", "1", "--batch-size", "8", "--num-workers", "0"]  # fmt: skip


def document_commands() -> list[tuple[str, list[str]]]:
    """(script, arguments) of every `python ml/...` line of the guide's bash blocks, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", DOCUMENT.read_text(encoding="utf-8"), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("python ml/"):
                script, *argv = shlex.split(line)[1:]
                commands.append((script, argv))
    return commands


def assert_values(args, expected: dict, where: str) -> None:
    for key, value in expected.items():
        assert getattr(args, key) == pytest.approx(value), f"{where}: {key} is {getattr(args, key)}, guide: {value}"


def test_the_vendored_document_is_the_users():
    if not SEED.is_file():
        pytest.skip("the user's documents are not beside this checkout")
    assert DOCUMENT.read_text(encoding="utf-8") == SEED.read_text(encoding="utf-8")


def test_every_command_of_the_guide_resolves_to_what_it_describes():
    commands = document_commands()
    # quick start, advanced, strategies 1-4, the evaluation, the research pair, the summary pair
    assert "".join("T" if s == "ml/train.py" else "E" for s, _ in commands) == "TTTTTTETETE"
    trainings = [argv for script, argv in commands if script == "ml/train.py"]
    evaluations = [argv for script, argv in commands if script == "ml/evaluate.py"]
    assert len(trainings) == len(EXPECTED) and len(evaluations) == len(EVALUATIONS)
    for argv, (name, expected) in zip(trainings, EXPECTED, strict=True):
        args = fundus_train.parse_args(argv)
        assert_values(args, {**TABLES, **DATA, "save_dir": "ml/models", **expected}, name)
    for argv, expected in zip(evaluations, EVALUATIONS, strict=True):
        assert_values(fundus_evaluate.parse_args(argv), expected, " ".join(argv))


def guide_tables() -> dict[str, str]:
    """`--flag` -> its Default cell, from the tables of "Training Arguments" that have a Default column."""
    text = DOCUMENT.read_text(encoding="utf-8")
    section = text[text.index("Training Arguments") : text.index("Training Strategies")]
    defaults = {}
    for table in re.findall(r"(\|[^\n]*\|\n\|[-| ]+\|\n(?:\|[^\n]*\|\n)+)", section):
        header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
        if "Default" not in header:
            continue
        for row in table.splitlines()[2:]:
            cells = [c.strip() for c in row.strip("|").split("|")]
            defaults[cells[0].strip("`")] = cells[header.index("Default")].strip("`")
    return defaults


def test_our_defaults_are_the_guides_tables():
    defaults = guide_tables()
    assert len(defaults) == 22, sorted(defaults)
    parser = fundus_train.get_args_parser()
    args = fundus_train.parse_args([])
    for flag, cell in defaults.items():
        value = getattr(args, parser._option_string_actions[flag].dest)
        if cell == "Required":  # our parser needs them unless --demo, and says so
            assert value is None, flag
        elif cell in ("True", "False"):
            assert value is (cell == "True"), flag
        elif isinstance(value, str):
            assert value == cell, flag
        else:
            assert value == pytest.approx(float(cell)), flag


def test_the_troubleshooting_flags_exist():
    """Every `--flag value` line of the troubleshooting blocks parses, and "Remove --mixed-precision flag" is
    --no-mixed-precision, since mixed precision is on by default."""
    text = DOCUMENT.read_text(encoding="utf-8")
    section = text[text.index("Troubleshooting") : text.index("After Training")]
    lines = [line.split("#")[0].split() for line in section.splitlines() if re.match(r"--[a-z]", line)]
    assert len(lines) == 15
    base = ["--labels-csv", "x.csv", "--img-dir", "x"]
    for words in lines:
        fundus_train.parse_args(base + words)
    assert "Remove --mixed-precision flag" in section
    assert fundus_train.parse_args(base + ["--no-mixed-precision"]).mixed_precision is False


def shrunk(argv: list[str]) -> list[str]:
    """The command with the shrinking flags put after it (argparse: the last value wins)."""
    return [*argv, *SHRUNK]


def test_the_guides_runs_write_the_files_it_names(tmp_path, monkeypatch, capsys):
    """Strategy 2, then the guide's evaluate command on it; strategy 1 (no --save-dir: ml/models itself), then the
    research evaluation. A second run into a folder that holds one stops and changes nothing."""
    monkeypatch.chdir(tmp_path)
    write_demo_dataset(tmp_path / "ml" / "data", n_images=40)
    trainings = [argv for script, argv in document_commands() if script == "ml/train.py"]
    evaluations = [argv for script, argv in document_commands() if script == "ml/evaluate.py"]

    monkeypatch.setattr(fundus_train, "emulated_bf16", lambda device: False)  # the guide's bf16, on any CPU
    run = fundus_train.main(fundus_train.parse_args(shrunk(trainings[3])))
    out, err = capsys.readouterr()
    folder = tmp_path / "ml" / "models" / "efficientnet_b3_focal"
    assert run == folder.resolve()
    for name in ("best_model.pth", "best_stage1.pth", "training_history.json", "config.json", "split.json"):
        assert (folder / name).is_file(), name
    split = json.loads((folder / "split.json").read_text())
    assert [len(split[k]) for k in ("train", "val", "test")] == [28, 8, 4]

    # the console block of "Understanding Training Output", line by line (progress bars and numbers aside)
    block = DOCUMENT.read_text(encoding="utf-8").split("### Training Progress")[1].split("```")[1]
    ascii_lines = [re.sub(r"[^\x20-\x7e]", "", line).strip() for line in out.splitlines()]
    expected = 0
    for line in block.splitlines():
        label = re.sub(r"[^\x20-\x7e]", "", line).strip().split(":")[0]
        if not label or "%|" in line or label.startswith(("...", "GPU", "Memory", "Stage ")):
            continue  # bars go to stderr; GPU and memory only on CUDA
        label = {"Best Validation Accuracy": "Best Validation QWK"}.get(label, label)  # QWK chooses the model
        assert any(x.startswith(label) for x in ascii_lines), f"no line {label!r} in:\n{out}"
        expected += 1
    assert expected >= 25
    assert "Model: resnet18" in out and "Mixed precision: True (bfloat16 training)" in out
    assert "Stage 1 - Epoch 1/1 [Train]" in err and "Stage 2 - Epoch 1/1 [Val]" in err
    assert "Held-out test split, 4 photos" in out

    # the guide's evaluation: the training CSV, whose train and validation rows are left out
    results = fundus_evaluate.main(fundus_evaluate.parse_args(evaluations[0] + ["--num-workers", "0"]))
    assert results == Path("results")
    for name in ("metrics.json", "classification_report.txt", "confusion_matrix.png", "roc_curves.png"):
        assert (results / name).is_file(), name
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["images"] == 4 and metrics["images_seen_in_training"] == 0
    assert "left out 36 of 40 photos" in capsys.readouterr().out

    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    with pytest.raises(SystemExit, match=r"(?s)efficientnet_b3_focal already holds a training run.*--resume"):
        fundus_train.main(fundus_train.parse_args(shrunk(trainings[3])))
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before

    fundus_train.main(fundus_train.parse_args(shrunk(trainings[2])))  # strategy 1: into ml/models itself
    assert (tmp_path / "ml" / "models" / "best_model.pth").is_file()
    again = fundus_evaluate.main(fundus_evaluate.parse_args(evaluations[1] + ["--num-workers", "0"]))
    assert again.parent == Path("results")  # results/ holds the first evaluation: a new folder inside it
    assert json.loads((again / "metrics.json").read_text())["data"].startswith("held-out test split")
