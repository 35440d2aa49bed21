"""CPM-Bee model configuration.

Field names and defaults are the original CPM-Bee ones, so the released JSON configs load
unchanged. The ``int4``/``int4_*`` and ``int8``/``int8_threshold`` fields, and ``precision``, are this project's
additions; :attr:`CPMBeeConfig.quantization` turns them into one typed setting
(:class:`Int4Quantization`, :class:`Int8Quantization` or ``None``), which the linear factory, the
quantizer, the loader, LoRA and export read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from cpm_live.errors import ConfigError
from cpm_live.utils import read_json_file

# The fields of CPM-Bee's own CPMBeeConfig (main 95cc575): its constructor accepts exactly these.
ORIGINAL_FIELDS = ("vocab_size", "dim_model", "num_heads", "dim_head", "dim_ff", "num_layers", "dropout_p",
                   "position_bias_num_buckets", "position_bias_num_segment_buckets", "position_bias_max_distance",
                   "eps", "half", "mask_modules")
_COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"
# Model dtype names: ``precision`` accepts any key, stores the value.
_PRECISIONS = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16", "half": "fp16",
               "bf16": "bf16", "bfloat16": "bf16"}
_PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_QUANT_TYPES = ("nf4", "fp4")


_FIELD_TYPES = {
    "vocab_size": int, "dim_model": int, "num_heads": int, "dim_head": int, "dim_ff": int, "num_layers": int,
    "dropout_p": (int, float), "position_bias_num_buckets": int, "position_bias_num_segment_buckets": int,
    "position_bias_max_distance": int, "eps": (int, float), "half": bool, "int4": bool,
    "int4_quant_type": str, "int4_double_quant": bool, "int4_blocksize": int, "int4_compute_dtype": str,
    "int8": bool, "int8_threshold": (int, float),
}


def native_bf16(device: torch.device | str, cuda_capability: tuple[int, int] | None = None,
                cpu_bf16: bool | None = None) -> bool:
    """Whether ``device`` computes bf16 matmuls natively: CUDA sm80+ (Ampere on), or a CPU whose
    oneDNN has bf16 kernels (avx512_bf16 or AMX). The hardware facts default to this machine's."""
    device = torch.device(device)
    if device.type == "cuda":
        if cuda_capability is None:
            cuda_capability = torch.cuda.get_device_capability(device)
        return tuple(cuda_capability) >= (8, 0)
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) if cpu_bf16 is None else cpu_bf16
    return False


def resolve_compute_dtype(setting: str, model_dtype: torch.dtype, device: torch.device | str,
                          cuda_capability: tuple[int, int] | None = None, cpu_bf16: bool | None = None) -> str:
    """The compute dtype name a quantized layer uses for ``setting`` (a dtype name or ``"auto"``).

    ``auto``: ``bfloat16`` where the device computes it natively (fp32 GEMMs on a bf16 CPU are ~5x
    slower, and fp16 QLoRA is unstable on GPUs); otherwise the model dtype on CUDA and ``float32`` on
    CPU (emulated bf16/fp16 CPU matmuls are slower than fp32). Any other setting is returned as is.
    """
    setting = setting.removeprefix("torch.")
    if setting != AUTO:
        return setting
    device = torch.device(device)
    if native_bf16(device, cuda_capability, cpu_bf16):
        return "bfloat16"
    if device.type == "cuda":
        return {v: k for k, v in _COMPUTE_DTYPES.items()}[model_dtype]
    return "float32"


@dataclass(frozen=True)
class Int4Quantization:
    """Frozen 4-bit (NF4/FP4) base projections in bitsandbytes' blockwise format."""

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: torch.dtype = torch.float32  # dtype of the matmul

    kind = "int4"


@dataclass(frozen=True)
class Int8Quantization:
    """Frozen LLM.int8 base projections: int8 rows with fp32 absmax scales (bitsandbytes' ``SCB``).

    ``threshold``: input features with any ``|x| >= threshold`` take the fp16 path (outlier
    decomposition); 0 turns it off. ``compute_dtype`` is fixed to fp16: bitsandbytes' int8 kernels
    quantize fp16 inputs.
    """

    threshold: float = 6.0
    compute_dtype: torch.dtype = torch.float16

    kind = "int8"


Quantization = Int4Quantization | Int8Quantization


# Largest value of each size field: far above any real model (CPM-Bee 10B: 86,583 tokens, d 4096, ff
# 10240, 48 layers), low enough that a hostile config cannot make a model (built on the meta device
# first) or a loop over layers run for minutes.
SIZE_LIMITS = {"vocab_size": 1 << 24, "dim_model": 1 << 17, "num_heads": 1 << 12, "dim_head": 1 << 12,
               "dim_ff": 1 << 19, "num_layers": 1 << 12, "position_bias_num_buckets": 1 << 16,
               "position_bias_num_segment_buckets": 1 << 16, "position_bias_max_distance": 1 << 24}


def check_size(name: str, value: int, where: str = "", key: str | None = None) -> None:
    """Refuse a size field ``name`` (spelled ``key`` in the file) outside ``1..SIZE_LIMITS[name]``."""
    if not 1 <= value <= SIZE_LIMITS[name]:
        raise ConfigError(f"config key {key or name!r}{where} must be in 1..{SIZE_LIMITS[name]}, got {value}")


@dataclass
class CPMBeeConfig:
    vocab_size: int = 30720
    dim_model: int = 4096
    num_heads: int = 64
    dim_head: int = 64
    dim_ff: int = 10240
    num_layers: int = 32
    dropout_p: float = 0.0
    position_bias_num_buckets: int = 256
    position_bias_num_segment_buckets: int = 256
    position_bias_max_distance: int = 2048
    eps: float = 1e-6
    half: bool = True  # True: fp16 weights and activations; False: fp32 (``precision``, when set, wins)
    # One (mask_att, mask_ffn) pair per layer; a masked sub-block is not built (compressed models).
    mask_modules: list[list[bool]] | None = None
    int4: bool = False  # base projections become frozen 4-bit Linear4bit layers
    int4_quant_type: str = "nf4"
    int4_double_quant: bool = True
    int4_blocksize: int = 64
    # "auto": bf16 where the device computes it natively, else the model dtype (CUDA) or fp32 (CPU);
    # see resolve_compute_dtype. The training loop records what "auto" chose.
    int4_compute_dtype: str = AUTO
    # Model dtype "fp32" / "fp16" / "bf16" (None: from ``half``, as the original). bf16 has no
    # original spelling: ``to_original_dict`` writes ``half: false`` for it.
    precision: str | None = None
    int8: bool = False  # base projections become frozen LLM.int8 Linear8bit layers
    int8_threshold: float = 6.0  # LLM.int8 outlier threshold; 0 = no outlier decomposition
    # Where this config came from, for error messages; not serialised.
    source: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f" in {self.source}" if self.source else ""
        self._check_types(where)
        if self.dim_model % 2:
            raise ConfigError(f"dim_model must be even for the rotary embedding, got {self.dim_model}{where}")
        if self.mask_modules is not None:
            if len(self.mask_modules) != self.num_layers:
                raise ConfigError(
                    f"mask_modules has {len(self.mask_modules)} entries but num_layers is "
                    f"{self.num_layers}{where}: give one [mask_att, mask_ffn] pair per layer"
                )
            self.mask_modules = [[bool(a), bool(f)] for a, f in self.mask_modules]
        if self.int4 and self.int8:
            raise ConfigError(f'"int4" and "int8" are both true{where}: choose one base quantization '
                              f'(set the other to false, or drop --int4/--int8)')
        if not 0 <= self.int8_threshold < float("inf"):
            raise ConfigError(f"int8_threshold must be a finite number >= 0 (0: no outlier decomposition), "
                              f"got {self.int8_threshold!r}{where}")
        self.int8_threshold = float(self.int8_threshold)
        if self.int4_quant_type not in _QUANT_TYPES:
            raise ConfigError(
                f"int4_quant_type must be one of {_QUANT_TYPES}, got {self.int4_quant_type!r}{where}"
            )
        if self.int4_compute_dtype.removeprefix("torch.") not in (*_COMPUTE_DTYPES, AUTO):
            raise ConfigError(
                f"int4_compute_dtype must be one of {[AUTO, *sorted(_COMPUTE_DTYPES)]}, "
                f"got {self.int4_compute_dtype!r}{where}"
            )
        if self.precision is not None:
            if not isinstance(self.precision, str) or self.precision not in _PRECISIONS:
                raise ConfigError(f"precision must be one of {sorted(set(_PRECISIONS.values()))} (or null: "
                                  f"from \"half\"), got {self.precision!r}{where}")
            self.precision = _PRECISIONS[self.precision]
            self.half = self.precision == "fp16"  # so the original fields tell CPM-Bee the nearest dtype
        self.int4_compute_dtype = self.int4_compute_dtype.removeprefix("torch.")
        if self.int4_blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ConfigError(f"int4_blocksize must be a power of two in 32..4096, got {self.int4_blocksize}")

    def _check_types(self, where: str) -> None:
        """JSON types as the original configs use them: a string "false" is not a boolean (it is
        truthy), "128" is not a size. Sizes are positive, eps positive, dropout in [0, 1)."""
        for name, wanted in _FIELD_TYPES.items():
            value = getattr(self, name)
            ok = (isinstance(value, bool) if wanted is bool else
                  isinstance(value, wanted) and not isinstance(value, bool))
            if not ok:
                example = {bool: "true or false", int: "an integer", str: "a string"}.get(wanted, "a number")
                raise ConfigError(f"config key {name!r}{where} must be {example} (JSON, unquoted where not a "
                                  f"string), got {value!r}")
        for name in SIZE_LIMITS:
            check_size(name, getattr(self, name), where)
        if not 0 < self.eps < 1:
            raise ConfigError(f"config key 'eps'{where} must be a small positive number (e.g. 1e-6), got {self.eps}")
        if not 0 <= self.dropout_p < 1:
            raise ConfigError(f"config key 'dropout_p'{where} must be in [0, 1), got {self.dropout_p}")
        masks = self.mask_modules
        if masks is not None and not (isinstance(masks, (list, tuple)) and all(
                isinstance(m, (list, tuple)) and len(m) == 2 and all(b in (0, 1) and not isinstance(b, str)
                                                                     for b in m) for m in masks)):
            raise ConfigError(f"config key 'mask_modules'{where} must be a list of [mask_att, mask_ffn] "
                              f"pairs of true/false, got {str(masks)[:200]}")

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of weights and activations: ``precision``, else from ``half`` as the original."""
        if self.precision is not None:
            return _PRECISION_DTYPES[self.precision]
        return torch.half if self.half else torch.float

    def with_dtype(self, dtype: torch.dtype) -> CPMBeeConfig:
        """A copy whose model dtype is ``dtype`` (fp32, fp16 or bf16); the int4 settings are kept."""
        names = {v: k for k, v in _PRECISION_DTYPES.items()}
        if dtype not in names:
            raise ConfigError(f"model dtype must be one of {list(_PRECISION_DTYPES.values())}, got {dtype}")
        return dataclasses.replace(self, precision=names[dtype])

    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype the 4-bit matmul runs in; ``auto`` is resolved for the current default device
        (the training loop resolves it once, for its device, with :meth:`resolve_compute_dtype`)."""
        name = self.int4_compute_dtype
        if name == AUTO:
            name = resolve_compute_dtype(name, self.dtype, torch.get_default_device())
        return _COMPUTE_DTYPES[name]

    def resolve_compute_dtype(self, device: torch.device | str) -> CPMBeeConfig:
        """A copy with ``int4_compute_dtype`` chosen for ``device`` if it was ``auto`` (else unchanged)."""
        return dataclasses.replace(
            self, int4_compute_dtype=resolve_compute_dtype(self.int4_compute_dtype, self.dtype, device))

    @property
    def quantization(self) -> Quantization | None:
        """The one quantization setting of the base projections (``None``: dense)."""
        if self.int4:
            return Int4Quantization(self.int4_quant_type, self.int4_double_quant, self.int4_blocksize,
                                    self.compute_dtype)
        if self.int8:
            return Int8Quantization(self.int8_threshold)
        return None

    def with_quantization(self, kind: str | None) -> CPMBeeConfig:
        """A copy with the base quantization switched to ``kind`` (``"int4"``, ``"int8"`` or ``None``)."""
        if kind not in (None, "int4", "int8"):
            raise ConfigError(f"quantization kind must be int4, int8 or None, got {kind!r}")
        return dataclasses.replace(self, int4=kind == "int4", int8=kind == "int8")

    @property
    def quant_settings(self) -> dict[str, Any]:
        """The int4 settings that a compressed checkpoint must agree with."""
        return {
            "quant_type": self.int4_quant_type,
            "double_quant": self.int4_double_quant,
            "blocksize": self.int4_blocksize,
        }

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> CPMBeeConfig:
        """Read a CPM-Bee JSON config; keyword arguments override its values."""
        path = os.fspath(path)
        try:
            values = read_json_file(path)
        except FileNotFoundError:
            raise ConfigError(f"model config not found: {path}") from None
        except ValueError as e:
            raise ConfigError(f"model config {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"model config {path} must hold a JSON object, got {type(values).__name__}")
        values.update(overrides)
        return cls.from_dict(values, source=path)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str | None = None) -> CPMBeeConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"source"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {unknown} in {source or 'config'}; known keys: {sorted(known)}"
            )
        return cls(**values, source=source)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values.pop("source")
        return values

    def to_original_dict(self) -> dict[str, Any]:
        """Only the fields CPM-Bee's ``CPMBeeConfig`` accepts (no int4 settings)."""
        values = self.to_dict()
        return {name: values[name] for name in ORIGINAL_FIELDS}

    def to_json_string(self, original: bool = False) -> str:
        values = self.to_original_dict() if original else self.to_dict()
        return json.dumps(values, indent=2, ensure_ascii=False) + "\n"

    def to_json_file(self, path: str | os.PathLike, original: bool = False) -> None:
        """Write the config as JSON (atomically: temp file, then rename); ``original``: only the fields
        CPM-Bee's ``CPMBeeConfig.from_json_file`` reads."""
        from cpm_live.utils import atomic_write_text

        atomic_write_text(path, self.to_json_string(original))
