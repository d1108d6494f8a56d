"""GPT-2 in plain PyTorch: config, presets and the model (no Lightning, no Hydra).

Attribute names follow "Build a Large Language Model (From Scratch)": ``tok_emb``,
``pos_emb``, ``trf_blocks``, ``final_norm``, ``out_head``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpt_classifier.model.attention import CausalSelfAttention, few_rows
from gpt_classifier.model.config import GPTConfig, preset_config
from gpt_classifier.model.weights import WeightLoadError, read_pretrained


class FeedForward(nn.Module):
    """The MLP of a block: expand 4x, GELU (tanh approximation, as GPT-2), project back."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(norm1(x)), then x + ff(norm2(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.att = CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.ff = FeedForward(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); with ``positions`` (B,), the output there only: (B, D).

        The pooled form equals ``block(x)[rows, positions]``. It runs the query, the output
        projection and the MLP at the positions only and folds the keys and values into
        the query, unless a key or value layer is hooked or has adapter dropout: those
        must see every token, so the full block runs.
        """
        if positions is None or not self.att.foldable():
            x = x + self.att(self.norm1(x))
            x = x + self.ff(self.norm2(x))
            return x if positions is None else x[torch.arange(len(x), device=x.device), positions]
        b, t = x.shape[:2]
        if self.att.causal:
            visible = torch.arange(t, device=x.device)[None, :] <= positions[:, None]  # (B, T)
        else:  # every position sees the whole row
            visible = torch.ones(b, t, dtype=torch.bool, device=x.device)
        h = x[torch.arange(b, device=x.device), positions]  # (B, D)
        h = h + self.att.attend_from(self.norm1(x), positions, visible)
        with few_rows(h):
            return h + self.ff(self.norm2(h).to(self.ff.fc.weight.dtype))


class GPT(nn.Module):
    """GPT-2: embeddings, transformer blocks, final LayerNorm and an output layer.

    ``model(input_ids)`` returns logits of shape (batch, tokens, out_features). The
    output layer starts vocabulary-sized and tied to ``tok_emb``; replace it with
    ``model.out_head = nn.Linear(emb_dim, num_classes)`` to make a classifier.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.out_head.weight = self.tok_emb.weight  # tied, as in GPT-2
        if self.tok_emb.weight.device.type != "meta":
            self.init_weights()

    def init_weights(self) -> None:
        """GPT-2's random initialisation."""
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith(("att.out_proj.weight", "ff.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPT:
        """A randomly initialised model of a named preset (e.g. ``gpt2-small``)."""
        # Allocate once and initialise once: building on the meta device skips the
        # default initialisation that init_weights() would overwrite anyway.
        with torch.device("meta"):
            model = cls(preset_config(name, **overrides))
        model.to_empty(device="cpu")
        model.out_head.weight = model.tok_emb.weight  # to_empty unties shared parameters
        model.init_weights()
        return model

    @classmethod
    def from_state_dict(cls, cfg: GPTConfig, state: dict[str, torch.Tensor]) -> GPT:
        """A model whose parameters are the tensors of ``state`` (book names), not copies:
        no memory is allocated or initialised for them. Missing tensors stay on meta."""
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(state, strict=False, assign=True)
        model.out_head.weight = model.tok_emb.weight  # re-tie after assign replaced tok_emb
        return model

    @classmethod
    def from_pretrained(cls, source: str | Path, **overrides: Any) -> GPT:
        """A model with pretrained weights from a Hub name or a local folder (see
        :func:`gpt_classifier.model.weights.read_pretrained` for the accepted sources);
        ``overrides`` set non-architectural fields such as ``drop_rate``."""
        weights = read_pretrained(source, **overrides)
        state = {k: v.to(torch.float32).contiguous() for k, v in weights.state.items()}
        model = cls.from_state_dict(weights.cfg, state)
        leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if leftover:  # read_pretrained checked every tensor; never hand out meta tensors
            raise WeightLoadError(f"{weights.origin}: tensors {leftover} were not loaded")
        if weights.head is not None:  # a classifier's score layer starts our head
            model.pretrained_head = weights.head.to(torch.float32)
        return model

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token plus position embeddings: (B, T) ids -> (B, T, D)."""
        t = input_ids.shape[1]
        if t > self.cfg.context_length:
            raise ValueError(
                f"sequence of {t} tokens is longer than the model's context length "
                f"{self.cfg.context_length}; truncate the input first."
            )
        pos = torch.arange(t, device=input_ids.device)
        return self.drop_emb(self.tok_emb(input_ids) + self.pos_emb(pos))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)  # (B, T, D)
        for block in self.trf_blocks:
            x = block(x)
        return self.out_head(self.final_norm(x))  # (B, T, out_features)
