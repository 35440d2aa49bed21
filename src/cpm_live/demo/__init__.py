"""The CPU demo (:mod:`cpm_live.demo.pipeline`) and the format-trained stand-in base it starts from
(:mod:`cpm_live.demo.format_base`); ``python -m cpm_live.demo`` runs the demo."""

from cpm_live.demo.format_base import train_base
from cpm_live.demo.pipeline import DEMO_WORDS, demo_data_file, format_report, main, run_demo, tiny_config

__all__ = ["DEMO_WORDS", "demo_data_file", "format_report", "main", "run_demo", "tiny_config", "train_base"]
