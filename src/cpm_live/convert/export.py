"""``cpm-bee-export``: write a checkpoint in CPM-Bee's original dense key layout, or compress one.

    cpm-bee-export --model-config config/cpm-bee-10b.json --load model-nf4.safetensors --output model.pt
    cpm-bee-export --model-config config/cpm-bee-10b.json --load cpm-bee-10b.pt --output model.safetensors \\
        --dtype int4        # or int8 (LLM.int8, bitsandbytes' Linear8bitLt layout)

fp16/bf16/fp32 output dequantizes every 4-bit or int8 weight (exactly: level x absmax in fp32, cast once) and
casts the other tensors; ``.pt`` output is a ``torch.save``d plain ``OrderedDict`` of tensors (built
in memory: peak = the exported model), ``.safetensors`` output is streamed one tensor at a time.
int4/int8 output runs :func:`cpm_live.convert.compress.quantize_state_dict` with the config's settings.

``--format hf`` writes a Hugging Face style model directory instead (:mod:`cpm_live.checkpoint.hf_dir`):
``config.json`` in the HF port's field names, the weights as safetensors shards of at most
``--max-shard-mb`` with ``model.safetensors.index.json`` and ``cpmbee.``-prefixed keys (the tied
``lm_head.weight`` is left out: ``CpmBeeForCausalLM`` ties it on load), and ``vocab.txt``. The
input may be any checkpoint ``--load`` accepts, Hugging Face directories included.

    cpm-bee-export --model-config config/cpm-bee-10b.json --load model.pt --vocab vocab.txt \\
        --output cpm-bee-10b-hf --format hf
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from cpm_live.checkpoint import (
    CheckpointError,
    CheckpointReader,
    check_checkpoint,
    check_finite,
    hf_dir,
    open_checkpoint,
)
from cpm_live.checkpoint.base_model import ModelArgs, add_model_args, find_vocab, stored_config
from cpm_live.checkpoint.writer import SafetensorsWriter
from cpm_live.convert.compress import quantize_state_dict
from cpm_live.data.tensors import CPMBeeInputs
from cpm_live.errors import CPMLiveError, for_cli
from cpm_live.lora.merge import MergeError, merge_in_fp32
from cpm_live.models import CPMBee, CPMBeeConfig
from cpm_live.outputs import check_output_dir, check_output_file, reported_write
from cpm_live.quant import format as qformat
from cpm_live.quant import int8 as qint8
from cpm_live.tokenizers import check_vocab_fits
from cpm_live.utils import atomic_path, set_cpu_threads

DENSE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
QUANT_DTYPES = ("int4", "int8")
FORMATS = ("original", "hf")
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size

# Weight-space delta for a key (same shape as the dense weight), or None. A LoRA merge returns
# ``sqrt(dim_in) * alpha / r * B @ A`` for its targets: CPM-Bee's Linear divides by sqrt(dim_in).
DeltaFn = Callable[[str], torch.Tensor | None]


@dataclass
class ExportSummary:
    output_path: str
    dtype: str
    keys: int
    merged: list[str]  # keys that received a delta; a merge caller checks it covers its adapter


def expected_shapes(config: CPMBeeConfig) -> dict[str, tuple[int, ...]]:
    """Key -> dense shape of the model ``config`` describes, in the model's order (no memory used)."""
    with torch.device("meta"):
        model = CPMBee(config.with_quantization(None))
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def read_dense(reader: CheckpointReader, key: str) -> torch.Tensor:
    """Tensor ``key`` as stored, or dequantized to fp32 when it is a 4-bit or int8 weight."""
    blob = qformat.blob_key(key, reader.keys())
    if blob is None and key.endswith("weight") and qint8.module_prefix(key) + "SCB" in reader.keys():
        entries = {k: reader.read(k) for k in qint8.entry_keys(key) if k in reader.keys()}
        dense = qint8.dequantize(entries[key], entries[qint8.module_prefix(key) + "SCB"], torch.float32)
        for tensor in entries.values():
            reader.release(tensor)
        return dense
    if blob is None:
        return reader.read(key)
    entries = {k: reader.read(k) for k in reader.keys() if k == key or k.startswith(key + ".")}
    dense = qformat.dequantize(key, entries, dtype=torch.float32)
    for tensor in entries.values():
        reader.release(tensor)
    return dense


def merge(key: str, tensor: torch.Tensor, delta_fn: DeltaFn | None) -> tuple[torch.Tensor, bool]:
    """Add ``delta_fn(key)`` in fp32; refuse a delta of the wrong shape or with non-finite values."""
    delta = delta_fn(key) if delta_fn is not None else None
    if delta is None:
        return tensor, False
    if tuple(delta.shape) != tuple(tensor.shape):
        raise CheckpointError(f"delta for {key} has shape {list(delta.shape)}, weight {list(tensor.shape)}")
    try:
        return merge_in_fp32(tensor, delta, f"the delta into {key}"), True
    except MergeError as e:  # the export CLI reports CheckpointErrors
        raise CheckpointError(str(e)) from None


def export_checkpoint(config: CPMBeeConfig, load_path: str | os.PathLike, output_path: str | os.PathLike,
                      dtype: str = "fp16", delta_fn: DeltaFn | None = None, force: bool = False,
                      progress: bool = True, fmt: str = "original", vocab: str | None = None,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES, inputs: Sequence[str] = ()) -> ExportSummary:
    """Export ``load_path`` (dense, int4 or int8, checked against ``config``) to ``output_path`` in ``dtype``.

    ``delta_fn`` (dense dtypes only) is asked for every key and its delta added to the dense weight in
    fp32 before the cast. It is refused for int4/int8 output: that would silently re-quantize the merged
    weights; use :func:`merge_adapter`, which reports the drift. ``fmt="hf"`` writes a Hugging Face
    model directory (dense dtypes only) with ``vocab`` copied into it. ``inputs``: other files the run
    reads (an adapter), which the output may not be either.
    """
    load_path, output_path = os.fspath(load_path), os.fspath(output_path)
    if dtype not in (*DENSE_DTYPES, *QUANT_DTYPES):
        raise ValueError(f"dtype must be fp16, bf16, fp32, int4 or int8, got {dtype!r}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if fmt == "hf":
        if dtype in QUANT_DTYPES:
            raise CheckpointError("`fmt` hf writes the dense weights Hugging Face's CpmBee model reads: use "
                                  "`dtype` fp16, bf16 or fp32")
        if vocab is None:
            raise CheckpointError("`fmt` hf needs the vocab for the directory's vocab.txt: pass `vocab`")
        check_vocab_fits(vocab, config.vocab_size)
        check_output_dir(output_path, [load_path, vocab, *inputs], force=force, own=hf_dir.is_export_file)
    else:
        suffixes = (".safetensors",) if dtype in QUANT_DTYPES else (".pt", ".safetensors")
        check_output_file(output_path, [load_path, *inputs], force=force, suffixes=suffixes)
    expected = expected_shapes(config)
    with open_checkpoint(load_path) as reader:
        stored = stored_config(config, reader)
        with torch.device("meta"):
            model = CPMBee(stored)
        check_checkpoint(reader, model, stored)  # the loader's checks, before reading any weight
        if fmt == "hf":
            with reported_write(output_path):
                return _export_hf_dir(reader, expected, output_path, DENSE_DTYPES[dtype], delta_fn, progress,
                                      config, vocab, max_shard_bytes)
        if dtype in QUANT_DTYPES:
            if delta_fn is not None:
                raise CheckpointError(f"merging a delta into an {dtype} export would re-quantize the merged "
                                      f"weights: use merge_adapter (cpm-bee-export --delta), which reports the drift")
            if reader.quant_kind is not None:
                raise CheckpointError(f"{load_path} is already {reader.quant_kind}; export it to fp16 to "
                                      f"re-quantize it")
        else:
            return _export_dense(reader, expected, output_path, DENSE_DTYPES[dtype], delta_fn, progress)
    _quantize(config, load_path, output_path, dtype, force, progress)
    return ExportSummary(output_path, dtype, len(expected), [])


def _quantize(config: CPMBeeConfig, dense_path: str, output_path: str, dtype: str, force: bool,
              progress: bool) -> None:
    """Compress ``dense_path`` to ``dtype`` (int4 with the config's int4 settings, or int8)."""
    quantize_state_dict(dense_path, output_path, **config.quant_settings, force=force,
                        compute_dtype=config.int4_compute_dtype, progress=progress, int8=dtype == "int8",
                        int8_threshold=config.int8_threshold)


def _dense_tensors(reader: CheckpointReader, keys: list[str], dtype: torch.dtype, delta_fn: DeltaFn | None,
                   merged: list[str], progress: bool):
    """Yield ``(key, tensor)`` in ``dtype`` (dequantized, delta merged in fp32), one at a time."""
    for key in tqdm(keys, desc="export", unit="tensor", disable=not progress):
        stored = read_dense(reader, key)
        check_finite(reader.path, key, stored)
        tensor, changed = merge(key, stored, delta_fn)
        merged += [key] if changed else []
        yield key, tensor.to(dtype).contiguous()
        reader.release(stored)


def _export_hf_dir(reader: CheckpointReader, expected: dict[str, tuple[int, ...]], output_dir: str,
                   dtype: torch.dtype, delta_fn: DeltaFn | None, progress: bool, config: CPMBeeConfig,
                   vocab: str, max_shard_bytes: int) -> ExportSummary:
    """A Hugging Face model directory, built beside ``output_dir`` and renamed into place when complete."""
    size = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    used = 0
    for key, shape in expected.items():
        nbytes = size * max(1, int(torch.Size(shape).numel()))
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    hf_config = config.with_dtype(dtype)
    merged: list[str] = []
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.", dir=parent)
    try:
        weight_map = {}
        for name, keys in zip(names, shards):
            layout = {hf_dir.HF_PREFIX + k: (expected[k], dtype) for k in keys}
            writer = SafetensorsWriter(os.path.join(tmp, name), layout, metadata={"format": "pt"})
            try:
                for key, tensor in _dense_tensors(reader, keys, dtype, delta_fn, merged, progress):
                    writer.write(hf_dir.HF_PREFIX + key, tensor)
            except BaseException:
                writer.abort()
                raise
            writer.close()
            weight_map.update({k: name for k in layout})
        index = {"metadata": {"total_size": sum(size * torch.Size(s).numel() for s in expected.values())},
                 "weight_map": weight_map}
        _write_json(os.path.join(tmp, hf_dir.WEIGHT_FILES[0][0]), index)
        _write_json(os.path.join(tmp, hf_dir.CONFIG_FILE), hf_dir.hf_config(hf_config))
        shutil.copyfile(vocab, os.path.join(tmp, hf_dir.VOCAB_FILE))
        if os.path.isdir(output_dir):  # an earlier export, replaced with `force` (check_output_dir)
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return ExportSummary(output_dir, str(dtype).removeprefix("torch."), len(expected), merged)


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _export_dense(reader: CheckpointReader, expected: dict[str, tuple[int, ...]], output_path: str,
                  dtype: torch.dtype, delta_fn: DeltaFn | None, progress: bool) -> ExportSummary:
    merged: list[str] = []
    with reported_write(output_path), atomic_path(output_path) as tmp:
        as_pt = output_path.endswith(".pt")
        state: OrderedDict[str, torch.Tensor] = OrderedDict()
        name = str(dtype).removeprefix("torch.")
        metadata = {"format": "cpm_live.dense", "source": reader.path, "dtype": name}
        layout = {k: (shape, dtype) for k, shape in expected.items()}
        writer = None if as_pt else SafetensorsWriter(tmp, layout, metadata=metadata)
        try:
            for key, tensor in _dense_tensors(reader, list(expected), dtype, delta_fn, merged, progress):
                if as_pt:
                    # A view into the memory-mapped input would make torch.save write its whole storage.
                    view = tensor.untyped_storage().nbytes() > tensor.nbytes
                    state[key] = tensor.clone() if view else tensor
                else:
                    writer.write(key, tensor)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if as_pt:
            torch.save(state, tmp)
        else:
            writer.close()
    return ExportSummary(output_path, name, len(expected), merged)


def merge_adapter(config: CPMBeeConfig, load_path: str, adapter_path: str, output_path: str, dtype: str,
                  force: bool = False, progress: bool = True, fmt: str = "original", vocab: str | None = None,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> ExportSummary:
    """Merge a LoRA adapter into the base and export it; the merge always happens in fp32.

    fp16/bf16/fp32: dequantize (if int4/int8), add the adapter's weight-space delta in fp32, cast once.
    int4/int8: the same merge into a temporary fp32 file, then an explicit re-quantization, whose
    logits drift against the merged fp32 model is printed: re-quantizing moves every merged weight to
    the nearest 4-bit/int8 level, which is a second rounding the adapter was not trained with.
    """
    from cpm_live.checkpoint.adapters import LoraDelta, check_base_shape, read_adapter

    settings, state = read_adapter(adapter_path)
    check_base_shape(adapter_path, config)
    delta = LoraDelta(state, settings, source=adapter_path)
    if dtype not in QUANT_DTYPES or fmt == "hf":
        summary = export_checkpoint(config, load_path, output_path, dtype, delta_fn=delta, force=force,
                                    progress=progress, fmt=fmt, vocab=vocab, max_shard_bytes=max_shard_bytes,
                                    inputs=[adapter_path])
        _check_merged(summary, delta, adapter_path)
        return summary
    check_output_file(output_path, [load_path, adapter_path], force=force, suffixes=(".safetensors",))
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(output_path))) as tmp:
        dense = os.path.join(tmp, "merged-fp32.safetensors")
        dense_config = config.with_quantization(None).with_dtype(torch.float32)
        _check_merged(export_checkpoint(dense_config, load_path, dense, "fp32", delta_fn=delta, progress=progress),
                      delta, adapter_path)
        _quantize(config, dense, output_path, dtype, force, progress)
        drift = logits_drift(dense_config, dense, output_path, kind=dtype)
    print(f"re-quantization drift: relative L2 error of the {dtype} logits vs the merged fp32 model = {drift:.4f}")
    return ExportSummary(output_path, dtype, len(expected_shapes(config)), list(delta.weight_keys))


def _check_merged(summary: ExportSummary, delta, adapter_path: str) -> None:
    missing = sorted(set(delta.weight_keys) - set(summary.merged))
    if missing:
        raise CheckpointError(f"adapter {adapter_path} targets {missing[0]!r} (and {len(missing) - 1} more), "
                              "which the checkpoint does not have: it was trained on another model")


@torch.no_grad()
def logits_drift(dense_config: CPMBeeConfig, dense_path: str, quant_path: str, length: int = 32,
                 seed: int = 0, kind: str = "int4") -> float:
    """Relative L2 difference of the logits of an int4/int8 checkpoint vs its dense source on random tokens."""
    from cpm_live.checkpoint import build_model

    quant_config = dense_config.with_quantization(kind)
    logits = []
    for config, path in ((dense_config, dense_path), (quant_config, quant_path)):
        model = build_model(config, path)
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(11, config.vocab_size, (1, length), generator=g, dtype=torch.int32)
        zeros = torch.zeros(1, length, dtype=torch.int32)
        # One row, every token given, one segment, no ext token (a single zero ext column).
        inputs = CPMBeeInputs(input=ids, input_sub=zeros, length=torch.tensor([length], dtype=torch.int32),
                              context=torch.ones(1, length, dtype=torch.bool), sample_ids=zeros,
                              num_segments=torch.ones(1, length, dtype=torch.int32), segment=zeros,
                              segment_rel_offset=zeros, segment_rel=torch.zeros(1, 1, dtype=torch.int32),
                              span=zeros, ext_table_ids=zeros[0, :1], ext_table_sub=zeros[0, :1])
        out, _ = model.eval()(**inputs.forward_kwargs())
        logits.append(out.float())
    return float((logits[1] - logits[0]).norm() / logits[0].norm())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpm-bee-export", description=__doc__.split("\n\n")[0])
    add_model_args(parser, load_required=True, adapter=True)
    parser.add_argument("--output", required=True,
                        help="file to write (.pt or .safetensors picks the format), or the directory of --format hf")
    parser.add_argument("--dtype", choices=(*DENSE_DTYPES, *QUANT_DTYPES), default="fp16",
                        help="default fp16; int4/int8 re-quantize (with --delta: after the fp32 merge)")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="original",
                        help="original: one file in CPM-Bee's key layout (default); hf: a Hugging Face model directory")
    parser.add_argument("--max-shard-mb", type=int, default=DEFAULT_SHARD_BYTES // 10**6,
                        help="--format hf: largest safetensors shard in MB (default 5000)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    set_cpu_threads()
    try:
        model_args = ModelArgs.from_args(args)
        config = model_args.resolve_config()
        options = {}
        if args.fmt == "hf":
            options = {"fmt": "hf", "vocab": find_vocab(model_args.vocab, model_args.load),
                       "max_shard_bytes": args.max_shard_mb * 10**6}
        if args.delta is not None:
            summary = merge_adapter(config, args.load, args.delta, args.output, args.dtype, force=args.force,
                                    **options)
        else:
            summary = export_checkpoint(config, args.load, args.output, args.dtype, force=args.force, **options)
    except CPMLiveError as e:
        raise SystemExit(f"error: {for_cli(e, parser)}") from None
    merged = f", adapter merged into {len(summary.merged)} weights" if summary.merged else ""
    print(f"wrote {summary.output_path} ({summary.dtype}, {summary.keys} tensors{merged})")


if __name__ == "__main__":
    main()
