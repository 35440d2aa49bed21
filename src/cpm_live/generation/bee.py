"""CPM-Bee generation front ends: beam search (the original), top-k/top-p sampling and greedy decoding.

All three share prompt building, the decoding step and the parse-back; they differ only in how a
token is chosen. They call nothing but ``model.inference``, so a dense, int4 or int4 + LoRA
`CPMBee` works the same, on the device its parameters are on::

    generator = CPMBeeBeamSearch(model, tokenizer)
    generator.generate([{"input": "...", "prompt": "中翻英", "<ans>": ""}], beam_size=3)
    # -> [{"input": "...", "prompt": "中翻英", "<ans>": "<generated text>"}]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cpm_live.generation.beam_search import beam_search
from cpm_live.generation.decoding import Decoder, model_device
from cpm_live.generation.prompt import AnswerToken, PromptBatch, build_batch, build_prompt, fill_answers
from cpm_live.generation.sampling import TopKTopPSampler, greedy_choice, sample
from cpm_live.tokenizers import CPMBeeTokenizer


class CPMBeeGeneration:
    """Base: ``data_list`` (CPM-Bee JSON samples) -> prompts -> decode -> answers in ``"<ans>"``.

    As in the original, the samples' ``"<ans>"`` values are replaced in place (every leaf becomes
    the generated text, or None if that answer was never reached) and the same list is returned.
    The model is put in eval mode.
    """

    def __init__(self, model: nn.Module, tokenizer: CPMBeeTokenizer):
        vocab_size = model.config.vocab_size
        if vocab_size != tokenizer.vocab_size:
            # Ext columns start at the tokenizer's vocab size; a mismatch would shift every one.
            raise ValueError(
                f"model vocab_size {vocab_size} != tokenizer vocab size {tokenizer.vocab_size} "
                f"({tokenizer.vocab_file}); use the vocab the model was trained with"
            )
        model.eval()
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def _generate(self, data_list: list[dict[str, Any]],
                  decode: Callable[[PromptBatch], list[list[AnswerToken]]]) -> list[dict[str, Any]]:
        if not data_list:
            return data_list
        prompts = [build_prompt(self.tokenizer, data) for data in data_list]
        batch = build_batch(self.tokenizer, prompts, self.device)
        with torch.inference_mode():
            results = decode(batch)
        for data, prompt, table, tokens in zip(data_list, prompts, batch.decode_tables, results):
            fill_answers(self.tokenizer, data, prompt, table, tokens)
        return data_list

    def _decoder(self, batch: PromptBatch, repetition_penalty: float,
                 repetition_window: int | None) -> Decoder:
        return Decoder(self.model, self.tokenizer, batch, repetition_penalty, repetition_window)


class CPMBeeBeamSearch(CPMBeeGeneration):
    def generate(self, data_list: list[dict[str, Any]], beam_size: int = 3, max_length: int = 100,
                 repetition_penalty: float = 1.0, repetition_window: int | None = None,
                 ) -> list[dict[str, Any]]:
        """Beam search as the original ``CPMBeeBeamSearch.generate``.

        ``max_length`` tokens per answer plus eos; ``repetition_penalty`` >= 1 (1 = off) over the
        tokens generated so far, or the last ``repetition_window`` of them.
        """
        return self._generate(data_list, lambda batch: beam_search(
            self._decoder(batch, repetition_penalty, repetition_window), beam_size, max_length))


class CPMBeeSampling(CPMBeeGeneration):
    """Top-k / top-p sampling. With a ``seed`` the sampler owns its random stream: the same seed,
    model, inputs and batching give the same answers, and successive ``generate`` calls continue
    the stream instead of repeating it."""

    def __init__(self, model: nn.Module, tokenizer: CPMBeeTokenizer, seed: int | None = None):
        super().__init__(model, tokenizer)
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def generate(self, data_list: list[dict[str, Any]], max_length: int = 100, top_k: int = 0,
                 top_p: float = 0.9, temperature: float = 0.9, repetition_penalty: float = 1.0,
                 repetition_window: int | None = None) -> list[dict[str, Any]]:
        """Sample at ``temperature`` from the ``top_k`` (0: all) tokens within cumulative probability
        ``top_p`` (0: off); defaults are CPM-Ant's."""
        sampler = TopKTopPSampler(top_k, top_p, temperature, self.generator)
        return self._generate(data_list, lambda batch: sample(
            self._decoder(batch, repetition_penalty, repetition_window), sampler, max_length))


class CPMBeeGreedy(CPMBeeGeneration):
    def generate(self, data_list: list[dict[str, Any]], max_length: int = 100,
                 repetition_penalty: float = 1.0, repetition_window: int | None = None,
                 ) -> list[dict[str, Any]]:
        """Argmax decoding; gives the same answers as beam search with ``beam_size=1``."""
        return self._generate(data_list, lambda batch: sample(
            self._decoder(batch, repetition_penalty, repetition_window), greedy_choice, max_length))
