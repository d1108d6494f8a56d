"""Fine-tune pretrained GPT-2 into a text classifier."""

from gpt_classifier.backbone import GPT, PRESETS, GPTConfig, preset_config
from gpt_classifier.tokenizer import PAD_TOKEN_ID, get_tokenizer

__all__ = ["GPT", "GPTConfig", "PRESETS", "PAD_TOKEN_ID", "get_tokenizer", "preset_config"]
