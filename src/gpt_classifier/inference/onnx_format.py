"""``format=onnx``: the classifier as an ONNX graph that ONNX Runtime runs.

The graph is our ``SequenceClassifier.forward(input_ids, lengths)`` (LoRA merged), with
the batch size and the number of tokens free: the same pooling, the same padding
independence, float32 (on CPUs faster than PyTorch: docs/benchmarks.md). It needs
``pip install -e ".[onnx]"`` (onnx and onnxscript to export, onnxruntime to run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gpt_classifier.extras import import_extra
from gpt_classifier.inference import native_format
from gpt_classifier.inference.loading import (
    EXPORT_FORMAT,
    InferenceSettings,
    ModelLoadError,
    build_classifier,
)
from gpt_classifier.model.classifier import SequenceClassifier
from gpt_classifier.model.config import GPTConfig
from gpt_classifier.model.lora import merged_state_dict

ONNX_FILE = "model.onnx"


class OnnxClassifier:
    """The part of ``SequenceClassifier`` that inference uses, run by ONNX Runtime."""

    def __init__(self, path: Path, cfg: GPTConfig, num_parameters: int) -> None:
        ort = import_extra("onnxruntime", "onnx", f"running the ONNX export {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as PyTorch would use
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.cfg = cfg
        self.num_parameters = num_parameters

    def __call__(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        feed = {"input_ids": input_ids.cpu().numpy(), "lengths": lengths.cpu().numpy()}
        (logits,) = self.session.run(["logits"], feed)
        return torch.from_numpy(logits)


class _Forward(torch.nn.Module):
    """``(input_ids, lengths) -> logits``: the two inputs the graph takes, named."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, lengths)


def export(model: SequenceClassifier, settings: InferenceSettings, folder: Path) -> Path:
    """Write ``model.onnx`` (with its weights beside it in ``model.onnx.data``) and
    ``config.json`` into ``folder``."""
    for module in ("onnx", "onnxscript"):  # torch's exporter imports both
        import_extra(module, "onnx", "export.py format=onnx")
    config = native_format.export_config(model, settings)
    # A plain model without LoRA code: adapters merged into the weights they adapt.
    plain = build_classifier(config["architecture"], config["num_classes"], settings.pooling,
                             merged_state_dict(model), folder).eval()  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch")
    tokens = torch.export.Dim("tokens", max=plain.cfg.context_length)
    example = (torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 2]))
    torch.onnx.export(
        _Forward(plain), example, str(folder / ONNX_FILE), dynamo=True, external_data=True,
        input_names=["input_ids", "lengths"], output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: tokens}, "lengths": {0: batch}},
    )  # fmt: skip
    config["runtime"] = "onnx"
    config["parameters"] = sum(p.numel() for p in plain.parameters())
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "README.md").write_text(_readme(config))
    return folder


def load(folder: Path, config: dict[str, Any]) -> tuple[OnnxClassifier, InferenceSettings]:
    """A folder written by ``export.py format=onnx``, run by ONNX Runtime."""
    if config.get("format") != EXPORT_FORMAT or config.get("runtime") != "onnx":
        raise ModelLoadError(f"{folder / 'config.json'} is not a gpt-classifier ONNX export")
    cfg = GPTConfig.from_dict(dict(config["architecture"]))
    try:
        model = OnnxClassifier(folder / ONNX_FILE, cfg, int(config.get("parameters", 0)))
    except ImportError:
        raise
    except Exception as err:  # noqa: BLE001 - ONNX Runtime's own errors say what broke
        raise ModelLoadError(f"{folder / ONNX_FILE} could not be loaded ({err}); export "
                             "it again") from err  # fmt: skip
    return model, InferenceSettings.from_config(config)


def _readme(config: dict[str, Any]) -> str:
    arch = config["architecture"]
    return f"""# GPT-2 text classifier, ONNX (gpt-classifier export)

GPT-2 ({arch["n_layers"]} layers, {arch["emb_dim"]} dims) fine-tuned to classify text as
{", ".join(config["label_names"])}, as an ONNX graph: `model.onnx` (weights in
`model.onnx.data`) and `config.json` (labels, tokenizer, truncation, pooling).

Inputs: `input_ids` (batch, tokens; int64, GPT-2 BPE, right-padded with 50256) and
`lengths` (batch; int64, each row's real tokens). Output: `logits` (batch, classes).

```python
from gpt_classifier.inference import TextClassifier   # tokenizes as training did
print(TextClassifier.load("this folder").classify(["your text"]))
```
or `python serve.py ckpt_path=<this folder>`.
"""
