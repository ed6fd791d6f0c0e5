"""ALPT: adaptive low-precision training of the embedding tables.

After Li et al., "Adaptive Low-Precision Training for Embeddings in Click-Through Rate
Prediction" (AAAI 2023). Registry name ``"alpt"`` (kind ``"train"``, settings ``"int8"``,
``"int4"``). The embedding weights are *stored* as signed b-bit integer codes during
training (no fp32 master copy): ``codes`` int8 [N, D] (4-bit codes also held in int8 in
memory, bit-packed in the export) and a learned step per field ``step`` [F] (one field =
one table). Every training step (``ALPTOptimizer.step``, after the backward pass):

1. de-quantize the looked-up rows ``w = codes * step_f`` (done by ``forward``; only these
   rows exist in fp32, for the step's duration) and get their gradient ``g``;
2. update them in fp32: ``w' = w - lr * adam(g)`` (lazy Adam: moments of the looked-up
   rows only), or plain SGD with ``row_optimizer="sgd"``;
3. learn the step by its LSQ gradient at the updated rows, ``x = w' / step_f``:
   ``dL/dstep_f = sum g * (round(x) - x)`` inside the code range, ``g * bound`` outside;
4. re-quantize with the new step and stochastic rounding,
   ``codes = clamp(floor(x + u), -2^(b-1), 2^(b-1) - 1)``, ``u ~ U[0, 1)``.

Choices where this differs from the paper or its Hetu code, and why:

- one step per field (the table), not per row: a per-row fp32 step would add 4 bytes to
  every 8-byte (int4) or 16-byte (int8) row at D = 16;
- step 3 reuses the step's own row gradient ``g`` (the gradient at ``w``) instead of a
  second forward/backward at the re-quantized ``w'`` (the paper alternates the weight and
  step updates): one pass per step, a first-order approximation of the same gradient;
- the step is updated multiplicatively (Adam on ``log step``), so it stays positive and
  the learning rate is relative: an additive Adam step of ``lr = 1e-3`` would be larger
  than an int8 step (~4e-4 at the N(0, 0.003) init) itself.

Training memory of the embedding: 1 byte per weight for the codes, plus 8 bytes per
weight of fp32 Adam moments with the default ``row_optimizer="adam"`` (as any Adam-trained
table has; ``"sgd"`` keeps none). Export: ``codes.npy`` (uint8, ``mpe.packing.pack_codes``,
``ceil(N * D * b / 8)`` bytes) and ``steps.npy`` (float32 [F]); a row decodes to
``code * steps[field]``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from baselines.base import CompressedEmbedding, read_tables
from baselines.registry import Method, MethodInputs
from ctr.model import DEFAULT_INIT_STD
from ctr.trainer import trainable_parameters
from data.layout import field_offsets
from encoding.packing import pack_codes, unpack_codes
from encoding.sizes import MAX_BITS, bucket_code_bytes, code_range, npy_file_bytes

SETTINGS = ("int8", "int4")
RowOptimizer = Literal["adam", "sgd"]
MAX_STEP_UPDATE = 10.0  # bound of Adam's m / sqrt(v) for log(step): at most exp(10 lr) per step
_INIT_CHUNK = 1 << 18  # rows drawn and quantized at a time at init (bounds the fp32 temporary)


def parse_bits(setting: str) -> int:
    """``"int8"`` -> 8, ``"int4"`` -> 4 (also ``"8"``, ``"4"``, and 2..8 generally)."""
    text = setting.removeprefix("int")
    if not text.isdigit() or not 2 <= int(text) <= MAX_BITS:
        raise ValueError(f"alpt setting {setting!r} is not an integer bit-width 'int2'..'int8' (e.g. 'int8', 'int4')")
    return int(text)


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``floor(x + u)``, ``u ~ U[0, 1)``: rounds up with probability ``x - floor(x)`` (unbiased)."""
    return torch.floor(x + torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device))


class ALPTEmbedding(CompressedEmbedding):
    """Integer-coded tables with a learned step per field; forward(kjt) -> Tensor[B, F, D].

    Args:
        fields, cardinalities: the fields and their number of rows (one table each).
        dim: embedding dimension D.
        bits: code bit-width b (codes in ``[-2^(b-1), 2^(b-1) - 1]``).
        init_std: rows start as N(0, init_std) (torch's global RNG), stochastically rounded.
        seed: seed of the optimiser's stochastic rounding.

    State: buffer ``codes`` int8 [N, D] (global rows in field order), parameter ``step``
    [F] (positive; updated by ``ALPTOptimizer`` only, ``forward`` gives it no gradient).
    In training mode with gradients enabled, ``forward`` keeps the looked-up rows (unique
    ids, their field, the fp32 rows with ``requires_grad``) for ``ALPTOptimizer.step``.
    """

    method = "alpt"

    def __init__(
        self,
        fields: Sequence[str],
        cardinalities: Sequence[int],
        dim: int,
        bits: int,
        init_std: float = DEFAULT_INIT_STD,
        seed: int = 0,
    ):
        super().__init__()
        self.fields = list(fields)
        self.cardinalities = [int(c) for c in cardinalities]
        self.dim = int(dim)
        self.bits = int(bits)
        self.seed = int(seed)
        low, high = code_range(self.bits)
        self.low, self.high = float(low), float(high)
        self.register_buffer("field_offsets", torch.from_numpy(field_offsets(self.cardinalities)))
        self.register_buffer("codes", torch.zeros(self.num_rows(), self.dim, dtype=torch.int8))
        self.step = nn.Parameter(torch.ones(len(self.fields)))
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._init_codes(init_std)

    @torch.no_grad()
    def _init_codes(self, init_std: float) -> None:
        """N(0, init_std) rows, LSQ step init ``2 E|w| / sqrt(2^(b-1))`` (the expectation
        for a Gaussian, so no fp32 table is kept), stochastically rounded to codes."""
        mean_abs = init_std * math.sqrt(2 / math.pi)
        self.step.fill_(max(2 * mean_abs / math.sqrt(2 ** (self.bits - 1)), 1e-8))
        step = float(self.step[0])
        for start in range(0, self.num_rows(), _INIT_CHUNK):
            rows = torch.empty(min(_INIT_CHUNK, self.num_rows() - start), self.dim).normal_(0.0, init_std)
            self.codes[start : start + rows.shape[0]] = self.quantize(rows, step)

    # -- quantization --------------------------------------------------------------------
    def quantize(self, w: torch.Tensor, step: torch.Tensor | float, generator: torch.Generator | None = None) -> torch.Tensor:
        """int8 codes of ``w`` [n, D] at ``step`` ([n, 1] or a scalar), stochastic rounding."""
        return stochastic_round(w / step, generator).clamp_(self.low, self.high).to(torch.int8)

    def field_of(self, global_ids: torch.Tensor) -> torch.Tensor:
        """int64 field index of every global row id."""
        return torch.searchsorted(self.field_offsets, global_ids, right=True) - 1

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [N, D]: every row as ``forward`` returns it (tests and small tables)."""
        field = self.field_of(torch.arange(self.num_rows()))
        return self.codes.to(torch.float32) * self.step.detach()[field, None]

    # -- forward -------------------------------------------------------------------------
    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        ids = self.global_ids(kjt)  # [B, F]
        step = self.step.detach()
        if not (self.training and torch.is_grad_enabled()):
            return self.codes[ids].to(torch.float32) * step[None, :, None]
        uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        field = self.field_of(uniq)
        rows = (self.codes[uniq].to(torch.float32) * step[field, None]).requires_grad_(True)
        self._pending = (uniq, field, rows)
        # index_select: its backward sums the duplicates deterministically
        return rows.index_select(0, inverse).view(*ids.shape, self.dim)

    def pop_pending(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(unique global ids [U], their field [U], fp32 rows [U, D] with ``.grad``) of the
        last training forward, and forget them."""
        pending, self._pending = self._pending, None
        return pending

    # -- sizes and export ----------------------------------------------------------------
    def num_bytes(self) -> int:
        """``codes.npy`` (bit-packed codes) + ``steps.npy``, headers included, as written."""
        return npy_file_bytes((bucket_code_bytes(self.num_rows(), self.bits, self.dim),), np.uint8) + npy_file_bytes(
            (len(self.fields),), np.float32
        )

    def export_arrays(self) -> dict[str, np.ndarray]:
        """``codes``: uint8 packed b-bit codes of all rows; ``steps``: float32 [F]."""
        return {
            "codes": pack_codes(self.codes.cpu().numpy(), self.bits),
            "steps": self.step.detach().cpu().numpy().astype(np.float32),
        }

    def export_config(self) -> dict[str, Any]:
        return {"bits": self.bits, "cardinalities": list(self.cardinalities)}

    @classmethod
    def from_export(cls, export_dir: str | os.PathLike) -> ALPTEmbedding:
        """Rebuild the tables from an ``export()`` directory (checksums verified, no pickle)."""
        header, arrays = read_tables(export_dir, cls.method)
        cfg = header["config"]
        emb = cls(header["fields"], cfg["cardinalities"], header["dim"], cfg["bits"], init_std=0.0)
        codes = unpack_codes(arrays["codes"], emb.num_rows(), emb.dim, emb.bits)
        if arrays["steps"].shape != (len(emb.fields),):
            raise ValueError(f"{export_dir}: steps.npy has shape {arrays['steps'].shape}, expected ({len(emb.fields)},)")
        with torch.no_grad():
            emb.codes.copy_(torch.from_numpy(codes))
            emb.step.copy_(torch.from_numpy(arrays["steps"]))
        return emb


class ALPTOptimizer(torch.optim.Optimizer):
    """The ALPT update of an ``ALPTEmbedding`` (see the module docstring for the four steps).

    Args:
        embedding: the module whose last training forward is updated.
        lr: learning rate of the rows and (relative) of the steps.
        betas, eps: Adam's, for the rows; the step's Adam uses ``betas`` and ``step_eps``.
        row_optimizer: "adam" (lazy: the looked-up rows' moments only) or "sgd".
        seed: seed of the stochastic rounding (its state is in ``state_dict()``).

    State (``state[embedding.step]``): ``t``, the rows' ``exp_avg`` / ``exp_avg_sq``
    float32 [N, D] (adam only), the step's, and ``rng`` (the generator's state).
    """

    def __init__(
        self,
        embedding: ALPTEmbedding,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        step_eps: float = 1e-20,
        row_optimizer: RowOptimizer = "adam",
        seed: int | None = None,
    ):
        if row_optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown row_optimizer {row_optimizer!r}; expected 'adam' or 'sgd'")
        super().__init__([embedding.step], {"lr": lr, "betas": betas, "eps": eps, "step_eps": step_eps})
        self.embedding = embedding
        self.row_optimizer = row_optimizer
        self.generator = torch.Generator(embedding.codes.device)
        self.generator.manual_seed(embedding.seed if seed is None else int(seed))

    def _state(self) -> dict[str, torch.Tensor]:
        emb = self.embedding
        state = self.state[emb.step]
        if not state:
            dev = emb.codes.device
            state["t"] = torch.zeros((), device=dev)
            state["step_exp_avg"] = torch.zeros(len(emb.fields), device=dev)
            state["step_exp_avg_sq"] = torch.zeros(len(emb.fields), device=dev)
            if self.row_optimizer == "adam":
                state["exp_avg"] = torch.zeros(emb.num_rows(), emb.dim, device=dev)
                state["exp_avg_sq"] = torch.zeros(emb.num_rows(), emb.dim, device=dev)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        rng = self.state[self.embedding.step].get("rng")
        if rng is not None:  # torch casts every state tensor of a float parameter to its dtype
            self.generator.set_state(rng.to(device="cpu", dtype=torch.uint8))
            self.state[self.embedding.step]["rng"] = self.generator.get_state()

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Update the rows looked up by the last training forward and the steps."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        emb = self.embedding
        pending = emb.pop_pending()
        if pending is None or pending[2].grad is None:
            return loss
        uniq, field, rows = pending
        g = rows.grad
        group = self.param_groups[0]
        lr, (beta1, beta2) = group["lr"], group["betas"]
        state = self._state()
        state["t"] += 1
        t = float(state["t"])

        # 2. fp32 update of the looked-up rows
        if self.row_optimizer == "adam":
            m = state["exp_avg"][uniq].mul_(beta1).add_(g, alpha=1 - beta1)
            v = state["exp_avg_sq"][uniq].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            state["exp_avg"][uniq], state["exp_avg_sq"][uniq] = m, v
            denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
            w = rows.detach() - (lr / (1 - beta1**t)) * m / denom
        else:
            w = rows.detach() - lr * g

        # 3. the step's LSQ gradient at the updated rows, Adam on log(step)
        step = emb.step
        x = w / step[field, None]
        slope = torch.where(x < emb.low, emb.low, torch.where(x > emb.high, emb.high, torch.round(x) - x))
        per_row = (g * slope).sum(1).to(torch.float64)
        grad = (torch.bincount(field, weights=per_row, minlength=len(emb.fields)) * step.to(torch.float64)).float()
        sm, sv = state["step_exp_avg"], state["step_exp_avg_sq"]
        sm.mul_(beta1).add_(grad, alpha=1 - beta1)
        sv.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        update = (sm / (1 - beta1**t)) / ((sv / (1 - beta2**t)).sqrt() + group["step_eps"])
        update.clamp_(-MAX_STEP_UPDATE, MAX_STEP_UPDATE)  # |Adam's ratio| is ~1; guards an underflowed v
        step.mul_(torch.exp(-lr * update).to(step.dtype))

        # 4. re-quantize with the new step, stochastic rounding
        emb.codes[uniq] = emb.quantize(w, step[field, None], self.generator)
        state["rng"] = self.generator.get_state()
        return loss


def build(inputs: MethodInputs, setting: str) -> ALPTEmbedding:
    """Codes at ``setting`` (int8 / int4) from N(0, 0.003) rows; rounding seeded by ``inputs.seed``."""
    return ALPTEmbedding(inputs.fields, inputs.cardinalities, inputs.dim, parse_bits(setting), seed=inputs.seed)


def optimizers(model: nn.Module, lr: float) -> list[torch.optim.Optimizer]:
    """``ALPTOptimizer`` for the embedding, Adam for the tower."""
    emb: ALPTEmbedding = model.embedding
    rest = [p for p in trainable_parameters(model) if p is not emb.step]
    return [ALPTOptimizer(emb, lr=lr), torch.optim.Adam(rest, lr=lr)]


METHOD = Method(
    name="alpt",
    kind="train",
    settings=SETTINGS,
    description="ALPT low-precision training: int8/int4 codes stored during training, learned step per field",
    build=build,
    optimizers=optimizers,
)
