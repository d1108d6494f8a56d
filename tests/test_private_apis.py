"""The private APIs of torch, Lightning and torchmetrics we use (no public one does the
job), each pinned by a test that fails when its behaviour changes under us."""

from __future__ import annotations

import warnings
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn
from torch.nn.modules import module as torch_module
from torchmetrics import MeanMetric

from gpt_classifier.model.attention import CausalSelfAttention
from gpt_classifier.model.config import PRESETS
from gpt_classifier.training.distributed import starts_processes_by_script
from gpt_classifier.training.metrics import SplitMetrics
from gpt_classifier.training.resume import StepCheckpoint, mid_accumulation


def test_torchmetrics_update_count_says_whether_a_restored_metric_may_compute():
    """``Metric._update_count`` (SplitMetrics.restore): a metric given states but no count
    warns that it computes before any update; with the count restored it does not."""
    source = MeanMetric()
    source.update(torch.tensor([1.0, 3.0]))
    target = MeanMetric()
    for key, value in source.metric_state.items():
        setattr(target, key, value.clone())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        target.compute()
    assert any("before the ``update``" in str(w.message) for w in caught)
    restored = SplitMetrics(["a", "b"])
    restored.restore({"loss": {"states": source.metric_state, "updates": source._update_count}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(restored.loss.compute()) == 2.0


def test_lightnings_should_accumulate_is_true_between_the_steps_of_an_accumulation():
    """``fit_loop.epoch_loop._should_accumulate()`` (resume.mid_accumulation): true on
    the batches whose gradients wait for the next, false on the batch that steps."""
    seen: list[bool] = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            seen.append(mid_accumulation(trainer))

    trainer = L.Trainer(accelerator="cpu", max_steps=3, accumulate_grad_batches=3,
                        callbacks=[Watch()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(BoringModel())
    assert seen[:6] == [True, True, False, True, True, False]


def test_step_checkpoint_times_lightnings_saves_and_stretches_its_interval(tmp_path):
    """``ModelCheckpoint._save_checkpoint`` and ``_train_time_interval``: Lightning saves
    through the first and reads the second at each batch; StepCheckpoint times each save
    there and stretches the interval to ten times the save."""
    checkpoint = StepCheckpoint(dirpath=str(tmp_path), minutes=1e-6)
    assert checkpoint._train_time_interval == timedelta(minutes=1e-6)
    trainer = L.Trainer(accelerator="cpu", max_steps=5, callbacks=[checkpoint], logger=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(BoringModel())
    assert (tmp_path / "step.ckpt").is_file()
    assert checkpoint._train_time_interval > timedelta(minutes=1e-6)


def test_the_subprocess_script_launcher_is_what_ddp_on_cpus_starts_processes_with():
    """``_SubprocessScriptLauncher`` (distributed.starts_processes_by_script): ddp re-runs
    the script for its other processes; ddp_spawn and one process do not."""
    for strategy, devices, expected in (("ddp", 2, True), ("ddp_spawn", 2, False),
                                        ("auto", 1, False)):  # fmt: skip
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy,
                            logger=False)  # fmt: skip
        assert starts_processes_by_script(trainer) is expected, strategy


def test_torch_keeps_forward_hooks_where_the_folded_attention_looks_for_them():
    """``_global_forward_hooks``, ``_forward_hooks`` and their pre-hook twins
    (CausalSelfAttention.foldable): any hook on the key or value layers, or on every
    module, turns the fold off, since skipping those layers' calls would hide from it."""
    attention = CausalSelfAttention(PRESETS["gpt2-tiny"])
    assert attention.foldable()
    handle = attention.W_key.register_forward_hook(lambda *args: None)
    assert attention.W_key._forward_hooks and not attention.foldable()
    handle.remove()
    handle = attention.W_value.register_forward_pre_hook(lambda *args: None)
    assert not attention.foldable()
    handle.remove()
    for register in (nn.modules.module.register_module_forward_hook,
                     nn.modules.module.register_module_forward_pre_hook):  # fmt: skip
        handle = register(lambda *args: None)
        assert torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
        assert not attention.foldable()
        handle.remove()
    assert attention.foldable()


def test_a_tensors_version_counter_moves_with_every_in_place_update():
    """``Tensor._version`` (sweep reuse knows weights by identity and version): an
    optimizer step and any other in-place update bump it."""
    weight = nn.Parameter(torch.zeros(3))
    weight.grad = torch.ones(3)
    before = weight._version
    torch.optim.AdamW([weight], lr=1.0).step()
    stepped = weight._version
    with torch.no_grad():
        weight.add_(1.0)
    assert before < stepped < weight._version
