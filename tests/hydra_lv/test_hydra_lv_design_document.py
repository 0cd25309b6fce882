"""Every command of the user's design document for hydra_lv runs through our configuration loader as written.

The document (../shared/seeds/004_59e719b5f4010ca4.txt, vendored as data/design_document.md) was written for
pytorch_connectomics' `python scripts/main.py --config tutorials/hydra-lv.yaml`; here that is
`python hydra_lv/train.py --config hydra_lv/hydra-lv.yaml`, with the same keys and overrides. Each command is
parsed by train.py's own parser, its settings loaded as training loads them and checked, every override is found
in the result, and the network it describes is built on the meta device (no memory) and run on one window."""

import re
import shlex
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from hydra_lv import train as hydra_train
from hydra_lv.data import DataError, check_splits_disjoint, load_config
from hydra_lv.model import model_from_config

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DOCUMENT = HERE / "data" / "design_document.md"
SEED = REPO.parent / "shared" / "seeds" / "004_59e719b5f4010ca4.txt"


def commands(text: str) -> list[list[str]]:
    """The argv after `python scripts/main.py` of every command in the document's bash blocks (line continuations
    joined, comments dropped), with our config path for the tutorial's."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["python", "scripts/main.py"]:
                found.append([str(REPO / "hydra_lv" / "hydra-lv.yaml") if w == "tutorials/hydra-lv.yaml" else w
                              for w in words[2:]])  # fmt: skip
    return found


def test_the_vendored_document_is_the_users():
    if not SEED.is_file():
        pytest.skip("the user's documents are not beside this checkout")
    assert DOCUMENT.read_text() == SEED.read_text()


def test_the_defaults_are_the_documents_table():
    cfg = load_config()
    m, data, system, optimization = cfg["model"], cfg["data"], cfg["system"], cfg["optimization"]
    assert m["architecture"] == "rsunet" and m["rsunet_norm"] == "batch"
    assert m["filters"] == [32, 64, 128, 256, 512] and m["loss_weights"] == [1.0, 1.0, 3.0]
    assert data["patch_size"] == m["input_size"] == m["output_size"] == [32, 128, 128]
    assert data["pad_size"] == [8, 24, 24] and data["iterations_per_epoch"] == 1280  # "Patches/epoch: 1,280"
    assert system["training"]["batch_size"] == 16 and system["training"]["num_gpus"] == 4  # 64 patches per step
    assert optimization["optimizer"]["lr"] == 0.001 and optimization["scheduler"]["factor"] == 0.5
    assert optimization["early_stopping"] == {"loss_threshold": 0.02, "patience": 100}
    assert cfg["experiment_name"] == "hydra_lv_rsunet"


def test_every_command_of_the_document_loads_and_builds_its_network(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the document's relative globs (datasets/hydra-lv/...) resolve here, unread
    argvs = commands(DOCUMENT.read_text())
    assert len(argvs) == 17
    architectures = set()
    for argv in argvs:
        args = hydra_train.parse_args(argv)
        if args.mode == "test":
            assert args.checkpoint.startswith("outputs/hydra_lv_rsunet/checkpoints/")
            continue
        cfg, resume, _ = hydra_train.load_settings(args, lambda *a: None)
        hydra_train.check_config(cfg)
        for item in args.overrides:  # each override does what it says
            key, value = item.split("=", 1)
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert node == yaml.safe_load(value), item
        if args.fast_dev_run:  # its own folder: the next command's outputs/hydra_lv_rsunet/ is the real run's
            assert cfg["experiment_name"] == "hydra_lv_rsunet_fast_dev_run" and cfg["optimization"]["max_epochs"] == 1
        with torch.device("meta"):
            model = model_from_config(cfg).train()
            output = model(torch.empty(1, 1, *cfg["model"]["input_size"]))
        outputs = output if isinstance(output, tuple) else (output,)
        assert outputs[0].shape == (1, 3, *cfg["model"]["output_size"]), argv
        assert (len(outputs) > 1) == bool(cfg["model"]["deep_supervision"]), argv
        architectures.add((cfg["model"]["architecture"], cfg["model"]["deep_supervision"]))
    # the baseline, the default, and the two "next steps" the document proposes
    assert architectures == {("monai_unet", False), ("rsunet", False), ("mednext", True), ("rsunet", True)}


def test_option_6_validation_globs_beside_the_training_glob_are_refused_by_name(tmp_path):
    """The document's validation volumes vol_val*_im.h5 also match its training glob vol*_im.h5."""
    folder = tmp_path / "datasets" / "hydra-lv"
    folder.mkdir(parents=True)
    for name in ("vol1_im.h5", "vol_val1_im.h5"):
        with h5py.File(folder / name, "w") as f:
            f["main"] = np.zeros((2, 4, 4), np.uint8)
    snippet = re.search(r"```yaml\n(# Split data into train/val.*?)```", DOCUMENT.read_text(), flags=re.S).group(1)
    data = {**load_config()["data"], **yaml.safe_load(snippet)["data"]}
    data = {k: str(tmp_path / v) if isinstance(v, str) and k.split("_")[0] in ("train", "val") else v
            for k, v in data.items()}  # fmt: skip
    with pytest.raises(DataError, match=r"vol_val1_im.h5 matches both data.train_image=.*vol\*_im.h5"):
        check_splits_disjoint(data)
    data["train_image"] = str(folder / "vol[0-9]*_im.h5")  # what the README says to write instead
    check_splits_disjoint(data)
