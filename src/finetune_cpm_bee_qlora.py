"""QLoRA fine-tuning of CPM-Bee: 4-bit NF4 base (int4 on) and LoRA adapters (--use-delta on).

    python src/quantize_state_dict.py --input-path model.pt --output-path model-int4.safetensors
    torchrun --nproc_per_node 2 src/finetune_cpm_bee_qlora.py --model-config src/config/cpm-bee-10b.json \
        --load model-int4.safetensors --dataset train.jsonl --eval_dataset eval.jsonl --save results
"""

from cpm_live.training.cli import qlora_main

if __name__ == "__main__":
    qlora_main()
