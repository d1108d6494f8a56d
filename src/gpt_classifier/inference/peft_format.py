"""``format=peft``: a LoRA run as a peft adapter for transformers' GPT-2 classifier.

The adapter keeps the run's low-rank matrices as they are, unmerged. transformers' GPT-2
fuses the query, key and value projections into one ``c_attn``: their adapters become one
of rank ``rank x parts``, ``A`` stacked and ``B`` block-diagonal, with the alpha scaled
alike so that ``alpha / rank`` stays the same. The head (and the final LayerNorm, which
absorbs the head's bias) is saved whole, as peft's ``modules_to_save``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from gpt_classifier.files import atomic_path
from gpt_classifier.inference import hf_format
from gpt_classifier.inference.loading import InferenceSettings
from gpt_classifier.model.classifier import SequenceClassifier
from gpt_classifier.model.lora import LoRALinear, lora_layers

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
BASE_FOLDER = "base"
QKV = ("att.W_query", "att.W_key", "att.W_value")
HF_NAMES = {"att.out_proj": "attn.c_proj", "ff.fc": "mlp.c_fc", "ff.proj": "mlp.c_proj"}
PREFIX = "base_model.model."


def export(
    model: SequenceClassifier,
    settings: InferenceSettings,
    folder: Path,
    base_model: str | None = None,
    final: Path | None = None,
) -> Path:
    """``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder``;
    ``base_model``: the Hub id of the weights the run started from, else their
    ``format=hf`` export is written to ``folder/base`` (``final``: where ``folder`` is
    moved to once written)."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    blocks = _adapted_blocks(layers)
    if not blocks:
        raise ValueError("format=peft needs a LoRA run (freeze=lora) or its checkpoint, "
                         "whose adapters are still apart (an export has them merged); export "
                         "this one with format=hf or format=native")  # fmt: skip
    arch = model.cfg.to_dict()
    hf_format.check_exportable(settings.pooling, arch.get("causal_mask", True))
    first = blocks[min(blocks)]
    some = next(iter(first.values()))
    rank, alpha = some.rank, some.alpha
    qkv_parts = len([name for name in QKV if name in first])
    tensors: dict[str, torch.Tensor] = {}
    for i, adapted in blocks.items():
        if set(adapted) != set(first):
            raise ValueError("format=peft needs the same LoRA targets in every adapted block")
        hf = f"{PREFIX}transformer.h.{i}."
        parts = [name for name in QKV if name in adapted]
        if parts:
            a, b = _fused_qkv(parts, adapted, arch["emb_dim"])
            tensors[hf + "attn.c_attn.lora_A.weight"], tensors[hf + "attn.c_attn.lora_B.weight"] = (
                a,
                b,
            )
        for name, hf_name in HF_NAMES.items():
            if name in adapted:
                tensors[f"{hf}{hf_name}.lora_A.weight"] = adapted[name].lora_A.weight
                tensors[f"{hf}{hf_name}.lora_B.weight"] = adapted[name].lora_B.weight
    # The trained head (adapters merged, its bias folded into ln_f) replaces the base's.
    merged = hf_format.hf_state_dict(model, arch["n_layers"])
    for name in ("score.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"):
        tensors[PREFIX + name] = merged[name]
    folder.mkdir(parents=True, exist_ok=True)
    if base_model is None:  # the base beside the adapters, by the path it will have
        _write_base(model, settings, folder / BASE_FOLDER)
        base_model = str(((final or folder) / BASE_FOLDER).resolve())
    targets = sorted([HF_NAMES[n] for n in first if n in HF_NAMES] +
                     (["attn.c_attn"] if qkv_parts else []))  # fmt: skip
    every_block = sorted(blocks) == list(range(arch["n_layers"]))
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "rank_pattern": {"attn.c_attn": rank * qkv_parts} if qkv_parts > 1 else {},
        "alpha_pattern": {"attn.c_attn": alpha * qkv_parts} if qkv_parts > 1 else {},
        "fan_in_fan_out": True,  # GPT-2's Conv1D layers keep weights as (in, out)
        "bias": "none",
        "modules_to_save": ["score", "ln_f"],
        "layers_to_transform": None if every_block else sorted(blocks),
        "layers_pattern": None if every_block else "h",
        "inference_mode": True,
    }
    state = {k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}
    with atomic_path(folder / ADAPTER_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    with atomic_path(folder / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _adapted_blocks(layers: dict[str, LoRALinear]) -> dict[int, dict[str, LoRALinear]]:
    """The adapted layers of each block, by their name within it (``att.W_query``)."""
    blocks: dict[int, dict[str, LoRALinear]] = {}
    for name, layer in layers.items():
        if name.startswith("backbone.trf_blocks."):
            _, _, index, inner = name.split(".", 3)
            blocks.setdefault(int(index), {})[inner] = layer
    return dict(sorted(blocks.items()))


def _fused_qkv(
    parts: list[str], adapted: dict[str, LoRALinear], width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter for the fused ``c_attn`` equal to the separate ones of ``parts``."""
    rank = adapted[parts[0]].rank
    a = torch.cat([adapted[name].lora_A.weight.detach() for name in parts])
    b = torch.zeros(3 * width, rank * len(parts), dtype=a.dtype)
    for column, name in enumerate(parts):
        row = QKV.index(name)
        b[row * width : (row + 1) * width, column * rank : (column + 1) * rank] = adapted[
            name
        ].lora_B.weight.detach()
    return a, b


def _write_base(model: SequenceClassifier, settings: InferenceSettings, folder: Path) -> Path:
    """The weights the adapters apply to (``B`` zeroed: nothing merged), as ``format=hf``."""
    base = copy.deepcopy(model)
    with torch.no_grad():
        for layer in lora_layers(base).values():
            layer.lora_B.weight.zero_()
    return hf_format.export(base, settings, folder)
