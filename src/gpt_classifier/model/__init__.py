"""The model in plain PyTorch (no Lightning, no Hydra): GPT-2, pooling, the classifier, LoRA."""

from gpt_classifier.model.classifier import CachedPrefix, SequenceClassifier
from gpt_classifier.model.config import PRESETS, GPTConfig, preset_config
from gpt_classifier.model.gpt import GPT

__all__ = ["GPT", "PRESETS", "CachedPrefix", "GPTConfig", "SequenceClassifier", "preset_config"]
