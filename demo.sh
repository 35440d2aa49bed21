#!/usr/bin/env bash
# The main job on a built-in default: a tiny CPM-Bee, quantized to NF4 and QLoRA-fine-tuned on the
# bundled data, on CPU (sets up .venv on first use). Extra arguments go to `cpm-bee-demo`.
set -e
. "$(dirname "$0")/env.sh"
python -m cpm_live.demo "$@"
