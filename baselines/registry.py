"""Every method the AUC-vs-size benchmark can run, by name.

A method is one of three kinds:

- ``"train"``: ``build(inputs, setting)`` returns a ``CompressedEmbedding`` that is
  trained from scratch with the dense tower (optionally with its own ``optimizers``).
- ``"post"``: ``convert(fp32_embedding, inputs, setting)`` compresses the embedding of an
  fp32 model already trained with the same seed (post-training quantization); the tower
  is kept as trained.
- ``"pipeline"``: MPE, run by the benchmark through ``mpe.search.run``.

Methods live in their own modules and are imported lazily (``get_method``), so a broken
or slow import of one method does not affect the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from baselines.base import CompressedEmbedding
from encoding.sizes import fp32_table_bytes

Kind = Literal["train", "post", "pipeline"]


@dataclass(frozen=True)
class MethodInputs:
    """What a method may use to build its embedding.

    Attributes:
        fields, cardinalities: the fields and their number of rows (local id 0 = OOV).
        dim: embedding dimension D.
        frequency: int64 [N] training-split count of every global row (field order).
        seed: the run's seed.
    """

    fields: list[str]
    cardinalities: list[int]
    dim: int
    frequency: np.ndarray
    seed: int

    @property
    def num_rows(self) -> int:
        return sum(self.cardinalities)

    @property
    def fp32_bytes(self) -> int:
        return fp32_table_bytes(self.num_rows, self.dim)


OptimizerFactory = Callable[[nn.Module, float], list[torch.optim.Optimizer]]


@dataclass(frozen=True)
class Method:
    """A compression method.

    Attributes:
        name: registry key (CSV ``method`` column).
        kind: "train", "post" or "pipeline" (see the module docstring).
        settings: the settings the benchmark sweeps by default (CSV ``setting`` column).
        description: one line for ``--help`` and the README.
        build: kind "train": (inputs, setting) -> CompressedEmbedding.
        convert: kind "post": (trained fp32 embedding, inputs, setting) -> CompressedEmbedding.
        optimizers: optional (model, lr) -> optimisers, for methods that need their own
            update rule (e.g. ALPT's integer weights); default one Adam over everything.
    """

    name: str
    kind: Kind
    settings: tuple[str, ...]
    description: str
    build: Callable[[MethodInputs, str], CompressedEmbedding] | None = None
    convert: Callable[[nn.Module, MethodInputs, str], CompressedEmbedding] | None = None
    optimizers: OptimizerFactory | None = field(default=None)


# name -> "module:attribute" of its ``Method``; imported on first use.
METHODS: dict[str, str] = {
    "fp32": "baselines.fp32:METHOD",
    "lsq": "baselines.uniform:METHOD",
    "ptq": "baselines.ptq:METHOD",
    "alpt": "baselines.alpt:METHOD",
    "hash": "baselines.hashing:HASH_METHOD",
    "qr": "baselines.hashing:QR_METHOD",
    "pep": "baselines.pep:METHOD",
    "cutoff": "baselines.cutoff:METHOD",
    "mpe": "baselines.mpe_method:METHOD",
    "robe": "baselines.robe:METHOD",
    "ttrec": "baselines.ttrec:METHOD",
}


def get_method(name: str) -> Method:
    """The ``Method`` registered as ``name``; ``ValueError`` lists the known names."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    module, attr = METHODS[name].split(":")
    method = getattr(importlib.import_module(module), attr)
    if not isinstance(method, Method) or method.name != name:
        raise TypeError(f"{METHODS[name]} is not the Method {name!r}")
    return method
