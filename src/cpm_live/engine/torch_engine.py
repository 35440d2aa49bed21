"""PyTorch engine: FSDP2 ``fully_shard`` per transformer block, gloo on CPU, NCCL on CUDA.

One process (no torchrun, or ``--nproc_per_node 1``) runs without a process group and without
sharding. With several, every parameter is a ``DTensor`` sharded on dim 0, including the frozen
uint8 4-bit state of ``Linear4bit``: FSDP2 all-gathers a group of mixed dtypes as raw bytes and
never casts integer tensors, so the packed codes stay uint8 (no bf16 "quant storage" trick, which
is where sharded 4-bit weights have been reported to get corrupted).
"""

from __future__ import annotations

import datetime
import os
import random
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from cpm_live.engine.base import (
    DEFAULT_TIMEOUT_S,
    Engine,
    EngineError,
    check_state_dict_keys,
    launch_env,
    parameter_signature,
    recompute_activations,
)
from cpm_live.engine.loss_scale import DynamicLossScaler


def seed_everything(seed: int) -> None:
    """Same seed on every rank: models built before ``wrap`` start identical, which FSDP2 relies on
    (it keeps each rank's own slice; it does not broadcast rank 0's weights)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly sharded) one; collective for a DTensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut like ``like`` (a DTensor: rank 0's values are scattered; collective)."""
    if isinstance(like, DTensor):
        device = torch.device(like.device_mesh.device_type)
        return distribute_tensor(full.detach().to(device, like.dtype), like.device_mesh, like.placements)
    return full.detach().to(like.device, like.dtype)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW (decoupled decay) run on fp32 masters of the model's parameters.

    An fp32 parameter is its own master. An fp16/bf16 one gets an fp32 copy (sharded like it):
    gradients are upcast and unscaled into the copy, AdamW updates the copy, and the result is cast
    back, so small updates are not lost to fp16 rounding. ``param_groups`` hold the masters.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float):
        self.names = [n for n, _ in named_params]
        self.model_params = [p for _, p in named_params]
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().requires_grad_()
                        for p in self.model_params]
        super().__init__(self.masters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @torch.no_grad()
    def step(self, closure=None, grad_scale: float = 1.0):  # noqa: D417 - torch signature plus one kwarg
        """One update from the model parameters' gradients divided by ``grad_scale``."""
        for p, master in zip(self.model_params, self.masters):
            if p.grad is None:
                master.grad = None
            elif master is p:
                if grad_scale != 1.0:
                    p.grad.div_(grad_scale)
            else:
                master.grad = p.grad.float().div_(grad_scale)
        loss = super().step(closure)
        for p, master in zip(self.model_params, self.masters):
            if master is not p:
                p.copy_(master)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p in self.model_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()


def _restart_scoped_store(world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun restarts, a store whose keys are private to this attempt (else None: env://).

    torchrun's workers reuse the agent's TCPStore across restarts without a per-attempt prefix, so
    after a rank dies the new workers can read the dead attempt's gloo addresses and fail with
    "connectFullMesh ... Connection refused" (seen here in a 2-rank CPU run).
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                is_master=False, timeout=timeout)
    return dist.PrefixStore(f"cpm_live/attempt_{attempt}/", agent_store)


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, seed: int = 1234, device: str = "auto", loss_scale: float = 2.0**20,
                 loss_scale_factor: float = 2.0, loss_scale_steps: int = 512, timeout_s: float = DEFAULT_TIMEOUT_S):
        rank, world_size, local_rank = launch_env()
        if device not in ("auto", "cpu", "cuda"):
            raise EngineError(f"device must be auto, cpu or cuda, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineError("`device` cuda but torch sees no CUDA device; use `device` cpu (or auto)")
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(local_rank)
        super().__init__(rank, world_size, local_rank,
                         torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))
        self._owns_group = False
        self._mesh = None
        if world_size > 1:
            if not dist.is_initialized():
                if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
                    raise EngineError(f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set: "
                                      "launch with torchrun --nproc_per_node N")
                timeout = datetime.timedelta(seconds=timeout_s)
                dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                        timeout=timeout, store=_restart_scoped_store(world_size, timeout),
                                        device_id=self.device if use_cuda else None)
                self._owns_group = True
            elif dist.get_world_size() != world_size:
                raise EngineError(f"an existing process group has {dist.get_world_size()} ranks, "
                                  f"but WORLD_SIZE={world_size}")
            self._mesh = init_device_mesh(self.device.type, (world_size,))
        seed_everything(seed)
        self._scaler = DynamicLossScaler(loss_scale, loss_scale_factor, loss_scale_steps)
        self._model: nn.Module | None = None
        self._optimizer: MasterWeightAdamW | None = None

    # ------------------------------------------------------------------ model and optimizer
    def wrap(self, model: nn.Module, blocks: nn.ModuleList | None = None, recompute: bool = False) -> nn.Module:
        self.check_consistent(parameter_signature(model), "model parameters (name, shape, dtype)")
        blocks = list(blocks or [])
        if recompute:
            recompute_activations(blocks)
        if self._mesh is None:
            model = model.to(self.device)
        else:
            # Bottom-up: each block is one all-gather/reduce-scatter group; the root group takes
            # the rest (embedding, position bias, final norm). fully_shard moves to the device.
            # The root also reshards after forward (FSDP2 keeps it gathered by default): outside
            # forward/backward every parameter is then its sharded DTensor, so an optimizer built
            # or an evaluation run between steps never holds a transient full copy (an optimizer
            # built after an eval forward would otherwise update discarded unsharded tensors).
            for block in blocks:
                fully_shard(block, mesh=self._mesh)
            fully_shard(model, mesh=self._mesh, reshard_after_forward=True)
            if callable(getattr(model, "inference", None)):
                register_fsdp_forward_method(model, "inference")  # generation gathers like forward
        self._model, self._optimizer = model, None
        return model

    def optimizer(self, params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0,
                  betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> MasterWeightAdamW:
        if self._model is None:
            raise EngineError("call engine.wrap(model) before engine.optimizer(...): wrapping replaces "
                              "the parameters, so an optimizer built earlier would update stale tensors")
        names = {id(p): n for n, p in self._model.named_parameters()}
        params = [p for p in params if p.requires_grad]
        if not params:
            raise EngineError("no trainable parameters: every parameter has requires_grad=False")
        if self._mesh is not None and not all(isinstance(p, DTensor) for p in params):
            raise EngineError("engine.optimizer() got unsharded parameters: collect them from the wrapped "
                              "model outside forward/backward")
        foreign = [p for p in params if id(p) not in names]
        if foreign:
            raise EngineError(f"{len(foreign)} parameter(s) are not in the wrapped model; build the "
                              "optimizer from engine.wrap(model).parameters()")
        self._scaler.enabled = any(p.dtype == torch.float16 for p in params)
        self._optimizer = MasterWeightAdamW([(names[id(p)], p) for p in params], lr, betas, eps, weight_decay)
        return self._optimizer

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self._scaler.scale if self._scaler.enabled else loss).backward()

    def _grads(self) -> list[torch.Tensor]:
        """Local pieces of the trainable parameters' gradients (each element on exactly one rank)."""
        if self._optimizer is not None:
            params = self._optimizer.model_params
        elif self._model is not None:
            params = [p for p in self._model.parameters() if p.requires_grad]
        else:
            raise EngineError("call engine.wrap(model) first")
        grads = [p.grad for p in params if p.grad is not None]
        return [g.to_local() if isinstance(g, DTensor) else g for g in grads]

    def _found_overflow(self) -> bool:
        local = any(not torch.isfinite(g).all() for g in self._grads())
        return bool(self._reduce(torch.tensor(float(local), device=self.device), "max") > 0)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        if optimizer is not self._optimizer:
            raise EngineError("engine.step() needs the optimizer returned by engine.optimizer()")
        if self._scaler.enabled and self._found_overflow():
            self._scaler.update(overflow=True)
            optimizer.zero_grad()
            return False
        optimizer.step(grad_scale=self._scaler.scale)
        self._scaler.update(overflow=False)
        return True

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def clip_grad_norm(self, max_norm: float) -> float:
        grads = self._grads()
        local = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in grads:
            local += g.detach().double().pow(2).sum()
        total = float(self._reduce(local, "sum").sqrt()) / self._scaler.scale
        if total == total and total != float("inf") and total > max_norm:  # finite and too large
            coef = max_norm / (total + 1e-6)
            for g in grads:
                g.mul_(coef)
        return total

    @property
    def loss_scale(self) -> float:
        return self._scaler.scale

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        keep = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None
        out = {}
        # model.state_dict() holds DTensors (no copy); gather one entry at a time, in the same
        # (registration) order on every rank.
        for key, value in model.state_dict().items():
            if keep is not None and key not in keep:
                continue
            value = full_tensor(value)
            if self.is_main:
                out[key] = value.detach().to("cpu", copy=True)
        return out

    def load_state_dict(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                        strict: bool = True) -> None:
        current = model.state_dict()
        check_state_dict_keys(state_dict, current, strict)
        for key, value in state_dict.items():
            # Only sharded entries are checked here (they must be cut to the model's shape); the
            # rest (e.g. Linear4bit's quant-state blob) are for the module's own loader to judge.
            if isinstance(current[key], DTensor) and tuple(value.shape) != tuple(current[key].shape):
                raise EngineError(f"state dict entry {key} has shape {list(value.shape)}, the model "
                                  f"expects {list(current[key].shape)}")
        # Model order (identical on every rank) keeps the scatters of distribute_tensor in step.
        local = {key: shard_like(state_dict[key], value)
                 for key, value in current.items() if key in state_dict}
        model.load_state_dict(local, strict=strict)
        if self._optimizer is not None:  # fp32 masters of the loaded weights follow them
            with torch.no_grad():
                for name, p, master in zip(self._optimizer.names, self._optimizer.model_params,
                                           self._optimizer.masters):
                    if master is not p and name in state_dict:
                        master.copy_(p)

    def training_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if optimizer is not self._optimizer:
            raise EngineError("engine.training_state() needs the optimizer returned by engine.optimizer()")
        params = {}
        for name, p, master in zip(optimizer.names, optimizer.model_params, optimizer.masters):
            entry = {}
            for key, value in optimizer.state.get(master, {}).items():
                entry[key] = full_tensor(value).detach().to("cpu", copy=True)
            if master is not p:
                entry["master"] = full_tensor(master).detach().to("cpu", copy=True)
            params[name] = entry
        if not self.is_main:
            return {}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        return {"engine": self.name, "params": params, "param_groups": groups,
                "scaler": self._scaler.state_dict()}

    def load_training_state(self, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
        if optimizer is not self._optimizer:
            raise EngineError("engine.load_training_state() needs the optimizer returned by "
                              "engine.optimizer()")
        if state.get("engine") != self.name:
            raise EngineError(f"training state was written by engine {state.get('engine')!r}; resume it "
                              f"with `engine` {state.get('engine')} (optimizer layouts differ)")
        saved = state["params"]
        if set(saved) != set(optimizer.names):
            missing = sorted(set(optimizer.names) - set(saved))
            extra = sorted(set(saved) - set(optimizer.names))
            raise EngineError(f"training state does not match the trainable parameters: missing "
                              f"{missing[:5]}, unexpected {extra[:5]}; resume with the same model and LoRA "
                              "settings")
        for name, p, master in zip(optimizer.names, optimizer.model_params, optimizer.masters):
            entry = dict(saved[name])
            with torch.no_grad():
                if "master" in entry and master is not p:
                    master.copy_(shard_like(entry.pop("master"), master))
                    p.copy_(master)
            optimizer.state[master] = {k: v.clone() if k == "step" else shard_like(v, master)
                                       for k, v in entry.items() if k != "master"}
        for group, saved_group in zip(optimizer.param_groups, state["param_groups"]):
            group.update(saved_group)
        self._scaler.load_state_dict(state["scaler"])

    # ------------------------------------------------------------------ communication
    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
