@echo off
rem Test mode: segment the test volumes with a trained checkpoint and score them (set CHECKPOINT, and DATA to
rem the folder of the test volumes), then double-click. Results go to the run folder's results\ (then results_2, ...).
cd /d "%~dp0.."
set CHECKPOINT=outputs\hydra_lv_rsunet\checkpoints\best.ckpt
set DATA=datasets\hydra-lv-test
set PY=python
if exist .venv\Scripts\python.exe set PY=.venv\Scripts\python.exe
%PY% hydra_lv\train.py --mode test --checkpoint "%CHECKPOINT%" "data.test_image=%DATA%/vol*_im.h5" "data.test_label=%DATA%/vol*_vesicle_ins.h5" "data.test_mask=%DATA%/vol*_mask.h5" inference.tta=true %*
pause
