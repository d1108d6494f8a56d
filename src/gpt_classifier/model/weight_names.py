"""GPT-2's tensor names and the book's: the one table between them, used to load
pretrained weights and to export to 🤗 transformers."""

from __future__ import annotations

import re

import torch

from gpt_classifier.model.config import GPTConfig


class WeightLoadError(RuntimeError):
    """Pretrained weights could not be found, read or matched to the model."""


# Buffers that checkpoints carry but that hold no weights (causal masks).
_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
# The four Conv1D weights are stored (in, out); nn.Linear wants (out, in).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# GPT-2's names inside a block (transformer.h.<i>.) -> the book's (trf_blocks.<i>.);
# c_attn holds the query, key and value rows (split_fused_qkv).
BLOCK_NAMES = {
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "attn.c_attn.weight": "att.qkv.weight",
    "attn.c_attn.bias": "att.qkv.bias",
    "attn.c_proj.weight": "att.out_proj.weight",
    "attn.c_proj.bias": "att.out_proj.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "ff.fc.weight",
    "mlp.c_fc.bias": "ff.fc.bias",
    "mlp.c_proj.weight": "ff.proj.weight",
    "mlp.c_proj.bias": "ff.proj.bias",
}
TOP_NAMES = {
    "wte.weight": "tok_emb.weight",
    "wpe.weight": "pos_emb.weight",
    "ln_f.weight": "final_norm.weight",
    "ln_f.bias": "final_norm.bias",
}


def strip_prefix(key: str) -> str:
    return key.removeprefix("transformer.")


def to_book_names(
    state: dict[str, torch.Tensor], cfg: GPTConfig, origin: str
) -> dict[str, torch.Tensor]:
    """Check every tensor of a canonical state dict and rename it for :class:`GPT`."""
    expected = _expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for raw_key, tensor in state.items():
        key = strip_prefix(raw_key)
        if _IGNORED.match(key):
            continue
        if key == "lm_head.weight":
            wte = state.get("wte.weight", state.get("transformer.wte.weight"))
            if wte is not None and not torch.equal(tensor, wte):
                raise WeightLoadError(
                    f"{origin}: lm_head.weight differs from wte.weight, but GPT-2's output "
                    "layer is tied to its token embedding; this checkpoint is not GPT-2."
                )
            continue
        name = _book_name(key)
        if name is None or name not in expected:
            unexpected.append(raw_key)
            continue
        if key.endswith(CONV1D):
            tensor = tensor.t()
        if tuple(tensor.shape) != expected[name]:
            raise WeightLoadError(
                f"{origin}: tensor {raw_key!r} has shape {tuple(tensor.shape)}, expected "
                f"{expected[name]} for {cfg.n_layers} layers x {cfg.emb_dim} dims; the config "
                "and the weights do not belong together."
            )
        out[name] = tensor
    if unexpected:
        raise WeightLoadError(
            f"{origin}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            f" ({len(unexpected)} in all); this is not a GPT-2 checkpoint of the configured size."
        )
    missing = sorted(set(expected) - set(out))
    if missing:
        raise WeightLoadError(
            f"{origin}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)} in all); the file is incomplete. Download it again."
        )
    return split_fused_qkv(out)


def _book_name(key: str) -> str | None:
    if key in TOP_NAMES:
        return TOP_NAMES[key]
    match = re.match(r"^h\.(\d+)\.(.+)$", key)
    if match and match.group(2) in BLOCK_NAMES:
        return f"trf_blocks.{match.group(1)}.{BLOCK_NAMES[match.group(2)]}"
    return None


def _expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Shapes by book name, with each block's query, key and value fused as in GPT-2."""
    d = cfg.emb_dim
    shapes = {"tok_emb.weight": (cfg.vocab_size, d), "pos_emb.weight": (cfg.context_length, d),
              "final_norm.weight": (d,), "final_norm.bias": (d,)}  # fmt: skip
    block = {"norm1.weight": (d,), "norm1.bias": (d,), "att.qkv.weight": (3 * d, d),
             "att.out_proj.weight": (d, d), "att.out_proj.bias": (d,), "norm2.weight": (d,),
             "norm2.bias": (d,), "ff.fc.weight": (4 * d, d), "ff.fc.bias": (4 * d,),
             "ff.proj.weight": (d, 4 * d), "ff.proj.bias": (d,)}  # fmt: skip
    if cfg.qkv_bias:
        block["att.qkv.bias"] = (3 * d,)
    for i in range(cfg.n_layers):
        shapes.update({f"trf_blocks.{i}.{name}": shape for name, shape in block.items()})
    return shapes


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
