"""The GPT-2 backbone: published sizes, the book's interface, and the pooled fast path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpt_classifier import GPT, PRESETS, preset_config

# Published parameter counts with the output layer tied to the token embedding.
PUBLISHED = {
    "gpt2-small": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_published_parameter_counts(name):
    with torch.device("meta"):  # shapes only: no memory for 1.5B parameters
        model = GPT(preset_config(name))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]
    cfg = PRESETS[name]
    assert (cfg.vocab_size, cfg.context_length, cfg.qkv_bias) == (50257, 1024, True)


def test_small_preset_really_builds_with_tied_output_layer():
    model = GPT.from_preset("gpt2-small")
    assert model.out_head.weight is model.tok_emb.weight
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED["gpt2-small"]


def test_book_interface_turns_into_a_classifier():
    model = GPT.from_preset("gpt2-tiny").eval()
    ids = torch.randint(0, 50257, (2, 9))
    assert model(ids).shape == (2, 9, 50257)
    model.out_head = nn.Linear(model.cfg.emb_dim, 2)
    assert model(ids).shape == (2, 9, 2)
    assert isinstance(model.trf_blocks[-1], nn.Module) and isinstance(model.final_norm, nn.Module)


def test_default_dropout_is_off_and_configurable():
    assert preset_config("gpt2-small").drop_rate == 0.0
    assert preset_config("gpt2-small", drop_rate=0.1).drop_rate == 0.1
    with pytest.raises(ValueError, match="unknown GPTConfig keys"):
        preset_config("gpt2-small", dropout=0.1)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset_config("gpt2-huge")


def test_causality_later_tokens_do_not_change_earlier_logits():
    model = GPT.from_preset("gpt2-tiny").eval()
    ids = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        short = model(ids[:, :5])
        longer = model(torch.cat([ids[:, :5], torch.full((1, 7), 50256)], dim=1))
    torch.testing.assert_close(short, longer[:, :5], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"qkv_bias": False}, {"causal_mask": False}],
    ids=["gpt2", "no-bias", "no-mask"],
)
def test_pooled_block_equals_full_block_output_and_gradients(overrides):
    torch.manual_seed(0)
    model = GPT.from_preset("gpt2-tiny", **overrides).eval()
    x = model.embed(torch.randint(0, 50257, (4, 11))).detach().requires_grad_()
    positions = torch.tensor([0, 4, 10, 7])
    block = model.trf_blocks[-1]
    weights = torch.randn(4, x.shape[-1])

    def output_and_grads(pooled_only: bool):
        block.zero_grad()
        x.grad = None
        out = block(x, positions=positions) if pooled_only else block(x)[torch.arange(4), positions]
        (out * weights).sum().backward()
        grads = {name: p.grad.clone() for name, p in block.named_parameters()}
        return out.detach(), grads, x.grad.clone()

    pooled, pooled_grads, pooled_x_grad = output_and_grads(True)
    full, full_grads, full_x_grad = output_and_grads(False)
    torch.testing.assert_close(pooled, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled_grads, full_grads, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pooled_x_grad, full_x_grad, atol=1e-5, rtol=1e-4)
    if model.cfg.causal_mask:
        assert pooled_x_grad[0, 1:].abs().sum() == 0  # nothing after a position reaches it


def _tiny_last_block() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """gpt2-tiny's last block, a batch of 4 embedded sequences of 11 tokens, and one
    position per sequence."""
    torch.manual_seed(0)
    model = GPT.from_preset("gpt2-tiny").eval()
    x = model.embed(torch.randint(0, 50257, (4, 11))).detach()
    return model.trf_blocks[-1], x, torch.tensor([0, 4, 10, 7])


def _pooled_run(block, x, positions, bf16=False):
    """Output and parameter gradients of one pooled forward and backward pass."""
    block.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = block(x, positions=positions)
    out.float().square().sum().backward()  # outside autocast, as Lightning runs it
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    return out.detach().float(), grads


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
def test_pooled_block_gives_the_same_numbers_folded_or_hooked(bf16):
    # Plain key and value layers are folded into the query; a hook on either (which must
    # see its calls) runs the full block instead: the same numbers either way.
    block, x, positions = _tiny_last_block()
    folded, folded_grads = _pooled_run(block, x, positions, bf16)
    seen: list[int] = []
    handle = block.att.W_value.register_forward_hook(lambda m, a, out: seen.append(1))
    unfolded, unfolded_grads = _pooled_run(block, x, positions, bf16)
    handle.remove()
    assert seen == [1]
    # Under bf16 autocast the folded products run in float32: closer to exact, not equal.
    tol = {"atol": 3e-2, "rtol": 3e-2} if bf16 else {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(folded, unfolded, **tol)
    torch.testing.assert_close(folded_grads, unfolded_grads, **tol)
    assert folded_grads.keys() == dict(block.named_parameters()).keys()


def test_pooled_block_calls_lora_and_globally_hooked_layers():
    # Adapted layers and global module hooks see their calls, and the result is the
    # full block's at those positions.
    from torch.nn.modules.module import register_module_forward_hook

    from gpt_classifier.model.lora import add_lora

    block, x, positions = _tiny_last_block()
    calls: list[str] = []
    handle = register_module_forward_hook(
        lambda m, a, out: calls.append(type(m).__name__) if m is block.att.W_key else None
    )
    _pooled_run(block, x, positions)
    handle.remove()
    assert calls == ["Linear"]
    add_lora(block, "att.W_key", rank=2, alpha=4)
    with torch.no_grad():
        block.att.W_key.lora_B.weight.normal_()
    pooled, _ = _pooled_run(block, x, positions)
    full = block(x)[torch.arange(4), positions]
    torch.testing.assert_close(pooled, full.detach(), atol=1e-5, rtol=1e-5)


def test_pooled_block_folds_lora_keys_and_values_to_the_full_blocks_numbers():
    # Adapters without dropout are one linear map each, folded like plain layers, their
    # gradients included; with dropout (random per token) the full block runs.
    from gpt_classifier.model.lora import add_lora

    block, x, positions = _tiny_last_block()
    for name in ("att.W_key", "att.W_value"):
        with torch.no_grad():
            add_lora(block, name, rank=2, alpha=4).lora_B.weight.normal_()
    assert block.att.foldable()
    folded, folded_grads = _pooled_run(block, x, positions)
    block.zero_grad()
    full = block(x)[torch.arange(4), positions]
    full.square().sum().backward()
    full_grads = {n: p.grad for n, p in block.named_parameters() if p.grad is not None}
    torch.testing.assert_close(folded, full.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(folded_grads, full_grads, atol=1e-5, rtol=1e-4)
    assert {"att.W_key.lora_A.weight", "att.W_value.lora_B.weight"} <= folded_grads.keys()
    other, _, _ = _tiny_last_block()
    add_lora(other, "att.W_key", rank=2, alpha=4, dropout=0.1)
    assert not other.att.foldable()


def test_too_long_input_is_a_clear_error():
    model = GPT.from_preset("gpt2-tiny")
    with pytest.raises(ValueError, match="longer than the model's context length 256"):
        model(torch.zeros(1, 257, dtype=torch.long))


def test_split_fused_qkv_matches_gpt2_c_attn_layout():
    from gpt_classifier.model.weight_names import split_fused_qkv

    fused = {"trf_blocks.0.att.qkv.weight": torch.arange(12.0).view(6, 2),
             "trf_blocks.0.att.qkv.bias": torch.arange(6.0), "other": torch.ones(1)}  # fmt: skip
    split = split_fused_qkv(fused)
    assert sorted(split) == sorted([
        "other", *(f"trf_blocks.0.att.{p}.{k}" for p in ("W_query", "W_key", "W_value")
                   for k in ("weight", "bias")),
    ])  # fmt: skip
    torch.testing.assert_close(
        split["trf_blocks.0.att.W_key.weight"], torch.tensor([[4.0, 5], [6, 7]])
    )
    torch.testing.assert_close(split["trf_blocks.0.att.W_value.bias"], torch.tensor([4.0, 5]))
