"""A classical baseline on the same split: ``python baseline.py [data.path=...]``."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="baseline")
def main(cfg: DictConfig) -> float:
    """TF-IDF + logistic regression; returns the metric a sweep optimises."""
    from gpt_classifier.tasks.baseline import baseline
    from gpt_classifier.tasks.errors import shown_as_messages

    with shown_as_messages():
        return baseline(cfg)


if __name__ == "__main__":
    from gpt_classifier.tasks.command_line import check_overrides

    check_overrides(sys.argv[1:])
    main()
