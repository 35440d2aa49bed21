"""Fine-tune CPM-Bee (full or LoRA with --use-delta) on one or more processes.

    python src/finetune_cpm_bee.py --model-config src/config/cpm-bee-10b.json --load model.pt \
        --dataset data/train.jsonl --eval_dataset data/eval.jsonl --save results --use-delta
    torchrun --nproc_per_node 4 src/finetune_cpm_bee.py ...   # several GPUs (or CPU ranks with gloo)
"""

from cpm_live.training.cli import main

if __name__ == "__main__":
    main()
