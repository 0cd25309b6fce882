@echo off
rem Segment, count and measure granules in new images: set MODEL, IMAGES and PIXEL_SIZE (micrometres), then double-click.
cd /d "%~dp0.."
set MODEL=robust_stress_granule_model.pth
set IMAGES=data\stress_granules\new_images
set PIXEL_SIZE=0.108
set PY=python
if exist .venv\Scripts\python.exe set PY=.venv\Scripts\python.exe
%PY% stress_granules\evaluate.py "%MODEL%" --images "%IMAGES%" --pixel_size %PIXEL_SIZE% %*
pause
