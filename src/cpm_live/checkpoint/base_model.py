"""The base model of a command: the model flags (declared once), the config they resolve to, its
vocab and the loaded weights.

``cpm-bee-finetune``, ``cpm-bee-generate`` and ``cpm-bee-export`` take the same flags with the same
meaning (:func:`add_model_args`), parsed once into :class:`ModelArgs`:

    --model-config  CPM-Bee JSON config (default: config.json of a --load model directory)
    --load          checkpoint: .pt/.bin/.safetensors (dense, int4 or int8), a qlora-PR .pt, or a
                    Hugging Face model directory
    --vocab         vocab file (default: vocab.txt beside or inside --load)
    --int4, --int8  the base quantization: sets the config's int4 or int8 and clears the other;
                    without either, the config's own fields stand, and when the config names none a
                    compressed --load gives its own (int4 with its recorded settings, or int8)
    --delta         a LoRA adapter loaded on top (generate, export)

An entry point may name a default quantization, used only when neither a flag, the config nor the
checkpoint chooses one: the QLoRA script's int4, so a config with ``"int8": true`` trains an int8 base there
too. :func:`load_config` and :func:`find_vocab` resolve the flags' paths and say so in the flags'
words; :class:`ModelArgs` names its settings (```load```), which a command shows as its flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from cpm_live.checkpoint.adapters import load_adapter
from cpm_live.checkpoint.hf_dir import ARCHITECTURE_FIELDS, CONFIG_FILE, config_values, read_config, warn
from cpm_live.checkpoint.load import build_model
from cpm_live.checkpoint.readers import CheckpointReader, open_checkpoint
from cpm_live.config import CPMBeeConfig
from cpm_live.errors import ConfigError, MissingFileError
from cpm_live.models import CPMBee
from cpm_live.tokenizers import CPMBeeTokenizer

QUANTIZATIONS = ("int4", "int8")


def add_model_args(parser: argparse.ArgumentParser, *, load_required: bool = False,
                   adapter: bool = False) -> argparse.ArgumentParser:
    """Add the model flags (see the module docstring); ``adapter`` adds ``--delta``."""
    group = parser.add_argument_group("model")
    group.add_argument("--model-config", default=None,
                       help="CPM-Bee JSON config (default: config.json of a --load model directory)")
    group.add_argument("--load", required=load_required, default=None,
                       help="checkpoint: .pt / .bin / .safetensors (dense, int4 or int8), a qlora-PR .pt, or a "
                            "Hugging Face model directory")
    group.add_argument("--vocab", default=None, help="vocab file (default: vocab.txt beside or inside --load)")
    group.add_argument("--int4", action="store_true",
                       help="4-bit base: sets the config's int4 (and clears int8); default: the config, else what a "
                            "compressed --load says it is")
    group.add_argument("--int8", action="store_true",
                       help="LLM.int8 base: sets the config's int8 (and clears int4); default: the config, else what a "
                            "compressed --load says it is")
    if adapter:
        group.add_argument("--delta", default=None, help="LoRA adapter: peft directory or CPM-Bee *-delta-best.pt")
    return parser


@dataclass(frozen=True)
class ModelArgs:
    """Which model a command runs on: the model flags, parsed once."""

    model_config: str | None = None
    load: str | None = None
    vocab: str | None = None
    int4: bool = False
    int8: bool = False
    delta: str | None = None
    # The quantization when neither a flag nor the config chooses one (the QLoRA entry point: int4).
    default_quantization: str | None = None

    def __post_init__(self) -> None:
        if self.int4 and self.int8:
            raise ConfigError("`int4` and `int8` were both given: choose one base quantization")
        if self.default_quantization not in (None, *QUANTIZATIONS):
            raise ConfigError(f"default_quantization must be int4, int8 or None, got {self.default_quantization!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace, default_quantization: str | None = None) -> ModelArgs:
        return cls(model_config=args.model_config, load=args.load, vocab=args.vocab, int4=bool(args.int4),
                   int8=bool(args.int8), delta=getattr(args, "delta", None),
                   default_quantization=default_quantization)

    def check_paths(self) -> None:
        """Refuse a named file that does not exist, before anything slow starts."""
        for name in ("model_config", "load", "delta"):
            path = getattr(self, name)
            if path is not None and not os.path.exists(path):
                raise MissingFileError(f"`{name}` {path} does not exist")

    def resolve_config(self) -> CPMBeeConfig:
        """The config these flags mean (:func:`load_config`), with the default quantization applied."""
        config = load_config(self.model_config, self.load, int4=self.int4, int8=self.int8)
        if config.quantization is None and self.load is not None and not (self.int4 or self.int8):
            with open_checkpoint(self.load) as reader:  # a compressed checkpoint says what it is
                config = stored_config(config, reader)
        if config.quantization is None and self.default_quantization and not (self.int4 or self.int8):
            config = config.with_quantization(self.default_quantization)
        return config

    def tokenizer(self) -> CPMBeeTokenizer:
        return CPMBeeTokenizer(find_vocab(self.vocab, self.load))


def stored_config(config: CPMBeeConfig, reader: CheckpointReader) -> CPMBeeConfig:
    """``config`` with the quantization of ``reader``'s checkpoint when the config names none, with the
    int4 settings the file records: a compressed checkpoint says what it is, so ``--int4``/``--int8``
    are optional for every command that loads one."""
    kind = reader.quant_kind
    if config.quantization is not None or kind is None:
        return config
    settings = reader.quant_settings
    recorded = {} if settings is None else {
        "int4_quant_type": settings.quant_type, "int4_blocksize": settings.blocksize,
        "int4_double_quant": settings.double_quant}
    return dataclasses.replace(config.with_quantization(kind), **recorded)


def load_base(args: ModelArgs, config: CPMBeeConfig | None = None, device: torch.device | str = "cpu") -> CPMBee:
    """The model of ``config`` (default: ``args.resolve_config()``) on ``device``, with the weights of
    ``--load`` (random, the original init, without it) and the adapter of ``--delta`` on top."""
    config = config or args.resolve_config()
    if args.load is None:
        with torch.device(device):
            model = CPMBee(config)
    else:
        model = build_model(config, args.load, device=device)
    if args.delta is not None:
        load_adapter(model, args.delta)
    return model


def _dir_file(load: str | os.PathLike | None, name: str) -> str | None:
    """``load/name`` when ``load`` is a directory holding that file, else None."""
    if load is None or not os.path.isdir(load):
        return None
    path = os.path.join(os.fspath(load), name)
    return path if os.path.isfile(path) else None


def load_config(model_config: str | os.PathLike | None, load: str | os.PathLike | None,
                int4: bool = False, int8: bool = False, **overrides: Any) -> CPMBeeConfig:
    """The model config of a run: ``--model-config`` if given, else ``config.json`` of the ``--load`` directory.

    ``int4=True`` / ``int8=True`` (the ``--int4`` / ``--int8`` flags) turn that base quantization on
    and the other off; without them the file's own ``int4``/``int8`` stand (both flags: an error).
    When both configs exist and describe different models, the explicit ``--model-config`` wins and a
    :class:`~cpm_live.checkpoint.hf_dir.CompatibilityWarning` names the fields that differ.
    """
    if int4 and int8:
        raise ConfigError("--int4 and --int8 were both given: choose one base quantization")
    if int4 or int8:
        overrides.update(int4=bool(int4), int8=bool(int8))
    beside = _dir_file(load, CONFIG_FILE)
    if model_config is None:
        if beside is None:
            where = f"--load {load} is not a model directory with {CONFIG_FILE}" if load else "no --load given"
            raise ConfigError(f"--model-config is required: {where} (pass a CPM-Bee JSON config, e.g. "
                              f"src/config/cpm-bee-10b.json, or --load a Hugging Face model directory)")
        return read_config(beside, **overrides)
    config = CPMBeeConfig.from_json_file(model_config, **overrides)
    if beside is not None:
        theirs = config_values(beside)
        differ = [f for f in ARCHITECTURE_FIELDS if f in theirs and theirs[f] != getattr(config, f)]
        if differ:
            warn(f"--model-config {model_config} and {beside} differ in {', '.join(differ)}; "
                 f"using --model-config {model_config}")
    return config


def vocab_beside(checkpoint: str | os.PathLike) -> str:
    """The ``vocab.txt`` that goes with ``checkpoint``: beside the file, or inside it if a folder."""
    ckpt = os.fspath(checkpoint)
    return os.path.join(ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt)), "vocab.txt")


def find_vocab(vocab: str | os.PathLike | None, checkpoint: str | os.PathLike | None) -> str:
    """The vocab to use: `vocab` if given, else `vocab.txt` beside `checkpoint` (inside it if a folder).

    An explicit `vocab` wins; if the checkpoint folder has a `vocab.txt` with other content, a
    warning says so.
    """
    if vocab is not None:
        path = os.fspath(vocab)
        if not os.path.isfile(path):
            raise MissingFileError(f"--vocab {path} does not exist")
        beside = os.path.join(os.fspath(checkpoint), "vocab.txt") if checkpoint and os.path.isdir(checkpoint) else None
        if beside and os.path.isfile(beside) and not filecmp.cmp(beside, path, shallow=False):
            warnings.warn(f"--vocab {path} differs from {beside}; using --vocab {path}", UserWarning, stacklevel=2)
        return path
    if checkpoint is not None:
        path = vocab_beside(checkpoint)
        if os.path.isfile(path):
            return path
        raise MissingFileError(
            f"no vocab: {path} does not exist; pass --vocab PATH (the CPM-Bee vocabs/bee.txt) "
            f"or copy the vocab beside the checkpoint {os.fspath(checkpoint)} as vocab.txt"
        )
    raise MissingFileError(
        "no vocab: pass --vocab PATH (the CPM-Bee vocabs/bee.txt) or a checkpoint with vocab.txt beside it"
    )
