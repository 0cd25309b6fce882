@echo off
rem Train on your PanNuke folds: set DATA to the folder holding "Fold 1", "Fold 2", "Fold 3", then double-click.
cd /d "%~dp0.."
set DATA=data\pannuke
set PY=python
if exist .venv\Scripts\python.exe set PY=.venv\Scripts\python.exe
%PY% pannuke\train.py --data_dir "%DATA%" --epochs 60 --batch_size 16 --use_mixed_precision %*
pause
