"""Generation for CPM-Bee: beam search (as the original), sampling and greedy decoding; `<ans>` parsing."""

from .beam_search import BeamHypotheses, beam_search
from .bee import CPMBeeBeamSearch, CPMBeeGeneration, CPMBeeGreedy, CPMBeeSampling
from .decoding import Cursor, Decoder
from .prompt import Prompt, PromptBatch, build_batch, build_prompt, fill_answers, put_placeholders
from .sampling import TopKTopPSampler, greedy_choice, sample, top_k_top_p_filtering
from .stats import GenerationStats

__all__ = [
    "BeamHypotheses",
    "CPMBeeBeamSearch",
    "CPMBeeGeneration",
    "CPMBeeGreedy",
    "CPMBeeSampling",
    "Cursor",
    "Decoder",
    "GenerationStats",
    "Prompt",
    "PromptBatch",
    "TopKTopPSampler",
    "beam_search",
    "build_batch",
    "build_prompt",
    "fill_answers",
    "greedy_choice",
    "put_placeholders",
    "sample",
    "top_k_top_p_filtering",
]
