@echo off
rem The design document's Maximum Performance command: the sota recipe (AdamW, OneCycle, EMA, MixUp, hybrid loss, TTA)
rem with lr 3e-4, patience 15, mixed precision and SWA from epoch 30.
cd /d "%~dp0.."
set DATA=data\pannuke
set PY=python
if exist .venv\Scripts\python.exe set PY=.venv\Scripts\python.exe
%PY% pannuke\train.py --data_dir "%DATA%" --epochs 60 --batch_size 16 --lr 3e-4 --weight_decay 1e-4 --early_stopping_patience 15 --grad_clip_val 1.0 --use_mixed_precision --use_swa --swa_start_epoch 30 %*
pause
