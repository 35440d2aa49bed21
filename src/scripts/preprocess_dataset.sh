#!/usr/bin/env bash
# Turn a directory of .jsonl files into CPM-Bee binary datasets (one per file).
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"  # relative paths below stay relative to where you run it
python "$SRC/preprocess_dataset.py" --input "${1:-$SRC/../tutorials/basic_task_finetune/bee_data}" \
    --output_path "${2:-$SRC/../tutorials/basic_task_finetune/bin_data}" --output_name ccpm_data
