"""CellSAM training from Python:

    from cellsam import finetune, ExperimentConfig, Stage1Config, Stage2Config, ExperimentRunner
    from cellsam import HyperparameterSpace, HyperparameterOptimizer
    from cellsam import KFoldStrategy, TrainValSplitStrategy, FullDatasetStrategy
    from cellsam import GPUMonitor, MetricsTracker, TrainingVisualizer, CheckpointManager, EarlyStopping
    from cellsam import get_local_model, get_model, segment_cellular_image, CellSAM   # the published CellSAM

Names are imported on first use, so `import cellsam.data` stays light."""

_WHERE = {
    "finetune": "cellsam.train",
    "ExperimentRunner": "cellsam.train",
    "ExperimentConfig": "cellsam.config",
    "Stage1Config": "cellsam.config",
    "Stage2Config": "cellsam.config",
    "HyperparameterSpace": "cellsam.search",
    "HyperparameterOptimizer": "cellsam.search",
    "KFoldStrategy": "cellsam.strategies",
    "TrainValSplitStrategy": "cellsam.strategies",
    "FullDatasetStrategy": "cellsam.strategies",
    "GPUMonitor": "cellsam.utils",
    "MetricsTracker": "cellsam.utils",
    "TrainingVisualizer": "cellsam.utils",
    "CheckpointManager": "cellsam.utils",
    "EarlyStopping": "cellsam.utils",
    "CellSAM": "cellsam.published",
    "get_local_model": "cellsam.published",
    "get_model": "cellsam.published",
    "segment_cellular_image": "cellsam.published",
}
__all__ = list(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'cellsam' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
