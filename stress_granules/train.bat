@echo off
rem Train the robust stress-granule model: set IMAGES and MASKS to your folders, then double-click.
cd /d "%~dp0.."
set IMAGES=data\stress_granules\images
set MASKS=data\stress_granules\masks
set PY=python
if exist .venv\Scripts\python.exe set PY=.venv\Scripts\python.exe
%PY% stress_granules\train.py --images "%IMAGES%" --masks "%MASKS%" --preset robust --epochs 200 --batch_size 4 --lr 1e-4 --image_size 256 %*
pause
