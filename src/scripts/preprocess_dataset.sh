#!/usr/bin/env bash
# Turn a directory of .jsonl files into CPM-Bee binary datasets (one per file).
set -euo pipefail
cd "$(dirname "$0")/.."
python preprocess_dataset.py --input "${1:-../tutorials/basic_task_finetune/bee_data}" \
    --output_path "${2:-../tutorials/basic_task_finetune/bin_data}" --output_name ccpm_data
