"""Export a CPM-Bee checkpoint: int4/int8 -> fp16/bf16/fp32 in the original key layout, or fp -> int4.

    python src/export_model.py --model-config config/cpm-bee-10b.json --load model-nf4.safetensors \
        --output cpm-bee-10b-fp16.pt
    python src/export_model.py --model-config config/cpm-bee-10b.json --load cpm-bee-10b.pt \
        --output cpm-bee-10b-nf4.safetensors --dtype int4

Options: --dtype fp16|bf16|fp32|int4|int8 (default fp16), --force. Same as ``cpm-bee-export``
(:mod:`cpm_live.convert.export`).
"""

from cpm_live.convert.export import main

if __name__ == "__main__":
    main()
