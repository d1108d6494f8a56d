"""SequenceClassifier: every pooling rule and every starting depth equal the full forward."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from gpt_classifier import GPT, SequenceClassifier
from gpt_classifier.data.batching import Collator, plan_batches
from gpt_classifier.model.classifier import CachedPrefix
from gpt_classifier.model.pooling import POOLING_RULES, positions_read


def classifier(pooling: str = "last_token", n_layers: int = 3, causal: bool = True):
    torch.manual_seed(0)
    backbone = GPT.from_preset("gpt2-tiny", n_layers=n_layers, causal_mask=causal)
    return SequenceClassifier(backbone, 3, pooling).eval()


def batch(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    return Collator()([{"input_ids": torch.tensor(s), "label": 0} for s in seqs])


def explicit_logits(model: SequenceClassifier, ids: torch.Tensor, lengths: torch.Tensor, rule: str):
    """Each rule written out on the full per-position logits, the book's ``model(x)``."""
    full = model.backbone(ids)  # (B, T, C): the book's model with its head replaced
    rows = torch.arange(len(ids))
    if rule == "last_token":
        return full[rows, lengths - 1]
    if rule == "final_position":
        return full[:, -1]
    if rule == "first":
        return full[:, 0]
    if rule == "mean":
        return torch.stack([full[i, : int(n)].mean(dim=0) for i, n in enumerate(lengths)])
    if rule == "mean_with_padding":  # the book's model_output.mean(dim=1)
        return full.mean(dim=1)
    raise AssertionError(f"no explicit form for {rule}")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("rule", sorted(POOLING_RULES))
def test_each_pooling_rule_equals_its_explicit_computation(rule, causal):
    model = classifier(rule, causal=causal)
    seqs = [torch.randint(0, 50000, (n,)).tolist() for n in (5, 17, 1, 9)]
    b = batch(seqs)
    with torch.no_grad():
        got = model(b["input_ids"], b["lengths"])
        want = explicit_logits(model, b["input_ids"], b["lengths"], rule)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("rule", sorted(POOLING_RULES))
def test_starting_from_a_cached_prefix_equals_the_full_forward(rule, causal):
    model = classifier(rule, causal=causal)
    seqs = [torch.randint(0, 50000, (n,)).tolist() for n in (5, 17, 9)]
    b = batch(seqs)
    ids, lengths = b["input_ids"], b["lengths"]
    with torch.no_grad():
        want = model(ids, lengths)
        for depth in range(0, model.cfg.n_layers + 1):  # up to all blocks cached (head only)
            hidden = model(ids, hidden_after=depth)
            got = model(ids, lengths, prefix=CachedPrefix(hidden, depth))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"depth {depth}")


@pytest.mark.parametrize("rule", ["last_token", "first", "mean"])
def test_padding_independent_rules_give_the_same_answer_alone_and_batched(rule):
    model = classifier(rule)
    message = torch.randint(0, 50000, (12,)).tolist()
    long_ones = [torch.randint(0, 50000, (200,)).tolist() for _ in range(3)]
    with torch.no_grad():
        alone = model(**_args(batch([message])))[0]
        among_long = model(**_args(batch([*long_ones, message])))[-1]
    torch.testing.assert_close(among_long, alone, atol=1e-5, rtol=1e-5)


def test_final_position_depends_on_padding():
    model = classifier("final_position")
    message = torch.randint(0, 50000, (12,)).tolist()
    with torch.no_grad():
        alone = model(**_args(batch([message])))[0]
        padded = model(**_args(batch([[1] * 40, message])))[-1]
    assert not torch.allclose(alone, padded, atol=1e-3)


def test_without_the_causal_mask_position_0_attends_to_the_last_token():
    ids = torch.randint(0, 50000, (1, 9))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 50000
    for causal in (True, False):
        model = classifier("first", causal=causal)
        with torch.no_grad():
            same = torch.allclose(model(ids), model(changed))  # first token's logits
        assert same == causal


def test_positions_read_is_what_the_output_depends_on():
    lengths = torch.tensor([3, 5, 1])
    assert positions_read(POOLING_RULES["mean_with_padding"](lengths, 6), 6).tolist() == [6] * 3
    assert positions_read(POOLING_RULES["first"](lengths, 6), 6, causal=False).tolist() == [6] * 3
    assert positions_read(POOLING_RULES["last_token"](lengths, 6), 6).tolist() == [3, 5, 1]
    assert positions_read(POOLING_RULES["final_position"](lengths, 6), 6).tolist() == [6, 6, 6]
    assert positions_read(POOLING_RULES["first"](lengths, 6), 6).tolist() == [1, 1, 1]
    assert positions_read(POOLING_RULES["mean"](lengths, 6), 6).tolist() == [3, 5, 1]


def test_head_is_seeded_and_the_global_rng_untouched():
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    first = SequenceClassifier(GPT.from_preset("gpt2-tiny"), 2, head_seed=123)
    torch.random.set_rng_state(before)
    second = SequenceClassifier(GPT.from_preset("gpt2-tiny"), 2, head_seed=123)
    torch.testing.assert_close(first.head.weight, second.head.weight, atol=0, rtol=0)
    assert first.head.weight.shape == (2, 64)


def test_bad_pooling_and_class_count_are_named():
    with pytest.raises(ValueError, match=r"classifier.pooling='middle'; choose one of"):
        SequenceClassifier(GPT.from_preset("gpt2-tiny"), 2, "middle")
    with pytest.raises(ValueError, match="classifier.num_classes=1"):
        SequenceClassifier(GPT.from_preset("gpt2-tiny"), 1)


def _args(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": b["input_ids"], "lengths": b["lengths"]}


def padded_cost(lengths, batches, per_batch_cost):
    return sum(max(lengths[i] for i in b) * len(b) + per_batch_cost for b in batches)


@pytest.mark.parametrize("seed", range(20))
def test_inference_batches_pad_least_within_their_limits(seed):
    rng = random.Random(seed)
    lengths = [
        rng.choice([1, 3, 5, 8, 20, 40, 90]) + rng.randrange(5) for _ in range(rng.randrange(1, 9))
    ]
    batches = plan_batches(lengths, batch_size=3, max_tokens=100, per_batch_cost=10)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(fits(lengths, b) for b in batches)
    # No other cut of the longest-first order into batches within the limits costs less.
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    cuts = itertools.product([False, True], repeat=len(order) - 1)
    plans = [split_at(order, c) for c in cuts]
    within = [parts for parts in plans if all(fits(lengths, part) for part in parts)]
    best = min(padded_cost(lengths, parts, 10) for parts in within)
    assert padded_cost(lengths, batches, 10) == best


@pytest.mark.parametrize("batch_size", [0, -1])
def test_a_batch_size_below_one_is_refused_not_taken_as_one_batch_of_everything(batch_size):
    with pytest.raises(ValueError, match=f"batch_size={batch_size}: give a whole number, 1 or"):
        plan_batches([5, 3, 8], batch_size=batch_size, max_tokens=100)


def fits(lengths, batch) -> bool:
    return len(batch) <= 3 and (
        len(batch) == 1 or max(lengths[i] for i in batch) * len(batch) <= 100
    )


def split_at(order, cuts):
    parts, current = [], [order[0]]
    for index, cut in zip(order[1:], cuts):
        if cut:
            parts.append(current)
            current = []
        current.append(index)
    return [*parts, current]


@pytest.mark.parametrize("rule", ["last_token", "mean"])
def test_activation_checkpointing_recomputes_blocks_and_changes_no_number(rule):
    b = batch([[5, 6, 7, 8, 9], [3, 4]])
    results = []
    for on in (False, True):
        model = classifier(rule).train()
        model.activation_checkpointing = on
        calls = []
        for block in model.backbone.trf_blocks:
            block.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        loss = model(b["input_ids"], b["lengths"]).logsumexp(-1).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, len(calls)))
    (loss_off, grads_off, calls_off), (loss_on, grads_on, calls_on) = results
    torch.testing.assert_close(loss_on, loss_off, rtol=0, atol=0)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 0
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, rtol=0, atol=0)
    # Each block ran again in the backward pass: its activations were not kept.
    assert (calls_off, calls_on) == (3, 6)
    with torch.no_grad():  # nothing to recompute for: the plain forward
        model(b["input_ids"], b["lengths"])
