"""One smoke test of benchmarks/run.py (the benchmarks themselves are not part of the suite): the instance-metrics
item of --quick writes its report, and our metrics equal the per-instance-pair references on both images."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import run as benchmark_run  # noqa: E402


def test_quick_metrics_item_writes_a_report_with_identical_values(tmp_path):
    output = tmp_path / "RESULTS.md"
    args = ["--quick", "--items", "metrics", "--output", str(output), "--workdir", str(tmp_path / "work")]
    benchmark_run.main(benchmark_run.get_args_parser().parse_args(args))
    text = output.read_text()
    assert "## Instance metrics" in text and "torch" in text
    rows = [line for line in text.splitlines() if line.startswith("| 256 x 256") or line.startswith("| 1024 x 1024")]
    assert len(rows) == 2 and all("| yes |" in row for row in rows)


def test_channels_last_is_the_default_where_the_benchmark_found_it_faster():
    """benchmarks/RESULTS.md: channels-last convolutions were 1.16 to 1.4x faster per training step for the default
    models of pannuke, stress_granules, retinopathy and hydra_lv on the CPU, so train.py turns them on for CPU and
    CUDA; `--no-channels_last` (hydra_lv: optimization.channels_last=false) turns them off, MPS stays off."""
    import torch

    import hydra_lv.model as hydra_model
    import pannuke.train as pannuke_train
    import stress_granules.train as stress_train

    cpu, mps = torch.device("cpu"), torch.device("mps")
    for device, expected in ((cpu, True), (mps, False)):  # pannuke decides it in parse_args, from pick_device()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(pannuke_train, "pick_device", lambda device=device: device)
            assert pannuke_train.parse_args(["--demo"]).channels_last is expected
            assert pannuke_train.parse_args(["--demo", "--no-channels_last"]).channels_last is False
    for device, expected in ((cpu, True), (mps, False)):  # stress_granules too
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(stress_train, "pick_device", lambda device=device: device)
            assert stress_train.parse_args(["--demo"]).channels_last is expected
            assert stress_train.parse_args(["--demo", "--no-channels_last"]).channels_last is False
    for setting, expected in (("auto", True), (True, True), (False, False)):
        assert hydra_model.use_channels_last(cpu, {"optimization": {"channels_last": setting}}) is expected
    assert hydra_model.use_channels_last(cpu, {"optimization": {}})  # a config from before the key: auto
    assert not hydra_model.use_channels_last(mps, {"optimization": {"channels_last": "auto"}})
