"""Stop cleanly on a signal: a checkpoint after the current step, then a clear exit.

:class:`GracefulStop` turns SIGINT (Ctrl-C), SIGTERM (what ``kill``, schedulers and
Kubernetes send) and submitit's preemption signal into a checkpoint after the current
optimizer step and :class:`TrainingInterrupted`; :func:`fit` and :func:`test` turn that,
and Lightning's own SIGTERM stop, into the exit code a shell reports for the signal and
the command that continues the run.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gpt_classifier.training.resume import mid_accumulation

log = logging.getLogger(__name__)

INTERRUPTED_CHECKPOINT = "interrupted.ckpt"


def _preemption_signals() -> tuple[int, ...]:
    """submitit's preemption signal (``SUBMITIT_PREEMPT_SIGNAL``, USR2 by default); none
    where the platform lacks it (Windows)."""
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")
    found = getattr(signal, name, None)
    return (found,) if found is not None else ()


PREEMPTION_SIGNALS = _preemption_signals()


class TrainingInterrupted(Exception):
    """Training stopped on a signal after writing ``checkpoint``."""

    def __init__(self, signum: int, checkpoint: Path | None, then: Any = None) -> None:
        self.signum, self.checkpoint = signum, checkpoint
        # The handler the signal had before training (submitit's requeue for SIGUSR2):
        # called once the checkpoint is written and Lightning has let go.
        self.then = then if callable(then) else None
        super().__init__(f"{signal.Signals(signum).name}; checkpoint {checkpoint}")


class GracefulStop(L.Callback):
    """SIGINT (Ctrl-C), SIGTERM or SIGUSR2 during training: finish the optimizer step,
    write ``interrupted.ckpt`` beside the other checkpoints and raise
    :class:`TrainingInterrupted`.

    SIGUSR2 is what SLURM sends ahead of a time limit or preemption when jobs are
    submitted through submitit (``--signal=USR2@signal_delay_s``); submitit's own handler
    (requeue the job) is handed on in the exception, to run after the checkpoint.
    A second Ctrl-C stops at once, without a checkpoint. Lightning's own SIGTERM handler
    still runs (it stops DDP's child processes), except among one process's training
    batches, where it would stop between two steps without a checkpoint.
    """

    # Not Lightning's OnExceptionCheckpoint: Ctrl-C's KeyboardInterrupt lands anywhere in a
    # step, and a checkpoint from there does not resume to the same results.
    SIGNALS = (signal.SIGINT, signal.SIGTERM, *PREEMPTION_SIGNALS)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.forced = False  # a second Ctrl-C: stopped at once
        self._previous: dict[int, Any] = {}
        self._lightning_sigterm: Any = None  # Lightning's handler, while ours defers it
        self._in_batches = False  # between the training batches' start and validation
        self._deferred = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set in the main thread
        for signum in self.SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's SIGTERM handler, set up after on_fit_start, flags the trainer, and its
        # loop then stops at the end of the step, after on_train_batch_end: a SIGTERM there
        # would stop without a checkpoint. Among the training batches ours decides alone
        # (in one process: under DDP, Lightning's handler also syncs the processes).
        handler = signal.getsignal(signal.SIGTERM)
        main_thread = threading.current_thread() is threading.main_thread()
        if trainer.world_size == 1 and callable(handler) and main_thread:
            self._lightning_sigterm = handler
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self._in_batches:  # the next on_train_batch_end stops with a checkpoint
            self._deferred = True
            self._on_signal(signum, frame)
        else:
            self._lightning_sigterm(signum, frame)

    def _leave_batches(self) -> None:
        """Validation or the epoch's end: a SIGTERM no step has taken is Lightning's."""
        self._in_batches = False
        if self._deferred:
            self._deferred = False
            self._lightning_sigterm(signal.SIGTERM, None)

    def on_train_batch_start(self, *args: Any) -> None:
        self._in_batches = True

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._leave_batches()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._leave_batches()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            self.forced = True
            raise KeyboardInterrupt  # the second Ctrl-C
        if self.signum == signum:  # a deferred SIGTERM handed on to Lightning
            return
        self.signum = signum
        log.warning(
            "%s received: stopping after this training step, with a checkpoint%s",
            signal.Signals(signum).name,
            " (Ctrl-C again stops at once, without one)" if signum == signal.SIGINT else "",
        )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        # Not at the epoch's last batch: a checkpoint there resumes to other results (see
        # StepCheckpoint). The signal stops the validation that follows, or the next step.
        if batch_idx + 1 >= trainer.num_training_batches:
            return
        asked = self.signum is not None or trainer.received_sigterm
        # Every rank stops at the same step when any of them was signalled.
        if not trainer.strategy.reduce_boolean_decision(asked, all=False):
            return
        if mid_accumulation(trainer):
            return  # the accumulated gradients would be lost; stop after the step
        self._checkpoint_and_stop(trainer)

    def stop_if_asked(self, trainer: L.Trainer) -> None:
        """Between the batches of a long pass before training (the frozen prefix), in a
        one-process run: stop there as after a step. (Processes of a data-parallel run
        cannot agree on a moment there, and stop after the pass's first step instead.)"""
        if trainer.world_size == 1 and (self.signum is not None or trainer.received_sigterm):
            self._checkpoint_and_stop(trainer)

    def _checkpoint_and_stop(self, trainer: L.Trainer) -> None:
        signum = self.signum or signal.SIGTERM
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        path = Path(dirpath or trainer.default_root_dir) / INTERRUPTED_CHECKPOINT
        trainer.save_checkpoint(path)
        then = self._previous.get(signum) if signum in PREEMPTION_SIGNALS else None
        raise TrainingInterrupted(signum, path, then)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()


def _resume_hint(output_dir: Path) -> str:
    hint = f"  python train.py ckpt_path=last hydra.run.dir={output_dir}"
    if (sweep := output_dir.parent / "multirun.yaml").is_file():  # a job of a sweep
        hint += (f"\nor the whole sweep (finished jobs kept, the others resumed or started): "
                 f"its command with ckpt_path=last hydra.sweep.dir={sweep.parent}")  # fmt: skip
    return hint


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule,
        checkpoint: Path | None, output_dir: Path, stop: GracefulStop) -> None:  # fmt: skip
    """``trainer.fit``; on a signal, exit as a shell would report it (130 for Ctrl-C,
    143 for SIGTERM) after saying how to resume."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)
    except TrainingInterrupted as stopped:
        log.warning("Training stopped by %s at epoch %d, step %d; checkpoint: %s. Resume with:"
                    "\n%s", signal.Signals(stopped.signum).name, trainer.current_epoch,
                    trainer.global_step, stopped.checkpoint, _resume_hint(output_dir))  # fmt: skip
        if stopped.then is not None:  # submitit: requeue this job (it resumes from there)
            stopped.then(stopped.signum, None)
        raise SystemExit(128 + stopped.signum) from None
    except SIGTERMException:
        # Lightning's own SIGTERM check came first: the signal arrived outside a training
        # step (in a validation or at an epoch's end), so there is no checkpoint of this
        # moment; resuming continues from the furthest one. Its exception exits with 0.
        log.warning("Training stopped by SIGTERM outside a training step (in a validation or "
                    "at an epoch's end), at epoch %d, step %d. Resume from the furthest "
                    "checkpoint with:\n%s", trainer.current_epoch, trainer.global_step,
                    _resume_hint(output_dir))  # fmt: skip
        raise SystemExit(128 + signal.SIGTERM) from None
    except SystemExit:  # after SIGTERMException, which is one too
        if not stop.forced:
            raise
        # Lightning exits 1 after a KeyboardInterrupt; a shell reports 130 for Ctrl-C.
        log.warning(
            "Stopped at once by a second Ctrl-C, without a checkpoint of this step. "
            "Resume from the furthest checkpoint with:\n%s",
            _resume_hint(output_dir),
        )
        raise SystemExit(128 + signal.SIGINT) from None
    # A signal after the last training step (during the last validation): every process
    # skips the final test, as one alone would wait for the others there.
    if trainer.strategy.reduce_boolean_decision(stop.signum is not None, all=False):
        signum = stop.signum or signal.SIGTERM
        log.warning("%s received after the last training step: training is complete, the "
                    "final evaluation is skipped. Run it with:\n%s",
                    signal.Signals(signum).name, _resume_hint(output_dir))  # fmt: skip
        handler = signal.getsignal(signum)  # restored: submitit's requeue for SIGUSR2
        if signum in PREEMPTION_SIGNALS and callable(handler):
            handler(signum, None)
        raise SystemExit(128 + signum)


def test(trainer: L.Trainer, module: L.LightningModule, loaders: list[Any],
         checkpoint: str | None, output_dir: Path) -> None:  # fmt: skip
    """``trainer.test`` of the final evaluation; SIGTERM there exits 143, saying how to
    run it again."""
    try:
        trainer.test(module, dataloaders=loaders, ckpt_path=checkpoint, weights_only=True,
                     verbose=False)  # fmt: skip
    except SIGTERMException:
        log.warning("Stopped by SIGTERM during the final evaluation: training is complete, "
                    "metrics.json is not written. Evaluate with:\n%s",
                    _resume_hint(output_dir))  # fmt: skip
        raise SystemExit(128 + signal.SIGTERM) from None
