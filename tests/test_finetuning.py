"""Fine-tuning methods built from the real ``freeze`` configs, applied through setup(); LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from gpt_classifier import GPT, SequenceClassifier
from gpt_classifier.finetuning import LoRA, TrainLastBlocks, count_parameters, method_from_config
from gpt_classifier.finetuning.methods import LORA_TARGETS
from gpt_classifier.model.classifier import CachedPrefix
from gpt_classifier.model.config import GPTConfig, preset_config
from gpt_classifier.model.lora import LoRALinear, lora_layers, merged_state_dict
from gpt_classifier.training.module import ClassifierModule

REPO = Path(__file__).resolve().parents[1]
SMALL_TOTAL = 124_441_346  # gpt2-small with a 2-class head (untied)
SMALL_LORA_BLOCK = 221_184  # rank 16 on all six linear layers of one gpt2-small block


def method_from_overrides(*overrides: str):
    """The fine-tuning method exactly as train.py builds it from the config tree."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return instantiate(cfg.freeze, _convert_="all")


def set_up(model_name: str, *overrides: str, meta: bool = True) -> ClassifierModule:
    """A ClassifierModule after Lightning's setup(): the method applied as in a run."""
    if meta:  # shapes only: counting 124M parameters needs no memory
        with torch.device("meta"):
            model = SequenceClassifier(GPT(preset_config(model_name)), 2)
    else:
        model = SequenceClassifier(GPT.from_preset(model_name), 2)
    module = ClassifierModule(model, method_from_overrides(*overrides))
    module.setup("fit")
    return module


@pytest.mark.parametrize(
    ("overrides", "trainable"),
    [
        (["freeze=last_block"], 7_090_946),
        (["freeze=last_layer"], 1_538),
        (["freeze=all"], SMALL_TOTAL),
        (["freeze=last_n_blocks"], 7_090_946 + 7_087_872),
        (["freeze=last_n_blocks", "freeze.n=3"], 7_090_946 + 2 * 7_087_872),
        (["freeze=lora"], 12 * SMALL_LORA_BLOCK + 1_538),
        # Appendix E: every linear layer including the head, the head's base frozen.
        (["freeze=lora", "freeze.rank=16", "freeze.head=lora"], 2_666_528),
        (["freeze=lora", "freeze.head=both"], 12 * SMALL_LORA_BLOCK + 1_538 + 12_320),
        (["freeze=lora", "freeze.blocks=2"], 2 * SMALL_LORA_BLOCK + 1_538),
        (["freeze=lora", "freeze.rank=8", "freeze.targets=[att.W_query,att.W_value]"],
         12 * 2 * 8 * (768 + 768) + 1_538),
    ],
)  # fmt: skip
def test_config_options_train_exactly_their_parameters_on_gpt2_small(overrides, trainable):
    module = set_up("gpt2-small", *overrides)
    got_trainable, total = count_parameters(module.model)
    assert got_trainable == trainable
    if "freeze=lora" not in overrides:  # adapters add parameters; the others only mark
        assert total == SMALL_TOTAL
    # setup() runs again for the final test: nothing may change the second time.
    module.setup("test")
    assert count_parameters(module.model) == (got_trainable, total)


def trainable_names(module: ClassifierModule) -> set[str]:
    return {n for n, p in module.model.named_parameters() if p.requires_grad}


def test_last_block_and_last_layer_train_the_named_parameters():
    module = set_up("gpt2-small", "freeze=last_block")
    last = module.model.backbone.trf_blocks[11]
    assert trainable_names(module) == {
        *(f"backbone.trf_blocks.11.{k}" for k, _ in last.named_parameters()),
        "backbone.final_norm.weight", "backbone.final_norm.bias",
        "backbone.out_head.weight", "backbone.out_head.bias",
    }  # fmt: skip
    module = set_up("gpt2-small", "freeze=last_layer")
    assert trainable_names(module) == {"backbone.out_head.weight", "backbone.out_head.bias"}


def test_lora_trains_adapters_only_and_keeps_the_final_norm_frozen():
    module = set_up("gpt2-small", "freeze=lora", "freeze.head=lora")
    names = trainable_names(module)
    assert names and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in names)
    assert len(names) == 2 * (12 * len(LORA_TARGETS) + 1)
    assert "backbone.out_head.lora_A.weight" in names
    # What a checkpoint keeps is exactly what trains.
    assert module.method.checkpoint_names(module.model) == names


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["freeze=lora", "freeze.rank=0"], "freeze.rank=0 must be a positive integer"),
        (["freeze=lora", "freeze.alpha=-1"], "freeze.alpha=-1 must be a positive number"),
        (["freeze=lora", "freeze.dropout=1.0"], r"freeze.dropout=1.0 must be in \[0, 1\)"),
        (["freeze=lora", "freeze.head=half"], "freeze.head='half'; choose one of"),
        (["freeze=lora", "freeze.targets=[att.qkv]"], r"\['att.qkv'\] unknown"),
        (["freeze=lora", "freeze.blocks=0"], "freeze.blocks=0 must be a positive integer"),
        (["freeze=last_n_blocks", "freeze.n=0"], "freeze.n=0 must be a positive integer"),
    ],
)
def test_bad_values_fail_when_the_method_is_built(overrides, message):
    with pytest.raises(Exception, match=message):
        method_from_overrides(*overrides)


def test_methods_that_do_not_fit_the_architecture_are_named():
    with pytest.raises(ValueError, match="freeze.n=13 must be between 1 and the model's 12 blocks"):
        TrainLastBlocks(13).check(preset_config("gpt2-small"))
    with pytest.raises(ValueError, match="freeze.blocks=3 must be between 1 and the model's 2"):
        LoRA(blocks=3).check(preset_config("gpt2-tiny"))


def test_method_config_round_trips():
    for method in (
        TrainLastBlocks(3),
        LoRA(rank=4, alpha=8, targets=["ff.fc"], blocks=1, head="both"),
    ):
        again = method_from_config(method.to_config())
        assert type(again) is type(method) and again.to_config() == method.to_config()
    assert method_from_config(None).to_config() == {"method": "last_blocks", "n": 1}


# ----------------------------------------------------------------------------- LoRA layers


def test_adapted_layer_equals_the_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear.wrap(base, rank=3, alpha=12.0)
    assert layer.weight is base.weight and layer.bias is base.bias  # shared, not copied
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)  # B = 0 at the start
    torch.nn.init.normal_(layer.lora_B.weight)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    want = x @ base.weight.T + base.bias + (12.0 / 3) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    merged = x @ layer.merged_weight().T + base.bias
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=1e-5)


def lora_model(blocks: int | None, head: str = "lora") -> SequenceClassifier:
    torch.manual_seed(0)
    model = SequenceClassifier(GPT.from_preset("gpt2-tiny", n_layers=3), 2).eval()
    LoRA(rank=4, alpha=8, blocks=blocks, head=head).apply(model)
    return model


def logits_three_ways(model: SequenceClassifier, depth: int) -> list[torch.Tensor]:
    """Logits of the book's full forward (every block on every position), of the
    classifier's forward (last block at the pooled token only), and of the latter
    starting from a cached prefix of ``depth`` blocks."""
    ids = torch.randint(0, 50000, (3, 11), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([11, 4, 7])
    with torch.no_grad():
        book = model.backbone(ids)[torch.arange(3), lengths - 1]
        pooled = model(ids, lengths)
        cached = model(ids, lengths, prefix=CachedPrefix(model(ids, hidden_after=depth), depth))
    return [book, pooled, cached]


@pytest.mark.parametrize(("blocks", "depth"), [(1, 2), (None, 0)])
def test_each_adapter_changes_the_logits_on_every_path(blocks, depth):
    # blocks=1: the last block is adapted and the two before it form a cacheable
    # prefix; blocks=None: every block is adapted. A wrapper skipped on any path (e.g.
    # a weight passed to F.linear) makes the three disagree or leaves logits unchanged.
    model = lora_model(blocks=blocks)
    base = logits_three_ways(model, depth)
    layers = lora_layers(model)
    assert len(layers) == len(LORA_TARGETS) * (blocks or 3) + 1
    for name, layer in layers.items():
        with torch.no_grad():
            layer.lora_B.weight.normal_(std=0.5)
        book, pooled, cached = logits_three_ways(model, depth)
        assert not torch.allclose(book, base[0], atol=1e-4), f"{name} changes nothing"
        torch.testing.assert_close(pooled, book, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(cached, book, atol=1e-5, rtol=1e-5, msg=name)
        with torch.no_grad():
            layer.lora_B.weight.zero_()


def test_merged_adapters_give_the_same_logits_without_lora_code():
    model = lora_model(blocks=None, head="both")
    for layer in lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.weight.normal_(std=0.1)
    want = logits_three_ways(model, depth=0)[1]
    state = merged_state_dict(model)
    assert not any("lora_" in k for k in state)
    plain = SequenceClassifier(GPT.from_preset("gpt2-tiny", n_layers=3), 2).eval()
    plain.load_state_dict(state, strict=True)
    got = logits_three_ways(plain, depth=0)[1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_lora_depth_leaves_the_unadapted_blocks_to_the_cache():
    cfg = GPTConfig(n_layers=12)
    assert LoRA().frozen_depth(cfg) == 0
    assert LoRA(blocks=2).frozen_depth(cfg) == 10
    assert TrainLastBlocks(3).frozen_depth(cfg) == 9


# ----------------------------------------------------------------------------- optimizer


def test_optimizer_and_scheduler_come_from_their_configs():
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["scheduler=cosine", "optimizer.lr=1e-3"])
    optimizer, scheduler = instantiate(cfg.optimizer), instantiate(cfg.scheduler)
    model = SequenceClassifier(GPT.from_preset("gpt2-tiny"), 2)
    module = ClassifierModule(model, TrainLastBlocks(1), optimizer, scheduler)
    module.setup("fit")
    configured = module.configure_optimizers()
    opt = configured["optimizer"]
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["weight_decay"] == 0.1
    assert opt.defaults["fused"] is True  # the config leaves it open; the CPU has one
    trained = {id(p) for p in module.parameters() if p.requires_grad}
    assert {id(p) for group in opt.param_groups for p in group["params"]} == trained
    schedule = configured["lr_scheduler"]
    assert schedule["interval"] == "epoch"
    assert isinstance(schedule["scheduler"], torch.optim.lr_scheduler.CosineAnnealingLR)
    assert schedule["scheduler"].T_max == cfg.trainer.max_epochs
    # No scheduler by default, as the book.
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        assert compose("train").get("scheduler") is None
    assert isinstance(ClassifierModule(model).configure_optimizers(), torch.optim.AdamW)
