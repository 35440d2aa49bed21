"""BMTrain engine (CUDA only): ZeRO-3 blocks, CPU-offloaded Adam, BMTrain's loss scaling.

This is the only module that imports ``bmtrain`` (the optional ``gpu`` extra); model code never
does. How :class:`cpm_live.models.CPMBee` is mapped onto BMTrain by :meth:`BMTrainEngine.wrap`:

- each of the ``blocks`` it is given (``model.encoder.layers``) becomes a ``bmt.Block`` (its
  parameters live in flat ZeRO-3 shards, gathered for forward and backward; activations recomputed
  when told ``recompute``), all in one ``bmt.TransformerBlockList`` that replaces the list in its
  parent module and links neighbours for prefetching and releasing;
- parameters outside the blocks (embedding, position bias, final norm) become
  ``bmt.DistributedParameter`` and their modules ``bmt.DistributedModule`` (gathered on attribute
  access), as ``bmt.BMTrainModelWrapper`` does;
- integer tensors (``Linear4bit``'s packed codes and 8-bit absmax, ``Linear8bit``'s int8 weight) become
  :class:`DistributedParameter4Int8`.

Why each layer is adapted instead of handing the list to ``TransformerBlockList.forward``: the
caller iterates the blocks and calls each as the block contract of :meth:`Engine.wrap` says,
``layer(h, mask, bias, past_kv, use_cache)`` expecting ``(h, kv)``, whereas
``TransformerBlockList.forward`` feeds every output back as the next block's leading inputs; and
``bmt.Block``'s path for a block whose inputs need no grad (the first block under LoRA: the frozen
embedding's output) runs ``OneStepNoGradFunc``, whose backward takes exactly one
gradient, so a block must return a single tensor. Hence :class:`_HiddenStatesOnly` (the layer as
``(h, mask, bias) -> h``, sharing the layer's children so parameter names do not change) inside
:class:`_EncoderLayerBlock` (a ``bmt.Block`` with the Encoder's call signature). The Encoder iterating
the ``TransformerBlockList`` does what ``TransformerBlockList.forward`` does: call each block in order.

Load weights (including the 4-bit base) *before* :meth:`BMTrainEngine.wrap`: ``bmt.load`` cannot
broadcast uint8 tensors, and a wrapped block does not run ``Linear4bit``'s own loader.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import bmtrain as bmt
import torch
from bmtrain.loss import FusedCrossEntropy
from bmtrain.optim.optim_manager import check_overflow
from bmtrain.store import allgather_objects
from bmtrain.zero_context import ZeroContext
from torch import nn

from cpm_live.data.tensors import IGNORE_INDEX
from cpm_live.engine.base import (
    Engine,
    EngineError,
    check_state_dict_keys,
    float_parameters_outside_quantized_layers,
    launch_env,
    parameter_signature,
)

_LOAD_BEFORE_WRAP = ("with `engine` bmtrain, load the base checkpoint (4-bit state included) into the model "
                     "before engine.wrap(); afterwards only the floating-point parameters outside the 4-bit/int8 "
                     "layers can be loaded")


class DistributedParameter4Int8(bmt.DistributedParameter):
    """A ZeRO shard of an integer tensor (packed 4-bit codes, 8-bit absmax, int8 weights) that never trains.

    BMTrain restores the full packed shape when a block gathers it (``_original_shape``), which is
    all ``Linear4bit`` needs to rebuild its ``QuantState``: the logical weight shape and dtype are
    attributes of the layer, the statistics are its other (gathered) parameters.
    """

    def __new__(cls, data: torch.Tensor):
        if data.is_floating_point() or data.is_complex():
            raise TypeError(f"DistributedParameter4Int8 holds integer tensors, got {data.dtype}")
        return super().__new__(cls, data, requires_grad=False)

    @property
    def packed_shape(self) -> torch.Size:
        """Shape of the whole packed tensor (the local data is this rank's flat slice)."""
        return self._original_shape

    @property
    def packed_dtype(self) -> torch.dtype:
        return self.dtype

    def requires_grad_(self, requires_grad: bool = True) -> DistributedParameter4Int8:
        if requires_grad:
            raise RuntimeError("the frozen 4-bit state cannot train; LoRA adapters are the trainable part")
        return super().requires_grad_(False)


def _distribute_own_parameters(module: nn.Module) -> None:
    """Replace ``module``'s direct parameters by BMTrain shards and move its buffers to CUDA."""
    for name, param in list(module._parameters.items()):
        if param is None or isinstance(param, bmt.DistributedParameter):
            continue
        if param.is_floating_point():
            module._parameters[name] = bmt.DistributedParameter(param.data, requires_grad=param.requires_grad)
        else:
            module._parameters[name] = DistributedParameter4Int8(param.data)
    for name, buf in module._buffers.items():
        if buf is not None:
            module._buffers[name] = buf.cuda()


_DISTRIBUTED_CLASSES: dict[type, type] = {}


def _make_distributed_module(module: nn.Module) -> None:
    """Give a module outside the blocks ``DistributedModule``'s gather-on-access (class swap, as
    ``bmt.BMTrainModelWrapper`` does), so ``self.weight`` in its forward is the full tensor."""
    cls = type(module)
    if cls not in _DISTRIBUTED_CLASSES:
        _DISTRIBUTED_CLASSES[cls] = type("Distributed" + cls.__name__, (cls, bmt.DistributedModule), {})
    module.__class__ = _DISTRIBUTED_CLASSES[cls]


def _distribute_outside_blocks(module: nn.Module) -> None:
    if isinstance(module, bmt.Block):
        return
    if any(p is not None for p in module._parameters.values()):
        _distribute_own_parameters(module)
        _make_distributed_module(module)
    else:
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.cuda()
    for child in module.children():
        _distribute_outside_blocks(child)


class _HiddenStatesOnly(nn.Module):
    """A ``TransformerBlock`` as ``(h, mask, bias) -> h`` for ``bmt.Block`` (one output only).

    It adopts the layer's children instead of holding the layer as a submodule, so parameter names
    (and checkpoint keys) stay ``encoder.layers.N.self_att...``.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        if list(layer.parameters(recurse=False)) or list(layer.buffers(recurse=False)):
            raise EngineError(f"{type(layer).__name__} holds tensors of its own; only its children are "
                              "adopted")
        for name, child in layer.named_children():
            self.add_module(name, child)
        self.layer_forward = layer.forward

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor,
                position_bias: torch.Tensor) -> torch.Tensor:
        return self.layer_forward(h, attention_mask, position_bias)[0]


@contextlib.contextmanager
def _integer_shards_allowed() -> Iterator[None]:
    """Let ``bmt.Block`` build the flat shard of a block's integer tensors (the packed 4-bit codes).

    bmtrain 1.0.1's ``Block.init_param_storage`` wraps every flat shard in ``torch.nn.Parameter(t)``
    and only then sets ``requires_grad`` from the tensors it holds; the constructor's default
    ``requires_grad=True`` is refused for integer dtypes ("Only Tensors of floating point and complex
    dtype can require gradients", seen on an H100 with torch 2.11), although bmtrain's storage and NCCL
    type maps accept uint8. While a block is built, an integer ``Parameter`` starts without grad.
    """
    original = torch.nn.Parameter.__dict__["__new__"]
    construct = torch.nn.Parameter.__new__

    def new(cls, data=None, requires_grad=True):
        if data is not None and not (data.is_floating_point() or data.is_complex()):
            requires_grad = False
        return construct(cls, data, requires_grad)

    torch.nn.Parameter.__new__ = staticmethod(new)
    try:
        yield
    finally:
        torch.nn.Parameter.__new__ = original


class _EncoderLayerBlock(bmt.Block):
    """``bmt.Block`` called like an Encoder layer: ``(h, mask, bias, past_kv, use_cache) -> (h, kv)``."""

    def __init__(self, layer: _HiddenStatesOnly, use_checkpoint: bool):
        with _integer_shards_allowed():
            super().__init__(layer, use_checkpoint=use_checkpoint)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor, position_bias: torch.Tensor,
                past_kv: Any = None, use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        if past_kv is None and not use_cache:
            return super().forward(h, attention_mask, position_bias), None
        if torch.is_grad_enabled():
            raise EngineError("incremental decoding (use_cache) under `engine` bmtrain needs torch.no_grad()")
        # Generation: gather this block's parameters and run the whole layer, cache included.
        with ZeroContext(self):
            return self._module.layer_forward(h, attention_mask, position_bias, past_kv, use_cache)


class _AdamOffloadW(bmt.optim.AdamOffloadOptimizer):
    """``AdamOffloadOptimizer`` with decoupled weight decay for fp32 parameters too.

    BMTrain's fp16/bf16 kernel already decays decoupled; its fp32 path calls torch's functional Adam
    with L2 (coupled) decay. fp32 groups are therefore built with ``weight_decay=0`` and
    ``decoupled_weight_decay=wd``, applied here to the fp32 master copy before the update, as AdamW does.
    """

    @torch.no_grad()
    def step(self, closure=None, scale: float = 1):
        for group in self.param_groups:
            decay = group.get("decoupled_weight_decay", 0.0)
            if not decay:
                continue
            for p in group["params"]:
                if p.grad is None or not p.requires_grad:
                    continue
                state = self.state[p]
                # The host master is the source of truth once it exists; before the first step it
                # is created from p, so decaying p is the same.
                (state["_param_fp32"] if "_param_fp32" in state else p).mul_(1.0 - group["lr"] * decay)
        return super().step(closure, scale)


class BMTrainEngine(Engine):
    name = "bmtrain"

    def __init__(self, seed: int = 1234, loss_scale: float = 2.0**20, loss_scale_factor: float = 2.0,
                 loss_scale_steps: int = 512):
        launch_env()  # validates torchrun's variables before bmtrain reads them
        if not loss_scale > 0 or not loss_scale_factor > 1 or loss_scale_steps < 1:
            raise EngineError(f"invalid loss scaling: `loss_scale` {loss_scale} (> 0), `loss_scale_factor` "
                              f"{loss_scale_factor} (> 1), `loss_scale_steps` {loss_scale_steps} (>= 1)")
        bmt.init_distributed(seed=seed)  # also seeds torch, random and numpy (same seed on every rank)
        super().__init__(bmt.rank(), bmt.world_size(), bmt.config["local_rank"],
                         torch.device("cuda", torch.cuda.current_device()))
        self._loss_scale = (float(loss_scale), float(loss_scale_factor), int(loss_scale_steps))
        self._wrapped = False
        self._optimizer: _AdamOffloadW | None = None
        self._manager: bmt.optim.OptimManager | None = None

    # ------------------------------------------------------------------ model and optimizer
    def wrap(self, model: nn.Module, blocks: nn.ModuleList | None = None, recompute: bool = False) -> nn.Module:
        if self._wrapped:
            raise EngineError("this engine already wrapped a model; BMTrain shards one model per run")
        owner = next(((parent, name) for parent in model.modules() for name, child in parent.named_children()
                      if blocks is not None and child is blocks), None)
        if owner is None:
            raise EngineError(f"`engine` bmtrain needs the blocks to shard: wrap(model, blocks=<a ModuleList "
                              f"inside the model>); got {type(blocks).__name__} for {type(model).__name__}")
        self.check_consistent(parameter_signature(model), "model parameters (name, shape, dtype)")
        wrapped = []
        for layer in blocks:
            for m in layer.modules():
                _distribute_own_parameters(m)
            wrapped.append(_EncoderLayerBlock(_HiddenStatesOnly(layer), use_checkpoint=recompute))
        setattr(*owner, bmt.TransformerBlockList(wrapped))
        _distribute_outside_blocks(model)
        bmt.synchronize()
        self._wrapped = True
        return model

    def optimizer(self, params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0,
                  betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> _AdamOffloadW:
        if not self._wrapped:
            raise EngineError("call engine.wrap(model) before engine.optimizer(...)")
        params = [p for p in params if p.requires_grad]
        if not params:
            raise EngineError("no trainable parameters: every parameter has requires_grad=False")
        if not all(isinstance(p, bmt.DistributedParameter) for p in params):
            raise EngineError("build the optimizer from engine.wrap(model).parameters(): some parameters "
                              "are not BMTrain shards")
        fp32 = [p for p in params if p.dtype == torch.float32]
        low = [p for p in params if p.dtype != torch.float32]
        groups = ([{"params": low, "weight_decay": weight_decay}] if low else []) + \
            ([{"params": fp32, "weight_decay": 0.0, "decoupled_weight_decay": weight_decay}] if fp32 else [])
        self._optimizer = _AdamOffloadW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        init_scale, factor, steps = self._loss_scale
        # Loss scaling only protects fp16 gradients; with None, OptimManager keeps the scale at 1.
        fp16 = any(p.dtype == torch.float16 for p in params)
        self._manager = bmt.optim.OptimManager(loss_scale=init_scale if fp16 else None,
                                               loss_scale_factor=factor, loss_scale_steps=steps)
        self._manager.add_optimizer(self._optimizer)
        return self._optimizer

    def _need_manager(self, optimizer: torch.optim.Optimizer | None = None) -> bmt.optim.OptimManager:
        if self._manager is None or (optimizer is not None and optimizer is not self._optimizer):
            raise EngineError("use the optimizer returned by engine.optimizer() (create it before backward)")
        return self._manager

    def backward(self, loss: torch.Tensor) -> None:
        self._need_manager().backward(loss)  # loss * scale / world_size: gradients are summed

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        manager = self._need_manager(optimizer)
        overflow = False
        if manager.loss_scale_enabled:
            try:
                check_overflow(optimizer.param_groups)
            except OverflowError:
                overflow = True
        manager.step()  # on overflow it lowers the scale and zeroes the gradients itself
        return not overflow

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        self._need_manager(optimizer).zero_grad()

    def clip_grad_norm(self, max_norm: float) -> float:
        manager = self._need_manager()
        return float(manager.clip_grad_norm(self._optimizer.param_groups, max_norm))

    @property
    def loss_scale(self) -> float:
        return float(self._manager.loss_scale) if self._manager is not None else 1.0

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        keep = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None
        out: dict[str, torch.Tensor] = {}

        def visit(module: nn.Module, prefix: str) -> None:
            # Same walk on every rank, so the gathers inside line up.
            if isinstance(module, bmt.Block):
                if keep is not None and not any(k.startswith(prefix) for k in keep):
                    return
                part = module.state_dict(prefix=prefix)  # gathers this block only
            else:
                part = {}
                module._save_to_state_dict(part, prefix, False)  # DistributedModule gathers its own
                for name, child in module._modules.items():
                    if child is not None:
                        visit(child, prefix + name + ".")
            if self.is_main:
                out.update({k: v.detach().to("cpu", copy=True) for k, v in part.items()
                            if keep is None or k in keep})

        with torch.no_grad():
            visit(model, "")
        return out

    def load_state_dict(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                        strict: bool = True) -> None:
        # After wrap only the floating-point parameters outside quantized layers load (the 4-bit and
        # int8 state, its float statistics included, went in before wrap), so those are what
        # ``strict`` asks for; a quantized layer's key is one the wrapped model does not take.
        loadable = float_parameters_outside_quantized_layers(model)
        check_state_dict_keys(state_dict, loadable, strict, hint=_LOAD_BEFORE_WRAP)
        model.load_state_dict(dict(state_dict), strict=False)  # each Block / DistributedModule: its shard
        if self._optimizer is not None:  # keep AdamOffload's host fp32 masters in step with the weights
            for group in self._optimizer.param_groups:
                for p in group["params"]:
                    master = self._optimizer.state.get(p, {}).get("_param_fp32")
                    if master is not None:
                        master.copy_(p.detach())

    def training_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        manager = self._need_manager(optimizer)
        # gather=True: whole (unsharded) Adam moments and masters, loadable at another world size.
        # BMTrain's gather needs some state to exist (it reads a step count), i.e. one step done.
        opt_state = self._optimizer.state_dict(gather=bool(self._optimizer.state))
        if not self.is_main:
            return {}
        return {"engine": self.name, "optimizer": opt_state, "loss_scale": float(manager.loss_scale),
                "steps_since_last_scale": int(manager.steps_since_last_scale)}

    def load_training_state(self, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
        manager = self._need_manager(optimizer)
        if state.get("engine") != self.name:
            raise EngineError(f"training state was written by engine {state.get('engine')!r}; resume it "
                              f"with `engine` {state.get('engine')} (optimizer layouts differ)")
        # Not OptimManager.load_state_dict: it calls load_state_dict on a None lr scheduler.
        self._optimizer.load_state_dict(state["optimizer"])
        if manager.loss_scale_enabled:
            manager.loss_scale = float(state["loss_scale"])
            manager.steps_since_last_scale = int(state["steps_since_last_scale"])

    # ------------------------------------------------------------------ communication
    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        return bmt.distributed.all_reduce(tensor, op)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return allgather_objects(obj)

    def barrier(self) -> None:
        bmt.synchronize()

    def close(self) -> None:
        """BMTrain has no API to destroy its NCCL communicator; wait for outstanding work only."""
        torch.cuda.synchronize()

    def cross_entropy_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """fp16 logits use ``bmt.loss.FusedCrossEntropy`` (fp32 math without an fp32 copy of the
        logits); other dtypes the generic fp32 path."""
        if logits.dtype != torch.float16:
            return super().cross_entropy_sum(logits, targets)
        targets = targets.reshape(-1)
        return FusedCrossEntropy(ignore_index=IGNORE_INDEX, reduction="sum")(
            logits.reshape(targets.numel(), -1).contiguous(), targets)
