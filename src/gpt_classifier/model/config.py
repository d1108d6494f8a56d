"""GPT-2's architecture: a config dataclass and the named sizes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class GPTConfig:
    """Architecture of a GPT-2 model."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5
    # False: every position attends to every other, padding included (the book's
    # --disable_causal_mask experiment); GPT-2 was trained causal.
    causal_mask: bool = True

    def __post_init__(self) -> None:
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"emb_dim={self.emb_dim} is not divisible by n_heads={self.n_heads}; "
                "pick a head count that divides the embedding size."
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, e.g. for hyperparameters or config.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPTConfig:
        """Build from a dict, rejecting keys this class does not know."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**values)


# The four published GPT-2 sizes, plus a tiny one for tests.
PRESETS: dict[str, GPTConfig] = {
    "gpt2-small": GPTConfig(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),
    # Real tokenizer vocabulary, so it reads real data; small enough to train in seconds.
    "gpt2-tiny": GPTConfig(context_length=256, emb_dim=64, n_layers=2, n_heads=4),
}


def preset_config(name: str, **overrides: Any) -> GPTConfig:
    """The named preset's config, with fields such as ``drop_rate`` overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    values = PRESETS[name].to_dict()
    values.update(overrides)
    return GPTConfig.from_dict(values)
