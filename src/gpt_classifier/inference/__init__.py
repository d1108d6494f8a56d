"""Use a trained classifier: load a checkpoint or export, classify texts, export."""

from gpt_classifier.inference.classifier import (
    InferenceSettings,
    ModelLoadError,
    Prediction,
    TextClassifier,
    resolve_checkpoint,
)

__all__ = [
    "InferenceSettings",
    "ModelLoadError",
    "Prediction",
    "TextClassifier",
    "resolve_checkpoint",
]
