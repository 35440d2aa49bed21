#!/usr/bin/env bash
# QLoRA fine-tuning of CPM-Bee (4-bit NF4 base + LoRA) under torchrun, on one or more GPUs
# (or CPU ranks: add --device cpu). First compress the checkpoint once:
#   python src/quantize_state_dict.py --input-path model.pt --output-path model-int4.safetensors
# GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT and MAX_RESTARTS come from the environment.
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"  # relative paths below stay relative to where you run it
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "${MASTER_ADDR:-localhost}" --master_port "${MASTER_PORT:-12345}" \
    --max-restarts "${MAX_RESTARTS:-3}" \
    "$SRC/finetune_cpm_bee_qlora.py" \
    --model-config "$SRC/config/cpm-bee-10b.json" \
    --load model-int4.safetensors \
    --dataset "$SRC/../tutorials/basic_task_finetune/bin_data/train" \
    --eval_dataset "$SRC/../tutorials/basic_task_finetune/bin_data/eval" \
    --epoch 10 --batch-size 2 --train-iters 100 --max-length 2048 \
    --save-name cpm_bee_qlora --save results/ --save-iters 20 --resume auto \
    --lr 0.0001 --warmup-iters 1 --eval-interval 10 --early-stop-patience 10 \
    --weight-decay 0.01 --loss-scale 32768 \
    "$@"
