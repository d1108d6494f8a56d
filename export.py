"""Export a trained classifier: ``python export.py ckpt_path=... out=<dir>``."""

import sys

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
    from gpt_classifier.tasks.command_line import check_overrides

    check_overrides(sys.argv[1:])
    main()
