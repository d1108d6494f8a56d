"""``format=hf``: a ``GPT2ForSequenceClassification`` folder for 🤗 transformers.

The folder loads with ``AutoModelForSequenceClassification.from_pretrained(folder)``,
``AutoTokenizer.from_pretrained(folder)`` and ``pipeline("text-classification",
model=folder)``, with no code of ours, and computes our probabilities:

- ``GPT2ForSequenceClassification`` reads the last non-padding token: our
  ``last_token`` pooling. Other poolings read other positions and are refused.
- Its ``score`` layer has no bias; ours does. The bias is folded into the final
  LayerNorm's shift (``W (x + d) = W x + b`` for ``d = pinv(W) b``), which only the head
  reads, so the logits are ours (up to float rounding and a shift shared by all classes,
  which softmax ignores). The exported final hidden states therefore differ from the
  backbone's.
- LoRA adapters are merged into the weights they adapt; attention's separate query, key
  and value weights are fused into GPT-2's ``c_attn``; Linear weights become GPT-2's
  transposed ``Conv1D`` layout.
- The tokenizer files are GPT-2's own BPE files (``vocab.json`` is ``encoder.json``,
  ``merges.txt`` is ``vocab.bpe``), with padding on the right by ``<|endoftext|>``
  (id 50256) and our truncation length and side.

Nothing here imports transformers; :func:`load` reads such a folder back without it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gpt_classifier.data.tokenizer import PAD_TOKEN_ID, gpt2_bpe_files
from gpt_classifier.files import atomic_path
from gpt_classifier.inference.loading import InferenceSettings, ModelLoadError, build_classifier
from gpt_classifier.model.classifier import SequenceClassifier
from gpt_classifier.model.lora import merged_state_dict
from gpt_classifier.model.weight_names import BLOCK_NAMES, CONV1D

ENDOFTEXT = "<|endoftext|>"
# Ours (inside backbone.trf_blocks.<i>.) -> GPT-2's (inside transformer.h.<i>.), but for
# the fused query, key and value; Conv1D weights are transposed into its (in, out) layout.
_BLOCK_NAMES = {ours: theirs for theirs, ours in BLOCK_NAMES.items() if "qkv" not in ours}


class TransformersExportError(ValueError):
    """The model computes something ``GPT2ForSequenceClassification`` cannot."""


def check_exportable(pooling: str, causal_mask: bool) -> None:
    """Refuse what transformers would compute differently, saying why."""
    if pooling != "last_token":
        raise TransformersExportError(
            f"classifier.pooling={pooling}: GPT2ForSequenceClassification reads the last "
            "non-padding token (our last_token pooling) and would give other answers. "
            "Export with format=native, or train with classifier.pooling=last_token."
        )
    if not causal_mask:
        raise TransformersExportError(
            "model.causal_mask=false: transformers' GPT-2 always masks future positions. "
            "Export with format=native."
        )


def hf_state_dict(model: torch.nn.Module, n_layers: int) -> dict[str, torch.Tensor]:
    """``model``'s weights (adapters merged) under GPT2ForSequenceClassification's names."""
    ours = {k: v.detach().cpu().float() for k, v in merged_state_dict(model).items()}
    out: dict[str, torch.Tensor] = {
        "transformer.wte.weight": ours["backbone.tok_emb.weight"],
        "transformer.wpe.weight": ours["backbone.pos_emb.weight"],
        "transformer.ln_f.weight": ours["backbone.final_norm.weight"],
    }
    for i in range(n_layers):
        src, dst = f"backbone.trf_blocks.{i}.", f"transformer.h.{i}."
        for name, hf_name in _BLOCK_NAMES.items():
            tensor = ours[src + name]
            out[dst + hf_name] = tensor.t() if hf_name in CONV1D else tensor
        parts = [ours[f"{src}att.W_{p}.weight"] for p in ("query", "key", "value")]
        out[dst + "attn.c_attn.weight"] = torch.cat(parts, dim=0).t()
        biases = [ours.get(f"{src}att.W_{p}.bias") for p in ("query", "key", "value")]
        out[dst + "attn.c_attn.bias"] = torch.cat([
            b if b is not None else torch.zeros(p.shape[0]) for b, p in zip(biases, parts)
        ])  # fmt: skip
    weight = ours["backbone.out_head.weight"]
    bias = ours.get("backbone.out_head.bias")
    shift = ours["backbone.final_norm.bias"]
    if bias is not None:
        shift = shift + fold_bias(weight, bias)
    out["transformer.ln_f.bias"] = shift
    out["score.weight"] = weight
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_state_dict` (the head's bias folded, so zero)."""
    out = {
        "backbone.tok_emb.weight": state["transformer.wte.weight"],
        "backbone.pos_emb.weight": state["transformer.wpe.weight"],
        "backbone.final_norm.weight": state["transformer.ln_f.weight"],
        "backbone.final_norm.bias": state["transformer.ln_f.bias"],
        "backbone.out_head.weight": state["score.weight"],
        "backbone.out_head.bias": torch.zeros(state["score.weight"].shape[0]),
    }
    for i in range(n_layers):
        src, dst = f"transformer.h.{i}.", f"backbone.trf_blocks.{i}."
        for name, hf_name in _BLOCK_NAMES.items():
            tensor = state[src + hf_name]
            out[dst + name] = tensor.t() if hf_name in CONV1D else tensor
        weights = state[src + "attn.c_attn.weight"].t().chunk(3, dim=0)
        biases = state[src + "attn.c_attn.bias"].chunk(3)
        for part, w, b in zip(("query", "key", "value"), weights, biases):
            out[f"{dst}att.W_{part}.weight"], out[f"{dst}att.W_{part}.bias"] = w, b
    return {k: v.contiguous() for k, v in out.items()}


def fold_bias(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``d`` with ``weight @ d = bias`` up to one constant for all classes."""
    w, b = weight.double(), bias.double()
    d = torch.linalg.pinv(w) @ b
    residual = w @ d - b
    spread = float(residual.max() - residual.min())
    if spread > 1e-6 * (1 + float(b.abs().max())):
        raise TransformersExportError(
            f"the head's bias cannot be folded into the final LayerNorm (its weight rows are "
            f"linearly dependent; residual spread {spread:.2e}); export with format=native"
        )
    return d.float()


def hf_config(arch: dict[str, Any], label_names: list[str]) -> dict[str, Any]:
    """A ``config.json`` for ``GPT2ForSequenceClassification``."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2ForSequenceClassification"],
        "vocab_size": arch["vocab_size"],
        "n_positions": arch["context_length"],
        "n_ctx": arch["context_length"],
        "n_embd": arch["emb_dim"],
        "n_layer": arch["n_layers"],
        "n_head": arch["n_heads"],
        "n_inner": None,
        "activation_function": "gelu_new",  # the tanh approximation, as ours
        "layer_norm_epsilon": arch["layer_norm_eps"],
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "bos_token_id": PAD_TOKEN_ID,
        "eos_token_id": PAD_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
        "num_labels": len(label_names),
        "id2label": {str(i): name for i, name in enumerate(label_names)},
        "label2id": {name: i for i, name in enumerate(label_names)},
        "torch_dtype": "float32",
    }


def export(model: SequenceClassifier, settings: InferenceSettings, folder: Path) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files."""
    from safetensors.torch import save_file

    arch, settings = model.cfg.to_dict(), asdict(settings)
    check_exportable(settings["pooling"], arch.get("causal_mask", True))
    state = hf_state_dict(model, arch["n_layers"])
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    config = hf_config(arch, list(settings["label_names"]))
    # Ours, ignored by transformers: what TextClassifier needs to read the folder back.
    config["gpt_classifier"] = {**settings, "architecture": arch}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    encoder_json, vocab_bpe = gpt2_bpe_files()
    (folder / "vocab.json").write_bytes(encoder_json)
    (folder / "merges.txt").write_bytes(vocab_bpe)
    limit = min(settings["max_length"], arch["context_length"])
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": limit,
        "truncation_side": "left" if settings["truncation_side"] == "left" else "right",
        "padding_side": "right",
        "add_prefix_space": False,
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "unk_token": ENDOFTEXT,
        "pad_token": ENDOFTEXT,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special = {k: ENDOFTEXT for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return folder


def load(folder: Path, config: dict[str, Any]) -> tuple[SequenceClassifier, InferenceSettings]:
    """A folder written by ``export.py format=hf``, read back without transformers."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ours = dict(config["gpt_classifier"])
    arch = ours.pop("architecture")
    weights_path = folder / "model.safetensors"
    try:
        state = from_hf_state_dict(load_file(str(weights_path)), arch["n_layers"])
    except (SafetensorError, OSError, KeyError) as err:
        raise ModelLoadError(f"{weights_path} could not be read ({err}); export it again") from err
    settings = InferenceSettings.from_config(ours)
    model = build_classifier(arch, len(settings.label_names), settings.pooling, state, weights_path)
    return model, settings
