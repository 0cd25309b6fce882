@echo off
rem Five-fold CellSAM training: set IMAGES and MASKS to your folders and SAM to the official checkpoint file
rem (sam_vit_b_01ec64.pth), then double-click. Results go to output\my_cells (then _2, _3, ...).
cd /d "%~dp0.."
set IMAGES=data\cells\images
set MASKS=data\cells\masks
set SAM=checkpoints\sam_vit_b_01ec64.pth
set PY=python
if exist .venv\Scripts\python.exe set PY=.venv\Scripts\python.exe
%PY% cellsam\train.py --img_path "%IMAGES%" --mask_path "%MASKS%" --output_name my_cells --strategy k_fold --k_folds 5 --sam_size vit_b --sam_checkpoint "%SAM%" --total_epochs_s1 50 --total_epochs_s2 30 --batch_size 2 %*
pause
