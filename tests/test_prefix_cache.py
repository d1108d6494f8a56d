"""The fast path equals the slow one: prefix cache, dynamic padding, disk persistence."""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading

import lightning as L
import numpy as np
import pytest
import torch

from gpt_classifier import GPT, SequenceClassifier, sweep_reuse
from gpt_classifier.data.datamodule import SMSSpamDataModule
from gpt_classifier.finetuning import LoRA, TrainAll, TrainHead, TrainLastBlocks
from gpt_classifier.training import prefix_callback, prefix_store
from gpt_classifier.training.module import ClassifierModule
from gpt_classifier.training.prefix_cache import PrefixCache
from gpt_classifier.training.prefix_callback import PrefixCacheCallback
from gpt_classifier.training.prefix_store import evict_oldest, load, save

METHODS = {
    "last_block": lambda: TrainLastBlocks(1),
    "last_n_blocks": lambda: TrainLastBlocks(2),
    "last_layer": TrainHead,
    "all": TrainAll,
    "lora_last_block": lambda: LoRA(rank=4, blocks=1),
}


class LossRecorder(L.Callback):
    """Every training step's loss, in order."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(sms_file, *, cache: bool | str, padding: str = "batch", method: str = "last_block",
        pooling: str = "last_token", persist_dir=None, seed: int = 7, epochs: int = 2,
        batches: int = 25, drop_rate: float = 0.0, causal: bool = True,
        max_gb: float = 10.0, max_memory_gb: float = 8.0):  # fmt: skip
    """Train gpt2-tiny (3 blocks) briefly in fp32, then test every split with it.

    Returns (losses, prefix-cache callback, test accuracy).
    """
    L.seed_everything(seed)
    backbone = GPT.from_preset("gpt2-tiny", n_layers=3, drop_rate=drop_rate, causal_mask=causal)
    dm = SMSSpamDataModule(path=str(sms_file), padding=padding, context_length=256)
    model = SequenceClassifier(backbone, 2, pooling)
    optimizer = lambda params, **kw: torch.optim.AdamW(params, lr=1e-3, **kw)  # noqa: E731
    module = ClassifierModule(model, METHODS[method](), optimizer)
    callback = PrefixCacheCallback(
        enabled=cache,
        persist=persist_dir is not None,
        dir=str(persist_dir) if persist_dir else None,
        max_gb=max_gb,
        max_memory_gb=max_memory_gb,
    )
    recorder = LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu", precision="32-true", max_epochs=epochs, limit_train_batches=batches,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[recorder, callback], num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    module.test_split_names = ["train", "val", "test"]
    loaders = [dm.eval_dataloader(s) for s in ("train", "validation", "test")]
    trainer.test(module, dataloaders=loaders, verbose=False)
    return recorder.losses, callback, float(trainer.callback_metrics["test/acc"])


@pytest.mark.parametrize("method", ["last_block", "last_n_blocks", "last_layer", "lora_last_block"])
def test_cached_training_equals_uncached(sms_file, method):
    slow, slow_cb, slow_acc = fit(sms_file, cache=False, method=method, batches=15)
    fast, fast_cb, fast_acc = fit(sms_file, cache=True, method=method, batches=15)
    assert slow_cb.cache is None and fast_cb.cache is not None
    depth = {"last_block": 2, "last_n_blocks": 1, "last_layer": 3, "lora_last_block": 2}
    assert fast_cb.cache.depth == depth[method]
    assert len(slow) == len(fast) == 30
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(slow), atol=1e-5, rtol=1e-4)
    assert fast_acc == slow_acc


def distinct_keys(sms_file, padding: str, pooling: str, causal: bool = True) -> int:
    """How many distinct cache keys the three splits hold, by the cache's own key rule."""
    dm = SMSSpamDataModule(path=str(sms_file), padding=padding, context_length=256)
    dm.setup()
    backbone = GPT.from_preset("gpt2-tiny", causal_mask=causal)
    cache = PrefixCache(SequenceClassifier(backbone, 2, pooling), depth=1)
    keys: set[bytes] = set()
    for dataset in dm.datasets.values():
        batch = dm._loader(dataset, train=False).collate_fn(
            [dataset[i] for i in range(len(dataset))]
        )
        keys.update(cache.row_keys(batch["input_ids"], batch["lengths"])[0])
    return len(keys)


@pytest.mark.parametrize(
    ("padding", "pooling"),
    list(
        itertools.product(["batch", "longest_train", "context"], ["last_token", "final_position"])
    ),
)
def test_each_message_is_computed_once_for_every_padding_and_pooling(sms_file, padding, pooling):
    slow, _, slow_acc = fit(sms_file, cache=False, padding=padding, pooling=pooling,
                            epochs=1, batches=10)  # fmt: skip
    fast, callback, fast_acc = fit(sms_file, cache=True, padding=padding, pooling=pooling,
                                   epochs=1, batches=10)  # fmt: skip
    cache = callback.cache
    # Warm-up, training, validation and the final test of all three splits together ran
    # the prefix for each distinct key exactly once: no lookup missed.
    assert cache.computed == len(cache.entries) == distinct_keys(sms_file, padding, pooling)
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(slow), atol=1e-5, rtol=1e-4)
    assert fast_acc == slow_acc


def test_cache_is_off_where_it_would_be_wrong(sms_file, caplog):
    with caplog.at_level("INFO"):
        _, callback, _ = fit(sms_file, cache="auto", method="all", epochs=1, batches=2)
    assert callback.cache is None
    assert "Prefix cache off (TrainAll() leaves no frozen prefix)" in caplog.text
    with pytest.raises(ValueError, match="prefix_cache.enabled=true is not valid here"):
        fit(sms_file, cache=True, method="all", epochs=1, batches=2)
    _, callback, _ = fit(sms_file, cache="auto", drop_rate=0.1, epochs=1, batches=2)
    assert callback.cache is None


def test_without_the_causal_mask_per_batch_padding_turns_the_cache_off(sms_file, caplog):
    with caplog.at_level("INFO"):
        slow, _, _ = fit(sms_file, cache=False, causal=False, epochs=1, batches=5)
        fast, callback, _ = fit(sms_file, cache="auto", causal=False, epochs=1, batches=5)
    assert callback.cache is None
    assert "depends on its batch's padding" in caplog.text
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(slow), atol=0, rtol=0)


def test_lora_on_every_block_turns_the_cache_off_and_on_the_last_keeps_it(sms_file):
    _, every, _ = fit(sms_file, cache="auto", method="lora_last_block", epochs=1, batches=2)
    assert every.cache is not None and every.cache.depth == 2
    backbone = GPT.from_preset("gpt2-tiny")
    module = ClassifierModule(SequenceClassifier(backbone, 2), LoRA(rank=2))
    module.setup("fit")
    callback = PrefixCacheCallback()
    callback._prepare(None, module)  # type: ignore[arg-type]
    assert callback.cache is None


def test_dynamic_padding_equals_padding_to_longest(sms_file):
    dynamic, _, dynamic_acc = fit(sms_file, cache=False, padding="batch", batches=15)
    # "context" pads every message to 256 tokens without truncating any.
    longest, _, longest_acc = fit(sms_file, cache=False, padding="context", batches=15)
    torch.testing.assert_close(torch.tensor(dynamic), torch.tensor(longest), atol=1e-5, rtol=1e-4)
    assert dynamic_acc == longest_acc


@pytest.fixture(autouse=True)
def _new_process():
    """Each test starts as a new process would: nothing handed on from another test."""
    sweep_reuse.forget()


def test_cache_persists_across_runs(sms_file, tmp_path, caplog):
    first, cb1, _ = fit(sms_file, cache=True, persist_dir=tmp_path, epochs=1, batches=10)
    assert cb1.cache.computed == len(cb1.cache.entries) > 1000
    files = list(tmp_path.glob("prefix-*.safetensors"))
    assert len(files) == 1
    sweep_reuse.forget()  # as a new process: nothing handed on in memory
    with caplog.at_level(logging.INFO, logger=prefix_callback.__name__):
        second, cb2, _ = fit(sms_file, cache=True, persist_dir=tmp_path, epochs=1, batches=10)
    assert cb2.cache.computed == 0  # the whole prefix came from disk
    n = len(cb1.cache.entries)
    assert f"reused {n} of {n} messages from {files[0]}" in caplog.text
    torch.testing.assert_close(torch.tensor(second), torch.tensor(first), atol=1e-6, rtol=1e-6)
    # Other weights (another seed) are another fingerprint: nothing stale is reused.
    _, cb3, _ = fit(sms_file, cache=True, persist_dir=tmp_path, seed=8, epochs=1, batches=10)
    assert cb3.cache.computed == cb1.cache.computed
    assert len(list(tmp_path.glob("prefix-*.safetensors"))) == 2
    # Off means off: no reuse at all.
    _, cb4, _ = fit(sms_file, cache=True, epochs=1, batches=10)
    assert cb4.cache.computed == cb1.cache.computed


def tiny_cache(depth: int = 1) -> tuple[SequenceClassifier, PrefixCache]:
    model = SequenceClassifier(GPT.from_preset("gpt2-tiny"), 2).eval()
    return model, PrefixCache(model, depth=depth)


IDS = torch.tensor([[1, 2, 3], [4, 5, 50256]])
LENGTHS = torch.tensor([3, 2])


def warmed(cache: PrefixCache, ids: torch.Tensor = IDS, lengths: torch.Tensor = LENGTHS) -> None:
    todo, _ = cache.plan([(ids, lengths)])
    cache.warm(todo, torch.device("cpu"), batch_tokens=512)


def test_fingerprint_covers_every_prefix_weight_and_nothing_else():
    torch.manual_seed(0)
    model, cache = tiny_cache(depth=1)
    torch.manual_seed(0)
    _, same = tiny_cache(depth=1)
    base = cache.fingerprint()
    assert same.fingerprint() == base  # identical weights in another model: one fingerprint
    assert cache.fingerprint("other settings") != base
    assert PrefixCache(model, depth=2).fingerprint() != base
    gpt = model.backbone
    with torch.no_grad():
        gpt.trf_blocks[1].att.W_query.weight[0, 0] += 1.0  # after the prefix: no effect
        assert cache.fingerprint() == base
        for p in (gpt.tok_emb.weight, gpt.pos_emb.weight, gpt.trf_blocks[0].ff.fc.bias):
            kept = p.view(-1)[-1].clone()
            p.view(-1)[-1] += 1.0  # the last element of each: the whole tensor is hashed
            assert cache.fingerprint() != base
            p.view(-1)[-1] = kept
        assert cache.fingerprint() == base
        bf16 = PrefixCache(SequenceClassifier(GPT.from_preset("gpt2-tiny").bfloat16(), 2), 1)
        assert len(bf16.fingerprint()) == 64


def test_unreadable_cache_file_is_recomputed(tmp_path):
    model, cache = tiny_cache()
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"garbage")
    assert load(cache, bad, "fp") == 0
    todo, asked = cache.plan([(IDS, LENGTHS)])
    assert len(todo) == asked == 2
    cache.warm(todo, torch.device("cpu"), batch_tokens=512)
    save(cache, bad, "fp")
    _, again = tiny_cache()
    again.model = model
    assert load(again, bad, "fp") == 2
    hidden = again.lookup(IDS, LENGTHS)
    assert again.computed == 0
    with torch.no_grad():
        want = model(IDS[:1], hidden_after=1)[0]
    torch.testing.assert_close(hidden[0], want)
    assert (hidden[1, 2] == 0).all()  # never read with last-token pooling


def test_a_foreign_or_inconsistent_cache_file_is_ignored(tmp_path, caplog):
    model, cache = tiny_cache()
    warmed(cache)
    file = tmp_path / "prefix-a.safetensors"
    save(cache, file, "a")
    other = PrefixCache(model, depth=1)
    with caplog.at_level(logging.WARNING):
        assert load(other, file, "b") == 0  # copied or renamed from another fingerprint
    assert "holds fingerprint 'a', not 'b'" in caplog.text and str(file) in caplog.text
    wider = PrefixCache(SequenceClassifier(GPT.from_preset("gpt2-tiny", emb_dim=32), 2), 1)
    assert load(wider, file, "a") == 0  # another model's hidden size
    assert load(other, file, "a") == 2


def test_writers_merge_what_each_computed(tmp_path):
    """Two jobs that read the file before either saved: the second keeps the first's rows."""
    model, one = tiny_cache()
    two = PrefixCache(model, depth=1)
    warmed(one, IDS[:1], LENGTHS[:1])
    warmed(two, IDS[1:], LENGTHS[1:])
    file = tmp_path / "prefix-x.safetensors"
    save(one, file, "x")
    save(two, file, "x")
    merged = PrefixCache(model, depth=1)
    assert load(merged, file, "x") == 2
    merged.lookup(IDS, LENGTHS)
    assert merged.computed == 0
    assert not list(tmp_path.glob("*.tmp"))


def test_concurrent_writers_lose_nothing(tmp_path):
    model, _ = tiny_cache()
    file = tmp_path / "prefix-x.safetensors"
    caches = []
    for i in range(4):
        cache = PrefixCache(model, depth=1)
        warmed(cache, torch.tensor([[10 + i, 20 + i]]), torch.tensor([2]))
        caches.append(cache)
    start = threading.Barrier(len(caches))

    def write(cache: PrefixCache) -> None:
        start.wait()
        save(cache, file, "x")

    threads = [threading.Thread(target=write, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert load(PrefixCache(model, depth=1), file, "x") == 4


def test_the_least_recently_used_files_are_evicted(tmp_path):
    sizes = {"a": 400, "b": 300, "c": 200}
    for age, (name, size) in enumerate(sizes.items()):
        file = tmp_path / f"prefix-{name}.safetensors"
        file.write_bytes(b"x" * size)
        (tmp_path / f"prefix-{name}.safetensors.lock").touch()
        os.utime(file, (1000 + age, 1000 + age))  # a oldest
    keep = tmp_path / "prefix-a.safetensors"
    deleted = evict_oldest(tmp_path, max_bytes=650, keep=keep)
    # a is the oldest but is the file in use: b goes, then the rest fits.
    assert deleted == [tmp_path / "prefix-b.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "prefix-a.safetensors", "prefix-a.safetensors.lock",
        "prefix-c.safetensors", "prefix-c.safetensors.lock",
    ]  # fmt: skip


def test_the_callback_keeps_its_folder_within_max_gb(sms_file, tmp_path, caplog):
    stale = tmp_path / "prefix-stale.safetensors"
    stale.write_bytes(b"x" * 15_000_000)  # with the run's ~10 MB, over the 20 MB budget
    os.utime(stale, (1000, 1000))
    with caplog.at_level(logging.INFO, logger=prefix_store.__name__):
        fit(sms_file, cache=True, persist_dir=tmp_path, epochs=1, batches=2,
            max_gb=0.02)  # fmt: skip
    assert not stale.exists()
    assert f"removed {stale} (least recently used; prefix_cache.max_gb=0.02)" in caplog.text
    # A cache bigger than the budget is not written at all.
    sweep_reuse.forget()
    with caplog.at_level(logging.INFO, logger=prefix_store.__name__):
        fit(sms_file, cache=True, persist_dir=tmp_path / "small", epochs=1, batches=2,
            max_gb=1e-6)  # fmt: skip
    assert "exceed prefix_cache.max_gb" in caplog.text
    assert not list((tmp_path / "small").glob("prefix-*.safetensors"))


def test_one_entry_serves_every_padding_up_to_its_extent():
    model = SequenceClassifier(GPT.from_preset("gpt2-tiny"), 2, "final_position").eval()
    cache = PrefixCache(model, depth=1)
    wide = torch.tensor([[7, 8, 50256, 50256, 50256]])
    cache.warm(cache.plan([(wide, torch.tensor([2]))])[0], torch.device("cpu"), batch_tokens=512)
    narrow = torch.tensor([[7, 8, 50256]])  # the same message in a narrower batch
    hidden = cache.lookup(narrow, torch.tensor([2]))
    assert cache.computed == 1
    with torch.no_grad():
        torch.testing.assert_close(hidden, model(narrow, hidden_after=1))


def test_the_prefix_pass_shows_a_progress_bar(sms_file, capfd):
    dm = SMSSpamDataModule(path=str(sms_file), context_length=256)
    module = ClassifierModule(SequenceClassifier(GPT.from_preset("gpt2-tiny"), 2))
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=1,
        logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[PrefixCacheCallback()], num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    err = capfd.readouterr().err
    assert "Prefix cache: 100%" in err and "msg" in err and "tokens/s" in err, err[-2000:]
    assert "1382/1382" in err  # every distinct message of the three splits, in one pass


def test_a_cache_file_damaged_in_place_is_not_trusted(tmp_path, caplog):
    # The same size, a readable header, NaN over part of the hidden states: the checksum
    # stored when the file was written tells, and the entries are recomputed.
    _, cache = tiny_cache()
    warmed(cache)
    file = tmp_path / "prefix-x.safetensors"
    save(cache, file, "x")
    data = bytearray(file.read_bytes())
    data[-64:] = b"\xff" * 64
    file.write_bytes(bytes(data))
    _, again = tiny_cache()
    with caplog.at_level(logging.WARNING):
        assert load(again, file, "x") == 0
    assert "do not match their checksum" in caplog.text and "recomputing" in caplog.text


def test_a_cache_over_its_memory_budget_is_off_and_says_how_big_it_would_be(sms_file, caplog):
    with caplog.at_level(logging.INFO, logger=prefix_callback.__name__):
        losses, callback, acc = fit(sms_file, cache=True, epochs=1, batches=5,
                                    max_memory_gb=0.005)  # fmt: skip
    # 1,382 distinct messages of gpt2-tiny (64 float32 numbers per position): ~0.01 GB.
    said = re.search(
        r"Prefix cache off: it would hold (0\.\d+) GB of hidden states for 1382 "
        r"messages in host memory, over prefix_cache.max_memory_gb=0.005",
        caplog.text,
    )
    assert said and 0.005 < float(said[1]) < 0.02, caplog.text
    assert callback.cache is None
    uncached, _, uncached_acc = fit(sms_file, cache=False, epochs=1, batches=5)
    assert losses == pytest.approx(uncached, abs=1e-5) and acc == uncached_acc


def test_a_persisted_file_gives_only_the_entries_a_run_needs(tmp_path):
    model, cache = tiny_cache()
    stored = PrefixCache(model, depth=1)
    stored.entries = {bytes([i]) * 8: torch.ones(2, 64) * i for i in range(5)}
    save(stored, tmp_path / "prefix.safetensors", "fingerprint")
    wanted = {bytes([1]) * 8, bytes([3]) * 8}
    assert load(cache, tmp_path / "prefix.safetensors", "fingerprint", wanted) == 2
    assert set(cache.entries) == wanted and cache.nbytes == 2 * 2 * 64 * 4
    torch.testing.assert_close(cache.entries[bytes([3]) * 8], torch.ones(2, 64) * 3)


def test_a_file_gives_back_entries_of_several_passes_exactly(tmp_path):
    """Entries of two passes, one outgrown by a wider use of its key and one received
    from another process: the file gives each back to the bit, all of them or those
    wanted."""
    model = SequenceClassifier(GPT.from_preset("gpt2-tiny"), 2, "final_position").eval()
    cache = PrefixCache(model, depth=1)
    warmed(cache, torch.tensor([[7, 8, 50256], [9, 50256, 50256]]), torch.tensor([2, 1]))
    wide = torch.tensor([[7, 8, 50256, 50256, 50256], [5, 6, 4, 3, 2]])
    warmed(cache, wide, torch.tensor([2, 5]))  # [7, 8] now needs 5 positions
    cache.entries[b"received"] = torch.randn(3, 64)
    seven_eight = np.array([7, 8], dtype=np.int64).tobytes()
    assert len(cache.entries[seven_eight]) == 5
    want = {key: h.clone() for key, h in cache.entries.items()}
    file = tmp_path / "prefix.safetensors"
    save(cache, file, "x")
    whole, part = PrefixCache(model, depth=1), PrefixCache(model, depth=1)
    assert load(whole, file, "x") == len(want) == 4
    assert load(part, file, "x", wanted={seven_eight, b"received"}) == 2
    for got in (whole, part):
        for key, hidden in got.entries.items():
            torch.testing.assert_close(hidden, want[key], rtol=0, atol=0)
    assert set(part.entries) == {seven_eight, b"received"}
