"""Fine-tune GPT-2 as an SMS spam classifier: ``python train.py [overrides]``."""

import sys
import warnings

import hydra
from omegaconf import DictConfig

# Our hydra/launcher/submitit_*.yaml carry all of the submitit plugin's keys and are
# checked against its schema of the same name, which Hydra 1.3 still does but warns of.
warnings.filterwarnings("ignore", message=".*validated against ConfigStore schema with the same")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    """Run one training job; returns the metric a sweep optimises."""
    from gpt_classifier.tasks.errors import shown_as_messages
    from gpt_classifier.tasks.preflight import check_training

    with shown_as_messages():
        check_training(cfg)  # before Lightning is imported: a failed start takes seconds
        from gpt_classifier.tasks.train import train

        return train(cfg)


if __name__ == "__main__":
    from gpt_classifier.tasks.command_line import check_overrides

    check_overrides(sys.argv[1:])
    main()
