"""Choosing an engine: ``--engine auto|torch|bmtrain``, its command-line options and :class:`EngineArgs`."""

from __future__ import annotations

import argparse
import importlib.util
import math
from dataclasses import dataclass, fields

import torch

from cpm_live.engine.base import DEFAULT_TIMEOUT_S, Engine
from cpm_live.errors import ConfigError, EngineError

ENGINES = ("auto", "torch", "bmtrain")
DEVICES = ("auto", "cpu", "cuda")


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--engine``, ``--device``, ``--seed``, the loss-scaling flags (original defaults) and
    ``--dist-timeout``."""
    group = parser.add_argument_group("distributed engine")
    group.add_argument("--engine", default="auto", choices=ENGINES,
                       help="auto: bmtrain when CUDA and bmtrain are installed, else torch (FSDP2)")
    group.add_argument("--device", default="auto", choices=DEVICES)
    group.add_argument("--seed", type=int, default=1234, help="same seed on every rank")
    group.add_argument("--loss-scale", type=float, default=1048576.0,
                       help="initial loss scale (used only when trainable parameters are fp16)")
    group.add_argument("--loss-scale-factor", type=float, default=2.0,
                       help="divide the scale by this on overflow; multiply by it after "
                       "--loss-scale-steps good steps")
    group.add_argument("--loss-scale-steps", type=int, default=512, help="good steps before the scale grows")
    group.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                       help="torch engine: a collective waiting longer than this for another rank fails the run "
                            "(default 1800, torch's; bmtrain's NCCL collectives take no timeout)")
    return parser


@dataclass(frozen=True)
class EngineArgs:
    """How a run is distributed: the :func:`add_engine_args` options, checked when built."""

    engine: str = "auto"  # auto, torch or bmtrain
    device: str = "auto"  # auto, cpu or cuda
    seed: int = 1234  # the same on every rank
    loss_scale: float = 2.0**20  # initial fp16 loss scale (only when a trainable parameter is fp16)
    loss_scale_factor: float = 2.0
    loss_scale_steps: int = 512  # good steps before the scale grows
    dist_timeout: float = DEFAULT_TIMEOUT_S  # seconds a torch-engine collective waits for another rank

    def __post_init__(self) -> None:
        problems = []
        if self.engine not in ENGINES:
            problems.append(f"`engine` must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.device not in DEVICES:
            problems.append(f"`device` must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not 0 < self.dist_timeout < math.inf:
            problems.append(f"`dist_timeout` must be a positive number, got {self.dist_timeout}")
        if not 0 < self.loss_scale < math.inf:
            problems.append(f"`loss_scale` must be > 0, got {self.loss_scale}")
        if not self.loss_scale_factor > 1:
            problems.append(f"`loss_scale_factor` must be > 1, got {self.loss_scale_factor}")
        if self.loss_scale_steps < 1:
            problems.append(f"`loss_scale_steps` must be a positive integer, got {self.loss_scale_steps}")
        if problems:
            raise ConfigError("; ".join(problems))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineArgs:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def resolve_engine_name(name: str, device: str = "auto") -> str:
    """The concrete engine ``name`` stands for; raises with the fix when it cannot run here."""
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}")
    if device not in DEVICES:
        raise EngineError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if name == "auto":
        bmtrain_ok = device != "cpu" and torch.cuda.is_available() and importlib.util.find_spec("bmtrain")
        return "bmtrain" if bmtrain_ok else "torch"
    if name == "bmtrain":
        if device == "cpu":
            raise EngineError("`engine` bmtrain runs on CUDA only; drop `device` cpu, or use `engine` torch")
        if not torch.cuda.is_available():
            raise EngineError("`engine` bmtrain needs a CUDA GPU and torch sees none; use `engine` torch "
                              "(FSDP2: gloo on CPU, NCCL on GPU)")
    return name


def get_engine(name: str = "auto", *, seed: int = 1234, device: str = "auto", loss_scale: float = 2.0**20,
               loss_scale_factor: float = 2.0, loss_scale_steps: int = 512,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> Engine:
    """Create the engine for this process from torchrun's environment (or a single process).

    ``name``: ``torch`` (FSDP2, CPU or GPU), ``bmtrain`` (CUDA and the ``gpu`` extra) or ``auto``.
    The loss-scale settings apply only when a trainable parameter is fp16. ``timeout_s`` bounds how
    long the torch engine's collectives wait for another rank (``bmt.init_distributed`` takes none).
    """
    name = resolve_engine_name(name, device)
    if name == "bmtrain":
        try:
            from cpm_live.engine.bmtrain_engine import BMTrainEngine
        except (ImportError, OSError) as e:  # OSError: bmtrain found but its NCCL library did not load
            raise EngineError(
                f"`engine` bmtrain could not import bmtrain ({type(e).__name__}: {e}). Install it with "
                "pip install 'cpm_live[gpu]' (bmtrain>=1.0.1,<1.1; its wheels cover CPython 3.8-3.11, "
                "build it from the sdist otherwise), or use `engine` torch"
            ) from e
        return BMTrainEngine(seed=seed, loss_scale=loss_scale, loss_scale_factor=loss_scale_factor,
                             loss_scale_steps=loss_scale_steps)
    from cpm_live.engine.torch_engine import TorchEngine

    return TorchEngine(seed=seed, device=device, loss_scale=loss_scale, loss_scale_factor=loss_scale_factor,
                       loss_scale_steps=loss_scale_steps, timeout_s=timeout_s)


def engine_from_args(args: EngineArgs) -> Engine:
    """``get_engine`` with the settings of ``args``."""
    return get_engine(args.engine, seed=args.seed, device=args.device, loss_scale=args.loss_scale,
                      loss_scale_factor=args.loss_scale_factor, loss_scale_steps=args.loss_scale_steps,
                      timeout_s=args.dist_timeout)
