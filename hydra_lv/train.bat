@echo off
rem Train the residual symmetric U-Net on one GPU: set DATA to the folder holding vol*_im.h5, vol*_vesicle_ins.h5
rem and vol*_mask.h5, then double-click. Runs go to outputs\hydra_lv_rsunet (then _2, _3, ...).
cd /d "%~dp0.."
set DATA=datasets\hydra-lv
set PY=python
if exist .venv\Scripts\python.exe set PY=.venv\Scripts\python.exe
%PY% hydra_lv\train.py --config hydra_lv\hydra-lv.yaml "data.train_image=%DATA%/vol*_im.h5" "data.train_label=%DATA%/vol*_vesicle_ins.h5" "data.train_mask=%DATA%/vol*_mask.h5" system.training.batch_size=2 system.training.num_gpus=1 system.training.num_workers=4 experiment_name=hydra_lv_rsunet %*
pause
