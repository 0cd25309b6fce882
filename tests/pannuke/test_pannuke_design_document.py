"""The user's design document for pannuke (../shared/seeds/001_82a9af9dbb215fd3.txt, vendored as
data/design_document.md): each of its commands, and each of its three Windows wrappers, does what it says.

The document's paths become this folder's: training/train.py and training/train_backup.py -> pannuke/,
visualize_predictions.py -> pannuke/visualize.py, visualize_dataset.py -> pannuke/visualize.py dataset. Each
training command is parsed as written and its values are compared with the document's; it then runs from a folder
that holds tiny synthetic folds at data/pannuke (where the scripts look by default) with only the network, the
epochs and the tile size shrunk, and the two visualize commands run as written on the runs it left there."""

import re
import shlex
from pathlib import Path

import pytest

from pannuke import train as pannuke_train
from pannuke import visualize as pannuke_visualize
from pannuke.data import write_demo_dataset
from pannuke.train_backup import parse_backup_args

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DOCUMENT = HERE / "data" / "design_document.md"
SEED = REPO.parent / "shared" / "seeds" / "001_82a9af9dbb215fd3.txt"
OURS = {
    "training/train.py": "pannuke/train.py",
    "training/train_backup.py": "pannuke/train_backup.py",
    "visualize_predictions.py": "pannuke/visualize.py",
    "visualize_dataset.py": "pannuke/visualize.py dataset",
}
PARSERS = {"pannuke/train.py": pannuke_train.parse_args, "pannuke/train_backup.py": parse_backup_args}
# What the document says each of its training commands runs.
SOTA = {"optimizer": "adamw", "scheduler": "onecycle", "use_ema": True, "mixup_alpha": 0.2, "loss": "hybrid",
        "tta": True, "progressive_aug": True, "progressive_resize": True}  # fmt: skip
EXPECTED = {
    "standard": {**SOTA, "epochs": 60, "batch_size": 16, "use_mixed_precision": True, "use_swa": False},
    "maximum": {**SOTA, "epochs": 60, "batch_size": 16, "lr": 3e-4, "weight_decay": 1e-4, "early_stopping_patience": 15,
                "grad_clip_val": 1.0, "use_mixed_precision": True, "use_swa": True, "swa_start_epoch": 30},
    "backup": {"optimizer": "adam", "scheduler": "cosine", "loss": "weighted_dice", "use_mixed_precision": False,
               "mixup_alpha": 0.0, "use_ema": False, "use_swa": False, "tta": False, "progressive_aug": False,
               "progressive_resize": False, "lr": 2e-4, "epochs": 50, "batch_size": 16},
}  # fmt: skip
WRAPPERS = {"train.bat": "standard", "train_advanced.bat": "maximum", "train_backup.bat": "backup"}
SHRUNK = {"epochs": 1, "swa_start_epoch": 1, "encoder": "resnet18", "encoder_weights": "none", "image_size": 64,
          "batch_size": 2, "num_workers": 0}  # fmt: skip


def document_commands() -> list[tuple[str, list[str]]]:
    """(our script, its arguments) of every `python ...` line of the document's bash blocks, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", DOCUMENT.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("python "):
                script, *argv = shlex.split(line)[1:]
                ours, *sub = OURS[script].split()
                commands.append((ours, [*sub, *argv]))
    return commands


def assert_runs_as_documented(args, expected: dict) -> None:
    for key, value in expected.items():
        assert getattr(args, key) == pytest.approx(value), f"{key} is {getattr(args, key)}, the document says {value}"


def test_the_vendored_document_is_the_users():
    if not SEED.is_file():
        pytest.skip("the user's documents are not beside this checkout")
    assert DOCUMENT.read_text() == SEED.read_text()


def test_the_documents_commands_and_wrappers_run_its_recipes():
    commands = document_commands()
    assert [script for script, _ in commands] == [
        "pannuke/train.py", "pannuke/train.py", "pannuke/train_backup.py", "pannuke/visualize.py",
        "pannuke/visualize.py",
    ]  # fmt: skip
    for (script, argv), name in zip(commands[:3], ("standard", "maximum", "backup"), strict=True):
        assert_runs_as_documented(PARSERS[script](argv), EXPECTED[name])
    for wrapper, name in WRAPPERS.items():
        (line,) = [x for x in (REPO / "pannuke" / wrapper).read_text().splitlines() if x.startswith("%PY% ")]
        script, *argv = shlex.split(line.removeprefix("%PY% ").replace("\\", "/"))
        args = PARSERS[script]([a.replace("%DATA%", "data/pannuke") for a in argv if a != "%*"])
        assert_runs_as_documented(args, EXPECTED[name])
        assert args.data_dir == "data/pannuke"
    assert parse_backup_args(["--recipe", "sota"]).optimizer == "adamw"  # a flag given wins, as on train.py


def test_the_documents_commands_run_from_a_folder_with_data_at_the_default_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_demo_dataset(tmp_path / "data" / "pannuke", tiles=(4, 2, 2), size=64, seed=3)
    commands = document_commands()
    runs = []
    for script, argv in commands[:3]:
        args = PARSERS[script](argv)
        vars(args).update(SHRUNK)
        runs.append(pannuke_train.main(args))
    assert [run.name.split("_", 1)[1] for run in runs] == ["sota", "sota", "backup"]
    assert all((run / "best.pth").is_file() for run in runs)
    assert (runs[1] / "swa.pth").is_file() and not (runs[0] / "swa.pth").exists()
    for script, argv in commands[3:]:
        assert script == "pannuke/visualize.py"
        pannuke_visualize.main(pannuke_visualize.parse_args(argv))
    assert list((runs[2] / "figures").glob("predictions_fold3_*.png"))  # the newest run's test fold
    assert list((tmp_path / "runs" / "pannuke" / "figures").glob("dataset_*.png"))
