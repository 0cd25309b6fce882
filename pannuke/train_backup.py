"""The design document's backup training: `python pannuke/train_backup.py --lr 2e-4 --epochs 50 --batch_size 16`.

Adam (not AdamW), linear warm-up then cosine annealing to lr * min_lr_factor, frequency-weighted Dice, fp32, and
none of the sota recipe's extras (MixUp, EMA, SWA, TTA, progressive augmentation or crop sizes). It is train.py with
--recipe backup, not a second training loop: every flag of train.py works here, and `-h` lists them with the values
this recipe runs with. The data are read from data/pannuke unless --data_dir says otherwise.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root: `common` and this folder import

from pannuke.train import main, parse_args


def parse_backup_args(argv=None):
    """train.py's arguments with --recipe backup first (a --recipe given later still wins, as on train.py)."""
    return parse_args(["--recipe", "backup", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main(parse_backup_args())
