"""LoRA settings, injection through peft, freezing, the trainable-parameter report and CLI options.

Order in a run (docs/architecture.md, Training): build model -> load base weights -> :func:`add_lora` (inject + freeze)
-> engine.wrap -> optimizer over the parameters that still require grad.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from cpm_live.errors import ConfigError
from cpm_live.layers.linear_factory import PROJECTION_TYPES, is_quantized
from cpm_live.lora.layers import CUSTOM_MODULES, LoraLinear

ADAPTER_NAME = "default"  # peft's adapter name; it never appears in saved keys


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; the defaults are CPM-Bee's delta tuning (OpenDelta ``LoraModel``)."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ("project_q", "project_v")  # module names, matched as peft does: by suffix

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoRA rank r must be a positive integer, got r={self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be positive, got alpha={self.alpha!r}")
        if float(self.alpha).is_integer():
            self.alpha = int(self.alpha)  # 16, not 16.0, in adapter_config.json (as peft writes it)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got dropout={self.dropout!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"LoRA targets must be non-empty module names, got targets={self.targets!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_peft_config(self) -> LoraConfig:
        """The peft ``LoraConfig`` with CPM-Bee's projection LoRA layers registered."""
        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=list(self.targets), bias="none", init_lora_weights=True)
        config._register_custom_module(CUSTOM_MODULES)
        return config

    @classmethod
    def from_peft_config(cls, config: LoraConfig) -> LoraSettings:
        targets = config.target_modules
        if isinstance(targets, str):
            raise ConfigError(
                f"adapter target_modules is the regex {targets!r}; only a list of module names is supported"
            )
        return cls(r=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                   targets=tuple(sorted(targets)))


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Module name -> LoRA layer, for every LoRA layer in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def matches_target(module_name: str, target: str) -> bool:
    """peft's rule for a list of target names: the whole module name or its last dotted components."""
    return module_name == target or module_name.endswith("." + target)


def _check_targets(model: nn.Module, targets: Iterable[str]) -> None:
    projections = {name: m for name, m in model.named_modules() if isinstance(m, PROJECTION_TYPES)}
    available = sorted({name.rsplit(".", 1)[-1] for name in projections})
    for target in targets:
        hits = [name for name, _ in model.named_modules() if name and matches_target(name, target)]
        if not hits:
            raise ConfigError(
                f"LoRA target {target!r} matches no module of {type(model).__name__}; "
                f"available projection names: {available}"
            )
        others = [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
                  if name in hits and name not in projections]
        if others:
            raise ConfigError(
                f"LoRA target {target!r} matches modules that are not Linear/Linear4bit/Linear8bit projections: "
                f"{others[:3]}; available projection names: {available}"
            )


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject LoRA layers (in place) via peft's custom-module registration and freeze the rest.

    Afterwards only the LoRA weights require grad; base weights and all 4-bit state are frozen.
    Returns ``model`` (peft also sets ``model.peft_config``).
    """
    if lora_layers(model):
        raise ValueError(
            f"{type(model).__name__} already has LoRA layers; add_lora must be called once per model "
            "(use load_adapter to load weights into them)"
        )
    _check_targets(model, settings.targets)
    inject_adapter_in_model(settings.to_peft_config(), model, adapter_name=ADAPTER_NAME)
    freeze_all_but_lora(model)
    return model


def freeze_all_but_lora(model: nn.Module) -> None:
    """Set ``requires_grad`` on exactly the LoRA layers' own adapter weights (the layers say which)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model).values():
        for p in layer.adapter_parameters():
            p.requires_grad_(True)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """peft-layout key (``...project_q.lora_A.weight``, no adapter name) -> the live parameter."""
    params = {}
    for name, layer in lora_layers(model).items():
        if ADAPTER_NAME in layer.lora_A:
            params[f"{name}.lora_A.weight"] = layer.lora_A[ADAPTER_NAME].weight
            params[f"{name}.lora_B.weight"] = layer.lora_B[ADAPTER_NAME].weight
    return params


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights in peft's key layout (what ``get_peft_model_state_dict`` gives for this model).

    Values are detached views of the live parameters: under FSDP2 they are shards, so a sharded
    model's adapter is saved from ``Engine.state_dict(model, trainable_only=True)`` instead.
    """
    return {key: p.detach() for key, p in lora_parameters(model).items()}


def trainable_parameter_report(model: nn.Module) -> str:
    """``"trainable params: N || all params: M || trainable%: P"``.

    A quantized projection counts as its logical ``dim_out * dim_in`` weights (a packed 4-bit uint8
    tensor stores two per byte); its quantization statistics (absmax, code tables, int8 ``SCB``) are
    bookkeeping, not weights, and are not counted. Sizes are global (a DTensor shard counts as the whole tensor).
    """
    skipped: set[int] = set()
    total = 0
    for module in model.modules():
        if is_quantized(module):
            total += module.dim_out * module.dim_in
            skipped.update(id(p) for p in module.parameters(recurse=False))
    trainable = 0
    for p in model.parameters():
        if id(p) in skipped:
            continue
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    percent = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"


def add_lora_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--use-delta`` (CPM-Bee's flag) and the LoRA options ``--lora-r/-alpha/-dropout/-targets``."""
    defaults = LoraSettings()
    group = parser.add_argument_group("LoRA (delta tuning)")
    group.add_argument("--use-delta", action="store_true", default=False,
                       help="train LoRA adapters only, base frozen (CPM-Bee's delta tuning)")
    group.add_argument("--lora-r", type=int, default=defaults.r, help="LoRA rank (default %(default)s)")
    group.add_argument("--lora-alpha", type=float, default=defaults.alpha,
                       help="LoRA alpha; the branch is scaled by alpha/r (default %(default)s)")
    group.add_argument("--lora-dropout", type=float, default=defaults.dropout,
                       help="dropout on the LoRA branch input (default %(default)s)")
    group.add_argument("--lora-targets", type=str, default=",".join(defaults.targets),
                       help="comma-separated projection names to adapt (default %(default)s); any of "
                            "project_q, project_k, project_v, attention_out, w_0, w_1, w_out")
    return parser


def lora_settings_from_args(args: argparse.Namespace) -> LoraSettings | None:
    """The settings given by :func:`add_lora_args` options, or ``None`` without ``--use-delta``."""
    if not args.use_delta:
        return None
    return LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                        targets=args.lora_targets)
