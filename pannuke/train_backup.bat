@echo off
rem The backup recipe: Adam, linear warm-up + cosine, frequency-weighted Dice, fp32.
cd /d "%~dp0.."
set DATA=data\pannuke
set PY=python
if exist .venv\Scripts\python.exe set PY=.venv\Scripts\python.exe
%PY% pannuke\train.py --data_dir "%DATA%" --recipe backup --epochs 60 --batch_size 16 --lr 1e-3 --warmup_epochs 5 --min_lr_factor 0.01 %*
pause
