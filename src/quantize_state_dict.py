"""Compress a CPM-Bee checkpoint to 4-bit (NF4 by default) safetensors for QLoRA.

    python src/quantize_state_dict.py --input-path cpm-bee-10b.pt --output-path cpm-bee-10b-nf4.safetensors

Options: --quant-type nf4|fp4, --no-double-quant, --blocksize N, --device cpu|cuda, --workers N, --force.
Same as the ``cpm-bee-quantize`` console script (:mod:`cpm_live.quant.cli`).
"""

from cpm_live.quant.cli import main

if __name__ == "__main__":
    main()
