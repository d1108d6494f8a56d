"""GPT-2 in plain PyTorch: config, presets and the model (no Lightning, no Hydra).

Attribute names follow "Build a Large Language Model (From Scratch)": ``tok_emb``,
``pos_emb``, ``trf_blocks``, ``final_norm``, ``out_head``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module


@dataclass(frozen=True)
class GPTConfig:
    """Architecture of a GPT-2 model."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5
    # False: every position attends to every other, padding included (the book's
    # --disable_causal_mask experiment); GPT-2 was trained causal.
    causal_mask: bool = True

    def __post_init__(self) -> None:
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"emb_dim={self.emb_dim} is not divisible by n_heads={self.n_heads}; "
                "pick a head count that divides the embedding size."
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, e.g. for hyperparameters or config.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPTConfig:
        """Build from a dict, rejecting keys this class does not know."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**values)


# The four published GPT-2 sizes, plus a tiny one for tests.
PRESETS: dict[str, GPTConfig] = {
    "gpt2-small": GPTConfig(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),
    # Real tokenizer vocabulary, so it reads real data; small enough to train in seconds.
    "gpt2-tiny": GPTConfig(context_length=256, emb_dim=64, n_layers=2, n_heads=4),
}


def preset_config(name: str, **overrides: Any) -> GPTConfig:
    """The named preset's config, with fields such as ``drop_rate`` overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    values = PRESETS[name].to_dict()
    values.update(overrides)
    return GPTConfig.from_dict(values)


# On a CPU, bfloat16 and float16 matrix products run on oneDNN, which builds a kernel for
# each new shape the first time it meets it: ~10 ms, while a cached gpt2-small step takes
# ~15 ms. The pooled path's packed token count differs nearly every step, so it is
# rounded up to a multiple of this many rows (zero rows, whose results are dropped).
CPU_ROW_MULTIPLE = 64


def few_shapes(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, D) with zero rows appended up to a multiple of ``CPU_ROW_MULTIPLE`` where
    its matrix products run in reduced precision on a CPU; else ``x`` itself."""
    reduced = x.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
    if x.device.type != "cpu" or not reduced or not x.shape[0] % CPU_ROW_MULTIPLE:
        return x
    return F.pad(x, (0, 0, 0, -x.shape[0] % CPU_ROW_MULTIPLE))


def few_rows(x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """Autocast off, on a CPU, for products of one row per sequence (``x``'s device).

    Their time goes into reading the weights, so reduced precision only adds work: the
    casts of the weights and of their gradients (a cached gpt2-small last-block step
    under bf16 autocast: 17.3 ms, with this ~16 ms, as float32 measured beside it).
    Inputs must be brought to the weights' dtype inside.
    """
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.autocast("cpu", enabled=False)
    return contextlib.nullcontext()


class PackedQueries(NamedTuple):
    """One query per sequence over packed tokens (see ``TransformerBlock.forward``).

    ``visible`` (B, T) marks the tokens each query can see in the padded batch,
    ``slots`` (N,) are their flat indices there, ``rows`` (B,) each query's row in the
    packed tokens (N, D).
    """

    visible: torch.Tensor
    slots: torch.Tensor
    rows: torch.Tensor


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with the book's separate query, key and value layers.

    Every projection is an ``nn.Linear`` called as a module, so wrappers around them
    (LoRA adapters, hooks) see all the work. One exception, where nothing can tell: on
    the pooled path, plain key and value layers that no hook watches are folded into the
    one query per sequence (see ``_attend_folded``).
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

    def forward(self, x: torch.Tensor, packed: PackedQueries | None = None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); with ``packed``: packed tokens (N, D) -> (B, D)."""
        if packed is not None:
            return self._forward_packed(x, packed)
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

    def _forward_packed(self, tokens: torch.Tensor, packed: PackedQueries) -> torch.Tensor:
        # Keys and values for the visible tokens only (padding costs nothing), the query
        # only where it is read.
        b, t = packed.visible.shape
        n, d = tokens.shape
        with few_rows(tokens):
            q = self.W_query(tokens[packed.rows].to(self.W_query.weight.dtype))  # (B, D)

        def unpack(z: torch.Tensor) -> torch.Tensor:  # (N, D) -> (B, T, D), zeros unseen
            return z.new_zeros(b * t, d).index_copy(0, packed.slots, z[:n]).view(b, t, d)

        rows = few_shapes(tokens)  # (N', D), N' >= N
        k, v = unpack(self.W_key(rows)), unpack(self.W_value(rows))
        y = F.scaled_dot_product_attention(
            self._heads(q.view(b, 1, d)),
            self._heads(k),
            self._heads(v),
            attn_mask=packed.visible[:, None, None, :],
            dropout_p=self.drop_rate if self.training else 0.0,
        )  # (B, nh, 1, hs)
        return self._project(y.transpose(1, 2).reshape(b, d))

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
        """Whether the key and value layers are plain linear layers that no hook watches,
        so that skipping their calls changes nothing anyone can observe."""
        # Hooks registered for every module (torch.nn.modules.module.register_module_*).
        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return False
        return all(
            type(layer) is nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks)
            for layer in (self.W_key, self.W_value)
        )

    def _attend_folded(
        self, q: torch.Tensor, x: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        """Attention of one query per sequence without projecting every token.

        With one query ``q`` per head, its score for token ``x`` is
        ``q . (W_k x + b_k) = (W_k^T q) . x + q . b_k``, and the mixed values are
        ``sum_t a_t (W_v x_t + b_v) = W_v (sum_t a_t x_t) + b_v sum_t a_t``: products with
        the (nh, hs, D) weights once per sequence instead of once per token (a cached
        gpt2-small last-block float32 step: 21.0 -> 14.5 ms). The same
        numbers up to rounding; in float32 with autocast off, since these products are
        small and reduced precision would only lose digits.
        q (B, D) and x (B, T, D) -> (B, D).
        """
        b, t, d = x.shape
        nh, hs = self.n_heads, self.head_dim
        # Batched products head by head (bmm) rather than einsum: on a CPU einsum's
        # layouts are slower (gpt2-small, 8 x 55 tokens, forward and backward of this
        # function: 7.7 against 5.6 ms).
        with torch.autocast(x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)
            x = x.to(dtype)
            qh = q.to(dtype).view(b, nh, hs).transpose(0, 1)  # (nh, B, hs)
            w_key = self.W_key.weight.to(dtype).view(nh, hs, d)
            w_value = self.W_value.weight.to(dtype).view(nh, hs, d)
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

        The pooled form equals ``block(x)[rows, positions]`` but runs the query, the
        output projection and the MLP only at the position itself, and folds the keys and
        values into its query; where the key or value layer is adapted or hooked, it
        projects only the tokens the position sees (not the padding after it).
        """
        if positions is None:
            x = x + self.att(self.norm1(x))
            return x + self.ff(self.norm2(x))
        b, t = x.shape[:2]
        if self.att.causal:
            visible = torch.arange(t, device=x.device)[None, :] <= positions[:, None]  # (B, T)
        else:  # every position sees the whole row
            visible = torch.ones(b, t, dtype=torch.bool, device=x.device)
        if self.att.foldable():  # no per-token products: the padded rows, masked, will do
            h = x[torch.arange(b, device=x.device), positions]
            h = h + self.att.attend_from(self.norm1(x), positions, visible)
        else:
            # Pack what each position can attend to: (N, D), row by row; index_select and
            # index_copy have cheap backward passes (boolean masks do not).
            slots = visible.flatten().nonzero().squeeze(1)  # (N,)
            tokens = x.flatten(0, 1).index_select(0, slots)  # (N, D)
            counts = visible.sum(dim=1)
            # (B,): each position's row in tokens (visible tokens start each sequence's run)
            rows = counts.cumsum(dim=0) - counts + positions
            h = tokens[rows] + self.att(self.norm1(tokens), PackedQueries(visible, slots, rows))
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
        """A model with pretrained weights from a Hub name or a local folder.

        See :func:`gpt_classifier.model.weights.load_pretrained` for the accepted sources.
        """
        from gpt_classifier.model.weights import load_pretrained

        return load_pretrained(source, **overrides)

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


def split_fused_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace fused ``att.qkv.weight`` / ``att.qkv.bias`` entries (GPT-2's ``c_attn``
    layout, rows ordered query, key, value) by ``W_query``, ``W_key`` and ``W_value``."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        prefix, fused, kind = name.rpartition("att.qkv.")
        if not fused or kind not in ("weight", "bias"):
            out[name] = tensor
            continue
        for part, chunk in zip(("W_query", "W_key", "W_value"), tensor.chunk(3, dim=0)):
            out[f"{prefix}att.{part}.{kind}"] = chunk.contiguous()
    return out
