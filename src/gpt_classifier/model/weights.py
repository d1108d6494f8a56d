"""Read pretrained GPT-2 weights from the Hub, a saved folder, or OpenAI's checkpoint.

Every source is turned into one canonical state dict (Hugging Face's tensor names
without the ``transformer.`` prefix), checked tensor by tensor, then renamed to the
book's names (GPT-2's fused ``c_attn`` split into ``W_query``, ``W_key`` and
``W_value``). This module owns the one table between GPT-2's names and the book's;
:meth:`~gpt_classifier.model.gpt.GPT.from_pretrained` builds the model.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt_classifier.model.config import PRESETS, GPTConfig
from gpt_classifier.model.tf_checkpoint import is_openai_folder, read_openai_folder
from gpt_classifier.model.weight_names import WeightLoadError, strip_prefix, to_book_names

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".index.json", ".bin", ".pt", ".pth")

# Hub repositories of the four published sizes, by every name people use for them.
HUB_MODELS: dict[str, str] = {
    "gpt2": "openai-community/gpt2",
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
HUB_MODELS.update({repo: repo for repo in list(HUB_MODELS.values())})
HUB_PREFIX = "hf:"  # "hf:owner/name" loads any other GPT-2-architecture Hub repository


@dataclass
class PretrainedWeights:
    """Checked tensors under the book's names, the architecture they belong to, where
    they came from, and the ``score`` layer of a fine-tuned classifier, if any."""

    cfg: GPTConfig
    state: dict[str, torch.Tensor]
    origin: str
    head: torch.Tensor | None = None


def read_pretrained(source: str | Path, **overrides: Any) -> PretrainedWeights:
    """The weights of ``source``, checked and renamed for :class:`~gpt_classifier.model.gpt.GPT`.

    ``source`` is a Hub name (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``,
    their ``openai-community/...`` names, or ``hf:owner/name``), a local folder saved
    by ``save_pretrained`` (``model.safetensors`` or ``pytorch_model.bin`` with
    ``config.json``), or a folder of OpenAI's original TensorFlow checkpoint.
    ``overrides`` set non-architectural fields such as ``drop_rate``.
    """
    path = Path(source).expanduser()
    if path.exists():
        folder = path if path.is_dir() else path.parent
        if is_openai_folder(folder):
            try:
                state, cfg, origin = read_openai_folder(folder)
            except (OSError, ValueError, KeyError) as err:
                raise WeightLoadError(str(err)) from err
        else:  # a file of the folder that holds no weights (config.json): the folder's
            weights = path.is_file() and path.name.endswith(WEIGHT_SUFFIXES)
            state, cfg, origin = _read_hf_folder(folder, path if weights else None)
    else:
        state, cfg, origin = _read_hub(str(source))
    cfg = GPTConfig.from_dict({**cfg.to_dict(), **overrides})
    # A GPT2ForSequenceClassification checkpoint: its score layer can start our head.
    head = state.pop("score.weight", None)
    weights = PretrainedWeights(cfg, to_book_names(state, cfg, origin), origin, head)
    if head is not None:
        log.info("%s is a classifier with %d classes: its score layer starts the head",
                 origin, head.shape[0])  # fmt: skip
    log.info("Loaded GPT-2 weights (%d layers, %d dims) from %s", cfg.n_layers, cfg.emb_dim, origin)
    return weights


# ----------------------------------------------------------------------------- sources


def _read_hub(name: str) -> tuple[dict[str, torch.Tensor], GPTConfig, str]:
    if name.startswith(HUB_PREFIX):
        repo_id = name[len(HUB_PREFIX) :]
    elif name in HUB_MODELS:
        repo_id = HUB_MODELS[name]
    else:
        raise WeightLoadError(
            f"{name!r} is neither an existing local path nor a known GPT-2 name. Use one of "
            f"{sorted(HUB_MODELS)}, 'hf:<owner>/<repo>' for another Hub repository, or the "
            "path of a folder with model.safetensors / pytorch_model.bin + config.json or "
            "OpenAI's checkpoint files."
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def fetch(filename: str) -> Path:
        try:
            return Path(hf_hub_download(repo_id, filename))
        except LocalEntryNotFoundError as err:
            raise WeightLoadError(
                f"could not download {filename} of {repo_id!r} from the Hugging Face Hub and "
                "no cached copy exists (no network, or HF_HUB_OFFLINE=1). Download it on a "
                "machine with internet (it is cached under HF_HOME) or point at a local copy: "
                "model.weights=/path/to/folder with model.safetensors and config.json, or "
                "OpenAI's 124M/355M/774M/1558M checkpoint folder."
            ) from err

    config_path = fetch("config.json")
    try:
        weights_path = fetch("model.safetensors")
    except EntryNotFoundError:
        weights_path = fetch("pytorch_model.bin")
    folder = weights_path.parent
    return _read_hf_folder(folder, weights_path, config_path, origin=f"hub:{repo_id}")


def _read_hf_folder(
    folder: Path,
    weights_file: Path | None = None,
    config_path: Path | None = None,
    origin: str | None = None,
) -> tuple[dict[str, torch.Tensor], GPTConfig, str]:
    if weights_file is None:
        candidates = [
            folder / "model.safetensors",
            folder / "model.safetensors.index.json",
            folder / "pytorch_model.bin",
        ]
        weights_file = next((c for c in candidates if c.is_file()), None)
        if weights_file is None:
            raise WeightLoadError(
                f"{folder} holds no weights: expected model.safetensors, "
                "model.safetensors.index.json or pytorch_model.bin (as written by "
                "save_pretrained), or OpenAI's checkpoint (hparams.json, model.ckpt.index)."
            )
    state = _read_weights_file(weights_file)
    config_path = config_path or folder / "config.json"
    cfg = _hf_config(config_path) if config_path.is_file() else _config_from_shapes(state, folder)
    return state, cfg, origin or str(weights_file)


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".index.json"):
        try:
            weight_map: dict[str, str] = json.loads(path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise WeightLoadError(f"{path} is not a valid safetensors index: {err}") from err
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_read_weights_file(path.parent / shard))
        return state
    if not path.is_file():
        raise WeightLoadError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # weights_only: a .bin is a pickle, and no code from it may run.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip raise many kinds
        raise WeightLoadError(
            f"{path} could not be read ({type(err).__name__}: {err}); the file is corrupt, "
            "truncated or not a weights file. Download it again."
        ) from err
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise WeightLoadError(f"{path} does not hold a flat dict of tensors (a state dict)")
    return loaded


def _hf_config(path: Path) -> GPTConfig:
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise WeightLoadError(f"{path} is not valid JSON: {err}") from err
    if raw.get("format") == "gpt-classifier":
        raise WeightLoadError(
            f"{path.parent} is a classifier exported by export.py (format=native), not GPT-2 "
            "weights: to train from it, export its run with format=hf and give that folder "
            "(its head starts ours), or continue the run itself with ckpt_path=<run>"
        )
    if raw.get("model_type", "gpt2") != "gpt2":
        raise WeightLoadError(
            f"{path}: model_type is {raw['model_type']!r}, but only 'gpt2' checkpoints load here"
        )
    activation = raw.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise WeightLoadError(
            f"{path}: activation_function {activation!r} is not GPT-2's tanh GELU ('gelu_new')"
        )
    for key, supported in (
        ("scale_attn_by_inverse_layer_idx", False),
        ("scale_attn_weights", True),
    ):
        if raw.get(key, supported) != supported:
            raise WeightLoadError(f"{path}: {key}={raw[key]} is not supported by this GPT-2")
    try:
        return GPTConfig(
            vocab_size=int(raw["vocab_size"]),
            context_length=int(raw.get("n_positions", raw.get("n_ctx", 1024))),
            emb_dim=int(raw["n_embd"]),
            n_layers=int(raw["n_layer"]),
            n_heads=int(raw["n_head"]),
            layer_norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        )
    except KeyError as err:
        raise WeightLoadError(f"{path} lacks the key {err.args[0]!r} of a GPT-2 config") from err


def _config_from_shapes(state: dict[str, torch.Tensor], folder: Path) -> GPTConfig:
    """Architecture from tensor shapes; the head count must come from a known size."""
    canonical = {strip_prefix(k): v for k, v in state.items()}
    try:
        vocab, emb_dim = canonical["wte.weight"].shape
        context = canonical["wpe.weight"].shape[0]
    except KeyError as err:
        raise WeightLoadError(f"{folder}: no config.json and no tensor {err.args[0]!r}") from err
    n_layers = 1 + max(
        (int(m.group(1)) for k in canonical if (m := re.match(r"h\.(\d+)\.", k))), default=-1
    )
    for preset in PRESETS.values():
        if (preset.emb_dim, preset.n_layers) == (emb_dim, n_layers):
            return GPTConfig(
                vocab_size=vocab, context_length=context, emb_dim=emb_dim,
                n_layers=n_layers, n_heads=preset.n_heads,
            )  # fmt: skip
    raise WeightLoadError(
        f"{folder} has no config.json, and {emb_dim} dims x {n_layers} layers is not a "
        "published GPT-2 size, so the number of heads is unknown. Add the config.json that "
        "save_pretrained writes."
    )
