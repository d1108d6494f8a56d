"""Use a trained classifier: load it from a checkpoint or an export, classify texts, export.

No Lightning at inference time: a checkpoint is read with ``torch.load(weights_only=True)``
(no pickled code runs) and an export folder is safetensors + JSON only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt_classifier.checkpoints import (
    complete_state_dict,
    is_sharded_checkpoint,
    read_checkpoint,
    upgrade_names,
)
from gpt_classifier.data.batching import Collator, plan_batches, truncate
from gpt_classifier.data.tokenizer import PAD_TOKEN_ID, get_tokenizer
from gpt_classifier.finetuning.methods import method_from_config
from gpt_classifier.model.classifier import SequenceClassifier
from gpt_classifier.model.config import GPTConfig
from gpt_classifier.model.gpt import GPT
from gpt_classifier.model.lora import lora_layers, merged_state_dict

log = logging.getLogger(__name__)

EXPORT_FORMAT = "gpt-classifier"
EXPORT_VERSION = 2  # 1: before SequenceClassifier (tensor names without "backbone.")
# Measured best of 256..4096 for gpt2-small on a 2-core Xeon (scripts/benchmark.py era).
MAX_BATCH_TOKENS = 1024


class ModelLoadError(RuntimeError):
    """A checkpoint or export folder is missing, corrupt or incompatible."""


@dataclass
class InferenceSettings:
    """How texts become model inputs; stored with every export."""

    label_names: list[str]
    pooling: str = "last_token"
    max_length: int = 1024
    truncation_side: str = "right"
    pad_to: int | None = None  # fixed padded length (book-style models), else per batch
    pad_token_id: int = PAD_TOKEN_ID


@dataclass
class Prediction:
    """One text's label and class probabilities."""

    label: str
    probabilities: dict[str, float]
    truncated: bool = field(default=False)


class TextClassifier:
    """A trained GPT-2 classifier: ``TextClassifier.load(path).classify(texts)``."""

    def __init__(
        self, model: SequenceClassifier, settings: InferenceSettings, device: str = "cpu"
    ) -> None:
        self.model = model.eval().to(resolve_device(device))
        self.settings = settings
        self.tokenizer = get_tokenizer()

    @property
    def device(self) -> torch.device:
        if not isinstance(self.model, torch.nn.Module):  # an ONNX export: ONNX Runtime, CPU
            return torch.device("cpu")
        return self.model.backbone.pos_emb.weight.device

    def num_parameters(self) -> int:
        if not isinstance(self.model, torch.nn.Module):
            return self.model.num_parameters
        return sum(p.numel() for p in self.model.parameters())

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> TextClassifier:
        """From a Lightning checkpoint, a training run folder or an export folder."""
        path = Path(path).expanduser()
        if path.is_dir() and (path / "config.json").is_file():
            model, settings = _load_export(path)
        else:
            model, settings = _load_checkpoint(resolve_checkpoint(path))
        return cls(model, settings, device)

    # ------------------------------------------------------------------ classifying

    def encode(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids as training saw them (same truncation), and which were truncated."""
        out, cut = [], []
        s = self.settings
        limit = min(s.max_length, s.pad_to or s.max_length, self.model.cfg.context_length)
        for index, ids in enumerate(self.tokenizer.encode_ordinary_batch(list(texts))):
            if not ids:
                raise ValueError(f"text {index} is empty; every text needs at least one token")
            ids, was_cut = truncate(ids, limit, s.truncation_side)  # type: ignore[arg-type]
            out.append(ids)
            cut.append(was_cut)
        return out, cut

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Class probabilities (N, num_classes), in the order of ``texts``."""
        ids, _ = self.encode(texts)
        return self.probabilities_from_ids(ids, batch_size)

    @torch.no_grad()
    def probabilities_from_ids(
        self, ids: list[list[int]], batch_size: int = 32, progress: bool = False
    ) -> torch.Tensor:
        """Class probabilities of already tokenized (and truncated) texts, in their order.

        Batches hold at most ``batch_size`` texts and about ``MAX_BATCH_TOKENS`` padded
        tokens (on a CPU, matrices that stay in cache beat bigger batches), grouped by
        length so that they pad little; results go back to input order.
        """
        collate = Collator(self.settings.pad_to, self.settings.pad_token_id)
        out = torch.empty(len(ids), len(self.settings.label_names))
        widths = [self.settings.pad_to or len(x) for x in ids]
        chunks = plan_batches(widths, batch_size, MAX_BATCH_TOKENS)
        if progress and len(chunks) > 10:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="classifying", unit="batch")
        for chunk in chunks:
            batch = collate([{"input_ids": torch.tensor(ids[i]), "label": 0} for i in chunk])
            logits = self.model(
                batch["input_ids"].to(self.device), batch["lengths"].to(self.device)
            )
            out[chunk] = torch.softmax(logits.float(), dim=-1).cpu()
        return out

    def classify(
        self, texts: Sequence[str], batch_size: int = 32, progress: bool = False
    ) -> list[Prediction]:
        """Label and probabilities of each text."""
        ids, cut = self.encode(texts)
        if any(cut):
            log.warning("%d of %d texts were longer than %d tokens and were truncated",
                        sum(cut), len(cut), self.settings.max_length)  # fmt: skip
        with torch.no_grad():
            probs = self.probabilities_from_ids(ids, batch_size, progress)
        names = self.settings.label_names
        return [
            Prediction(names[int(p.argmax())], dict(zip(names, map(float, p))), c)
            for p, c in zip(probs, cut)
        ]

    # ------------------------------------------------------------------ export

    def export(self, folder: str | Path, format: str = "native") -> Path:
        """Write ``model.safetensors``, ``config.json`` and a README into ``folder``;
        ``format="hf"``: a ``GPT2ForSequenceClassification`` folder for 🤗 transformers
        (see :mod:`gpt_classifier.inference.transformers_export`).

        LoRA adapters are merged into the weights they adapt: the export is a plain
        model that loads without any LoRA code.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        if not isinstance(self.model, torch.nn.Module):
            raise ValueError("this model was loaded from an ONNX export; export its checkpoint")
        if format == "onnx":
            from gpt_classifier.inference.onnx_runtime import export_onnx

            return export_onnx(self, folder)
        if format == "hf":
            from gpt_classifier.inference.transformers_export import export_for_transformers

            return export_for_transformers(
                self.model, self.model.cfg.to_dict(), asdict(self.settings), folder
            )
        if format != "native":
            raise ValueError(f"format={format!r}; choose native, hf or onnx")
        folder.mkdir(parents=True, exist_ok=True)
        merged = merged_state_dict(self.model)
        state = {k: v.detach().cpu().contiguous() for k, v in merged.items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": EXPORT_FORMAT})
        config = {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_VERSION,
            "architecture": self.model.cfg.to_dict(),
            "num_classes": len(self.settings.label_names),
            "tokenizer": "tiktoken:gpt2",
            "merged_adapters": len(lora_layers(self.model)),
            **asdict(self.settings),
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "README.md").write_text(_export_readme(config))
        return folder


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint file or sharded checkpoint folder, or the best (else last) checkpoint
    of a training run folder."""
    if path.is_file() or is_sharded_checkpoint(path):
        return path
    if path.is_dir():
        metrics = path / "metrics.json"
        if metrics.is_file():
            best = json.loads(metrics.read_text()).get("best_checkpoint")
            # In this folder first: it may have been moved or copied since training.
            for candidate in (path / "checkpoints" / Path(best).name, Path(best)) if best else ():
                if candidate.is_file() or is_sharded_checkpoint(candidate):
                    return candidate
        last = path / "checkpoints" / "last.ckpt"
        if last.exists():
            return last.resolve()
        raise ModelLoadError(
            f"{path} is neither an export folder (config.json + model.safetensors) nor a "
            "training run with checkpoints/; pass ckpt_path=<file.ckpt> or a run folder."
        )
    raise ModelLoadError(f"checkpoint {path} does not exist; pass a .ckpt file or a run folder")


def _load_checkpoint(path: Path) -> tuple[SequenceClassifier, InferenceSettings]:
    try:
        checkpoint = read_checkpoint(path)
    except Exception as err:  # zip, pickle, unpickler and shard-reading errors
        raise ModelLoadError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {err}); it may be "
            "truncated or corrupt, or need code to load: use a checkpoint written by train.py."
        ) from err
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if "backbone_config" not in hparams or "state_dict" not in checkpoint:
        raise ModelLoadError(f"{path} is not a gpt-classifier checkpoint (no backbone_config)")
    inference = checkpoint.get("inference") or {}
    names = inference.get("label_names") or hparams.get("label_names")
    settings = InferenceSettings(
        label_names=list(names or [str(i) for i in range(hparams.get("num_classes", 2))]),
        pooling=inference.get("pooling", hparams.get("pooling", "last_token")),
        max_length=int(inference.get("max_length", hparams["backbone_config"]["context_length"])),
        truncation_side=inference.get("truncation_side", "right"),
        pad_to=inference.get("pad_to"),
    )
    try:
        complete_state_dict(checkpoint, path)
        method = method_from_config(hparams.get("finetuning"))
    except (FileNotFoundError, RuntimeError, ValueError, TypeError) as err:
        raise ModelLoadError(f"{path}: {err}") from err
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()
             if k.startswith("model.")}  # fmt: skip
    model = _build(hparams["backbone_config"], len(settings.label_names), settings.pooling,
                   state, path, apply=method.apply)  # fmt: skip
    return model, settings


def _load_export(folder: Path) -> tuple[SequenceClassifier, InferenceSettings]:
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if (folder / "model.onnx").is_file():
        return _load_onnx_export(folder, config_path)
    for required in (config_path, weights_path):
        if not required.is_file():
            raise ModelLoadError(f"export folder {folder} lacks {required.name}; export it again")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise ModelLoadError(f"{config_path} is not valid JSON: {err}") from err
    if "gpt_classifier" in config and config.get("model_type") == "gpt2":
        return _load_transformers_export(folder, config)
    if config.get("format") != EXPORT_FORMAT:
        raise ModelLoadError(f"{config_path} is not a {EXPORT_FORMAT} export (format key)")
    if int(config.get("format_version", 1)) > EXPORT_VERSION:
        raise ModelLoadError(
            f"{config_path} is format version {config['format_version']}, newer than this "
            f"gpt-classifier reads ({EXPORT_VERSION}); upgrade gpt-classifier."
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = upgrade_names(load_file(str(weights_path)))
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{weights_path} could not be read ({err}); export it again") from err
    fields = {k: config[k] for k in InferenceSettings.__dataclass_fields__ if k in config}
    settings = InferenceSettings(**fields)
    model = _build(config["architecture"], config["num_classes"], settings.pooling, state,
                   weights_path)  # fmt: skip
    return model, settings


def _load_onnx_export(folder: Path, config_path: Path) -> tuple[Any, InferenceSettings]:
    """A folder written by ``export.py format=onnx``, run by ONNX Runtime."""
    from gpt_classifier.inference.onnx_runtime import OnnxClassifier

    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{config_path} could not be read ({err}); export it again") from err
    if config.get("format") != EXPORT_FORMAT or config.get("runtime") != "onnx":
        raise ModelLoadError(f"{config_path} is not a {EXPORT_FORMAT} ONNX export")
    fields = {k: config[k] for k in InferenceSettings.__dataclass_fields__ if k in config}
    cfg = GPTConfig.from_dict(dict(config["architecture"]))
    try:
        model = OnnxClassifier(folder / "model.onnx", cfg, int(config.get("parameters", 0)))
    except ImportError:
        raise
    except Exception as err:  # noqa: BLE001 - ONNX Runtime's own errors say what broke
        raise ModelLoadError(f"{folder / 'model.onnx'} could not be loaded ({err}); export "
                             "it again") from err  # fmt: skip
    return model, InferenceSettings(**fields)


def _load_transformers_export(
    folder: Path, config: dict[str, Any]
) -> tuple[SequenceClassifier, InferenceSettings]:
    """A folder written by ``export.py format=hf``, read back without transformers."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from gpt_classifier.inference.transformers_export import from_hf_state_dict

    ours = dict(config["gpt_classifier"])
    arch = ours.pop("architecture")
    weights_path = folder / "model.safetensors"
    try:
        state = from_hf_state_dict(load_file(str(weights_path)), arch["n_layers"])
    except (SafetensorError, OSError, KeyError) as err:
        raise ModelLoadError(f"{weights_path} could not be read ({err}); export it again") from err
    fields = {k: ours[k] for k in InferenceSettings.__dataclass_fields__ if k in ours}
    settings = InferenceSettings(**fields)
    model = _build(arch, len(settings.label_names), settings.pooling, state, weights_path)
    return model, settings


def _build(
    arch: dict[str, Any],
    num_classes: int,
    pooling: str,
    state: dict[str, torch.Tensor],
    origin: Path,
    apply: Callable[[SequenceClassifier], None] | None = None,
) -> SequenceClassifier:
    """The classifier of ``arch`` with the tensors of ``state``; ``apply`` adds the
    layers its fine-tuning method added (LoRA adapters) before they are filled."""
    try:
        with torch.device("meta"):  # no memory or time spent on weights about to be replaced
            model = SequenceClassifier(GPT(GPTConfig.from_dict(dict(arch))), num_classes, pooling)
            if apply is not None:
                apply(model)
        model.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, ValueError) as err:
        raise ModelLoadError(
            f"{origin} does not fit its own config (architecture {arch}, {num_classes} "
            f"classes, pooling {pooling!r}): {err}"
        ) from err
    return model.requires_grad_(False)


def _export_readme(config: dict[str, Any]) -> str:
    arch = config["architecture"]
    return f"""# GPT-2 text classifier (gpt-classifier export)

GPT-2 ({arch["n_layers"]} layers, {arch["emb_dim"]} dims) fine-tuned to classify text as
{", ".join(config["label_names"])}. Files: `model.safetensors` (weights, the book's tensor
names under `backbone.`: tok_emb, pos_emb, trf_blocks, final_norm, and out_head, the
classification head; any LoRA adapters are merged in) and `config.json` (architecture,
labels, tokenizer, truncation and pooling). Loading needs neither Lightning nor pickle.

```python
from gpt_classifier.inference import TextClassifier

clf = TextClassifier.load("this/folder")
print(clf.classify(["You are a winner! Call now to claim your prize."]))
```

Texts are tokenized with tiktoken's `gpt2` encoding, cut to {config["max_length"]} tokens
(truncation side: {config["truncation_side"]}), and classified from the logits of the
outputs that the `{config["pooling"]}` pooling rule picks (`gpt_classifier.model.pooling`).
"""
