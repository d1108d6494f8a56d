"""Serve a trained classifier over HTTP: ``python serve.py ckpt_path=<run or export>``."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="serve")
def main(cfg: DictConfig) -> None:
    """Hand the composed config to the task."""
    from gpt_classifier.tasks.errors import shown_as_messages
    from gpt_classifier.tasks.serve import serve

    with shown_as_messages():
        serve(cfg)


if __name__ == "__main__":
    from gpt_classifier.tasks.command_line import check_overrides

    check_overrides(sys.argv[1:])
    main()
