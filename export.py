"""Export a trained classifier: ``python export.py ckpt_path=... out=<dir>``."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="export")
def main(cfg: DictConfig) -> None:
    """Hand the composed config to the task."""
    from gpt_classifier.tasks.errors import shown_as_messages
    from gpt_classifier.tasks.export import export

    with shown_as_messages():
        export(cfg)


if __name__ == "__main__":
    main()
