"""One smoke test of benchmarks/run.py (the benchmarks themselves are not part of the suite): the instance-metrics
item of --quick writes its report, and our metrics equal the per-instance-pair references on both images."""

import sys
from pathlib import Path

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
