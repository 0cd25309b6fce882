@echo off
rem Train on synthetic PanNuke folds (about two minutes on a CPU); the log names the run folder to evaluate.
cd /d "%~dp0.."
set PY=python
if exist .venv\Scripts\python.exe set PY=.venv\Scripts\python.exe
%PY% pannuke\train.py --demo %*
pause
