@echo off
rem Segment new images with a trained experiment: set EXPERIMENT and IMAGES (and MASKS to score them), then
rem double-click. Label images (TIFF) and the report go to EXPERIMENT\evaluation\evaluation_<time>.
cd /d "%~dp0.."
set EXPERIMENT=output\my_cells
set IMAGES=data\cells\new_images
set PY=python
if exist .venv\Scripts\python.exe set PY=.venv\Scripts\python.exe
%PY% cellsam\evaluate.py "%EXPERIMENT%" --fold 1 --images "%IMAGES%" --overlap 64 %*
pause
