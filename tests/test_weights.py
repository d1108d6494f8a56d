"""Weight loading proven against the reference implementation (transformers) in every format."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gpt_classifier import GPT, get_tokenizer
from gpt_classifier.model.weights import WeightLoadError

transformers = pytest.importorskip("transformers")

SHAPES = [  # (n_embd, n_layer, n_head, n_positions, vocab_size)
    (32, 2, 4, 64, 1000),
    (48, 3, 6, 40, 777),
    (64, 1, 2, 128, 50257),
]


def reference_model(shape: tuple[int, ...], lm_head: bool, seed: int = 0) -> torch.nn.Module:
    n_embd, n_layer, n_head, n_positions, vocab = shape
    cfg = transformers.GPT2Config(
        n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions,
        vocab_size=vocab, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    cls = transformers.GPT2LMHeadModel if lm_head else transformers.GPT2Model
    model = cls(cfg).eval()
    with torch.no_grad():  # random LayerNorm parameters so that a swapped g/b would show
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def reference_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
        if hasattr(out, "logits"):
            return out.logits
        return out.last_hidden_state @ model.wte.weight.t()


def hub_style_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors as the Hub's gpt2 files hold them: no prefix, with the mask buffers."""
    base = model.transformer if hasattr(model, "transformer") else model
    state = {k: v.clone() for k, v in base.state_dict().items()}
    ctx = base.config.n_positions
    for i in range(base.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(ctx, ctx)).view(1, 1, ctx, ctx)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


# Small OpenAI-format checkpoints written by TensorFlow itself (scripts/make_tf_fixtures.py),
# each beside the same weights saved by transformers: our reader needs no TensorFlow, and
# neither do the tests.
TF_FIXTURES = Path(__file__).parent / "fixtures" / "openai_tf"
TF_FIXTURE_NAMES = sorted(p.name for p in TF_FIXTURES.iterdir())


def openai_checkpoint(name: str, tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A copy of a TensorFlow-written checkpoint folder, and its weights in transformers."""
    folder = shutil.copytree(TF_FIXTURES / name / "openai", tmp_path / "124M")
    ref = transformers.GPT2Model.from_pretrained(TF_FIXTURES / name / "reference").eval()
    return folder, ref


def assert_same_logits(ours: GPT, ref: torch.nn.Module, vocab: int, ctx: int) -> None:
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (3, min(ctx, 17)))
    ours.eval()
    with torch.no_grad():
        got = ours(ids)
    want = reference_logits(ref, ids)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("lm_head", [True, False], ids=["GPT2LMHeadModel", "GPT2Model"])
def test_save_pretrained_safetensors_matches_reference(tmp_path, shape, lm_head):
    ref = reference_model(shape, lm_head)
    ref.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    assert ours.cfg.n_layers == shape[1] and ours.cfg.n_heads == shape[2]
    assert_same_logits(ours, ref, shape[4], shape[3])


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("lm_head", [True, False], ids=["GPT2LMHeadModel", "GPT2Model"])
def test_hub_layout_files_match_reference(tmp_path, fmt, lm_head):
    shape = SHAPES[0]
    ref = reference_model(shape, lm_head, seed=3)
    ref.config.to_json_file(tmp_path / "config.json")
    state = hub_style_state(ref)
    if fmt == "safetensors":
        save_file(state, str(tmp_path / "model.safetensors"))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same_logits(GPT.from_pretrained(tmp_path), ref, shape[4], shape[3])
    # A file of the folder: the weights file itself, or another one (its folder is meant).
    weights = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    for given in (weights, "config.json"):
        assert_same_logits(GPT.from_pretrained(tmp_path / given), ref, shape[4], shape[3])


def test_prefixed_bin_with_tied_lm_head(tmp_path):
    ref = reference_model(SHAPES[1], lm_head=True, seed=4)
    ref.config.to_json_file(tmp_path / "config.json")
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")  # transformer.* + lm_head
    assert_same_logits(GPT.from_pretrained(tmp_path), ref, SHAPES[1][4], SHAPES[1][3])


def test_tf_fixtures_are_tensorflow_checkpoints():
    # What TensorFlow's SaveV2 writes: a sharded data file and a table-format index.
    assert len(TF_FIXTURE_NAMES) >= 2, TF_FIXTURE_NAMES
    for name in TF_FIXTURE_NAMES:
        files = sorted(p.name for p in (TF_FIXTURES / name / "openai").iterdir())
        assert files == ["checkpoint", "hparams.json", "model.ckpt.data-00000-of-00001",
                         "model.ckpt.index"], files  # fmt: skip


@pytest.mark.parametrize("name", TF_FIXTURE_NAMES)
def test_openai_tensorflow_checkpoint_matches_reference(tmp_path, name):
    folder, ref = openai_checkpoint(name, tmp_path)
    cfg = ref.config
    assert_same_logits(GPT.from_pretrained(folder), ref, cfg.vocab_size, cfg.n_positions)


def test_openai_folder_tokenizer_needs_no_download(tmp_path, tiktoken_files):
    (tmp_path / "encoder.json").write_bytes(
        (tiktoken_files / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6").read_bytes()
    )
    (tmp_path / "vocab.bpe").write_bytes(
        (tiktoken_files / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").read_bytes()
    )
    enc = get_tokenizer(tmp_path)
    assert enc.encode("Do you have time") == [5211, 345, 423, 640]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    text = "WINNER!! Claim your £900 prize now: call 09061701461."
    assert enc.encode(text) == get_tokenizer().encode(text)


def test_tokenizer_reference_ids():
    enc = get_tokenizer()
    assert enc.encode("Do you have time") == [5211, 345, 423, 640]
    assert enc.n_vocab == 50257


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def saved(tmp_path) -> Path:
    ref = reference_model(SHAPES[0], lm_head=False, seed=6)
    ref.config.to_json_file(tmp_path / "config.json")
    save_file(hub_style_state(ref), str(tmp_path / "model.safetensors"))
    return tmp_path


def _rewrite(folder: Path, change) -> None:
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(folder / "model.safetensors"))


def test_missing_tensor_is_named(saved):
    _rewrite(saved, lambda s: s.pop("h.1.mlp.c_fc.bias"))
    with pytest.raises(WeightLoadError, match=r"missing tensors \['trf_blocks.1.ff.fc.bias'\]"):
        GPT.from_pretrained(saved)


def test_unexpected_tensor_is_named(saved):
    _rewrite(saved, lambda s: s.__setitem__("h.0.attn.extra", torch.zeros(3)))
    with pytest.raises(WeightLoadError, match=r"unexpected tensors \['h.0.attn.extra'\]"):
        GPT.from_pretrained(saved)


def test_wrong_shape_is_named(saved):
    _rewrite(saved, lambda s: s.__setitem__("ln_f.weight", torch.ones(31)))
    with pytest.raises(WeightLoadError, match=r"'ln_f.weight' has shape \(31,\)"):
        GPT.from_pretrained(saved)


def test_truncated_safetensors_is_an_error(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightLoadError, match="model.safetensors could not be read"):
        GPT.from_pretrained(saved)


def test_corrupt_bin_is_an_error(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a zip or a pickle" * 10)
    with pytest.raises(WeightLoadError, match="pytorch_model.bin could not be read"):
        GPT.from_pretrained(tmp_path)


def test_bin_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"wte.weight": torch.zeros(2), "evil": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightLoadError, match="could not be read"):
        GPT.from_pretrained(tmp_path)


def test_truncated_tensorflow_data_is_an_error(tmp_path):
    folder, _ = openai_checkpoint(TF_FIXTURE_NAMES[0], tmp_path)
    data = folder / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(WeightLoadError, match=r"model.ckpt.data-00000-of-00001 is truncated"):
        GPT.from_pretrained(folder)


def test_corrupt_tensorflow_index_is_an_error(tmp_path):
    folder, _ = openai_checkpoint(TF_FIXTURE_NAMES[0], tmp_path)
    (folder / "model.ckpt.index").write_bytes(b"\0" * 100)
    with pytest.raises(WeightLoadError, match="model.ckpt.index is not a readable"):
        GPT.from_pretrained(folder)


def test_folder_without_weights_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightLoadError, match="holds no weights"):
        GPT.from_pretrained(tmp_path)


def test_unknown_size_without_config_is_an_error(saved):
    (saved / "config.json").unlink()
    with pytest.raises(WeightLoadError, match="number of heads is unknown"):
        GPT.from_pretrained(saved)


def test_unknown_name_is_an_error():
    with pytest.raises(WeightLoadError, match="neither an existing local path nor a known"):
        GPT.from_pretrained("gpt2-gigantic")


def test_hub_without_network_says_how_to_work_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightLoadError, match=r"no cached copy exists.*model.weights="):
        GPT.from_pretrained("gpt2")


def test_hub_download_uses_the_cache(tmp_path, monkeypatch):
    """A Hub name resolves through huggingface_hub; here its cache holds the files."""
    ref = reference_model(SHAPES[0], lm_head=True, seed=7)
    ref.save_pretrained(tmp_path / "snapshot")
    calls: list[tuple[str, str]] = []

    def fake_download(repo_id: str, filename: str, **_: object) -> str:
        calls.append((repo_id, filename))
        return str(tmp_path / "snapshot" / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    ours = GPT.from_pretrained("openai-community/gpt2")
    assert calls == [("openai-community/gpt2", "config.json"),
                     ("openai-community/gpt2", "model.safetensors")]  # fmt: skip
    assert_same_logits(ours, ref, SHAPES[0][4], SHAPES[0][3])
    shutil.rmtree(tmp_path / "snapshot")


def test_sharded_safetensors_folder_matches_reference(tmp_path):
    ref = reference_model(SHAPES[0], lm_head=True, seed=8)
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_same_logits(GPT.from_pretrained(tmp_path), ref, SHAPES[0][4], SHAPES[0][3])


def test_other_hub_repositories_need_the_hf_prefix(tmp_path, monkeypatch):
    ref = reference_model(SHAPES[1], lm_head=True, seed=9)
    ref.save_pretrained(tmp_path)
    repos: list[str] = []

    def fake_download(repo_id: str, filename: str, **_: object) -> str:
        repos.append(repo_id)
        return str(tmp_path / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    assert_same_logits(
        GPT.from_pretrained("hf:someone/gpt2-tuned"), ref, SHAPES[1][4], SHAPES[1][3]
    )
    assert set(repos) == {"someone/gpt2-tuned"}
    with pytest.raises(WeightLoadError, match="'hf:<owner>/<repo>' for another Hub repository"):
        GPT.from_pretrained("someone/gpt2-tuned")


def test_model_weights_given_on_the_command_line_is_never_ignored(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from gpt_classifier.tasks.errors import ConfigError
    from gpt_classifier.tasks.preflight import honour_weights

    def composed(*overrides: str):
        configs = str(Path(__file__).resolve().parents[1] / "configs")
        with initialize_config_dir(configs, version_base="1.3"):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg

    try:
        # gpt2-tiny trains from random weights unless weights are given: then it loads them.
        cfg = composed("model=gpt2-tiny", f"model.weights={tmp_path}")
        honour_weights(cfg)
        assert cfg.model.pretrained is True
        cfg = composed("model=gpt2-tiny", f"model.weights={tmp_path}", "model.pretrained=false")
        with pytest.raises(ConfigError, match="model.weights=.* and model.pretrained=false "
                           "contradict each other"):  # fmt: skip
            honour_weights(cfg)
        # The preset's own weights with model.pretrained=false: random weights, as asked.
        cfg = composed("model=gpt2-small", "model.pretrained=false")
        honour_weights(cfg)
        assert cfg.model.pretrained is False
    finally:
        HydraConfig.instance().cfg = None  # no Hydra state for later tests
