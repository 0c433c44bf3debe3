#!/usr/bin/env bash
# Creates benchmarks/peers/.venv with the PyTorch tools vadapt is compared against.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -c constraints.txt -r requirements.txt
.venv/bin/python -c "import torch, transformers, adapters, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'adapters', adapters.__version__, 'peft', peft.__version__)"
