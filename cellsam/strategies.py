"""How an experiment splits its images: KFoldStrategy (k models, each scored on the fifth it did not see),
TrainValSplitStrategy (one model, val_fraction held out) and FullDatasetStrategy (every image trains, nothing is
held out). Each gives splits(pairs) -> [(training pairs, validation pairs), ...], one per fold, and says clearly
when there are too few images for it."""

from __future__ import annotations

from sklearn.model_selection import KFold, train_test_split


class TrainValSplitStrategy:
    name = "train_val_split"

    def __init__(self, val_fraction: float = 0.2, seed: int = 42):
        self.val_fraction, self.seed = val_fraction, seed

    def splits(self, pairs: list, source: str = "the image folder") -> list[tuple[list, list]]:
        if len(pairs) < 2:
            raise SystemExit(
                f"--strategy train_val_split needs at least 2 images (one to train, one to validate); {source} "
                f"holds {len(pairs)}: add images or use --strategy full_dataset"
            )
        train, val = train_test_split(pairs, test_size=self.val_fraction, random_state=self.seed)
        return [(list(train), list(val))]


class KFoldStrategy:
    name = "k_fold"

    def __init__(self, k_folds: int = 5, seed: int = 42):
        self.k_folds, self.seed = k_folds, seed

    def splits(self, pairs: list, source: str = "the image folder") -> list[tuple[list, list]]:
        if len(pairs) < self.k_folds:
            raise SystemExit(
                f"--k_folds {self.k_folds} needs at least {self.k_folds} images (one held out per fold); {source} "
                f"holds {len(pairs)}"
            )
        folds = KFold(self.k_folds, shuffle=True, random_state=self.seed).split(pairs)
        return [([pairs[i] for i in train], [pairs[i] for i in val]) for train, val in folds]


class FullDatasetStrategy:
    name = "full_dataset"

    def splits(self, pairs: list, source: str = "the image folder") -> list[tuple[list, list]]:
        if not pairs:
            raise SystemExit(f"--strategy full_dataset: {source} holds no image")
        return [(list(pairs), [])]


def strategy_for(config) -> TrainValSplitStrategy | KFoldStrategy | FullDatasetStrategy:
    """The strategy an ExperimentConfig names."""
    if config.strategy == "k_fold":
        return KFoldStrategy(config.k_folds, config.seed)
    if config.strategy == "train_val_split":
        return TrainValSplitStrategy(config.val_fraction, config.seed)
    return FullDatasetStrategy()
