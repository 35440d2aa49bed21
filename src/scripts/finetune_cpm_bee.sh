#!/usr/bin/env bash
# Fine-tune CPM-Bee with LoRA (or full fine-tuning without --use-delta) under torchrun.
# GPUs / nodes come from the environment: GPUS_PER_NODE (default: all visible, else 1),
# NNODES (1), NODE_RANK (0), MASTER_ADDR (localhost), MASTER_PORT (12345).
# Usage: bash src/scripts/finetune_cpm_bee.sh [extra flags override the defaults below]
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"  # relative paths below stay relative to where you run it
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "${MASTER_ADDR:-localhost}" --master_port "${MASTER_PORT:-12345}" \
    --max-restarts "${MAX_RESTARTS:-0}" \
    "$SRC/finetune_cpm_bee.py" \
    --use-delta \
    --model-config "$SRC/config/cpm-bee-10b.json" \
    --dataset "$SRC/../tutorials/basic_task_finetune/bin_data/train" \
    --eval_dataset "$SRC/../tutorials/basic_task_finetune/bin_data/eval" \
    --epoch 100 --batch-size 5 --train-iters 100 --max-length 2048 \
    --save-name cpm_bee_finetune --save results/ --save-iters 50 --resume auto \
    --lr 0.0001 --inspect-iters 100 --warmup-iters 1 --eval-interval 1000 --early-stop-patience 5 \
    --lr-decay-style noam --weight-decay 0.01 --clip-grad 1.0 --loss-scale 32768 --start-step 0 \
    --load model.pt \
    "$@"
