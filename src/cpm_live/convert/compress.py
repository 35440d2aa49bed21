"""Compress a dense CPM-Bee checkpoint to the int4 or int8 safetensors format, one tensor at a time.

Each weight the linear factory quantizes (read from a model built on the meta device, layer index
aside: :func:`quant_targets`) becomes the bitsandbytes layout of :mod:`cpm_live.quant.format`
(int4) or :mod:`cpm_live.quant.int8` (int8, ``Linear8bitLt``'s ``weight``/``SCB``/``weight_format``);
every other tensor is copied unchanged. The input is read lazily
(:class:`cpm_live.checkpoint.CheckpointReader`) and the output streamed
(:class:`cpm_live.checkpoint.writer.SafetensorsWriter`), so peak memory is a few times the largest
tensor. The file is written to a temp path, read back and checked (every key, shape and dtype;
a ``QuantState.from_dict`` per weight), and only then renamed into place.

The input is anything :func:`cpm_live.checkpoint.open_checkpoint` reads, Hugging Face model
directories included. A compressed checkpoint of CPM-Bee's qlora PR is converted instead: its packed
bytes are copied, so the output equals quantizing the fp16 source the PR started from.

On CPU, ``workers`` threads quantize parts of one weight at once (ranges of whole 4-bit blocks, or
int8 rows, of about a million elements) while the calling thread reads the next tensor and writes
finished ones; bitsandbytes' CPU quantization is torch ops, which release the GIL, so threads scale
without the copies processes would need (``benchmarks/README.md`` has the measurement). The parts
of a weight join into exactly what quantizing it whole gives, and the writer places every tensor at
an offset fixed by the plan, so the output bytes do not depend on the number of workers. At most two
input tensors are in flight, so peak memory does not grow with the checkpoint or the workers. On
CUDA one thread quantizes each weight whole (the GPU is the parallel part).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from cpm_live.checkpoint import CheckpointError, CheckpointReader, check_finite, open_checkpoint
from cpm_live.checkpoint.writer import DTYPES, SafetensorsWriter
from cpm_live.config import CPMBeeConfig
from cpm_live.models import quantized_weight_keys
from cpm_live.outputs import check_output_file, reported_write
from cpm_live.quant import format as qformat
from cpm_live.quant import int8 as qint8
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
    workers: int = 1

    @property
    def throughput(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        return (f"wrote {self.output_path}: {self.quantized} weights quantized, {self.copied} copied, "
                f"{self.input_bytes / 1e6:.1f} MB -> {self.output_bytes / 1e6:.1f} MB "
                f"({self.output_bytes / max(self.input_bytes, 1):.3f}x) in {self.seconds:.1f} s "
                f"({self.throughput:.1f} MB/s, {self.workers} worker{'s' if self.workers > 1 else ''})")


def _layer_pattern(key: str) -> str:
    """``encoder.layers.12.ffn...`` -> ``encoder.layers.#.ffn...``: keys of every layer look alike."""
    return ".".join("#" if part.isdigit() else part for part in key.split("."))


@functools.cache
def quant_targets() -> frozenset[str]:
    """Layer-index-free patterns of the keys the factory quantizes (a one-layer meta-device model)."""
    return frozenset(_layer_pattern(k) for k in quantized_weight_keys(CPMBeeConfig(
        vocab_size=8, dim_model=8, num_heads=1, dim_head=8, dim_ff=8, num_layers=1, int4=True)))


def is_quant_target(key: str) -> bool:
    """True for the key of a weight the linear factory builds as a quantized layer."""
    return _layer_pattern(key) in quant_targets()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when present, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("`device` cuda was given but CUDA is not available; use `device` cpu")
    return device


def default_workers() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch's CPU ops on ``n`` intra-op threads inside the block, then restore the setting.

    Parallelism comes from quantizing several tensors at once, one core each; intra-op threads on
    top would only oversubscribe the cores (on one tensor they gave no speed-up: bitsandbytes' CPU
    path is mostly memory-bound elementwise work).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


WriteAt = Callable[[str, int, torch.Tensor], None]


def convert_tensors(reader: CheckpointReader, quantized: set[str], settings: qformat.QuantSettings | None,
                    device: torch.device, workers: int, write_at: WriteAt
                    ) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Convert every tensor of ``reader`` in file order; yield ``(key, entries left to write)``.

    Each tensor is cut into parts (:func:`split`) that ``workers`` threads check, quantize and write
    (``write_at(name, byte_offset, tensor)``) in order; this thread maps the next tensor meanwhile and
    joins finished ones into their small remaining entries (the quant state), so at most two input
    tensors are in flight. A tensor's mapped pages are released once its parts are done.
    ``settings`` None: int8.
    """
    def finish(item: tuple[str, torch.Tensor, list[Future], Callable]) -> tuple[str, dict[str, torch.Tensor]]:
        key, tensor, futures, join = item
        entries = join([f.result() for f in futures])
        reader.release(tensor)
        return key, entries

    pending: deque[tuple[str, torch.Tensor, list[Future], Callable]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="quantize") as pool:
        try:
            for key in reader.keys():
                tensor = reader.read_mapped(key)
                jobs, join = split(reader.path, key, tensor, key in quantized, settings, device, write_at)
                pending.append((key, tensor, [pool.submit(job) for job in jobs], join))
                if len(pending) > 1:
                    yield finish(pending.popleft())
            while pending:
                yield finish(pending.popleft())
        finally:  # the consumer failed or stopped: drop what has not started
            for _, _, futures, _ in pending:
                for future in futures:
                    future.cancel()


def split(path: str, key: str, tensor: torch.Tensor, quantize: bool, settings: qformat.QuantSettings | None,
          device: torch.device, write_at: WriteAt
          ) -> tuple[list[Callable[[], Any]], Callable[[list], dict[str, torch.Tensor]]]:
    """The jobs for one tensor and the function that joins their results into the entries still to
    write. A job takes a part of about ``qformat.PART_ELEMENTS`` elements (a range of whole 4-bit
    blocks, of int8 rows, or of a copied tensor), checks it for NaN/inf, quantizes it and writes its
    bytes where they belong in the output. On CUDA a weight is one part (the GPU is the parallel part)."""
    def checked(values: torch.Tensor) -> torch.Tensor:
        check_finite(path, key, values)
        return values

    def copy(start: int, part: torch.Tensor) -> None:
        write_at(key, start * part.element_size(), checked(part))

    def int8_rows(start: int, rows: torch.Tensor) -> torch.Tensor:
        cb, scb = qint8.quantize(checked(rows).to(device))
        write_at(key, start * rows.shape[1], cb)
        return scb.cpu()

    def int4_blocks(start: int, part: torch.Tensor) -> torch.Tensor:
        packed, absmax = qformat.quantize_part(checked(part).to(device), settings)
        write_at(key, start // 2, packed)
        return absmax

    part_elements = max(1, tensor.numel() if device.type == "cuda" else qformat.PART_ELEMENTS)
    flat = tensor.reshape(-1)
    if not quantize and not flat.numel():
        return [], lambda _: {key: tensor}
    if not quantize:
        ranges = [(a, min(a + part_elements, flat.numel())) for a in range(0, flat.numel(), part_elements)]
        return [functools.partial(copy, a, flat[a:b]) for a, b in ranges], lambda _: {}
    if settings is None:
        step = max(1, part_elements // max(1, tensor.shape[1]))
        jobs = [functools.partial(int8_rows, a, tensor[a:a + step]) for a in range(0, tensor.shape[0], step)]
        return jobs, lambda scbs: qint8.side_entries(key, torch.cat(scbs))
    qformat.check_dtype(tensor)
    jobs = [functools.partial(int4_blocks, a, flat[a:b])
            for a, b in qformat.part_ranges(flat.numel(), settings, part_elements)]

    def join(absmax: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        state = qformat.join_absmax(absmax, tensor.shape, tensor.dtype, settings)
        return {f"{key}.{field}": value.cpu() for field, value in state.as_dict(packed=True).items()}
    return jobs, join


def quantize_state_dict(input_path: str | os.PathLike, output_path: str | os.PathLike,
                        quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
                        device: str | torch.device | None = None, force: bool = False,
                        compute_dtype: str = "float32", progress: bool = True, workers: int | None = None,
                        int8: bool = False, int8_threshold: float = 6.0) -> QuantizeSummary:
    """Compress ``input_path`` (any checkpoint or model directory) into ``output_path`` (safetensors,
    whatever its name), or convert a qlora-PR checkpoint (:func:`convert_compressed`).

    ``int8``: write LLM.int8 weights (bitsandbytes' ``Linear8bitLt`` layout) instead of 4-bit; the
    int4 options are then unused and ``int8_threshold`` is recorded for readers.
    ``compute_dtype`` is recorded for readers; the quantized bytes do not depend on it, nor on
    ``workers`` (threads quantizing at once on CPU; default: the cores available; 1 on CUDA).
    """
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    settings = qformat.QuantSettings(quant_type, double_quant, blocksize)
    device = resolve_device(device)
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise CheckpointError(f"workers must be a positive integer, got {workers!r}; pass `workers` 1 or more")
    workers = 1 if device.type == "cuda" else workers or default_workers()
    check_output_file(output_path, [input_path], force=force, setting="output_path")
    start = time.perf_counter()
    with open_checkpoint(input_path) as reader:
        if reader.origin == "qlora-pr" and not int8:
            return convert_compressed(reader, output_path, settings, compute_dtype, progress, start)
        if reader.quant_kind is not None:
            raise CheckpointError(f"{input_path} is already {reader.quant_kind}-compressed; quantize the dense "
                                  f"checkpoint (cpm-bee-export --dtype fp16 gives one)")
        targets = [k for k in reader.keys() if is_quant_target(k)]
        if not targets:
            raise CheckpointError(f"{input_path} has none of the projection weights CPM-Bee quantizes (e.g. "
                                  f"encoder.layers.0.self_att.self_attention.project_q.weight): is it CPM-Bee's?")
        for key in targets:
            shape, dtype = reader.info(key)
            if len(shape) != 2 or not dtype.is_floating_point:
                raise CheckpointError(f"{input_path}: {key} is {dtype} {list(shape)}, not a 2-D float weight")
        quantized = set(targets)
        fixed, tails = plan(reader, quantized, None if int8 else settings)
        originals = {k: reader.info(k) for k in targets}
        metadata = (qint8.checkpoint_metadata(int8_threshold, input_path, originals) if int8 else
                    qformat.checkpoint_metadata(settings, compute_dtype, input_path, originals))
        input_bytes = sum(reader.nbytes(k) for k in reader.keys())
        with reported_write(output_path), atomic_path(output_path) as tmp:
            writer = SafetensorsWriter(tmp, fixed, tails, metadata)
            try:
                threads = 1 if device.type == "cpu" else torch.get_num_threads()
                with tqdm(total=input_bytes, unit="B", unit_scale=True, desc="quantize",
                          disable=not progress) as bar, torch_threads(threads):
                    for key, entries in convert_tensors(reader, quantized, None if int8 else settings, device,
                                                        workers, writer.write_at):
                        for name, value in entries.items():
                            writer.write(name, value)
                        bar.update(reader.nbytes(key))
            except BaseException:
                writer.abort()
                raise
            writer.close()
            verify(tmp, fixed, tails, metadata, {k: reader.info(k)[0] for k in targets}, None if int8 else settings)
            output_bytes = os.path.getsize(tmp)
    return QuantizeSummary(output_path, input_bytes, output_bytes, time.perf_counter() - start, len(targets),
                           len(reader.keys()) - len(targets), workers)


def convert_compressed(reader: CheckpointReader, output_path: str, settings: qformat.QuantSettings,
                       compute_dtype: str, progress: bool, start: float) -> QuantizeSummary:
    """Write an already-quantized checkpoint (the qlora PR's) in this project's format, bytes unchanged."""
    found = reader.quant_settings
    if found != settings:
        raise CheckpointError(f"{reader.path} is already quantized with {found.describe()}; asking for "
                              f"{settings.describe()} would need the fp16 weights: drop the `quant_type`/"
                              f"`blocksize`/`double_quant` options to convert it, or export it to fp16 first")
    originals = {k: (tuple(v["shape"]), getattr(torch, v["dtype"]))
                 for k, v in json.loads(reader.metadata["weights"]).items()}
    metadata = qformat.checkpoint_metadata(settings, compute_dtype, reader.path, originals)
    marker = "." + qformat.BLOB_PREFIX
    fixed = {k: reader.info(k) for k in reader.keys() if marker not in k}
    tails = [k for k in reader.keys() if marker in k]
    input_bytes = sum(reader.nbytes(k) for k in reader.keys())
    with reported_write(output_path), atomic_path(output_path) as tmp:
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


def plan(reader: CheckpointReader, quantized: set[str], settings: qformat.QuantSettings | None
         ) -> tuple[qformat.Layout, list[str]]:
    """Output layout: fixed-size tensors (shape, dtype) and the variable-length quant-state blobs
    (``settings`` None: int8, which has none)."""
    fixed, tails = {}, []
    for key in reader.keys():
        shape, dtype = reader.info(key)
        if key in quantized and settings is None:
            prefix = qint8.module_prefix(key)
            fixed.update({(prefix + s if s else key): v for s, v in qint8.tensor_layout(shape).items()})
        elif key in quantized:
            fixed.update({key + suffix: v for suffix, v in qformat.tensor_layout(shape, settings).items()})
            tails.append(f"{key}.{settings.blob_suffix}")
        else:
            fixed[key] = (shape, dtype)
    return fixed, tails


def verify(path: str, fixed, tails, metadata, shapes: dict[str, tuple[int, ...]],
           settings: qformat.QuantSettings | None) -> None:
    """Read the written file back with the safetensors library and check it against the plan
    (``shapes``: the dense shape of each quantized weight; ``settings`` None: int8)."""
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
            if settings is None:
                try:
                    qint8.validate(key, {k: f.get_tensor(k) for k in qint8.entry_keys(key)}, shape)
                except qformat.QuantFormatError as e:
                    raise fail(str(e)) from None
                continue
            entries = {k: f.get_tensor(k) for k in qformat.entry_keys(key, settings) if k != key}
            entries[key] = torch.empty(0, dtype=torch.uint8)
            state = qformat.quant_state(key, entries, device="cpu")
            if tuple(state.shape) != tuple(shape) or state.quant_type != settings.quant_type:
                raise fail(f"{key}: QuantState.from_dict gives shape {list(state.shape)}, {state.quant_type}")
