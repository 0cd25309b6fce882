@echo off
rem Recommended strategy: EfficientNet-B3, focal loss, medical preprocessing, advanced augmentation, mixed precision.
rem Set DATA to the folder holding train.csv and train_images, then double-click; runs go to ml\models.
cd /d "%~dp0.."
set DATA=data\aptos
set PY=python
if exist .venv\Scripts\python.exe set PY=.venv\Scripts\python.exe
%PY% retinopathy\train.py --labels-csv "%DATA%\train.csv" --img-dir "%DATA%\train_images" --save-dir ml\models --model-name efficientnet_b3 --loss focal --focal-gamma 2.0 --medical-preprocess --advanced-aug --image-size 384 --batch-size 16 --epochs-stage1 5 --epochs-stage2 25 --lr-stage1 1e-3 --lr-stage2 1e-4 --mixed-precision %*
pause
