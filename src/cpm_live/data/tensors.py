"""The model-input contract: one typed batch whose field names are ``CPMBee``'s parameter names.

The packer (``training_tasks.bee``) and the prompt builder (``generation.prompt``) produce it;
training, evaluation, generation and export consume it with ``model(**inputs.forward_kwargs())`` or
``model.inference(**inputs.inference_kwargs())``. ``CPMBee.forward`` keeps its original 12
positional parameters for CPM-Bee users; ``tests/unit/data/test_tensors.py`` checks that the field names here
are exactly those parameters, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

# Label of a token that gets no loss (torch's ``cross_entropy`` default ``ignore_index``).
IGNORE_INDEX = -100

# Fields only one of the two entry points takes: training rows have a filled ``length`` and packed
# instances (``span``); incremental generation has explicit positions instead.
_FORWARD_ONLY = ("length", "span")
_INFERENCE_ONLY = ("position",)


@dataclass
class CPMBeeInputs:
    """Model inputs; all ``(B, L)`` int32 except as noted. ``context`` is bool (True = given)."""

    input: torch.Tensor  # base token ids
    input_sub: torch.Tensor  # subscripts, 0 = ordinary token
    context: torch.Tensor  # (B, L) bool
    sample_ids: torch.Tensor  # 0 main sample, i+1 in-context example i
    num_segments: torch.Tensor  # segment count of the token's sample (0 = padding in inference)
    segment: torch.Tensor  # segment id of the token
    segment_rel_offset: torch.Tensor  # offset of the sample's n*n block in segment_rel
    segment_rel: torch.Tensor  # (B, R) flattened segment-relation buckets
    ext_table_ids: torch.Tensor  # (X,) base id of each ext column of the logits
    ext_table_sub: torch.Tensor  # (X,) its subscript
    length: torch.Tensor | None = None  # (B,) filled length of each row; forward only
    span: torch.Tensor | None = None  # index of the packed instance; forward only
    position: torch.Tensor | None = None  # explicit positions; inference only

    def __post_init__(self) -> None:
        self.context = self.context.bool()  # the one place the 0/1 context flags become a mask

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> CPMBeeInputs:
        """Tensors from the fields named in ``arrays`` (numpy or torch); other keys are ignored."""
        return cls(**{f.name: torch.as_tensor(arrays[f.name]) for f in dataclasses.fields(cls)
                      if arrays.get(f.name) is not None})

    @classmethod
    def placeholder(cls) -> CPMBeeInputs:
        """A one-token training row (and one ext column): the stand-in batch of a rank without rows
        (under FSDP every rank must run the same forward/backward collectives) and the smallest
        input that runs ``forward``."""
        one = torch.zeros(1, 1, dtype=torch.int32)
        return cls(input=one, input_sub=one, context=one, sample_ids=one, num_segments=one, segment=one,
                   segment_rel_offset=one, segment_rel=one, ext_table_ids=torch.zeros(1, dtype=torch.int32),
                   ext_table_sub=torch.ones(1, dtype=torch.int32), length=torch.ones(1, dtype=torch.int32),
                   span=one)

    def to(self, device: torch.device | str) -> CPMBeeInputs:
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self._present().items()})

    def forward_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of ``CPMBee.forward``."""
        return self._select(exclude=_INFERENCE_ONLY)

    def inference_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of ``CPMBee.inference`` (without ``past_key_values``)."""
        return self._select(exclude=_FORWARD_ONLY)

    def _present(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def _select(self, exclude: tuple[str, ...]) -> dict[str, torch.Tensor]:
        names = [f.name for f in dataclasses.fields(self) if f.name not in exclude]
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"CPMBeeInputs lacks {missing}: forward needs length and span, "
                             "inference needs position")
        return {n: getattr(self, n) for n in names}


@dataclass
class LabelledInputs:
    """Training/evaluation batch: the model inputs and next-token targets ``(B, L)``
    (``IGNORE_INDEX`` = no loss; ext tokens are ``vocab_size + ext column``)."""

    inputs: CPMBeeInputs
    target: torch.Tensor

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> LabelledInputs:
        return cls(CPMBeeInputs.from_arrays(arrays), torch.as_tensor(arrays["target"]))

    @classmethod
    def placeholder(cls) -> LabelledInputs:
        """:meth:`CPMBeeInputs.placeholder` with no labelled token."""
        return cls(CPMBeeInputs.placeholder(), torch.full((1, 1), IGNORE_INDEX, dtype=torch.int32))

    def to(self, device: torch.device | str) -> LabelledInputs:
        return LabelledInputs(self.inputs.to(device), self.target.to(device))

    @property
    def num_labels(self) -> int:
        return int((self.target != IGNORE_INDEX).sum())
