"""Evaluate a trained classifier: ``python eval.py ckpt_path=... [split=test]``."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    """Hand the composed config to the task."""
    from gpt_classifier.tasks.errors import shown_as_messages
    from gpt_classifier.tasks.evaluate import evaluate

    with shown_as_messages():
        evaluate(cfg)


if __name__ == "__main__":
    main()
