@echo off
rem Grade photos with a trained model: set MODEL to a run folder (or its best_model.pth), DATA to your photos.
rem With LABELS set to a CSV (id_code,diagnosis) it scores them; with LABELS empty it writes a Kaggle submission.
cd /d "%~dp0.."
set MODEL=ml\models\efficientnet_b3_focal
set DATA=data\aptos
set LABELS=
set PY=python
if exist .venv\Scripts\python.exe set PY=.venv\Scripts\python.exe
if "%LABELS%"=="" (
  %PY% retinopathy\evaluate.py --model-path "%MODEL%" --img-dir "%DATA%\test_images" --output-dir results --tta %*
) else (
  %PY% retinopathy\evaluate.py --model-path "%MODEL%" --labels-csv "%LABELS%" --img-dir "%DATA%\test_images" --output-dir results --tta %*
)
pause
