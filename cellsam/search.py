"""Hyperparameter search for CellSAM on Optuna: random, grid or TPE search over a HyperparameterSpace, each trial a
whole experiment (train.py's ExperimentRunner: its strategy, both stages), scored by its mean validation F1 at
IoU 0.5 (the validation images choose; report the chosen setting on test images).

    from cellsam import ExperimentConfig, HyperparameterSpace, HyperparameterOptimizer
    search = HyperparameterOptimizer(base_config, HyperparameterSpace(), "output/hp_search", max_parallel=2)
    search.run_random_search(n_trials=20)      # or search.run_grid_search(), search.run_tpe_search(20)

    python cellsam/search.py --img_path DATA/images --mask_path DATA/masks --output_name my_search \\
        --sampler random --n_trials 20 --max_parallel 2 [--prune] [--search_space space.json]
    python cellsam/search.py ... --storage postgresql://user:pass@host/db    # the same command on several machines

- The study lives in OUTPUT/search.db (SQLite, nothing to set up), or in the database --storage names, so that
  the same command started on several machines shares one study.
- Re-running the command on the same output folder resumes the study: it runs until the study holds n_trials
  trials (running or finished). A trial cut off by a kill is recorded as failed and run again with the same
  values: at once when its process was on this machine, after its heartbeat has been silent for a minute when
  it ran elsewhere.
- Samplers: random (RandomSampler: values drawn independently, a combination may come twice), grid (GridSampler:
  every combination of the space exactly once), tpe (TPESampler).
- max_parallel trials at once on one machine, in worker processes, one GPU each where there are several.
- Every finished trial is appended to OUTPUT/search_results.csv as it ends (its study, number, state, F1, values,
  seconds, error, folder); a failed trial is recorded with its error and the search goes on; OUTPUT/trials/
  trial_NNN/ holds each trial's experiment, OUTPUT/best_config.json the best one.
- --prune: Optuna's median pruner stops a trial whose validation loss at an epoch is worse than the median of
  earlier trials at the same epoch (after 4 trials and 3 epochs); it reports minus the loss, as the study
  maximises F1.

Quick checks: the environment variable CELLSAM_MAX_TRIALS=N caps every search at N trials (with
CELLSAM_OVERRIDES, see config.py, for tiny trials). search.py calls the training entry point; train.py knows
nothing of the search.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

import argparse
import copy
import csv
import json
import multiprocessing
import os
import socket
import traceback
import warnings
from dataclasses import dataclass, field, fields

import optuna
import pandas as pd
import torch

from cellsam.config import ExperimentConfig
from cellsam.train import ExperimentRunner, add_config_flags, config_from_args, set_field, set_up_demo

SAMPLERS = ("random", "grid", "tpe")
HEARTBEAT_S = 20  # a running trial's heartbeat; one silent for 3 beats was cut off and is run again
MAX_TRIALS = "CELLSAM_MAX_TRIALS"  # environment variable: caps every search at this many trials (quick checks)
COLUMNS = ["study", "trial", "state", "f1", "seconds", "error", "folder"]


@dataclass
class HyperparameterSpace:
    """The values each searched setting may take. extra: any other setting by its train.py flag name (e.g.
    {"dice_loss_weight": [1.0, 2.0], "stage1_type": ["cellfinder", "image_encoder"]})."""

    stage1_learning_rates: list = field(default_factory=lambda: [1e-4, 1e-5])
    stage2_learning_rates: list = field(default_factory=lambda: [1e-4, 5e-5])
    focal_gammas: list = field(default_factory=lambda: [2.0, 3.0])  # stage 2's focal loss
    gammas: list = field(default_factory=lambda: [2.1, 2.4])  # the input gamma correction
    augmentation_flags: list = field(default_factory=lambda: [False, True])
    extra: dict = field(default_factory=dict)

    # each field's setting (a train.py flag name)
    SETTINGS = {"stage1_learning_rates": "learning_rate_s1", "stage2_learning_rates": "learning_rate_s2",
                "focal_gammas": "focal_gamma_s2", "gammas": "gamma", "augmentation_flags": "augmentation"}  # fmt: skip

    def choices(self) -> dict:
        """{setting: its values}, checked: every list non-empty, every extra name a setting."""
        out = {self.SETTINGS[f.name]: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        for name, values in out.items():
            if not isinstance(values, (list, tuple)) or len(values) == 0:
                raise SystemExit(f"search space: {name} has no values (give a non-empty list)")
            try:
                set_field(ExperimentConfig(), name, values[0])
            except TypeError as error:
                raise SystemExit(f"search space: {error}".replace("finetune() got an unexpected keyword argument",
                                                                  "no setting named")) from None  # fmt: skip
        return {name: list(values) for name, values in out.items()}

    def size(self) -> int:
        n = 1
        for values in self.choices().values():
            n *= len(values)
        return n


def apply(config: ExperimentConfig, values: dict) -> ExperimentConfig:
    """A copy of config with the searched settings (train.py flag names: learning_rate_s1, gamma...) set."""
    config = copy.deepcopy(config)
    for name, value in values.items():
        set_field(config, name, value)
    return config


class HyperparameterOptimizer:
    """A search over param_space around base_config; studies and results in output_dir (see the module
    docstring). storage: a database URL (default sqlite:///OUTPUT_DIR/search.db); prune: median pruning."""

    def __init__(self, base_config: ExperimentConfig, param_space: HyperparameterSpace, output_dir, max_parallel=1,
                 storage: str | None = None, prune: bool = False, seed: int = 0):  # fmt: skip
        self.base = copy.deepcopy(base_config)
        ExperimentRunner(self.base)  # its errors (a missing folder, a bad value) now, before any trial
        if self.base.strategy == "full_dataset":
            raise SystemExit("a search chooses by validation F1: --strategy full_dataset holds no image out")
        self.space, self.choices = param_space, param_space.choices()
        self.output_dir, self.max_parallel = Path(output_dir), max(1, int(max_parallel))
        self.storage_url = storage or f"sqlite:///{(self.output_dir / 'search.db').resolve()}"
        self.prune, self.seed = prune, seed

    def run_random_search(self, n_trials: int = 20) -> pd.DataFrame:
        return self.run("random", n_trials)

    def run_grid_search(self) -> pd.DataFrame:
        """Every combination of the space exactly once."""
        return self.run("grid", self.space.size())

    def run_tpe_search(self, n_trials: int = 20) -> pd.DataFrame:
        return self.run("tpe", n_trials)

    def run(self, sampler: str, n_trials: int) -> pd.DataFrame:
        if sampler not in SAMPLERS:
            raise SystemExit(f"--sampler {sampler}: choose one of {', '.join(SAMPLERS)}")
        if n_trials < 1:
            raise SystemExit(f"--n_trials {n_trials}: at least 1")
        if os.environ.get(MAX_TRIALS):  # a quick check of a script or notebook: every search this short
            n_trials = min(n_trials, int(os.environ[MAX_TRIALS]))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        results = self.output_dir / "search_results.csv"
        if not results.is_file():
            with open(results, "w", newline="") as f:
                csv.writer(f).writerow(COLUMNS + list(self.choices))
        job = {"base": self.base.to_dict(), "choices": self.choices, "folder": str(self.output_dir),
               "storage": self.storage_url, "sampler": sampler, "n_trials": n_trials, "prune": self.prune,
               "seed": self.seed, "workers": self.max_parallel, "gpus": torch.cuda.device_count()}  # fmt: skip
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = open_study(job)  # created here, so workers never race to create it
        fail_dead_trials(study)
        print(f"search {study.study_name} in {self.storage_url}: {count_finished(study)} of {n_trials} trials "
              f"finished, {self.max_parallel} at a time", flush=True)  # fmt: skip
        if self.max_parallel == 1:
            search_worker(job, 0)
        else:
            context = multiprocessing.get_context("spawn")  # no CUDA state or open files shared with this process
            workers = [context.Process(target=search_worker, args=(job, i)) for i in range(self.max_parallel)]
            for worker in workers:
                worker.start()
            try:
                for worker in workers:
                    worker.join()
            finally:  # Ctrl-C or an error here: the workers stop too
                for worker in workers:
                    if worker.is_alive():
                        worker.terminate()
        return self.summary(sampler)

    def summary(self, sampler: str) -> pd.DataFrame:
        """The study's trials as a table; the best one's values and whole configuration in best_config.json."""
        study = open_study({"storage": self.storage_url, "sampler": sampler, "choices": self.choices,
                            "prune": self.prune, "seed": self.seed})  # fmt: skip
        rows = [
            trial_row(study.study_name, t)
            for t in study.get_trials(deepcopy=False)
            if not t.user_attrs.get("duplicate")
        ]
        table = pd.DataFrame(rows, columns=COLUMNS + list(self.choices))
        done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        if done:
            best = max(done, key=lambda t: t.value)
            best_json = {"study": study.study_name, "trial": best.number, "f1": best.value, "values": best.params,
                         "config": apply(self.base, best.params).to_dict()}  # fmt: skip
            (self.output_dir / "best_config.json").write_text(json.dumps(best_json, indent=2))
        return table


def open_study(job: dict) -> optuna.Study:
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna's words
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            job["storage"],
            heartbeat_interval=HEARTBEAT_S,
            grace_period=3 * HEARTBEAT_S,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
        )
    seed = job["seed"]
    sampler = {
        "random": lambda: optuna.samplers.RandomSampler(seed),
        "grid": lambda: optuna.samplers.GridSampler(job["choices"], seed),
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
    }[job["sampler"]]()
    pruner = optuna.pruners.MedianPruner(4, 3) if job["prune"] else optuna.pruners.NopPruner()
    return optuna.create_study(storage=storage, sampler=sampler, pruner=pruner, study_name=f"cellsam_{job['sampler']}",
                               direction="maximize", load_if_exists=True)  # fmt: skip


def fail_dead_trials(study: optuna.Study) -> None:
    """Trials left running by a process of this machine that is gone (a kill): failed now and queued to run
    again with the same values (trials of other machines wait for their heartbeat to go silent)."""
    if os.name != "posix":
        return
    storage, host = study._storage, socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("host") != host or "pid" not in t.user_attrs:
            continue
        try:
            os.kill(t.user_attrs["pid"], 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's live process
        if storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL):
            storage.get_heartbeat_stale_trial_callback()(study, copy.deepcopy(storage.get_trial(t._trial_id)))


def count_started(study: optuna.Study) -> int:
    """Trials that count towards n_trials: running, completed, pruned, or failed with an error of their own (a
    trial cut off by a kill has no error and runs again)."""
    return sum(counts(t) for t in study.get_trials(deepcopy=False))


def count_finished(study: optuna.Study) -> int:
    """Trials that count towards n_trials: completed, pruned, or failed with an error of their own (a trial cut off
    by a kill has no error and is run again)."""
    states = optuna.trial.TrialState
    return sum(counts(t) and t.state != states.RUNNING for t in study.get_trials(deepcopy=False))


def grid_points_left(study: optuna.Study, n_points: int) -> bool:
    """Whether a grid point is neither finished nor running (or a cut-off trial waits to run again): GridSampler
    itself would start a second run of a point another worker is running."""
    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    if any(t.state == states.WAITING for t in trials):
        return True
    taken = {t.system_attrs.get("grid_id") for t in trials if t.state != states.WAITING}
    return bool(set(range(n_points)) - taken)


def counts(t) -> bool:
    """Whether a trial counts towards n_trials: running, completed, pruned, or failed with an error of its own (a
    trial cut off by a kill has no error and runs again); never a trial that stood down."""
    states = optuna.trial.TrialState
    if t.user_attrs.get("duplicate"):
        return False
    return t.state in (states.RUNNING, states.COMPLETE, states.PRUNED) or (
        t.state == states.FAIL and "error" in t.user_attrs
    )


def trials_before(study: optuna.Study, number: int) -> int:
    """Counting trials numbered below `number`: two workers that check the count at once can both start one more
    trial than the study needs (measured in CI: a third trial of two); the later one stands down."""
    return sum(counts(t) for t in study.get_trials(deepcopy=False) if t.number < number)


def grid_point_taken(study: optuna.Study, number: int) -> bool:
    """Whether an earlier trial holds the grid point of trial `number`: two workers that ask GridSampler at the
    same moment can be given the same last point (measured: a third grid trial in a 2-point grid, once in CI)."""
    trials = study.get_trials(deepcopy=False)
    point = next(t for t in trials if t.number == number).system_attrs.get("grid_id")
    states = optuna.trial.TrialState
    return any(
        t.number < number and t.system_attrs.get("grid_id") == point and not t.user_attrs.get("duplicate")
        and (t.state in (states.RUNNING, states.COMPLETE, states.PRUNED)
             or (t.state == states.FAIL and "error" in t.user_attrs))  # a trial cut off by a kill runs again
        for t in trials
    )  # fmt: skip


def trial_row(study_name: str, t) -> dict:
    seconds = (
        (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
    )
    return {"study": study_name, "trial": t.number, "state": t.state.name.lower(), "f1": t.value, "seconds": seconds,
            "error": t.user_attrs.get("error", ""), "folder": t.user_attrs.get("folder", ""), **t.params}  # fmt: skip


def search_worker(job: dict, index: int) -> None:
    """One worker: trials until the study holds n_trials finished ones (or the grid is done)."""
    if job["workers"] > 1:  # a worker process: its own GPU (before CUDA starts here), its share of the cores
        if job["gpus"] > 1:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(index % job["gpus"])
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // job["workers"]))
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial's line is printed below
    study = open_study(job)
    base, folder = ExperimentConfig.from_dict(job["base"]), Path(job["folder"])
    offsets = (base.stage1_config.total_epochs, base.stage1_config.total_epochs + base.stage2_config.total_epochs)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("host", socket.gethostname())  # first: a kill from here on is noticed at once
        trial.set_user_attr("pid", os.getpid())
        values = {name: trial.suggest_categorical(name, choices) for name, choices in job["choices"].items()}
        surplus = trials_before(study, trial.number) >= job["n_trials"]  # a worker asked as another's trial began
        if surplus or (job["sampler"] == "grid" and grid_point_taken(study, trial.number)):
            trial.set_user_attr("duplicate", True)  # left out of the counts and the tables
            raise optuna.TrialPruned(
                "the study has its trials already" if surplus else "another worker took this grid point first"
            )
        # one folder per study: trial 0 of a grid study is not trial 0 of the random study run before it
        trial_dir = folder / "trials" / job["sampler"] / f"trial_{trial.number:03d}"
        trial.set_user_attr("folder", str(trial_dir))

        def on_epoch(fold, stage, epoch, loss):  # the pruner sees minus the validation loss at each epoch
            if not job["prune"]:
                return
            trial.report(-loss, (fold - 1) * offsets[1] + (offsets[0] if stage == 2 else 0) + epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"stage {stage} epoch {epoch}: validation loss {loss:.4f}")

        try:
            result = ExperimentRunner(apply(base, values), trial_dir, on_epoch).run()
            return result["metrics"]["f1"]["mean"]
        except optuna.TrialPruned:
            raise
        except (Exception, SystemExit) as error:  # recorded, and the search goes on
            message = f"{type(error).__name__}: {error}"
            trial.set_user_attr("error", message)
            trial_dir.mkdir(parents=True, exist_ok=True)
            (trial_dir / "error.txt").write_text(traceback.format_exc())
            raise RuntimeError(message) from None

    def append_row(study, trial) -> None:
        if trial.user_attrs.get("duplicate"):
            return
        row = trial_row(study.study_name, trial)
        with open(folder / "search_results.csv", "a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in COLUMNS + list(job["choices"])])
        print(f"trial {trial.number}: {row['state']}"
              + (f", validation F1 {row['f1']:.3f}" if row["f1"] is not None else "")
              + (f" ({row['error']})" if row["error"] else ""), flush=True)  # fmt: skip

    while count_started(study) < job["n_trials"]:
        if job["sampler"] == "grid" and not grid_points_left(study, job["n_trials"]):
            break
        study.optimize(objective, n_trials=1, catch=(RuntimeError,), callbacks=[append_row])


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python cellsam/search.py",
        usage="%(prog)s (--img_path DIR --mask_path DIR | --demo) [--sampler random|grid|tpe] [options]",
        description=__doc__.split("\n\n")[0],
        epilog="The experiment options are train.py's; the search folder is OUTPUT_DIR/OUTPUT_NAME_search.",
    )
    s = p.add_argument_group("search")
    s.add_argument("--sampler", choices=SAMPLERS, default="random", help="how trials choose values (default: random)")
    s.add_argument("--n_trials", type=int, default=20, metavar="N", help="random, tpe: trials in all (default: 20)")
    s.add_argument("--max_parallel", type=int, default=1, metavar="N",
                   help="trials at once on this machine, one GPU each (default: 1)")  # fmt: skip
    s.add_argument("--storage", metavar="URL", help="a database URL shared by several machines (default: "
                   "sqlite:///OUTPUT_DIR/OUTPUT_NAME_search/search.db)")  # fmt: skip
    s.add_argument("--prune", action="store_true", help="median pruning on the validation loss")
    s.add_argument("--search_space", metavar="FILE", help="a JSON file of HyperparameterSpace fields (lists of "
                   "values; extra: {flag name: values}) (default: HyperparameterSpace())")  # fmt: skip
    s.add_argument("--seed_search", type=int, default=0, metavar="N", help="the sampler's seed (default: 0)")
    s.add_argument("--demo", action="store_true", help="search on train.py --demo's synthetic cells and settings")
    add_config_flags(p)
    return p


def main(args) -> pd.DataFrame:
    config = config_from_args(args)
    if args.demo:
        set_up_demo(config, {a.lstrip("-").split("=")[0] for a in sys.argv[1:] if a.startswith("--")})
    if args.search_space:
        path = Path(args.search_space)
        try:
            space = HyperparameterSpace(**json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as error:
            raise SystemExit(f"--search_space {path}: {error}") from None
    else:
        space = HyperparameterSpace()
    folder = Path(config.output_dir) / f"{config.output_name}_search"
    search = HyperparameterOptimizer(config, space, folder, args.max_parallel, args.storage, args.prune,
                                     args.seed_search)  # fmt: skip
    table = search.run(args.sampler, space.size() if args.sampler == "grid" else args.n_trials)
    print(table.to_string(index=False))
    print(f"wrote {folder / 'search_results.csv'}")
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())
