"""The distributed seam: one small interface that the training loop, saving and evaluation use.

An engine owns the process group (or BMTrain's communicator), the device, how the model is sharded,
the optimizer with its fp32 master weights and loss scaling, and the gathered state dicts. Every
method whose docstring says *collective* must be called by every rank in the same order, or the
ranks wait for each other forever.

Lifecycle (the order matters; see docs/architecture.md)::

    engine = get_engine("auto", seed=1234)                 # process group, device, seeds
    engine.check_consistent(config.to_dict(), "model config")
    model = CPMBee(config); load weights; inject LoRA; freeze the base
    model = engine.wrap(model, blocks=model.encoder.layers, recompute=True)  # shard
    opt = engine.optimizer(trainable_params, lr=1e-4, weight_decay=0.01)
    for batch in data:
        loss = engine.cross_entropy(model(...)[0], targets)
        engine.backward(loss)                              # scaled
        norm = engine.clip_grad_norm(1.0)                  # global, unscaled
        engine.step(opt)                                   # False: skipped (fp16 overflow)
        engine.zero_grad(opt)
    state = engine.state_dict(model, trainable_only=True)  # full tensors on rank 0, {} elsewhere
    engine.close()
"""

from __future__ import annotations

import abc
import os
import resource
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed._composable import checkpoint

from cpm_live.data.tensors import IGNORE_INDEX
from cpm_live.errors import EngineError
from cpm_live.utils import key_mismatch

DEFAULT_TIMEOUT_S = 1800.0  # torch.distributed's default collective timeout (gloo)


def is_collective_timeout(error: BaseException) -> bool:
    """Whether ``error`` is a collective that waited past the process group's timeout for another rank:
    gloo raises "Timed out waiting Nms for recv/send operation" (NCCL's watchdog aborts the process)."""
    return isinstance(error, RuntimeError) and "Timed out waiting" in str(error)


def launch_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` without it."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    values = []
    for name, default in zip(names, ("0", "1", "0")):
        raw = os.environ.get(name, default)
        try:
            values.append(int(raw))
        except ValueError:
            raise EngineError(f"environment variable {name}={raw!r} is not an integer; "
                              "launch with torchrun") from None
    rank, world_size, local_rank = values
    if world_size < 1 or not 0 <= rank < world_size:
        raise EngineError(f"RANK={rank} / WORLD_SIZE={world_size} are inconsistent; launch with torchrun")
    return rank, world_size, local_rank


def check_state_dict_keys(given: Iterable[str], expected: Iterable[str], strict: bool,
                          hint: str = "") -> None:
    """Raise on keys the model does not have (always) and on missing keys (``strict``).

    Unlike ``nn.Module.load_state_dict(strict=False)``, an unknown key is never ignored: loading a
    trainable-only dict whose names do not match the model would otherwise load nothing, silently.
    """
    mismatch = key_mismatch(given, expected, missing_ok=not strict)
    if mismatch:
        hint = f". {hint}" if hint else ""
        raise EngineError("state dict does not match the model: " + "; ".join(mismatch) + hint)


def describe_difference(reference: Any, other: Any) -> str:
    """A short human description of how ``other`` differs from ``reference`` (dict keys named)."""
    if isinstance(reference, Mapping) and isinstance(other, Mapping):
        keys = sorted(set(reference) | set(other), key=str)
        diffs = [f"{k}: {reference.get(k, '<absent>')!r} vs {other.get(k, '<absent>')!r}"
                 for k in keys if reference.get(k, "<absent>") != other.get(k, "<absent>")]
        return "; ".join(diffs[:5]) + (f" (+{len(diffs) - 5} more)" if len(diffs) > 5 else "")
    text = f"{reference!r} vs {other!r}"
    return text if len(text) < 400 else text[:400] + "..."


def recompute_activations(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block's activations in backward instead of storing them (in place).

    torch's composable ``checkpoint`` hooks the module itself, so parameter names (and checkpoint
    keys) do not change and ``fully_shard`` can be applied afterwards; non-reentrant, as
    ``torch.utils.checkpoint(use_reentrant=False)``.
    """
    for block in blocks:
        checkpoint(block)


def float_parameters_outside_quantized_layers(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters that are not part of a quantized layer's state.

    A module holding an integer parameter (packed 4-bit codes, int8 weights) is a quantized layer: its
    floating-point parameters (``weight_nested_absmax``, ``SCB``) are statistics of those codes, stored
    under the layer's own state-dict keys (``weight.nested_absmax``), and load with them.
    """
    names = []
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(prefix=prefix, recurse=False))
        if any(not (p.is_floating_point() or p.is_complex()) for _, p in own):
            continue
        names += [name for name, p in own if p.is_floating_point()]
    return names


def parameter_signature(model: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, dtype)`` of every parameter: what must agree across ranks before sharding."""
    return [(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()]


class Engine(abc.ABC):
    """Distributed training back end. See the module docstring for the call order."""

    name: str

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device):
        self._rank, self._world_size, self._local_rank = rank, world_size, local_rank
        self._device = device

    # ------------------------------------------------------------------ identity
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def local_rank(self) -> int:
        return self._local_rank

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def is_main(self) -> bool:
        return self._rank == 0

    # ------------------------------------------------------------------ model and optimizer
    @abc.abstractmethod
    def wrap(self, model: nn.Module, blocks: nn.ModuleList | None = None, recompute: bool = False) -> nn.Module:
        """Shard ``model`` (collective) and move it to :attr:`device`; returns the model to use.

        ``blocks`` are the model's repeated blocks, called in order: each becomes its own
        gather/release group (the rest of the model is one more group). ``recompute`` recomputes
        each block's activations in backward instead of storing them. The engine is told both; it
        never looks inside the model for them. Load weights, inject LoRA and freeze the base
        *before* this call. The parameter names stay those of the unwrapped model, so state-dict
        keys do not change.

        The block contract (the one thing an engine may assume of a block; the bmtrain engine's
        adapter relies on it, ``tests/unit/engine/test_engine.py`` checks CPM-Bee's ``TransformerBlock`` against
        it): a block holds no parameters or buffers of its own, only in its children, and is called
        ``block(h, attention_mask, position_bias, past_kv=None, use_cache=False) -> (h, kv)``, where
        training passes only the first three and uses only ``h``.
        """

    @abc.abstractmethod
    def optimizer(self, params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0,
                  betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
        """Adam with decoupled weight decay over the parameters that require grad (after :meth:`wrap`).

        fp16/bf16 parameters get fp32 master weights; loss scaling turns on only if some trainable
        parameter is fp16. ``param_groups[i]["lr"]`` may be set by a scheduler.
        """

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """``loss`` times the current loss scale, backpropagated; gradients are averaged over ranks."""

    @abc.abstractmethod
    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale and apply the gradients (collective). Returns False when an fp16 gradient
        overflowed on any rank: the step is skipped, the gradients dropped and the scale lowered."""

    @abc.abstractmethod
    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the gradients of the optimizer's parameters."""

    @abc.abstractmethod
    def clip_grad_norm(self, max_norm: float) -> float:
        """Global L2 norm of the (unscaled) gradients over all ranks (collective); clips to ``max_norm``.

        ``math.inf`` only measures. A non-finite norm clips nothing (the step will be skipped).
        """

    @property
    @abc.abstractmethod
    def loss_scale(self) -> float:
        """The current loss scale (1.0 when loss scaling is off)."""

    # ------------------------------------------------------------------ checkpoints
    @abc.abstractmethod
    def state_dict(self, model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """Full (unsharded) CPU tensors under the unwrapped model's keys, on rank 0; ``{}`` on the
        other ranks (collective). ``trainable_only`` keeps the parameters that require grad."""

    @abc.abstractmethod
    def load_state_dict(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                        strict: bool = True) -> None:
        """Load full tensors into a wrapped model (collective; every rank passes the same dict).

        Keys the model does not have always raise; ``strict`` also raises on missing keys.
        """

    @abc.abstractmethod
    def training_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Optimizer and loss-scaler state for resuming, gathered so that any world size can load
        it; on rank 0, ``{}`` elsewhere (collective). Holds only tensors and plain Python values."""

    @abc.abstractmethod
    def load_training_state(self, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
        """Restore :meth:`training_state` (collective; every rank passes the same dict)."""

    # ------------------------------------------------------------------ communication
    @abc.abstractmethod
    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """Out-of-place all-reduce of a tensor on :attr:`device`; ``op`` is "sum" or "max"."""

    @abc.abstractmethod
    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (collective)."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Wait for every rank (collective)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the process group (if this engine created it)."""

    def all_reduce_sum(self, value: float | torch.Tensor) -> float | torch.Tensor:
        """Sum over ranks (collective); a float in, a float out."""
        if isinstance(value, torch.Tensor):
            return self._reduce(value, "sum")
        return float(self._reduce(torch.tensor(float(value), dtype=torch.float64), "sum"))

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (collective), as a new tensor on ``tensor``'s device."""
        return self._reduce(tensor, "sum") / self.world_size

    def _reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if self.world_size == 1:
            return tensor.detach().clone()
        return self._all_reduce(tensor.detach().to(self.device, copy=True), op).to(tensor.device)

    def check_consistent(self, obj: Any, what: str) -> None:
        """Raise :class:`EngineError` on *every* rank if ranks hold different ``obj`` (collective).

        Call it on values that must agree before a collective depends on them (model config,
        parameter shapes): a mismatch found later shows up as a hang or a shape error in NCCL/gloo.
        """
        values = self.all_gather_object(obj)
        differing = [r for r, v in enumerate(values) if v != values[0]]
        if differing:
            first = differing[0]
            raise EngineError(
                f"{what} differs across ranks: rank {first} vs rank 0: "
                f"{describe_difference(values[0], values[first])} (ranks that differ from rank 0: "
                f"{differing}). Launch every rank with the same arguments and files."
            )

    # ------------------------------------------------------------------ helpers
    def print_rank0(self, *args: Any, **kwargs: Any) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def cross_entropy_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sum of token cross entropy over labelled targets (``IGNORE_INDEX`` ignored), computed in fp32.

        The training loop divides it by the step's global token count; engines override this one
        method to use a fused kernel.
        """
        targets = targets.reshape(-1)
        return F.cross_entropy(logits.reshape(targets.numel(), -1).float(), targets.long(),
                               ignore_index=IGNORE_INDEX, reduction="sum")

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token cross entropy over labelled targets; no labelled token gives 0 (with a graph),
        not the 0/0 NaN of ``reduction="mean"``."""
        return self.cross_entropy_sum(logits, targets) / (targets != IGNORE_INDEX).sum().clamp(min=1)

    def peak_memory_mb(self) -> float:
        """Peak memory of this rank: CUDA allocator peak on GPU, the process's max RSS on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}, "
                f"device={self.device})")
