"""The fast path equals the slow one: prefix cache, dynamic padding, disk persistence."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from gpt_classifier import GPT
from gpt_classifier.classifier import GPTClassifier
from gpt_classifier.datamodule import SMSSpamDataModule
from gpt_classifier.prefix_cache import PrefixCache


class LossRecorder(L.Callback):
    """Every training step's loss, in order."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(sms_file, *, cache: bool | str, padding: str = "batch", freeze: str = "last_block",
        cache_file: str | None = None, seed: int = 7, **module_kwargs):  # fmt: skip
    """Train gpt2-tiny briefly in fp32; returns (losses, module, final test accuracy)."""
    L.seed_everything(seed)
    backbone = GPT.from_preset("gpt2-tiny", n_layers=3)
    dm = SMSSpamDataModule(path=str(sms_file), padding=padding, context_length=256)
    clf = GPTClassifier(
        backbone.cfg.to_dict(), backbone=backbone, freeze=freeze, freeze_n=2,
        prefix_cache=cache, cache_file=cache_file, lr=1e-3, **module_kwargs,
    )  # fmt: skip
    recorder = LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu", precision="32-true", max_epochs=2, limit_train_batches=25,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[recorder],
    )  # fmt: skip
    trainer.fit(clf, datamodule=dm)
    trainer.test(clf, datamodule=dm, verbose=False)
    return recorder.losses, clf, float(trainer.callback_metrics["test/acc"])


@pytest.mark.parametrize("freeze", ["last_block", "last_n_blocks", "last_layer"])
def test_cached_training_equals_uncached(sms_file, freeze):
    slow, slow_clf, slow_acc = fit(sms_file, cache=False, freeze=freeze)
    fast, fast_clf, fast_acc = fit(sms_file, cache=True, freeze=freeze)
    assert slow_clf.cache is None and fast_clf.cache is not None
    assert fast_clf.cache_depth == {"last_block": 2, "last_n_blocks": 1, "last_layer": 3}[freeze]
    assert len(slow) == len(fast) == 50
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(slow), atol=1e-5, rtol=1e-4)
    assert fast_acc == slow_acc


def test_cache_is_off_where_it_would_be_wrong(sms_file):
    _, all_clf, _ = fit(sms_file, cache="auto", freeze="all")
    assert all_clf.cache is None
    with pytest.raises(ValueError, match="prefix_cache.enabled=true is not valid here"):
        fit(sms_file, cache=True, freeze="all")


def test_dropout_turns_the_cache_off():
    backbone = GPT.from_preset("gpt2-tiny", drop_rate=0.1)
    clf = GPTClassifier(backbone.cfg.to_dict(), backbone=backbone)
    clf.setup("fit")
    assert clf.cache is None


def test_dynamic_padding_equals_padding_to_longest(sms_file):
    dynamic, _, dynamic_acc = fit(sms_file, cache=False, padding="batch")
    # "context" pads every message to 256 tokens without truncating any.
    longest, _, longest_acc = fit(sms_file, cache=False, padding="context")
    torch.testing.assert_close(torch.tensor(dynamic), torch.tensor(longest), atol=1e-5, rtol=1e-4)
    assert dynamic_acc == longest_acc


def test_cache_with_book_pooling_and_fixed_padding_equals_uncached(sms_file):
    kwargs = {"padding": "longest_train", "pooling": "final_position"}
    slow, _, _ = fit(sms_file, cache=False, **kwargs)
    fast, clf, _ = fit(sms_file, cache=True, **kwargs)
    assert clf.cache is not None
    assert clf.cache.computed == len(clf.cache.entries) > 1000  # each row once: no misses
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(slow), atol=1e-5, rtol=1e-4)


def test_cache_persists_across_runs(sms_file, tmp_path):
    cache_file = str(tmp_path / "prefix")
    first, clf1, _ = fit(sms_file, cache=True, cache_file=cache_file)
    assert clf1.cache.computed == len(clf1.cache.entries) > 1000
    files = list(tmp_path.glob("prefix-*.safetensors"))
    assert len(files) == 1
    second, clf2, _ = fit(sms_file, cache=True, cache_file=cache_file)
    assert clf2.cache.computed == 0  # the whole prefix came from disk
    torch.testing.assert_close(torch.tensor(second), torch.tensor(first), atol=1e-6, rtol=1e-6)
    # Other weights (another seed) are another fingerprint: nothing stale is reused.
    _, clf3, _ = fit(sms_file, cache=True, cache_file=cache_file, seed=8)
    assert clf3.cache.computed == clf1.cache.computed
    assert len(list(tmp_path.glob("prefix-*.safetensors"))) == 2


def test_unreadable_cache_file_is_recomputed(tmp_path):
    model = GPT.from_preset("gpt2-tiny").eval()
    cache = PrefixCache(model, depth=1)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"garbage")
    assert cache.load(bad) == 0
    seqs = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    assert cache.warm(seqs, torch.device("cpu")) == 2
    cache.save(bad)
    again = PrefixCache(model, depth=1)
    assert again.load(bad) == 2
    hidden = again.lookup(torch.tensor([[1, 2, 3], [4, 5, 50256]]), torch.tensor([3, 2]))
    with torch.no_grad():
        want = model.run_blocks(model.embed(torch.tensor([[1, 2, 3]])), 0, 1)[0]
    torch.testing.assert_close(hidden[0], want)
    assert (hidden[1, 2] == 0).all()
