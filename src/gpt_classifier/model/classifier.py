"""``SequenceClassifier``: GPT-2 with a ``num_classes`` output layer, read at a pooled position.

Plain PyTorch (no Lightning, no Hydra): training, inference and export all drive it
through ``forward``, so wrappers that hook modules (LoRA, FSDP, activation
checkpointing) see every step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gpt_classifier.model.config import GPTConfig
from gpt_classifier.model.gpt import GPT
from gpt_classifier.model.pooling import pooling_rule


class CachedPrefix(NamedTuple):
    """Hidden states after the first ``depth`` blocks (B, T, D), computed earlier."""

    hidden: torch.Tensor
    depth: int


class SequenceClassifier(nn.Module):
    """The book's classifier: GPT-2 whose ``out_head`` maps to ``num_classes`` logits.

    ``pooling`` names the rule in :mod:`~gpt_classifier.model.pooling` that picks the
    outputs that classify a sequence; the default, ``last_token``, reads each
    sequence's last real token, so a prediction never depends on padding.
    """

    def __init__(
        self,
        backbone: GPT,
        num_classes: int = 2,
        pooling: str = "last_token",
        head_seed: int | None = 123,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"classifier.num_classes={num_classes}; a classifier needs >= 2")
        self.pool = pooling_rule(pooling)
        self.pooling = pooling
        self.num_classes = num_classes
        self.backbone = backbone
        # Training may trade compute for memory: each block's activations are recomputed
        # in the backward pass instead of kept (model.activation_checkpointing).
        self.activation_checkpointing = False
        device = backbone.tok_emb.weight.device
        # The book seeds the head's initialisation; fork so the global RNG is untouched.
        with torch.random.fork_rng(devices=[], enabled=head_seed is not None):
            if head_seed is not None:
                torch.manual_seed(head_seed)
            backbone.out_head = nn.Linear(backbone.cfg.emb_dim, num_classes, device=device)
        head = getattr(backbone, "pretrained_head", None)
        if head is not None:  # weights of a fine-tuned GPT2ForSequenceClassification
            if head.shape != backbone.out_head.weight.shape:
                raise ValueError(
                    f"the pretrained weights are a classifier with {head.shape[0]} classes "
                    f"(its score layer), but classifier.num_classes={num_classes}: set "
                    f"classifier.num_classes={head.shape[0]} (and data.labels to match)"
                )
            with torch.no_grad():
                backbone.out_head.weight.copy_(head)
                backbone.out_head.bias.zero_()  # GPT-2's score layer has no bias

    @property
    def cfg(self) -> GPTConfig:
        return self.backbone.cfg

    @property
    def head(self) -> nn.Linear:
        """The classification layer (the backbone's ``out_head``)."""
        return self.backbone.out_head

    def forward(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor | None = None,
        prefix: CachedPrefix | None = None,
        hidden_after: int | None = None,
    ) -> torch.Tensor:
        """Class logits (B, num_classes) of right-padded token ids (B, T).

        ``lengths`` (B,) counts each sequence's real tokens (default: no padding).
        ``prefix`` starts from hidden states computed earlier instead of running the
        first ``prefix.depth`` blocks. ``hidden_after=k`` returns the hidden states
        after the first ``k`` blocks (B, T, D) instead of logits: what a prefix holds.
        """
        gpt = self.backbone
        b, t = input_ids.shape
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=input_ids.device)
        x, start = (gpt.embed(input_ids), 0) if prefix is None else prefix
        blocks = gpt.trf_blocks
        if hidden_after is not None:
            for block in blocks[start:hidden_after]:
                x = block(x)
            return x
        selection = self.pool(lengths, t)
        last = len(blocks) - 1
        for block in blocks[start:last]:
            x = self._run(block, x)  # (B, T, D)
        if not selection.is_floating_point():  # one position per sequence
            if start <= last:
                h = self._run(blocks[last], x, positions=selection)  # those positions only
            else:
                h = x[torch.arange(b, device=x.device), selection]
            return gpt.out_head(gpt.final_norm(h))  # (B, num_classes)
        if start <= last:
            x = self._run(blocks[last], x)
        # Averaging before the (linear) head equals averaging the positions' logits.
        h = torch.einsum("bt,btd->bd", selection.to(x.dtype), gpt.final_norm(x))
        return gpt.out_head(h)

    def _run(self, block: nn.Module, x: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        """``block(x)``, through activation checkpointing when it is on and a backward
        pass will follow."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False, **kwargs)
        return block(x, **kwargs)
