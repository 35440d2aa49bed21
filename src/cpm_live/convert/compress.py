"""Compress a dense CPM-Bee checkpoint to the int4 safetensors format, one tensor at a time.

Each projection weight (``*.project_q|project_k|project_v|attention_out|w_0|w_1|w_out.weight``,
matched on the module name, not a substring) becomes the bitsandbytes packed layout of
:mod:`cpm_live.quant.format`; every other tensor is copied unchanged. The input is read lazily
(:class:`cpm_live.checkpoint.CheckpointReader`) and the output streamed
(:class:`cpm_live.quant.stream.SafetensorsWriter`), so peak memory is a few times the largest
tensor. The file is written to a temp path, read back and checked (every key, shape and dtype;
a ``QuantState.from_dict`` per weight), and only then renamed into place.

The input is anything :func:`cpm_live.checkpoint.open_checkpoint` reads, Hugging Face model
directories included. A compressed checkpoint of CPM-Bee's qlora PR is converted instead: its packed
bytes are copied, so the output equals quantizing the fp16 source the PR started from.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch
from safetensors import safe_open
from tqdm import tqdm

from cpm_live.checkpoint import CheckpointError, CheckpointReader, open_checkpoint
from cpm_live.layers.linear_factory import QUANTIZED_PROJECTIONS
from cpm_live.quant import format as qformat
from cpm_live.quant.stream import DTYPES, SafetensorsWriter
from cpm_live.utils import atomic_path


@dataclass
class QuantizeSummary:
    """What one compression did; ``throughput`` is MB (1e6 bytes) of input per second."""

    output_path: str
    input_bytes: int
    output_bytes: int
    seconds: float
    quantized: int
    copied: int

    @property
    def throughput(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        return (f"wrote {self.output_path}: {self.quantized} weights quantized, {self.copied} copied, "
                f"{self.input_bytes / 1e6:.1f} MB -> {self.output_bytes / 1e6:.1f} MB "
                f"({self.output_bytes / max(self.input_bytes, 1):.3f}x) in {self.seconds:.1f} s "
                f"({self.throughput:.1f} MB/s)")


def is_quant_target(key: str) -> bool:
    """True for ``<...>.<projection>.weight`` with ``projection`` one of CPM-Bee's seven."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in QUANTIZED_PROJECTIONS


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when present, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was given but CUDA is not available; use --device cpu")
    return device


def check_output_path(input_path: str, output_path: str, force: bool, suffixes: tuple[str, ...] | None) -> None:
    """Refuse overwriting the input, or an existing file without ``force``; ``suffixes`` (if given) are required."""
    if suffixes is not None and not output_path.endswith(suffixes):
        raise CheckpointError(f"output path {output_path} must end in {' or '.join(suffixes)}")
    if os.path.exists(output_path):
        if os.path.exists(input_path) and os.path.samefile(input_path, output_path):
            raise CheckpointError(f"output path {output_path} is the input checkpoint; choose another path")
        if not force:
            raise CheckpointError(f"{output_path} already exists; pass --force to overwrite it")


def quantize_state_dict(input_path: str | os.PathLike, output_path: str | os.PathLike,
                        quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
                        device: str | torch.device | None = None, force: bool = False,
                        compute_dtype: str = "float32", progress: bool = True) -> QuantizeSummary:
    """Compress ``input_path`` (any checkpoint or model directory) into ``output_path`` (safetensors,
    whatever its name), or convert a qlora-PR checkpoint (:func:`convert_compressed`).

    ``compute_dtype`` is recorded for readers; the quantized bytes do not depend on it.
    """
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    settings = qformat.QuantSettings(quant_type, double_quant, blocksize)
    device = resolve_device(device)
    check_output_path(input_path, output_path, force, None)
    start = time.perf_counter()
    with open_checkpoint(input_path) as reader:
        if reader.origin == "qlora-pr":
            return convert_compressed(reader, output_path, settings, compute_dtype, progress, start)
        if reader.is_compressed():
            raise CheckpointError(f"{input_path} is already int4-compressed; quantize the dense checkpoint")
        targets = [k for k in reader.keys() if is_quant_target(k)]
        if not targets:
            names = "|".join(QUANTIZED_PROJECTIONS)
            raise CheckpointError(f"{input_path} has no keys ending in .<{names}>.weight: is it CPM-Bee's?")
        for key in targets:
            shape, dtype = reader.info(key)
            if len(shape) != 2 or not dtype.is_floating_point:
                raise CheckpointError(f"{input_path}: {key} is {dtype} {list(shape)}, not a 2-D float weight")
        quantized = set(targets)
        fixed, tails = plan(reader, quantized, settings)
        metadata = qformat.checkpoint_metadata(settings, compute_dtype, input_path,
                                               {k: reader.info(k) for k in targets})
        input_bytes = sum(reader.nbytes(k) for k in reader.keys())
        with atomic_path(output_path) as tmp:
            writer = SafetensorsWriter(tmp, fixed, tails, metadata)
            try:
                with tqdm(total=input_bytes, unit="B", unit_scale=True, desc="quantize",
                          disable=not progress) as bar:
                    for key, tensor in reader.iter_tensors():
                        entries = {key: tensor}
                        if key in quantized:
                            entries = qformat.quantize_entries(key, tensor.to(device), settings)
                        for name, value in entries.items():
                            writer.write(name, value)
                        bar.update(reader.nbytes(key))
            except BaseException:
                writer.abort()
                raise
            writer.close()
            verify(tmp, fixed, tails, metadata, {k: reader.info(k)[0] for k in targets}, settings)
            output_bytes = os.path.getsize(tmp)
    return QuantizeSummary(output_path, input_bytes, output_bytes, time.perf_counter() - start, len(targets),
                           len(reader.keys()) - len(targets))


def convert_compressed(reader: CheckpointReader, output_path: str, settings: qformat.QuantSettings,
                       compute_dtype: str, progress: bool, start: float) -> QuantizeSummary:
    """Write an already-quantized checkpoint (the qlora PR's) in this project's format, bytes unchanged."""
    found = reader.quant_settings
    if found != settings:
        raise CheckpointError(f"{reader.path} is already quantized with {found.describe()}; asking for "
                              f"{settings.describe()} would need the fp16 weights: drop the --quant-type/"
                              f"--blocksize/--no-double-quant options to convert it, or export it to fp16 first")
    originals = {k: (tuple(v["shape"]), getattr(torch, v["dtype"]))
                 for k, v in json.loads(reader.metadata["weights"]).items()}
    metadata = qformat.checkpoint_metadata(settings, compute_dtype, reader.path, originals)
    marker = "." + qformat.BLOB_PREFIX
    fixed = {k: reader.info(k) for k in reader.keys() if marker not in k}
    tails = [k for k in reader.keys() if marker in k]
    input_bytes = sum(reader.nbytes(k) for k in reader.keys())
    with atomic_path(output_path) as tmp:
        writer = SafetensorsWriter(tmp, fixed, tails, metadata)
        try:
            for key, tensor in tqdm(reader.iter_tensors(), total=len(reader.keys()), desc="convert",
                                    disable=not progress):
                writer.write(key, tensor)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        verify(tmp, fixed, tails, metadata, {k: s for k, (s, _) in originals.items()}, settings)
        output_bytes = os.path.getsize(tmp)
    return QuantizeSummary(output_path, input_bytes, output_bytes, time.perf_counter() - start, len(originals),
                           len(reader.logical_shapes()) - len(originals))


def plan(reader: CheckpointReader, quantized: set[str], settings: qformat.QuantSettings
         ) -> tuple[qformat.Layout, list[str]]:
    """Output layout: fixed-size tensors (shape, dtype) and the variable-length quant-state blobs."""
    fixed, tails = {}, []
    for key in reader.keys():
        shape, dtype = reader.info(key)
        if key in quantized:
            fixed.update({key + suffix: v for suffix, v in qformat.tensor_layout(shape, settings).items()})
            tails.append(f"{key}.{settings.blob_suffix}")
        else:
            fixed[key] = (shape, dtype)
    return fixed, tails


def verify(path: str, fixed, tails, metadata, shapes: dict[str, tuple[int, ...]],
           settings: qformat.QuantSettings) -> None:
    """Read the written file back with the safetensors library and check it against the plan
    (``shapes``: the dense shape of each quantized weight)."""
    def fail(message: str) -> CheckpointError:
        return CheckpointError(f"verifying the written file {path} failed: {message}; nothing was replaced")

    with safe_open(path, framework="pt") as f:
        if f.metadata() != metadata:
            raise fail("metadata differs from what was written")
        if set(f.keys()) != set(fixed) | set(tails):
            raise fail("the key set differs from the plan")
        for key, (shape, dtype) in fixed.items():
            tensor_slice = f.get_slice(key)
            if tuple(tensor_slice.get_shape()) != tuple(shape) or tensor_slice.get_dtype() != DTYPES[dtype]:
                raise fail(f"{key} has the wrong shape or dtype")
        for key, shape in shapes.items():
            entries = {k: f.get_tensor(k) for k in qformat.entry_keys(key, settings) if k != key}
            entries[key] = torch.empty(0, dtype=torch.uint8)
            state = qformat.quant_state(key, entries, device="cpu")
            if tuple(state.shape) != tuple(shape) or state.quant_type != settings.quant_type:
                raise fail(f"{key}: QuantState.from_dict gives shape {list(state.shape)}, {state.quant_type}")
