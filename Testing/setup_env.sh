#!/usr/bin/env bash
# Create (or update) the project's virtual environment: torch first, then GuidedSeg with its
# training and test extras. Idempotent: a second run with nothing changed does nothing.
#   usage: bash Testing/setup_env.sh [VENV]   (default .venv)
# Where there is no NVIDIA GPU, torch is pinned to 2.13.0, which takes the CPU build on our
# machines; elsewhere set TORCH_SPEC (and PIP_EXTRA_INDEX_URL for PyTorch's CPU wheel index)
# to avoid gigabytes of CUDA packages. With a GPU, TORCH_SPEC defaults to the registry's build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
python="${PYTHON:-python3}"

"$python" - <<'PY' || { echo "GuidedSeg needs Python 3.10 or later (found $("$python" --version 2>&1))" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

stamp="$venv/.guidedseg-installed"
want="$(cat pyproject.toml Testing/setup_env.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import GuidedSegLib, torch, monai" 2>/dev/null; then
  exit 0
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="${TORCH_SPEC:-torch}"
  else
    spec="${TORCH_SPEC:-torch==2.13.0}"
  fi
  echo "installing $spec into $venv ..."
  "${pip[@]}" install "$spec"
fi
echo "installing GuidedSeg (editable) with its training and test extras into $venv ..."
"${pip[@]}" install -e ".[test]"
"$venv/bin/python" -c "import GuidedSegLib, torch, monai, SimpleITK, slicerio; import slicer; slicer.vtkMRMLScene" \
  || { echo "the environment in $venv is incomplete" >&2; exit 1; }
echo "$want" > "$stamp"
