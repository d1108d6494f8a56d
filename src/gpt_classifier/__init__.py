"""Fine-tune pretrained GPT-2 into a text classifier."""

from gpt_classifier.data.tokenizer import PAD_TOKEN_ID, get_tokenizer
from gpt_classifier.model import GPT, PRESETS, GPTConfig, SequenceClassifier, preset_config

__all__ = [
    "GPT",
    "GPTConfig",
    "PAD_TOKEN_ID",
    "PRESETS",
    "SequenceClassifier",
    "get_tokenizer",
    "preset_config",
]
