"""LoRA for ``nn.Linear`` layers, and the base class every adapter layer shares.

A frozen ``base: nn.Linear`` (``weight: [d_out, d_in]``) gets a low-rank update

    dW = (alpha / r) * B @ A,     A: [r, d_in],  B: [d_out, r]

and computes ``y = base(x) + dropout(x) @ A^T @ B^T * (alpha / r)`` for ``x: [..., d_in]``.
``B`` starts at zero, so ``dW = 0`` and the wrapped layer reproduces ``base`` exactly at
initialisation; ``A`` starts random (Kaiming-uniform as in Hugging Face PEFT, or Gaussian with
std ``1/r``), so ``B`` receives a gradient from the first step.

Parameters per adapted layer: ``r * (d_in + d_out)``.

``merge()`` adds ``dW`` into ``base.weight`` in place (the layer then costs nothing extra at
inference), ``unmerge()`` recomputes ``dW`` from the unchanged adapter tensors and subtracts it.
Only a ``merged`` flag is stored, never a copy of the original weight, so a round trip is exact
up to float rounding (|error| ~ 1e-7 for float32 weights of order 1).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AdapterConfig", "AdapterLinear", "LoRAConfig", "LoRALinear"]


@dataclass
class AdapterConfig:
    """Fields and (de)serialisation shared by adapter configs (subclassed, not used directly)."""

    adapter_type: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the config fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        """Inverse of ``to_dict``; unknown keys raise ``ValueError`` instead of being dropped."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config field(s) {unknown}")
        return cls(**d)

    def make_layer(self, base: nn.Linear) -> AdapterLinear:
        """Wrap ``base`` in this config's adapter layer (``base`` itself is not modified)."""
        raise NotImplementedError


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA hyperparameters.

    r: rank (rows of A, columns of B). alpha: the update is scaled by ``alpha / r``.
    dropout: dropout on the adapter branch's input (0 disables it).
    init: ``"kaiming"`` (A ~ Kaiming-uniform, a=sqrt(5), PEFT's default) or ``"gaussian"``
    (A ~ N(0, 1/r^2)). B is always zero-initialised.
    """

    adapter_type: ClassVar[str] = "lora"

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    init: str = "kaiming"

    def __post_init__(self) -> None:
        if int(self.r) != self.r or self.r < 1:
            raise ValueError(f"LoRAConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"LoRAConfig.init must be 'kaiming' or 'gaussian', got {self.init!r}")
        self.r = int(self.r)
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)

    def make_layer(self, base: nn.Linear) -> LoRALinear:
        return LoRALinear(base, self)


class AdapterLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank update ``dW = scaling * B @ A``.

    Subclasses implement ``factors() -> (A: [r, d_in], B: [d_out, r])``. The base layer is
    ``self.base``; adapter tensors are every parameter whose name does not start with ``base.``.
    """

    def __init__(self, base: nn.Linear, config: AdapterConfig, r: int, alpha: float,
                 dropout: float) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        self.config = config
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.r = r
        self.scaling = alpha / r
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    # -- to implement -----------------------------------------------------------------------
    def factors(self) -> tuple[Tensor, Tensor]:
        """``(A: [r, d_in], B: [d_out, r])``."""
        raise NotImplementedError

    # -- shared API ---------------------------------------------------------------------------
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter's own parameters by local name (``base.*`` excluded)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base.")}

    def num_adapter_parameters(self) -> int:
        """Number of scalars in the adapter tensors (the base layer excluded)."""
        return sum(p.numel() for p in self.adapter_parameters().values())

    def delta_weight(self) -> Tensor:
        """``dW = scaling * B @ A``: ``Tensor[d_out, d_in]`` (differentiable)."""
        a, b = self.factors()
        return (b @ a) * self.scaling

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Add ``dW`` into ``base.weight`` in place; ``forward`` then runs ``base`` only.

        safe_merge: refuse (``ValueError``) if the merged weight would contain NaN/inf.
        Merging twice is a no-op with a warning.
        """
        if self.merged:
            warnings.warn(f"{type(self).__name__}: already merged, nothing to do", stacklevel=2)
            return
        delta = self.delta_weight().to(self.base.weight.dtype)
        if safe_merge and not torch.isfinite(self.base.weight + delta).all():
            raise ValueError(f"{type(self).__name__}: merging would produce NaN/inf weights")
        self.base.weight.add_(delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ``dW`` (recomputed from the unchanged adapter tensors) from ``base.weight``."""
        if not self.merged:
            warnings.warn(f"{type(self).__name__}: not merged, nothing to do", stacklevel=2)
            return
        self.base.weight.sub_(self.delta_weight().to(self.base.weight.dtype))
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        """``x: [..., d_in] -> [..., d_out]``; ``base(x) + dropout(x) A^T B^T * scaling`` unless merged."""
        out = self.base(x)
        if self.merged:
            return out
        a, b = self.factors()
        return out + F.linear(F.linear(self.dropout(x), a), b) * self.scaling

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, merged={self.merged}")


class LoRALinear(AdapterLinear):
    """LoRA on one ``nn.Linear``: explicit ``lora_A: [r, d_in]`` and ``lora_B: [d_out, r]``.

    Parameters: ``r * (d_in + d_out)``. The base layer is frozen (``requires_grad=False``) by
    ``genlora_rec.adapters.inject_adapters``; the constructor does not touch it.
    """

    def __init__(self, base: nn.Linear, config: LoRAConfig) -> None:
        super().__init__(base, config, config.r, config.alpha, config.dropout)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, **kw))
        self.reset_adapter_parameters()

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """A random (per ``config.init``), B zero: ``dW = 0``."""
        if self.config.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        nn.init.zeros_(self.lora_B)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_A, self.lora_B
