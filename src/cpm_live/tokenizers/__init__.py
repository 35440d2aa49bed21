"""Tokenizers: the CPM-Bee tokenizer and vocab helpers."""

from cpm_live.tokenizers.bee import CPMBeeTokenizer, Token, build_tiny_vocab, check_vocab_fits, load_vocab

__all__ = ["CPMBeeTokenizer", "Token", "build_tiny_vocab", "check_vocab_fits", "load_vocab"]
