"""The mixed-precision embedding: fp32 master rows in torchrec, fake-quantized per row by group.

The master weights live in a torchrec ``EmbeddingBagCollection`` (one table per field, so
it shards like any other). After the lookup, each row is fake-quantized with the
bit-width of its frequency group:

- phase ``"search"``: every group has logits over the candidate bit-widths;
  ``mode="expected"`` mixes all candidate quantizations by ``softmax(logits / tau)``
  (the reference code), ``mode="sample"`` draws one bit-width per row (Gumbel-max)
  and quantizes it once; the logits get a score-function gradient whose batch mean
  matches the expected mode's (see ``LSQQuantizer.mix_sampled``). Cheaper per step.
  ``extra_loss()`` is the size penalty ``lambda * sum_g w_g * E_p[bits_g]``.
- phase ``"fixed"``: every group has one bit-width (after selection); rows are
  quantized at it, exactly as the bit-packed export stores them. A 0-bit (pruned) row reads
  as ``pruned_as`` says: ``"oov"`` (default) as its field's row 0, the OOV row that
  ``data.prepare`` gives a rare or unseen value, so a pruned value is served like an unseen
  one and the export's vocabulary needs only the kept values (``mpe.vocabulary``);
  ``"zero"`` as the zero vector (the paper's). The two differ only in fields whose OOV row
  keeps bits > 0; the search phase is the same for both.

Criteo and Avazu fields are single-valued, so a sum-pooled bag of one id is the row
itself and quantizing the pooled output equals quantizing the row. Multi-hot fields
(bags of several ids) would pool before quantization, which is wrong for MPE: they need
torchrec's unpooled ``EmbeddingCollection``; ``forward`` refuses them with a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from ctr.model import DEFAULT_INIT_STD, build_ebc, field_rows, table_name
from data.layout import field_offsets, global_ids
from encoding.sizes import fp32_table_bytes
from mpe.bitwidths import (
    DEFAULT_CANDIDATES,
    DEFAULT_PRUNED_AS,
    PRUNED_AS,
    oov_alias,
    packed_table_bytes,
    validate_candidates,
)
from mpe.multiplier import SizeMultiplier
from mpe.quantizer import LSQQuantizer

PHASES = ("search", "fixed")
MODES = ("expected", "sample")


class MixedPrecisionEmbedding(nn.Module):
    """Per-field torchrec tables whose looked-up rows are fake-quantized by frequency group.

    Args:
        fields, cardinalities: the fields and their number of rows (one table each).
        dim: embedding dimension D.
        group_of_row: int [N] group id of every global row (N = sum of cardinalities;
            global id = field offset + local id).
        penalty_weights: float [G] size-penalty weight of every group (1 / r_g).
        pruned_rows: bool [N] rows pruned by construction whatever their group's bit-width
            (rows never seen in training: they carry no learned signal); they look up as
            zero vectors and take no bytes. Needs 0 among the candidates. Default: none.
        pruned_as: what a 0-bit row reads as in phase 'fixed': ``"oov"`` its field's row 0,
            ``"zero"`` the zero vector (module docstring).
        candidates: bit-width candidates (0 = pruned row).
        mode: 'expected' or 'sample' (search phase only).
        tau: softmax temperature of the precision distributions.
        lam: size-penalty coefficient lambda.

    forward(kjt) -> Tensor[B, F, D].
    """

    def __init__(
        self,
        fields: Sequence[str],
        cardinalities: Sequence[int],
        dim: int,
        group_of_row: np.ndarray,
        penalty_weights: np.ndarray,
        candidates: Sequence[int] = DEFAULT_CANDIDATES,
        mode: str = "expected",
        tau: float = 3e-3,
        lam: float = 3e-4,
        init_std: float = DEFAULT_INIT_STD,
        pruned_rows: np.ndarray | None = None,
        pruned_as: str = DEFAULT_PRUNED_AS,
    ):
        super().__init__()
        if pruned_as not in PRUNED_AS:
            raise ValueError(f"pruned_as must be one of {PRUNED_AS}, got {pruned_as!r}")
        self.pruned_as = pruned_as
        if mode not in MODES:
            raise ValueError(f"unknown search mode {mode!r}; expected one of {MODES}")
        self.fields = list(fields)
        self.cardinalities = [int(c) for c in cardinalities]
        self.dim = dim
        self.candidates = validate_candidates(candidates)
        self.mode, self.tau, self._lam = mode, tau, lam
        self.multiplier: SizeMultiplier | None = None
        num_rows = sum(self.cardinalities)
        group_of_row = np.asarray(group_of_row, dtype=np.int64)
        if group_of_row.shape != (num_rows,):
            raise ValueError(f"group_of_row has shape {group_of_row.shape}, expected ({num_rows},)")
        num_groups = int(group_of_row.max()) + 1
        if len(penalty_weights) != num_groups:
            raise ValueError(f"{len(penalty_weights)} penalty weights for {num_groups} groups")
        pruned = np.zeros(num_rows, dtype=bool) if pruned_rows is None else np.asarray(pruned_rows, dtype=bool)
        if pruned.shape != (num_rows,):
            raise ValueError(f"pruned_rows has shape {pruned.shape}, expected ({num_rows},)")
        if pruned.any() and 0 not in self.candidates:
            raise ValueError(f"pruned rows need 0 among the candidate bit-widths, got {self.candidates}")
        self.init_std = init_std
        self.ebc = build_ebc(self.fields, self.cardinalities, dim, init_std)
        self.register_buffer("field_offsets", torch.from_numpy(field_offsets(self.cardinalities)))
        self.register_buffer("group_of_row", torch.from_numpy(group_of_row))
        self.register_buffer("pruned_rows", torch.from_numpy(pruned))
        self.register_buffer("penalty_weights", torch.as_tensor(np.asarray(penalty_weights), dtype=torch.float32))
        self.register_buffer("bit_values", torch.tensor(self.candidates, dtype=torch.float32))
        self.register_buffer("fixed_index", torch.zeros(num_groups, dtype=torch.int64))
        # phase 'fixed': rows read as their field's row 0 (derived from the bits: not saved)
        self.register_buffer("read_as_oov", torch.zeros(num_rows, dtype=torch.bool), persistent=False)
        self.logits = nn.Parameter(torch.zeros(num_groups, len(self.candidates)))
        self.quantizer = LSQQuantizer(self.candidates, dim, num_rows)
        self.quantizer.init_steps(self.global_weight())
        self._aliased = False
        self.phase = "search"

    # -- state -------------------------------------------------------------------------
    @property
    def lam(self) -> float:
        """The size-penalty coefficient: fixed, or the budget multiplier's current value."""
        return self.multiplier.lam if self.multiplier is not None else self._lam

    def set_budget(self, budget_bytes: int, rate: float) -> None:
        """Adapt lambda during the search so the expected export meets ``budget_bytes``
        (``mpe.multiplier``), starting from the current lambda."""
        self.multiplier = SizeMultiplier(self.lam, budget_bytes, rate, self.kept_rows_per_group())

    def clear_budget(self) -> float:
        """Drop the multiplier (after the search; the state dict is then the plain one's)
        and keep its last lambda as the fixed one; returns it."""
        if self.multiplier is not None:
            self._lam = self.multiplier.lam
            self.multiplier = None
        return self._lam

    def kept_rows_per_group(self) -> np.ndarray:
        """int [G]: rows of every group not pruned by construction."""
        kept = np.bincount(self.group_of_row.cpu().numpy(), weights=~self.pruned_rows.cpu().numpy(), minlength=self.num_groups)
        return kept.astype(np.int64)

    @property
    def num_groups(self) -> int:
        return int(self.logits.shape[0])

    def num_rows(self) -> int:
        return sum(self.cardinalities)

    def global_weight(self) -> torch.Tensor:
        """All master rows concatenated in field order: Tensor[N, D] (detached copy)."""
        return torch.cat([self.ebc.embedding_bags[table_name(f)].weight.detach() for f in self.fields])

    def load_global_weight(self, weight: torch.Tensor) -> None:
        """Overwrite the master rows with ``weight`` [N, D] (e.g. the pre-search init)."""
        with torch.no_grad():
            for f, start, card in zip(self.fields, self.field_offsets.tolist(), self.cardinalities, strict=True):
                self.ebc.embedding_bags[table_name(f)].weight.copy_(weight[start : start + card])

    def reinitialize_rows(self, seed: int) -> None:
        """Redraw the master rows as construction drew them right after ``torch.manual_seed(seed)``
        (the pre-search init of the retrain, rebuilt instead of kept: no copy of the tables is
        held through the search). The global RNG state is left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = build_ebc(self.fields, self.cardinalities, self.dim, self.init_std)
        with torch.no_grad():
            for f in self.fields:
                self.ebc.embedding_bags[table_name(f)].weight.copy_(fresh.embedding_bags[table_name(f)].weight)
                del fresh.embedding_bags[table_name(f)]  # one field's copy at a time

    def probabilities(self) -> torch.Tensor:
        """float [G, |B|]: each group's distribution over the candidate bit-widths."""
        return torch.softmax(self.logits / self.tau, dim=-1)

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        self.phase = phase
        self.logits.requires_grad_(phase == "search")
        alias = oov_alias(self.bits_per_row(), self.field_offsets.tolist(), self.pruned_as) \
            if phase == "fixed" else np.zeros(self.num_rows(), dtype=bool)
        self.read_as_oov = torch.from_numpy(alias).to(self.read_as_oov.device)
        self._aliased = bool(alias.any())

    def fix_bits(self, bits_per_group: np.ndarray | Sequence[int]) -> None:
        """Freeze one bit-width per group (bit values, not indices) and switch to phase 'fixed'."""
        bits = np.asarray(bits_per_group, dtype=np.int64)
        if bits.shape != (self.num_groups,):
            raise ValueError(f"got {bits.shape[0]} bit-widths for {self.num_groups} groups")
        index = {b: i for i, b in enumerate(self.candidates)}
        unknown = sorted(set(bits.tolist()) - set(index))
        if unknown:
            raise ValueError(f"bit-widths {unknown} are not among the candidates {self.candidates}")
        self.fixed_index.copy_(torch.as_tensor([index[b] for b in bits.tolist()]))
        self.set_phase("fixed")

    def bits_per_group(self) -> np.ndarray:
        """int [G]: the fixed bit-width of every group."""
        return np.asarray(self.candidates, dtype=np.int64)[self.fixed_index.numpy()]

    def bits_per_row(self) -> np.ndarray:
        """int [N]: the fixed bit-width of every global row (0 for the pruned rows)."""
        return self.row_bits(self.bits_per_group())

    def row_bits(self, bits_per_group: np.ndarray) -> np.ndarray:
        """int [N]: the bit-width every global row gets under ``bits_per_group`` [G] (bit
        values): its group's, or 0 for the rows pruned by construction."""
        bits = np.asarray(bits_per_group, dtype=np.int64)[self.group_of_row.cpu().numpy()]
        bits[self.pruned_rows.cpu().numpy()] = 0
        return bits

    def pruned_groups(self) -> np.ndarray:
        """bool [G]: groups all of whose rows are pruned by construction (their bit-width is moot)."""
        return self.kept_rows_per_group() == 0

    # -- forward -----------------------------------------------------------------------
    def global_ids(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """int64 [B, F] global row ids of a single-valued KJT."""
        return global_ids(kjt, self.field_offsets, type(self).__name__)

    def resolve(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """``kjt`` with the ids of the rows that read as their field's row 0 replaced by 0
        (phase 'fixed', ``pruned_as="oov"``; otherwise ``kjt`` itself)."""
        if self.phase != "fixed" or not self._aliased:
            return kjt
        ids = self.global_ids(kjt)  # [B, F]
        local = kjt.values().view(len(self.fields), -1)
        alias = self.read_as_oov.index_select(0, ids.t().reshape(-1)).view_as(local)
        return KeyedJaggedTensor(keys=kjt.keys(), values=torch.where(alias, torch.zeros_like(local), local).reshape(-1),
                                 lengths=kjt.lengths(), stride=kjt.stride())

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        kjt = self.resolve(kjt)
        rows = field_rows(self.ebc(kjt), self.fields, self.dim)
        # A batch looks its frequent rows up many times: quantize each distinct row once (the
        # quantization is a function of the row alone), then spread the results back out.
        # index_select, not [idx]: the backward of advanced indexing accumulates with parallel
        # index_put_ on CPU, whose summation order varies between runs (a resumed run could
        # then not reproduce an uninterrupted one); index_select's backward is deterministic.
        ids = self.global_ids(kjt).reshape(-1)
        unique, inverse = torch.unique(ids, return_inverse=True)
        first = torch.full(unique.shape, ids.numel(), dtype=torch.int64, device=ids.device).scatter_reduce_(
            0, inverse, torch.arange(ids.numel(), device=ids.device), reduce="amin")
        flat = rows.reshape(-1, self.dim).index_select(0, first)
        groups = self.group_of_row.index_select(0, unique)
        if self.phase == "fixed":
            out = self.quantizer.quantize_per_row(flat, self.fixed_index.index_select(0, groups))
        elif self.mode == "expected":
            out = self.quantizer.mix_expected(flat, self.probabilities().index_select(0, groups))
        else:
            out = self.quantizer.mix_sampled(flat, (self.logits / self.tau).index_select(0, groups), tau=1.0)
        # rows pruned by construction look up as zeros (x * 1 is exact for the others)
        out = out * (~self.pruned_rows.index_select(0, unique)).unsqueeze(1).to(out.dtype)
        return out.index_select(0, inverse).view_as(rows)

    def expected_bits(self) -> torch.Tensor:
        """float [G]: E_p[bits] of every group."""
        return self.probabilities() @ self.bit_values

    def extra_loss(self) -> torch.Tensor | None:
        """Size penalty lambda * sum_g w_g E[bits_g] during search; None otherwise."""
        if self.phase != "search" or self.lam == 0:
            return None
        return self.lam * (self.penalty_weights * self.expected_bits()).sum()

    def after_step(self) -> None:
        """After an optimiser step of the search: one update of the budget multiplier."""
        m = self.multiplier
        if self.phase != "search" or m is None:
            return
        with torch.no_grad():
            code_bytes = float(m.kept_rows @ self.expected_bits().to(torch.float64)) * self.dim / 8
            if m.needs_refresh():
                likely = np.asarray(self.candidates)[self.logits.argmax(dim=1).cpu().numpy()]
                row_bits = self.row_bits(likely)
                exact = packed_table_bytes(row_bits, self.dim, self.candidates)
                m.set_other_bytes(exact - int(row_bits.sum()) * self.dim // 8)
        m.update(code_bytes)

    def num_bytes(self) -> int:
        """Bytes of the bit-packed export (phase 'fixed') or of the fp32 tables (otherwise)."""
        if self.phase == "fixed":
            return packed_table_bytes(self.bits_per_row(), self.dim, self.candidates)
        return fp32_table_bytes(self.num_rows(), self.dim)

    def quant_parameters(self) -> list[nn.Parameter]:
        """The precision logits, steps and offset (their own optimiser, no weight decay)."""
        return [self.logits, *self.quantizer.parameters()]
