"""Speed and memory of a generation run: prompt (prefill) and decode throughput, peak memory.

Prefill and decoding are reported apart because they are bound by different things: the prompt is
one forward over many tokens (compute), each decoding step reads every weight for one token per row
(memory). `Decoder` adds to a `GenerationStats`; the front ends keep one across ``generate`` calls.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import torch

GIB = 2**30


def _sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock time covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class GenerationStats:
    """Tokens and wall-clock seconds of prompt prefill and of decoding, summed over calls.

    ``prompt_tokens`` counts the prompts' own tokens (not the left padding of a batch);
    ``decode_tokens`` counts one token per row and step (beam search: every beam's), timed from the
    end of the prefill to the end of the last step, strategy work between steps included."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    def timer(self, device: torch.device) -> _Clock:
        return _Clock(self, device)

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def report(self, device: torch.device) -> dict[str, float | int | str]:
        """The counters, the two rates, and peak memory (process RSS; on CUDA also torch's allocations)."""
        out: dict[str, float | int | str] = {
            "prompt_tokens": self.prompt_tokens, "prompt_seconds": self.prompt_seconds,
            "prompt_tokens_per_s": self.prompt_tokens_per_s, "decode_tokens": self.decode_tokens,
            "decode_seconds": self.decode_seconds, "decode_tokens_per_s": self.decode_tokens_per_s,
            "peak_rss_bytes": peak_rss_bytes(), "device": str(device)}
        if device.type == "cuda":
            out["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        return out

    def summary_line(self, device: torch.device) -> str:
        report = self.report(device)
        line = (f"prompt: {self.prompt_tokens} tokens in {self.prompt_seconds:.2f} s "
                f"({self.prompt_tokens_per_s:.1f} tokens/s); decode: {self.decode_tokens} tokens in "
                f"{self.decode_seconds:.2f} s ({self.decode_tokens_per_s:.2f} tokens/s); "
                f"peak memory: {report['peak_rss_bytes'] / GIB:.2f} GiB RSS")
        if "peak_cuda_allocated_bytes" in report:
            line += f", {report['peak_cuda_allocated_bytes'] / GIB:.2f} GiB CUDA"
        return line


class _Clock:
    """Splits one decoding's wall time: ``prefill_done(tokens)`` once, then ``step_done(rows)`` per step."""

    def __init__(self, stats: GenerationStats, device: torch.device):
        self.stats = stats
        self.device = device
        self.last = time.perf_counter()

    def _lap(self) -> float:
        _sync(self.device)
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds

    def prefill_done(self, tokens: int) -> None:
        self.stats.prompt_seconds += self._lap()
        self.stats.prompt_tokens += tokens

    def step_done(self, rows: int) -> None:
        self.stats.decode_seconds += self._lap()
        self.stats.decode_tokens += rows
