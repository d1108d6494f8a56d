"""Fine-tuning methods (the ``freeze`` config group): what trains, what stays frozen."""

from gpt_classifier.finetuning.methods import (
    METHODS,
    FineTuningMethod,
    LoRA,
    TrainAll,
    TrainHead,
    TrainLastBlocks,
    count_parameters,
    method_from_config,
)

__all__ = [
    "METHODS",
    "FineTuningMethod",
    "LoRA",
    "TrainAll",
    "TrainHead",
    "TrainLastBlocks",
    "count_parameters",
    "method_from_config",
]
