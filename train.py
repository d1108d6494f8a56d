"""Fine-tune GPT-2 as an SMS spam classifier: ``python train.py [overrides]``."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    """Run one training job; returns the metric a sweep optimises."""
    from gpt_classifier.tasks.train import train

    return train(cfg)


if __name__ == "__main__":
    main()
