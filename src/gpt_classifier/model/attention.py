"""GPT-2's attention: the full-sequence path, and the pooled path that computes one query
per sequence with the key and value layers folded into it."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from gpt_classifier.model.config import GPTConfig
from gpt_classifier.model.lora import LoRALinear


def few_rows(x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """Autocast off, on a CPU, for products of one row per sequence (``x``'s device).

    Their time goes into reading the weights, so reduced precision only adds the casts of
    the weights and their gradients. Inputs must be brought to the weights' dtype inside.
    """
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.autocast("cpu", enabled=False)
    return contextlib.nullcontext()


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with the book's separate query, key and value layers.

    Every projection is an ``nn.Linear`` called as a module, so wrappers around them
    (LoRA adapters, hooks) see all the work. One exception, where nothing can tell: on
    the pooled path, key and value layers that no hook watches (plain, or LoRA without
    dropout) are folded into the one query per sequence (see ``_attend_folded``).
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.emb_dim // cfg.n_heads
        self.W_query = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.W_key = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.W_value = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.drop_rate = cfg.drop_rate
        self.resid_drop = nn.Dropout(cfg.drop_rate)
        self.causal = cfg.causal_mask

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        b, t, d = x.shape
        y = F.scaled_dot_product_attention(
            self._heads(self.W_query(x)),
            self._heads(self.W_key(x)),
            self._heads(self.W_value(x)),
            dropout_p=self.drop_rate if self.training else 0.0,
            is_causal=self.causal,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.resid_drop(self.out_proj(y))

    def attend_from(
        self, x: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        """The attention output at one position per sequence, keys and values folded into
        its query (see ``_attend_folded``); only where ``foldable()``.

        x (B, T, D), positions (B,), visible (B, T): what each position sees -> (B, D).
        """
        with few_rows(x):
            rows = x[torch.arange(x.shape[0], device=x.device), positions]
            q = self.W_query(rows.to(self.W_query.weight.dtype))  # (B, D)
        return self._project(self._attend_folded(q, x, visible))

    def _project(self, y: torch.Tensor) -> torch.Tensor:
        """The output projection of one row per sequence (B, D)."""
        with few_rows(y):
            return self.resid_drop(self.out_proj(y.to(self.out_proj.weight.dtype)))

    def foldable(self) -> bool:
        """Whether the key and value layers are linear maps (plain, or LoRA-adapted
        without dropout) that no hook watches, so that skipping their calls changes
        nothing anyone can observe."""
        # Hooks registered for every module (torch.nn.modules.module.register_module_*).
        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return False
        return all(
            _is_linear_map(layer)
            and not any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules())
            for layer in (self.W_key, self.W_value)
        )

    def _attend_folded(
        self, q: torch.Tensor, x: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        """Attention of one query per sequence without projecting every token.

        With one query ``q`` per head, its score for token ``x`` is
        ``q . (W_k x + b_k) = (W_k^T q) . x + q . b_k``, and the mixed values are
        ``sum_t a_t (W_v x_t + b_v) = W_v (sum_t a_t x_t) + b_v sum_t a_t``: products with
        the (nh, hs, D) weights once per sequence instead of once per token. The same
        numbers up to rounding; in float32 with autocast off, since these products are
        small and reduced precision would only lose digits.
        q (B, D) and x (B, T, D) -> (B, D).
        """
        b, t, d = x.shape
        nh, hs = self.n_heads, self.head_dim
        # Batched products head by head (bmm) rather than einsum, whose layouts are
        # slower on a CPU.
        with torch.autocast(x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)
            x = x.to(dtype)
            qh = q.to(dtype).view(b, nh, hs).transpose(0, 1)  # (nh, B, hs)
            w_key = _fold_weight(self.W_key).to(dtype).view(nh, hs, d)
            w_value = _fold_weight(self.W_value).to(dtype).view(nh, hs, d)
            keys_q = torch.bmm(qh, w_key).transpose(0, 1)  # W_k^T q: (B, nh, D)
            scores = torch.bmm(keys_q, x.transpose(1, 2))  # (B, nh, T)
            if self.W_key.bias is not None:  # the same for every token: kept for its grads
                bias = self.W_key.bias.to(dtype).view(nh, 1, hs)
                scores = scores + (qh * bias).sum(dim=-1).t()[..., None]
            scores = (scores / math.sqrt(hs)).masked_fill(~visible[:, None, :], float("-inf"))
            weights = F.dropout(torch.softmax(scores, dim=-1), self.drop_rate, self.training)
            mixed = torch.bmm(weights, x)  # sum_t a_t x_t: (B, nh, D)
            y = torch.bmm(mixed.transpose(0, 1), w_value.transpose(1, 2))  # (nh, B, hs)
            y = y.transpose(0, 1)  # (B, nh, hs)
            if self.W_value.bias is not None:  # sum_t a_t is 1, or less after dropout
                y = y + weights.sum(dim=-1, keepdim=True) * self.W_value.bias.to(dtype).view(nh, hs)
        return y.reshape(b, d).to(q.dtype)


def _is_linear_map(layer: nn.Module) -> bool:
    """Whether ``layer`` computes one linear map: plain, or LoRA without adapter dropout."""
    if type(layer) is LoRALinear:
        return isinstance(layer.lora_dropout, nn.Identity)
    return type(layer) is nn.Linear


def _fold_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of a linear map (LoRA's merged one, differentiable in its adapters)."""
    return layer.merged_weight() if isinstance(layer, LoRALinear) else layer.weight
