"""Hyperparameter search for CellSAM: random or grid search over a HyperparameterSpace, trials in parallel worker
processes (one GPU each where there are several), a results table and the best configuration.

    from cellsam import ExperimentConfig, HyperparameterSpace, HyperparameterOptimizer
    search = HyperparameterOptimizer(base_config, HyperparameterSpace(), "output/search", max_parallel=2)
    search.run_random_search(20)      # or search.run_grid_search()
    python cellsam/train.py --img_path DATA/images --mask_path DATA/masks --search random --n_trials 20 --max_parallel 2

Each trial is a whole experiment (its strategy, both stages) under <search folder>/trials/trial_NNN/; its score is
the mean validation F1 at IoU 0.5. The search folder gets search_results.csv (one row per trial: its values,
status, F1, seconds; a failed trial is recorded with its error and the search goes on) and best_config.json.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cellsam.config import ExperimentConfig


@dataclass
class HyperparameterSpace:
    """The values each searched setting may take (stage 1 and 2 learning rates and focal gammas, the input gamma,
    the augmentation flags)."""

    lr_s1: list = field(default_factory=lambda: [3e-5, 1e-4, 3e-4])
    lr_s2: list = field(default_factory=lambda: [3e-5, 1e-4, 3e-4])
    focal_gamma_s1: list = field(default_factory=lambda: [1.5, 2.0, 2.5])
    focal_gamma_s2: list = field(default_factory=lambda: [1.5, 2.0, 2.5])
    gamma: list = field(default_factory=lambda: [0.8, 1.0, 1.25])
    augmentation: list = field(default_factory=lambda: [True, False])
    stain_transform: list = field(default_factory=lambda: [False])

    def check(self) -> HyperparameterSpace:
        for f in fields(self):
            values = getattr(self, f.name)
            if not isinstance(values, (list, tuple)) or len(values) == 0:
                raise SystemExit(f"search space: {f.name} has no values (give a non-empty list)")
        return self

    def grid(self) -> list[dict]:
        names = [f.name for f in fields(self)]
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(getattr(self, n) for n in names))]

    def sample(self, rng: np.random.Generator) -> dict:
        return {f.name: getattr(self, f.name)[int(rng.integers(len(getattr(self, f.name))))] for f in fields(self)}


def apply(config: ExperimentConfig, values: dict) -> ExperimentConfig:
    """A copy of config with the searched values set (lr_s1 -> stage1.lr, focal_gamma_s2 -> stage2.focal_gamma...)."""
    config = copy.deepcopy(config)
    for name, value in values.items():
        if name.endswith(("_s1", "_s2")):
            setattr(config.stage1 if name.endswith("_s1") else config.stage2, name[:-3], value)
        else:
            setattr(config, name, value)
    return config


def run_trial(config_dict: dict, trial_dir: str, gpu: int | None) -> dict:
    """One trial in a worker process: the whole experiment; returns its status, F1 and time. Never raises."""
    started = time.time()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # before CUDA starts in this process
    try:
        from cellsam.train import ExperimentRunner

        torch.set_num_threads(1)
        result = ExperimentRunner(ExperimentConfig.from_dict(config_dict), Path(trial_dir)).run()
        f1 = result["metrics"].get("f1", {}).get("mean", float("nan"))
        return {"status": "finished", "f1": f1, "seconds": time.time() - started, "error": ""}
    except BaseException as error:  # a failing trial is recorded, the search goes on
        message = f"{type(error).__name__}: {error}"
        (Path(trial_dir) / "error.txt").write_text(traceback.format_exc())
        return {"status": "failed", "f1": float("nan"), "seconds": time.time() - started, "error": message}


class HyperparameterOptimizer:
    def __init__(self, base_config: ExperimentConfig, param_space: HyperparameterSpace, output_dir, max_parallel=1):
        self.base, self.space = base_config.check(), param_space.check()
        self.output_dir, self.max_parallel = Path(output_dir), max(1, int(max_parallel))

    def run_random_search(self, n_trials: int, seed: int = 0) -> pd.DataFrame:
        if n_trials < 1:
            raise SystemExit(f"--n_trials {n_trials}: at least 1")
        rng = np.random.default_rng(seed)
        return self.run([self.space.sample(rng) for _ in range(n_trials)])

    def run_grid_search(self) -> pd.DataFrame:
        return self.run(self.space.grid())

    def run(self, trials: list[dict]) -> pd.DataFrame:
        folder = self.output_dir
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "search_results.csv").exists():
            raise SystemExit(f"{folder} holds an earlier search (search_results.csv); give another output folder")
        gpus = torch.cuda.device_count()
        jobs = []
        for i, values in enumerate(trials, start=1):
            trial_dir = folder / "trials" / f"trial_{i:03d}"
            trial_dir.mkdir(parents=True, exist_ok=True)
            config = apply(self.base, values)
            jobs.append((values, config.to_dict(), str(trial_dir), (i - 1) % gpus if gpus else None))
        # spawned workers: no CUDA state or open files shared with this process
        with ProcessPoolExecutor(self.max_parallel, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_trial, config, trial_dir, gpu) for _, config, trial_dir, gpu in jobs]
            outcomes = [future.result() for future in futures]
        rows = [
            {"trial": i, **values, **outcome}
            for i, ((values, *_), outcome) in enumerate(zip(jobs, outcomes, strict=True), 1)
        ]
        table = pd.DataFrame(rows)
        table.to_csv(folder / "search_results.csv", index=False)
        finished = table[(table["status"] == "finished") & table["f1"].notna()]
        if len(finished):
            best = finished.loc[finished["f1"].idxmax()]
            values = {k: _plain(best[k]) for k in trials[0]}
            best_json = {"trial": int(best["trial"]), "f1": float(best["f1"]), "values": values}
            best_json["config"] = apply(self.base, values).to_dict()
            (folder / "best_config.json").write_text(json.dumps(best_json, indent=2))
        return table


def _plain(value):
    """NumPy scalars from a DataFrame row back to Python values (for JSON and dataclasses)."""
    return value.item() if hasattr(value, "item") else value


__all__ = ["HyperparameterSpace", "HyperparameterOptimizer", "apply", "run_trial", "asdict"]
