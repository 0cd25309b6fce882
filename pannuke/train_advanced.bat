@echo off
rem Every feature of the sota recipe spelled out: EMA, SWA, MixUp, progressive augmentation and crops, TTA, AMP.
cd /d "%~dp0.."
set DATA=data\pannuke
set PY=python
if exist .venv\Scripts\python.exe set PY=.venv\Scripts\python.exe
%PY% pannuke\train.py --data_dir "%DATA%" --recipe sota --epochs 60 --batch_size 16 --lr 1e-3 --scheduler onecycle --use_mixed_precision --use_ema --use_swa --swa_start_epoch 45 --mixup_alpha 0.2 --progressive_aug --progressive_resize --tta --early_stopping_patience 15 %*
pause
