@echo off
rem The training guide's Strategy 2 (RECOMMENDED), as written: EfficientNet-B3, focal loss, two stages at 300 px, with
rem medical preprocessing, advanced augmentation and mixed precision (on by default).
rem Set DATA to the folder holding train.csv and train_images, then double-click; the run goes to
rem ml\models\efficientnet_b3_focal (a folder that holds a run is never overwritten: add --save-dir ml\models\other).
cd /d "%~dp0.."
set DATA=data\aptos
set PY=python
if exist .venv\Scripts\python.exe set PY=.venv\Scripts\python.exe
%PY% retinopathy\train.py --labels-csv "%DATA%\train.csv" --img-dir "%DATA%\train_images" --save-dir ml\models\efficientnet_b3_focal --model-name efficientnet_b3 --loss focal --focal-gamma 2.0 --two-stage --epochs-stage1 8 --epochs-stage2 35 --batch-size 24 --lr-stage1 0.001 --lr-stage2 0.00005 --image-size 300 --patience 12 %*
pause
