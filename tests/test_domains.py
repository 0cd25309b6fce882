"""Promises the four script domains (pannuke, stress_granules, retinopathy, hydra_lv) make together:

- the set-up helpers copied on purpose into each domain, so a folder can be copied out, keep one text;
- every script's --help shows each default once, taken from the parser (a recipe, preset or --demo sets parser
  defaults), and each flag under one name;
- README's recipe for copying a domain gives a folder that runs on its own: every module it imports comes from
  the copy, and its outputs are named after the copy;
- the readers of large TIFFs (stress_granules, cellsam, hydra_lv) read a region of any TIFF as tifffile reads
  it, and of an uncompressed one (one strip per plane) without decoding the plane.
"""

import ast
import contextlib
import importlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("pannuke", "stress_granules", "retinopathy", "hydra_lv")
SCRIPTS = ("train", "evaluate", "visualize")
# The intended copies and the module of each domain that holds them.
COPIES = {
    "model.py": ("pick_device",),
    "data.py": ("write_json", "HelpFormatter"),
    "train.py": ("setup_device", "is_main", "unwrap", "mixed_precision", "save_checkpoint"),
}


def definitions(path: Path) -> dict[str, str]:
    text = path.read_text()
    return {
        node.name: ast.get_source_segment(text, node)
        for node in ast.parse(text).body
        if isinstance(node, ast.FunctionDef | ast.ClassDef)
    }


@pytest.mark.parametrize("module", sorted(COPIES))
def test_the_intended_copies_have_one_text_in_all_four_domains(module):
    texts = {domain: definitions(ROOT / domain / module) for domain in DOMAINS}
    for name in COPIES[module]:
        missing = [domain for domain in DOMAINS if name not in texts[domain]]
        assert not missing, f"{name} is not defined in {module} of {missing}"
        reference = texts[DOMAINS[0]][name]
        for domain in DOMAINS[1:]:
            assert texts[domain][name] == reference, f"{domain}/{module}: {name} differs from {DOMAINS[0]}/{module}"


@pytest.mark.parametrize("domain", DOMAINS)
def test_each_copy_is_defined_once_inside_its_domain(domain):
    homes = {name: module for module, names in COPIES.items() for name in names}
    for path in sorted((ROOT / domain).glob("*.py")):
        for name in definitions(path):
            if name in homes:
                where = f"{domain}/{path.name} defines {name} again (it lives in {homes[name]})"
                assert path.name == homes[name], where


def test_mixed_precision_follows_one_policy():
    """Off: no autocast and a scaler that does nothing. CPU on: bf16 autocast, no loss scaling (bf16 has fp32's
    range). fp16 asked for: the scaler is on."""
    train = importlib.import_module("pannuke.train")
    cpu = torch.device("cpu")
    ctx, scaler = train.mixed_precision(cpu, enabled=False)
    with ctx:
        assert not torch.is_autocast_enabled("cpu")
    assert not scaler.is_enabled()
    ctx, scaler = train.mixed_precision(cpu, enabled=True)
    layer = torch.nn.Linear(4, 4)
    for _ in range(2):  # one context, entered once per batch
        with ctx:
            assert layer(torch.ones(2, 4)).dtype == torch.bfloat16
        assert layer(torch.ones(2, 4)).dtype == torch.float32
    assert not scaler.is_enabled()
    _, scaler = train.mixed_precision(cpu, enabled=True, dtype=torch.float16)
    assert scaler.is_enabled()


def script(domain: str, name: str):
    return importlib.import_module(f"{domain}.{name}")


def help_text(module, argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        module.parse_args([*argv, "--help"])
    assert stop.value.code == 0
    return " ".join(out.getvalue().split())  # argparse wraps at the terminal's width: "(default:\n 0.1)" counts too


HAND_WRITTEN_DEFAULT = re.compile(r"\bdefaults?\b|\(\s*[-+]?\.?\d[\w.%+-]*\s*\)", re.IGNORECASE)


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("domain", DOMAINS)
def test_help_shows_each_default_from_the_parser_and_each_flag_once(domain, name):
    module = script(domain, name)
    parser = module.get_args_parser()
    assert parser.formatter_class is script(domain, "data").HelpFormatter
    text = help_text(module, [])
    for action in parser._actions:
        if not action.option_strings or action.help == "==SUPPRESS==":
            continue
        assert action.help, f"{domain}/{name}.py {action.option_strings[0]} has no help"
        own = action.help.replace("%(default)s", "")
        assert not HAND_WRITTEN_DEFAULT.search(own), (
            f"{domain}/{name}.py {action.option_strings[0]}: the help writes a default by hand: {action.help!r}"
        )
        shown = 2 if action.nargs == 0 and any(s.startswith("--no-") for s in action.option_strings) else 1
        for alias in action.option_strings[shown:]:
            assert not re.search(rf"(?<![\w-]){re.escape(alias)}(?![\w-])", text), f"{domain}/{name}.py shows {alias}"
        if action.default not in (None, False, "==SUPPRESS==") and isinstance(action.default, int | float | str):
            assert f"(default: {action.default})" in text, f"{domain}/{name}.py --help misses {action.dest}'s default"


@pytest.mark.parametrize("domain", DOMAINS)
def test_demo_help_shows_the_values_a_demo_runs_with(domain):
    train = script(domain, "train")
    plain, demo = vars(train.parse_args([])), vars(train.parse_args(["--demo"]))
    changed = {k: v for k, v in demo.items() if v != plain.get(k) and k != "demo"}
    assert changed, f"{domain}: --demo changes no default"
    text = help_text(train, ["--demo"])
    for key, value in changed.items():
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            assert f"(default: {value})" in text, f"{domain} --demo --help does not show {key}={value}"


def readme_copy_recipe() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("To start a new experiment from a domain") :]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.strip().splitlines()]


# One short epoch of each domain's demo, for the copy (the README recipe's last line runs the whole demo).
TINY = {
    "pannuke": ["--epochs", "1", "--demo_tiles", "16", "--num_workers", "0"],
    "stress_granules": ["--epochs", "1", "--crops_per_image", "1", "--num_workers", "0"],
    "retinopathy": ["--epochs-stage2", "1", "--image-size", "64", "--num-workers", "0"],
    "hydra_lv": [
        "optimization.max_epochs=1",
        "data.iterations_per_epoch=4",
        "data.val_patches=4",
        "system.training.num_workers=0",
        "--no-test-after",
    ],  # fmt: skip
}


@pytest.mark.parametrize("domain", DOMAINS)
def test_a_domain_copied_by_the_readme_recipe_runs_on_its_own(tmp_path, domain):
    """README's commands, written for pannuke, applied to each domain: the copy answers --help and trains, with
    the original folder gone (so every import comes from the copy), and names its outputs after itself."""
    copy_step, rename_step, run_step = readme_copy_recipe()
    assert run_step.startswith("python pannuke_myexp/train.py")
    new = f"{domain}_myexp"
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "common", tree / "common", ignore=ignore)
    shutil.copytree(ROOT / domain, tree / domain, ignore=ignore)
    for step in (copy_step, rename_step):
        command = step.replace("pannuke", domain)
        subprocess.run(["bash", "-c", command], cwd=tree, check=True, timeout=60)
    shutil.rmtree(tree / domain)
    assert not re.search(rf"\b{domain}\b", "".join(p.read_text() for p in (tree / new).glob("*.py")))

    def run(*flags):
        result = subprocess.run(
            [sys.executable, f"{new}/train.py", *flags], cwd=tree, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout + result.stderr

    shown = run("--help")
    assert f"{new}/train.py" in shown or "usage: train.py" in shown
    run("--demo", *TINY[domain])
    checkpoints = [p for p in tree.rglob("*") if p.suffix in (".pth", ".ckpt") and "demo_data" not in p.parts]
    assert checkpoints, f"the copy of {domain} wrote no checkpoint"
    if domain != "stress_granules":  # its design document fixes metrics/robust_<device>_<stamp>/: the tag tells
        assert all(new in p.relative_to(tree).as_posix() for p in checkpoints), checkpoints
    stored = torch.load(sorted(checkpoints)[0], map_location="cpu", weights_only=True)
    if "domain" in stored:
        assert stored["domain"] == new


@pytest.mark.parametrize("domain", ["pannuke", "stress_granules", "cellsam", "hydra_lv"])
def test_readme_commands_for_large_inputs_parse(domain):
    """Each README's section on slides, large images or volumes gives commands whose flags the script takes."""
    import shlex

    text = (ROOT / domain / "README.md").read_text()
    heading = {"pannuke": "## Whole slides", "stress_granules": "## Large images", "cellsam": "## Large images",
               "hydra_lv": "### A volume larger than memory"}[domain]  # fmt: skip
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    commands = [c for c in re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0].replace("\\\n", " ").splitlines()
                if c.startswith("python ")]  # fmt: skip
    assert commands
    module = importlib.import_module(f"{domain}.evaluate")
    parser = module.get_args_parser()
    for command in commands:
        words = shlex.split(command.split("#", 1)[0])
        assert words[1] == f"{domain}/evaluate.py"
        parser.parse_args(words[2:])  # an unknown flag exits


def open_large_tiff(domain: str, path: Path):
    """(reader of a region (z, rows, cols) of a (z, y, x) TIFF, close) through the domain's reader of large
    inputs."""
    if domain == "stress_granules":
        from stress_granules.data import LargeImage

        planes = [LargeImage(path, channel=z) for z in (0, 1)]
        return (lambda z, rows, cols: planes[z][rows, cols]), lambda: [p.close() for p in planes]
    if domain == "cellsam":
        from cellsam.data import LargeImage

        image = LargeImage(path)
        return (lambda z, rows, cols: image.raw(rows, cols)[..., z]), image.close  # channels last
    from hydra_lv.data import Volume

    volume = Volume(path)
    return (lambda z, rows, cols: volume[z, rows, cols]), volume.close


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize("domain", ["stress_granules", "cellsam", "hydra_lv"])
def test_large_tiff_readers_read_a_region_without_the_plane(domain, compression, tmp_path):
    """A region of a two-plane 1,500 px TIFF equals tifffile's; uncompressed (one 4.5 MB strip per plane: the
    zarr view's chunk), reading it allocates about the region (tracemalloc), not the plane."""
    import tracemalloc

    import numpy as np
    import tifffile

    image = np.random.default_rng(0).integers(0, 65535, (2, 1500, 1500), dtype=np.uint16)
    path = tmp_path / "plate.tif"
    extra = {"tile": (256, 256), "compression": compression} if compression else {}
    tifffile.imwrite(path, image, photometric="minisblack", planarconfig="separate", **extra)
    read, close = open_large_tiff(domain, path)
    key = (1, slice(1000, 1064), slice(700, 764))
    read(*key)  # first reads may set up caches
    tracemalloc.start()
    region = read(*key)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    close()
    np.testing.assert_array_equal(region, image[key])
    if compression is None:
        assert peak < 200_000, peak
