"""The suite runs on one pytest-xdist worker per core (`-n auto --dist loadfile` in pyproject.toml): each worker
takes whole test files, so a file's module fixtures are built once. Each worker, and every script it starts, uses
its share of the cores: torch's default of one thread per core in every worker would have the workers fight over
the same cores."""

import os

workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if workers > 1:
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    os.environ["OMP_NUM_THREADS"] = threads  # the scripts a test starts, and their loader workers
    os.environ["MKL_NUM_THREADS"] = threads

    import torch

    torch.set_num_threads(int(threads))
