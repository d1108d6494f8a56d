"""Low-rank adapters (LoRA): wrap linear layers, train the adapters, merge them back.

An adapted layer computes ``W x + b + (alpha / rank) * B(A(dropout(x)))`` with ``A``
Kaiming-uniform and ``B`` zeros, so before the first step it equals the base layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` plus a low-rank update.

    It *is* the linear layer it wraps (same ``weight`` and ``bias`` parameters, same
    names in a state dict), with ``lora_A`` (rank x in) and ``lora_B`` (out x rank)
    added beside them.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, alpha: float,
        dropout: float = 0.0, bias: bool = True, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._make_adapters(self.weight.device, self.weight.dtype)

    def _make_adapters(self, device: torch.device, dtype: torch.dtype) -> None:
        self.lora_A = nn.Linear(self.in_features, self.rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(
            self.rank, self.out_features, bias=False, device=device, dtype=dtype
        )
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        """An adapted layer that shares ``linear``'s weight and bias (nothing is copied)."""
        # Built on the meta device, so no memory is spent on a weight about to be replaced.
        lora = cls(linear.in_features, linear.out_features, rank, alpha, dropout,
                   bias=linear.bias is not None, device="meta")  # fmt: skip
        lora.weight, lora.bias = linear.weight, linear.bias
        lora._make_adapters(linear.weight.device, linear.weight.dtype)
        return lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """``W + (alpha / rank) * B A``, computed in float32."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return (self.weight.float() + self.scaling * delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def add_lora(
    parent: nn.Module, name: str, rank: int, alpha: float, dropout: float = 0.0
) -> LoRALinear:
    """Replace the linear layer ``parent.<name>`` (a dotted path) by its adapted form.

    Idempotent: a layer that already has adapters is returned as it is.
    """
    owner_path, _, attr = name.rpartition(".")
    owner = parent.get_submodule(owner_path) if owner_path else parent
    layer = getattr(owner, attr)
    if isinstance(layer, LoRALinear):
        return layer
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{name} is a {type(layer).__name__}, not a linear layer")
    lora = LoRALinear.wrap(layer, rank, alpha, dropout)
    setattr(owner, attr, lora)
    return lora


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every adapted layer of ``model`` by its qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every adapter folded into its base weight.

    The result loads into the same architecture without LoRA; ``model`` itself is
    not changed.
    """
    state = dict(model.state_dict())
    for name, layer in lora_layers(model).items():
        prefix = f"{name}." if name else ""
        state[f"{prefix}weight"] = layer.merged_weight().detach()
        del state[f"{prefix}lora_A.weight"], state[f"{prefix}lora_B.weight"]
    return state
