"""What a run needs beyond Lightning's own strategies to train in several processes.

- :func:`is_rank_zero_process`: which process writes the run's files before the
  Trainer knows the ranks (Lightning starts the other processes inside ``fit``).
- :func:`starts_processes_by_script`: whether a strategy starts its processes by
  re-running the script (``tasks.sweep_job`` runs such sweep jobs in their own process).
- :func:`all_gather_objects`: every process's share of the prefix pass to every process.
"""

from __future__ import annotations

import os
import random
from typing import Any

import lightning as L
import numpy as np
import torch

# Set by the launchers: torchrun and Lightning's own children (RANK / LOCAL_RANK,
# NODE_RANK) and SLURM (SLURM_PROCID).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def is_rank_zero_process() -> bool:
    """Whether this process is the first of its run (or the only one), judged from the
    launcher's environment: the ranks are known before the Trainer is built."""
    if os.environ.get("SLURM_NTASKS", "1") == "1":  # one task: SLURM_PROCID says nothing
        variables = [v for v in RANK_VARIABLES if v != "SLURM_PROCID"]
    else:
        variables = list(RANK_VARIABLES)
    return all(os.environ.get(name, "0") in ("", "0") for name in variables)


def starts_processes_by_script(trainer: L.Trainer) -> bool:
    """Whether ``trainer``'s strategy starts its other processes by re-running the
    script (Lightning's ``_SubprocessScriptLauncher`` with more than one process)."""
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    return isinstance(launcher, _SubprocessScriptLauncher) and launcher.num_processes > 1


def all_gather_objects(trainer: L.Trainer, value: Any) -> list[Any]:
    """``value`` of every process of ``trainer``'s run, by rank (``[value]`` alone)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [value]
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


class KeepRandomState(L.Callback):
    """Puts back, when fitting starts, the random generators' states that
    :meth:`capture` saw (just before ``fit``).

    Lightning's multi-process strategies re-seed every process with the run's seed while
    they set up (``reset_seed``); a one-process run is not re-seeded. Without this the
    data order, drawn from the global generator, would depend on the strategy, and a
    ``ddp`` run could not match a one-process run with the same global batch. Every
    process reaches ``fit`` along the same path, so the states are the same in all.
    A resumed run then restores the checkpoint's states (``training.resume``).
    """

    def __init__(self) -> None:
        self.capture()

    def capture(self) -> None:
        """Keep the generators' states of this moment."""
        self.states = (random.getstate(), np.random.get_state(), torch.get_rng_state())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            python_state, numpy_state, torch_state = self.states
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            torch.set_rng_state(torch_state)


def fsdp_strategy(
    sharding_strategy: str = "FULL_SHARD",
    state_dict_type: str = "sharded",
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
    process_group_backend: str | None = None,
) -> L.pytorch.strategies.FSDPStrategy:
    """Lightning's FSDP with one shard unit per transformer block.

    ``use_orig_params``: the fine-tuning method may leave some parameters of a unit
    frozen (``freeze=last_block``: the embeddings sit in the root unit beside the
    trainable final LayerNorm), which FSDP's flat parameters allow only this way.
    ``activation_checkpointing`` recomputes each block's activations in the backward
    pass instead of keeping them (``model.activation_checkpointing``).
    """
    from lightning.pytorch.strategies import FSDPStrategy

    from gpt_classifier.model.gpt import TransformerBlock

    return FSDPStrategy(
        auto_wrap_policy={TransformerBlock},
        activation_checkpointing_policy={TransformerBlock} if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
        process_group_backend=process_group_backend,
        use_orig_params=True,
    )
