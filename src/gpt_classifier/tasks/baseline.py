"""The task behind ``python baseline.py``: TF-IDF features and logistic regression.

The same data config, and so the same split, as ``train.py``: what a GPT-2 classifier
has to beat. Needs scikit-learn (``pip install -e ".[baseline]"``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from gpt_classifier.extras import import_extra
from gpt_classifier.reporting.reports import write_json
from gpt_classifier.tasks.train import check_monitored
from gpt_classifier.training.metrics import rates

log = logging.getLogger(__name__)

SPLIT_KEYS = {"train": "train", "validation": "val", "test": "test"}


def baseline(cfg: DictConfig) -> float:
    """Fit on the training split, write ``metrics.json`` for all three splits."""
    import_extra("sklearn", "baseline", "baseline.py")
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import confusion_matrix, log_loss

    output_dir = Path(cfg.paths.output_dir)
    datamodule = instantiate(cfg.data, splits_dir=str(output_dir / "splits"), _convert_="all")
    splits = datamodule.load_splits()
    names = datamodule.label_names
    check_monitored(cfg, names)  # before the fit, as train.py
    features = dict(cfg.features)
    features["ngram_range"] = tuple(features["ngram_range"])
    vectorizer = TfidfVectorizer(**features)
    model = LogisticRegression(**cfg.classifier, random_state=cfg.seed)

    start = time.perf_counter()
    texts, labels = zip(*splits.train)
    model.fit(vectorizer.fit_transform(texts), labels)
    fit_seconds = time.perf_counter() - start

    start = time.perf_counter()
    metrics: dict[str, Any] = {}
    classes = list(range(len(names)))
    for split, rows in splits.items():
        texts, labels = zip(*rows)
        x = vectorizer.transform(texts)
        predicted, probabilities = model.predict(x), model.predict_proba(x)
        key = SPLIT_KEYS[split]
        # The names and definitions train.py logs (per class, macro, micro; spam's for two).
        matrix = torch.as_tensor(confusion_matrix(labels, predicted, labels=classes))
        metrics.update({f"{key}/{name}": float(v) for name, v in rates(matrix, names).items()})
        metrics[f"{key}/loss"] = float(log_loss(labels, probabilities, labels=classes))
        metrics[f"{key}/examples"] = len(labels)
    metrics.update({
        "model": f"tfidf({features['analyzer']}, {features['ngram_range']}) + logistic regression",
        "features": len(vectorizer.vocabulary_),
        "time/fit_s": round(fit_seconds, 3),
        "time/test_s": round(time.perf_counter() - start, 3),
    })  # fmt: skip
    write_json(output_dir / "metrics.json", metrics)
    log.info("Baseline: %s", {k: round(v, 4) for k, v in metrics.items() if k.endswith("/acc")})
    return float(metrics[cfg.optimize_metric])
