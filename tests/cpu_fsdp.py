"""``trainer=fsdp`` on a CPU, for tests only: Lightning's FSDP strategy past its two
GPU-only spots.

Lightning refuses ``FSDPStrategy`` with a CPU accelerator by an exact type check, and
wraps the model with ``device_id=<the GPU's index>``, which is None on a CPU, where FSDP
then refuses to start. This subclass passes the check, and its ``_setup_model`` is
Lightning's with one change: ``device_id`` is the CPU. Everything else (auto-wrap per
block, activation checkpointing, sharded checkpoints, gloo) is Lightning's and torch's.
Used as ``trainer.strategy._target_=cpu_fsdp.cpu_fsdp_strategy`` with ``tests/`` on
``PYTHONPATH``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies import fsdp as lightning_fsdp
from torch import nn

from gpt_classifier.training.distributed import fsdp_strategy


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP with the model wrapped on the CPU."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                **self.kwargs,
            )  # fmt: skip
        lightning_fsdp._move_torchmetrics_to_device(model, self.root_device)
        lightning_fsdp._setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model


def cpu_fsdp_strategy(**kwargs: Any) -> CPUFSDPStrategy:
    """The strategy ``trainer=fsdp`` builds (``fsdp_strategy``), as a :class:`CPUFSDPStrategy`."""
    strategy = fsdp_strategy(**kwargs)
    strategy.__class__ = CPUFSDPStrategy
    return strategy
