@echo off
rem The design document's backup training: Adam, linear warm-up + cosine, frequency-weighted Dice, fp32.
cd /d "%~dp0.."
set DATA=data\pannuke
set PY=python
if exist .venv\Scripts\python.exe set PY=.venv\Scripts\python.exe
%PY% pannuke\train_backup.py --data_dir "%DATA%" --lr 2e-4 --epochs 50 --batch_size 16 %*
pause
