"""The task behind ``python baseline.py``: TF-IDF features and logistic regression.

The same data config, and so the same split, as ``train.py``: what a GPT-2 classifier
has to beat. Needs scikit-learn (``pip install -e ".[baseline]"``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from gpt_classifier.reporting.reports import write_json

log = logging.getLogger(__name__)

SPLIT_KEYS = {"train": "train", "validation": "val", "test": "test"}


def baseline(cfg: DictConfig) -> float:
    """Fit on the training split, write ``metrics.json`` for all three splits."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import accuracy_score, log_loss, precision_recall_fscore_support
    except ImportError as err:
        raise SystemExit(
            f'baseline.py needs scikit-learn ({err}); install it with: pip install -e ".[baseline]"'
        ) from err
    output_dir = Path(cfg.paths.output_dir)
    datamodule = instantiate(cfg.data, splits_dir=str(output_dir / "splits"), _convert_="all")
    splits = datamodule.load_splits()
    names = datamodule.label_names
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
    binary = len(names) == 2
    for split, rows in splits.items():
        texts, labels = zip(*rows)
        x = vectorizer.transform(texts)
        predicted, probabilities = model.predict(x), model.predict_proba(x)
        # The positive class (spam) for two classes, as train.py reports; macro otherwise.
        precision, recall, f1, _ = precision_recall_fscore_support(
            labels, predicted, average="binary" if binary else "macro", zero_division=0
        )
        key = SPLIT_KEYS[split]
        metrics.update({
            f"{key}/acc": float(accuracy_score(labels, predicted)),
            f"{key}/loss": float(log_loss(labels, probabilities, labels=list(range(len(names))))),
            f"{key}/precision": float(precision),
            f"{key}/recall": float(recall),
            f"{key}/f1": float(f1),
        })  # fmt: skip
    metrics.update({
        "model": f"tfidf({features['analyzer']}, {features['ngram_range']}) + logistic regression",
        "features": len(vectorizer.vocabulary_),
        "time/fit_s": round(fit_seconds, 3),
        "time/test_s": round(time.perf_counter() - start, 3),
    })  # fmt: skip
    write_json(output_dir / "metrics.json", metrics)
    log.info("Baseline: %s", {k: round(v, 4) for k, v in metrics.items() if k.endswith("/acc")})
    return float(metrics[cfg.optimize_metric])
