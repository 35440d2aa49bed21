"""The model flags, declared once: what --int4/--int8 and an entry point's default quantization mean."""

import argparse

import pytest

from cpm_live.checkpoint.base_model import ModelArgs, add_model_args
from cpm_live.errors import ConfigError, CPMLiveError, MissingFileError, for_cli
from cpm_live.models import CPMBeeConfig


@pytest.fixture
def configs(tmp_path):
    plain = CPMBeeConfig(vocab_size=100, dim_model=32, num_heads=2, dim_head=16, dim_ff=64, num_layers=1)
    paths = {}
    for name, kind in (("plain", None), ("int8", "int8"), ("int4", "int4")):
        paths[name] = str(tmp_path / f"{name}.json")
        plain.with_quantization(kind).to_json_file(paths[name])
    return paths


@pytest.mark.parametrize("config, flags, default, expected", [
    ("plain", [], None, None),
    ("plain", [], "int4", "int4"),  # the QLoRA script on a config that chooses nothing
    ("int8", [], "int4", "int8"),  # ... and on one that asks for int8
    ("int4", ["--int8"], "int4", "int8"),  # a flag beats the config and the default
    ("int8", ["--int4"], None, "int4"),
])
def test_flags_config_then_entry_point_default_choose_the_quantization(configs, config, flags, default, expected):
    parser = add_model_args(argparse.ArgumentParser())
    args = ModelArgs.from_args(parser.parse_args(["--model-config", configs[config], *flags]), default)
    quantization = args.resolve_config().quantization
    assert (quantization.kind if quantization else None) == expected


def test_both_quantizations_are_refused_naming_the_flags():
    parser = add_model_args(argparse.ArgumentParser())
    with pytest.raises(ConfigError, match="`int4` and `int8`") as info:
        ModelArgs.from_args(parser.parse_args(["--int4", "--int8"]))
    assert for_cli(info.value, parser).startswith("--int4 and --int8")


def test_a_missing_path_names_its_setting_and_the_cli_shows_the_flag(tmp_path):
    parser = add_model_args(argparse.ArgumentParser(), adapter=True)
    args = ModelArgs.from_args(parser.parse_args(["--delta", str(tmp_path / "nowhere")]))
    with pytest.raises(MissingFileError, match="`delta`") as info:
        args.check_paths()
    assert isinstance(info.value, CPMLiveError) and isinstance(info.value, FileNotFoundError)
    assert for_cli(info.value, parser) == f"--delta {tmp_path / 'nowhere'} does not exist"


def test_every_command_with_a_model_declares_the_same_model_flags():
    from cpm_live.convert.export import build_parser as export_parser
    from cpm_live.generation.cli import build_parser as generation_parser
    from cpm_live.training.args import build_parser as training_parser

    def model_flags(parser: argparse.ArgumentParser) -> dict:
        group = next(g for g in parser._action_groups if g.title == "model")
        return {a.dest: (a.option_strings, a.help, a.default) for a in group._group_actions}

    training, generation, export = model_flags(training_parser()), model_flags(generation_parser()), \
        model_flags(export_parser())
    assert set(training) == {"model_config", "load", "vocab", "int4", "int8"}
    assert generation == export == {**training, "delta": (["--delta"], generation["delta"][1], None)}
