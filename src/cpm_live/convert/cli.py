"""``cpm-bee-quantize``: compress a CPM-Bee checkpoint's projections to 4-bit (or int8) safetensors.

    cpm-bee-quantize --input-path cpm-bee-10b.pt --output-path cpm-bee-10b-nf4.safetensors
    cpm-bee-quantize --input-path model.safetensors --output-path model-fp4.safetensors --quant-type fp4
    cpm-bee-quantize --input-path cpm-bee-10b/ --output-path cpm-bee-10b-nf4.safetensors   # HF directory
    cpm-bee-quantize --input-path quantized_model.pt --output-path model-nf4.safetensors   # qlora-PR file
    cpm-bee-quantize --input-path cpm-bee-10b.pt --output-path cpm-bee-10b-int8.safetensors --int8

The output is always safetensors, whatever its name. A compressed ``.pt`` of CPM-Bee's qlora PR is
converted (bytes unchanged); it can also be passed to ``--load`` directly.

Then set ``"int4": true`` (and matching ``int4_*`` settings), or ``"int8": true``, in the model
config (or pass ``--int4``/``--int8``) and pass the compressed file to ``--load``.
"""

from __future__ import annotations

import argparse
import sys

from cpm_live.convert.compress import quantize_state_dict
from cpm_live.errors import CPMLiveError, for_cli
from cpm_live.quant.format import BLOCKSIZES, QUANT_TYPES


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpm-bee-quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input-path", required=True,
                        help="dense checkpoint (.pt/.bin/.safetensors, Hugging Face model directory) or a qlora-PR "
                             "compressed .pt to convert")
    parser.add_argument("--output-path", required=True,
                        help="compressed checkpoint to write (safetensors format whatever the name)")
    parser.add_argument("--quant-type", choices=QUANT_TYPES, default="nf4", help="4-bit type (default nf4)")
    parser.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                        help="keep per-block absmax in fp32 instead of quantizing it to 8 bits")
    parser.add_argument("--blocksize", type=int, choices=BLOCKSIZES, default=64,
                        help="values per absmax block (default 64)")
    parser.add_argument("--int8", action="store_true",
                        help="LLM.int8 instead of 4 bit: int8 rows + fp32 SCB scales (bitsandbytes' Linear8bitLt "
                             "layout); the 4-bit options are then unused")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where to quantize (default: cuda when available, else cpu)")
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="threads quantizing tensors at once on CPU (default: the cores available; "
                             "the output bytes do not depend on it; CUDA uses one)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.output_path.endswith(".safetensors"):
        print(f"note: {args.output_path} will hold safetensors (this project's compressed format), not a "
              f"pickle; every cpm_live script reads it by its content", file=sys.stderr)
    try:
        summary = quantize_state_dict(args.input_path, args.output_path, quant_type=args.quant_type,
                                      double_quant=args.double_quant, blocksize=args.blocksize,
                                      device=args.device, force=args.force, workers=args.workers, int8=args.int8)
    except CPMLiveError as e:
        raise SystemExit(f"error: {for_cli(e, parser)}") from None
    print(summary)


if __name__ == "__main__":
    main()
