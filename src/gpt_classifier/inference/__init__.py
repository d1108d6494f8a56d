"""Use a trained classifier: load a checkpoint or export, classify texts, export."""

from gpt_classifier.inference.classifier import Prediction, TextClassifier
from gpt_classifier.inference.loading import InferenceSettings, ModelLoadError

__all__ = [
    "InferenceSettings",
    "ModelLoadError",
    "Prediction",
    "TextClassifier",
]
