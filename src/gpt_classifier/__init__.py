"""Fine-tune pretrained GPT-2 into a text classifier."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpt_classifier.data.tokenizer import PAD_TOKEN_ID, get_tokenizer
    from gpt_classifier.model import GPT, PRESETS, GPTConfig, SequenceClassifier, preset_config

# Imported on first use: an entry point checks its command line, and Hydra answers
# --help and --cfg, without importing torch.
_HOMES = {"GPT": "model", "GPTConfig": "model", "PRESETS": "model", "SequenceClassifier": "model",
          "preset_config": "model", "PAD_TOKEN_ID": "data.tokenizer",
          "get_tokenizer": "data.tokenizer"}  # fmt: skip
__all__ = [
    "GPT",
    "GPTConfig",
    "PAD_TOKEN_ID",
    "PRESETS",
    "SequenceClassifier",
    "get_tokenizer",
    "preset_config",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'gpt_classifier' has no attribute {name!r}")
    return getattr(import_module(f"gpt_classifier.{_HOMES[name]}"), name)
