"""Compress a CPM-Bee checkpoint to 4-bit (NF4 by default) safetensors for QLoRA.

    python src/quantize_state_dict.py --input-path cpm-bee-10b.pt --output-path cpm-bee-10b-nf4.safetensors

The input may also be a Hugging Face model directory, or a compressed .pt of CPM-Bee's qlora PR
(converted, bytes unchanged). The output is safetensors whatever its name.
Options: --quant-type nf4|fp4, --no-double-quant, --blocksize N, --device cpu|cuda, --workers N, --force.
Same as the ``cpm-bee-quantize`` console script (:mod:`cpm_live.convert.cli`).
"""

from cpm_live.convert.cli import main

if __name__ == "__main__":
    main()
