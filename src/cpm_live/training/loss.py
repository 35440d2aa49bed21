"""The training loss: what one micro-batch contributes to a step."""

from __future__ import annotations

import torch
from torch import nn

from cpm_live.data.tensors import LabelledInputs


def token_loss_sum(model: nn.Module, batch: LabelledInputs) -> torch.Tensor:
    """Summed cross entropy (fp32) over the batch's labelled tokens.

    The model computes it inside its forward from the final hidden states (``CPMBee.forward(...,
    targets=...)``), so the labelled positions' logits never exist at once and an engine that
    shards the embedding (FSDP2) still gathers it around its own forward. The caller divides by the
    step's token count.
    """
    loss, _ = model(**batch.inputs.forward_kwargs(), targets=batch.target)
    return loss
