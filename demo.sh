#!/usr/bin/env bash
# The main job on a built-in default: a tiny CPM-Bee, quantized to NF4 and QLoRA-fine-tuned on the
# bundled data, on CPU (sets up .venv on first use). Extra arguments go to `cpm-bee-demo`.
set -e
. "$(dirname "$0")/env.sh"
# One intra-op thread: on a small or shared CPU, torch's default (a thread per core) oversubscribes the
# cores (an earlier demo took 1278 s that way on a loaded 2-core machine); set OMP_NUM_THREADS to override.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m cpm_live.demo "$@"
