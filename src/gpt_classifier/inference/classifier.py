"""Use a trained classifier: load it from a checkpoint or an export, classify texts, export.

No Lightning at inference time: a checkpoint is read with ``torch.load(weights_only=True)``
(no pickled code runs) and an export folder is safetensors + JSON only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt_classifier.checkpoints import find_checkpoint, is_checkpoint
from gpt_classifier.data.batching import Collator, plan_batches, truncate
from gpt_classifier.data.tokenizer import encode_texts, get_tokenizer
from gpt_classifier.files import atomic_folder
from gpt_classifier.inference import hf_format, native_format, onnx_format, peft_format
from gpt_classifier.inference.loading import (
    EXPORT_FORMAT,
    InferenceSettings,
    ModelLoadError,
    read_config,
)
from gpt_classifier.model.classifier import SequenceClassifier

log = logging.getLogger(__name__)

# Measured best of 256..4096 for gpt2-small on a 2-core Xeon (scripts/benchmark.py era).
MAX_BATCH_TOKENS = 1024
# Each format's module: load(folder, config) -> (model, settings), export(model,
# settings, folder) -> folder.
FORMATS = {"native": native_format, "hf": hf_format, "onnx": onnx_format}
# Every name that an export of some format writes (tests/test_use.py exports each format
# over each other): a folder of only these, with our config, is an earlier export.
EXPORT_NAMES = {"README.md", "config.json", "model.safetensors", "vocab.json", "merges.txt",
                "tokenizer_config.json", "special_tokens_map.json", onnx_format.ONNX_FILE,
                f"{onnx_format.ONNX_FILE}.data", peft_format.ADAPTER_FILE, peft_format.CONFIG_FILE,
                peft_format.BASE_FOLDER}  # fmt: skip


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
        if isinstance(model, torch.nn.Module):
            model = model.eval().to(resolve_device(device))
        elif device not in ("auto", "cpu"):  # ONNX Runtime: auto is the CPU, on any machine
            raise ValueError(f"an ONNX export runs on the CPU here, not {device}; use device=cpu "
                             "(or auto), or the native export on an accelerator")  # fmt: skip
        self.model = model
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
            config = read_config(path / "config.json")
            return cls(*FORMATS[export_format(path, config)].load(path, config), device)
        run_folder = (path / "checkpoints").is_dir() or any(path.glob("*.ckpt"))
        if path.is_dir() and not run_folder and not is_checkpoint(path):
            runs = sorted((p.parent.name for p in path.glob("*/checkpoints")),
                          key=lambda name: (len(name), name))  # fmt: skip
            within = (f" It holds runs ({'..., ' if len(runs) > 5 else ''}{', '.join(runs[-5:])}): "
                      f"pass one, e.g. the latest: ckpt_path={path / runs[-1]} (a sweep's "
                      "summary.md ranks its jobs)." if runs else "")  # fmt: skip
            if (path / peft_format.CONFIG_FILE).is_file():
                within = (" It holds a peft adapter (export.py format=peft), which peft's "
                          "PeftModel loads (docs/using-the-model.md); here, pass the LoRA run "
                          "or an export of another format.")  # fmt: skip
            raise ModelLoadError(
                f"{path} is neither an export folder (config.json + model.safetensors) nor a "
                "training run with checkpoints/; pass ckpt_path=<file.ckpt> or a run folder."
                + within
            )
        try:
            checkpoint = find_checkpoint(path, best=True)
        except FileNotFoundError as err:
            raise ModelLoadError(str(err)) from err
        return cls(*native_format.load_checkpoint(checkpoint), device)

    # ------------------------------------------------------------------ classifying

    def encode(self, texts: Sequence[str] | str) -> tuple[list[list[int]], list[bool]]:
        """Token ids as training saw them (same truncation), and which were truncated; one
        ``str`` is one text (not a sequence of one-letter texts)."""
        out, cut = [], []
        s = self.settings
        limit = min(s.max_length, s.pad_to or s.max_length, self.model.cfg.context_length)
        texts = [texts] if isinstance(texts, str) else texts
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {index} is {type(text).__name__} {text!r}, not a str")
            if not text.strip():  # whitespace has tokens, but nothing to classify
                raise ValueError(f"text {index} is empty or only whitespace; give it some text")
        for ids in encode_texts(self.tokenizer, list(texts)):
            ids, was_cut = truncate(ids, limit, s.truncation_side)  # type: ignore[arg-type]
            out.append(ids)
            cut.append(was_cut)
        return out, cut

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str] | str, batch_size: int = 32) -> torch.Tensor:
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
        self, texts: Sequence[str] | str, batch_size: int = 32, progress: bool = False
    ) -> list[Prediction]:
        """Label and probabilities of each text (one ``str``: a list of one prediction)."""
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

    def export(
        self, folder: str | Path, format: str = "native", base_model: str | None = None
    ) -> Path:
        """Write the model into ``folder`` in ``format``: ``native`` (safetensors + JSON),
        ``hf`` (a ``GPT2ForSequenceClassification`` folder for 🤗 transformers) or ``onnx``,
        with LoRA adapters merged into the weights they adapt (a plain model); or ``peft``
        (a LoRA run's adapters, unmerged, for ``peft.PeftModel``; ``base_model``: the Hub
        id of the weights it started from, else their ``hf`` export goes to ``base/``).
        """
        if not isinstance(self.model, torch.nn.Module):
            raise ValueError("this model was loaded from an ONNX export; export its checkpoint")
        if format not in [*FORMATS, "peft"]:
            raise ValueError(f"format={format!r}; choose one of {', '.join([*FORMATS, 'peft'])}")
        folder = Path(folder)
        check_export_folder(folder)
        with atomic_folder(folder) as new:  # no file of an earlier export is left to mix in
            if format == "peft":
                peft_format.export(self.model, self.settings, new, base_model, folder)
            else:
                FORMATS[format].export(self.model, self.settings, new)
        return folder


def check_export_folder(folder: Path) -> None:
    """``folder`` can take an export: it is new, empty, or an earlier export (which the new
    one replaces whole). A folder with anything else is refused: that would be lost."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; give a folder to export into")
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    others = [name for name in names if name not in EXPORT_NAMES]
    config = folder / "config.json"
    earlier = _is_ours(config) if config.is_file() else peft_format.CONFIG_FILE in names
    if names and (others or not earlier):
        raise FileExistsError(
            f"{folder} holds files that are not an export of this project "
            f"({', '.join((others or names)[:5])}{', ...' if len(others or names) > 5 else ''}), "
            "which exporting there would delete: give a new or empty folder"
        )


def _is_ours(config: Path) -> bool:
    try:
        found = read_config(config)
    except ModelLoadError:
        return False
    if not isinstance(found, dict):
        return False
    return found.get("format") == EXPORT_FORMAT or "gpt_classifier" in found  # hf: ours inside


def export_format(folder: Path, config: dict[str, Any]) -> str:
    """Which format an export folder is in."""
    if (folder / onnx_format.ONNX_FILE).is_file():
        return "onnx"
    if "gpt_classifier" in config and config.get("model_type") == "gpt2":
        return "hf"
    return "native"


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; a device that this torch cannot
    use (``cuda`` on a machine without one) is an error naming ``device=``."""
    if device != "auto":
        try:
            chosen = torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"device={device}: choose auto, cpu, cuda (cuda:<n>) or mps") from err
        if (why := unusable(chosen)) is not None:
            raise ValueError(f"device={device}: {why}; use device=auto (a GPU where there is "
                             "one, else the CPU) or device=cpu")  # fmt: skip
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def unusable(device: torch.device) -> str | None:
    """Why this torch cannot run on ``device`` (a CUDA or MPS one), or None where it can."""
    if device.type == "cuda" and not torch.cuda.is_available():
        built = "finds no CUDA GPU" if torch.version.cuda else "is built without CUDA"
        return f"torch {torch.__version__} {built}"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA GPU(s), counted from 0"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return "Apple's MPS is not available (it needs macOS on Apple silicon)"
    return None
