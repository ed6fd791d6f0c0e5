"""PEP: learnable soft-threshold pruning of embedding entries (Liu et al., ICLR 2021,
"Learnable Embedding Sizes for Recommender Systems").

Registry name ``"pep"`` (kind ``"train"``). Every looked-up entry v becomes
``sign(v) * relu(|v| - sigmoid(s))`` with learnable thresholds s; entries under their
threshold are exactly zero, so each feature ends with its own number of non-zero
dimensions (its learned "embedding size"). No extra loss: the task loss moves s (under
Adam by about lr per step, so how much is pruned depends on the number of steps).

Threshold granularity: ``"field_dim"`` (default; one threshold per field and dimension,
F x D parameters, every threshold trained at every step) or ``"feature_dim"`` (one per row
and dimension, N x D, the reference code's finest option). The paper's initial
thresholds are about -15 .. -11 (sigmoid(-15) = 3e-7).

Settings
    ``"-15"``, ``"-9"``, ``"-6"`` (any negative number): the initial threshold; the
    compression ratio is measured, not set. Against the N(0, 0.003) initial rows, -15 is
    the paper's value and prunes nothing at first (its gradients are below Adam's eps, so it
    moves only in long runs), -9 prunes ~3% at initialisation and -6 (sigmoid = 0.0025)
    ~60%; measured on 100k synthetic Criteo rows (~200 steps) the ratios were 1.0x, 1.0x and
    2.6x. ``"x<R>"``: PEP from s = -15, then, whenever the table is read for
    evaluation or export, the entries with the smallest magnitudes are dropped until the
    export fits fp32 bytes / R (magnitude pruning after training, no fine-tuning: the
    training-mode forward does not see this mask).

Retraining (the paper's second stage, a lottery-ticket rewind): ``rewind()`` freezes the
current non-zero pattern as a mask, restores the initial weights (regenerated from the
stored init seed) and stops the thresholds; training again (fresh optimisers, e.g. a new
``Trainer``) then learns ``v * mask``. The AUC-vs-size benchmark trains once per run, so its
``pep`` rows are PEP without the retrain; ``rewind`` is for callers that run both stages.

Export (exact, no pruned value stored): the pruned table W' [N, D] is written in whichever
of three encodings takes fewest bytes, all row-major:

- ``dense``: ``table.npy`` float32 [N, D];
- ``bitmask``: ``mask.npy`` uint8 [ceil(N D / 8)] (one bit per entry, ``np.packbits``
  little-endian) + ``values.npy`` float32 [nnz];
- ``elias_fano``: ``positions.npy`` uint8 (the flat positions of the non-zeros,
  Elias-Fano coded in universe N D, ``mpe.packing.ef_encode``) + ``values.npy``.

The bitmask costs D/8 bytes per row, Elias-Fano about 2 + log2(N D / nnz) bits per non-zero
(cheaper below ~1/5 density), dense wins only when almost nothing is pruned.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from baselines.base import CompressedEmbedding, read_tables
from baselines.budget import budget_bytes, is_ratio, parse_ratio
from baselines.registry import Method, MethodInputs
from ctr.model import DEFAULT_INIT_STD, build_ebc, field_rows, table_name
from data.layout import field_offsets
from encoding.packing import ef_decode, ef_encode, ef_nbytes
from encoding.sizes import npy_file_bytes

GRANULARITIES = ("field_dim", "feature_dim")
ENCODINGS = ("dense", "bitmask", "elias_fano")
DEFAULT_THRESHOLD_INIT = -15.0


def encoding_bytes(encoding: str, nnz: int, num_rows: int, dim: int) -> int:
    """Export bytes of a pruned [num_rows, dim] table with ``nnz`` non-zeros in ``encoding``."""
    universe = num_rows * dim
    values = npy_file_bytes((nnz,), np.float32)
    if encoding == "dense":
        return npy_file_bytes((num_rows, dim), np.float32)
    if encoding == "bitmask":
        return npy_file_bytes(((universe + 7) // 8,), np.uint8) + values
    if encoding == "elias_fano":
        return npy_file_bytes((ef_nbytes(nnz, universe),), np.uint8) + values
    raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def best_encoding(nnz: int, num_rows: int, dim: int) -> tuple[str, int]:
    """(encoding, bytes) of the smallest encoding for ``nnz`` non-zeros (ties: ``ENCODINGS`` order)."""
    sizes = [(encoding_bytes(e, nnz, num_rows, dim), i) for i, e in enumerate(ENCODINGS)]
    nbytes, i = min(sizes)
    return ENCODINGS[i], nbytes


def max_nnz(budget: int, num_rows: int, dim: int) -> int:
    """The most non-zeros whose smallest encoding fits ``budget`` bytes; ``ValueError`` if none does."""
    def fits(k: int) -> bool:
        return best_encoding(k, num_rows, dim)[1] <= budget

    if not fits(0):
        raise ValueError(f"a budget of {budget:,} bytes cannot hold even an empty pruned table")
    lo, hi = 0, num_rows * dim
    if fits(hi):
        return hi
    while hi - lo > 1:  # sizes grow with nnz (up to rounding); the result is checked below
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    while not fits(lo):
        lo -= 1
    return lo


class PEPEmbedding(CompressedEmbedding):
    """Per-field torchrec tables whose entries are soft-thresholded by learnable thresholds.

    Args:
        fields, cardinalities, dim: as the fp32 tables (one EBC table per field).
        threshold_init: initial s (sigmoid(s) is the threshold).
        granularity: ``"field_dim"`` (s is [F, D]) or ``"feature_dim"`` (s is [N, D]).
        budget: export byte budget; when set, evaluation lookups and the export keep only
            the largest-magnitude entries that fit (``max_nnz``).
        init_std: std of the N(0, init_std) initial rows, drawn from a generator seeded from
            torch's global RNG (so ``rewind`` can regenerate them).

    forward(kjt) -> Tensor[B, F, D]. Training mode: the soft threshold (differentiable);
    eval mode: rows of ``effective_table()``, exactly what the export stores.
    """

    method = "pep"

    def __init__(
        self,
        fields: Sequence[str],
        cardinalities: Sequence[int],
        dim: int = 16,
        threshold_init: float = DEFAULT_THRESHOLD_INIT,
        granularity: str = "field_dim",
        budget: int | None = None,
        init_std: float = DEFAULT_INIT_STD,
    ):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown threshold granularity {granularity!r}; expected one of {GRANULARITIES}")
        if not math.isfinite(threshold_init):
            raise ValueError(f"threshold_init must be finite, got {threshold_init}")
        self.fields = list(fields)
        self.cardinalities = [int(c) for c in cardinalities]
        self.dim = int(dim)
        self.threshold_init = float(threshold_init)
        self.granularity = granularity
        self.init_std = float(init_std)
        self.budget = None if budget is None else int(budget)
        self.keep_at_most = None if budget is None else max_nnz(self.budget, self.num_rows(), self.dim)
        self.init_seed = int(torch.randint(0, 2**62, (1,)).item())
        self.ebc = build_ebc(self.fields, self.cardinalities, self.dim, init_std)
        self._init_weights()
        rows = len(self.fields) if granularity == "field_dim" else self.num_rows()
        self.threshold = nn.Parameter(torch.full((rows, self.dim), self.threshold_init))
        offsets = field_offsets(self.cardinalities)
        self.register_buffer("field_offsets", torch.from_numpy(offsets), persistent=False)
        field_of = np.repeat(np.arange(len(self.fields)), self.cardinalities)
        self.register_buffer("field_of_row", torch.from_numpy(field_of), persistent=False)
        self.register_buffer("mask", None)  # bool [N, D] once ``rewind`` froze the pattern
        self._cache: tuple[tuple, torch.Tensor] | None = None

    # -- weights ---------------------------------------------------------------------------
    def _init_weights(self) -> None:
        gen = torch.Generator().manual_seed(self.init_seed)
        with torch.no_grad():
            for f in self.fields:
                self.ebc.embedding_bags[table_name(f)].weight.normal_(0.0, self.init_std, generator=gen)

    def _weights(self) -> list[torch.Tensor]:
        return [self.ebc.embedding_bags[table_name(f)].weight for f in self.fields]

    def raw_table(self) -> torch.Tensor:
        """float32 [N, D]: the unpruned weights of all fields in field order (a copy)."""
        return torch.cat([w.detach() for w in self._weights()])

    @property
    def retraining(self) -> bool:
        """True after ``rewind``: the pattern is frozen and the thresholds are no longer used."""
        return self.mask is not None

    # -- pruning ---------------------------------------------------------------------------
    def _soft(self, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.sign(v) * torch.relu(v.abs() - torch.sigmoid(s))

    def effective_table(self) -> torch.Tensor:
        """float32 [N, D]: the pruned table as exported (cached until a weight changes)."""
        weights = self._weights()
        key = tuple((id(t), t._version) for t in (*weights, self.threshold)) + (
            None if self.mask is None else (id(self.mask), self.mask._version),
        )
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        with torch.no_grad():
            table = torch.cat([w.detach() for w in weights])
            if self.mask is not None:
                table = table * self.mask
            else:
                s = self.threshold.detach()
                table = self._soft(table, s[self.field_of_row] if self.granularity == "field_dim" else s)
            if self.keep_at_most is not None:
                table = self._keep_largest(table, self.keep_at_most)
        self._cache = (key, table)
        return table

    @staticmethod
    def _keep_largest(table: torch.Tensor, k: int) -> torch.Tensor:
        """``table`` with all but its ``k`` largest-magnitude entries set to zero."""
        flat = table.reshape(-1).cpu().numpy()
        nonzero = np.flatnonzero(flat)
        if nonzero.size <= k:
            return table
        keep = nonzero[np.argpartition(-np.abs(flat[nonzero]), k - 1)[:k]] if k > 0 else nonzero[:0]
        out = np.zeros_like(flat)
        out[keep] = flat[keep]
        return torch.from_numpy(out.reshape(table.shape)).to(table.device)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        if list(kjt.keys()) != self.fields:
            raise ValueError(f"PEPEmbedding: KJT keys {list(kjt.keys())} are not the fields {self.fields}")
        ids = self.global_ids(kjt)
        if not self.training:
            return self.effective_table()[ids]
        rows = field_rows(self.ebc(kjt), self.fields, self.dim)
        if self.mask is not None:
            return rows * self.mask[ids]
        s = self.threshold if self.granularity == "field_dim" else self.threshold[ids]
        return self._soft(rows, s)

    def rewind(self) -> None:
        """Start PEP's retrain: freeze the current non-zero pattern, restore the initial weights.

        Thresholds stop training; build fresh optimisers afterwards (they skip frozen tensors).
        """
        mask = self.effective_table() != 0
        self._init_weights()
        self.mask = mask
        self.threshold.requires_grad_(False)
        self._cache = None

    # -- sizes and export ------------------------------------------------------------------
    def nnz(self) -> int:
        return int(torch.count_nonzero(self.effective_table()))

    def encoding(self) -> str:
        return best_encoding(self.nnz(), self.num_rows(), self.dim)[0]

    def num_bytes(self) -> int:
        """Payload bytes of ``export()`` (the smallest encoding of the effective table)."""
        return best_encoding(self.nnz(), self.num_rows(), self.dim)[1]

    def export_arrays(self) -> dict[str, np.ndarray]:
        """The effective table in its smallest encoding (see the module docstring)."""
        table = self.effective_table().cpu().numpy()
        flat = table.reshape(-1)
        nonzero = np.flatnonzero(flat)
        encoding = best_encoding(nonzero.size, self.num_rows(), self.dim)[0]
        if encoding == "dense":
            return {"table": table}
        values = flat[nonzero].astype(np.float32)
        if encoding == "bitmask":
            bits = np.zeros(flat.size, dtype=np.uint8)
            bits[nonzero] = 1
            return {"mask": np.packbits(bits, bitorder="little"), "values": values}
        return {"positions": ef_encode(nonzero, flat.size), "values": values}

    def export_config(self) -> dict[str, Any]:
        return {
            "cardinalities": self.cardinalities,
            "encoding": self.encoding(),
            "nnz": self.nnz(),
            "granularity": self.granularity,
            "threshold_init": self.threshold_init,
            "budget_bytes": self.budget,
            "retrained": self.retraining,
        }

    @classmethod
    def from_export(cls, export_dir: str | os.PathLike) -> PEPEmbedding:
        """Rebuild from an ``export()`` directory (checksums verified, no pickle).

        The result holds the exported table with its pattern frozen (``retraining`` is True).
        """
        header, arrays = read_tables(export_dir, cls.method)
        cfg = header["config"]
        dim, cards = int(header["dim"]), [int(c) for c in cfg["cardinalities"]]
        table = decode_table(cfg["encoding"], arrays, int(cfg["nnz"]), sum(cards), dim)
        emb = cls(header["fields"], cards, dim, cfg["threshold_init"], cfg["granularity"])
        with torch.no_grad():
            start = 0
            for w in emb._weights():
                w.copy_(torch.from_numpy(table[start : start + w.shape[0]]))
                start += w.shape[0]
        emb.mask = torch.from_numpy(table != 0)
        emb.threshold.requires_grad_(False)
        return emb


def decode_table(encoding: str, arrays: dict[str, np.ndarray], nnz: int, num_rows: int, dim: int) -> np.ndarray:
    """float32 [num_rows, dim] from the exported arrays of ``encoding``."""
    if encoding == "dense":
        return arrays["table"]
    flat = np.zeros(num_rows * dim, dtype=np.float32)
    if encoding == "bitmask":
        positions = np.flatnonzero(np.unpackbits(arrays["mask"], bitorder="little", count=flat.size))
    elif encoding == "elias_fano":
        positions = ef_decode(arrays["positions"], nnz, flat.size)
    else:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    values = arrays["values"]
    if positions.size != nnz or values.shape != (nnz,):
        raise ValueError(f"{encoding} export holds {positions.size} positions and {values.shape} values, expected {nnz}")
    flat[positions] = values
    return flat.reshape(num_rows, dim)


def build(inputs: MethodInputs, setting: str) -> PEPEmbedding:
    """PEP with initial threshold ``setting`` (e.g. ``"-12"``) or budget-pruned at ``"x<R>"``."""
    if is_ratio(setting):
        budget = budget_bytes(inputs.fp32_bytes, parse_ratio(setting, "pep"))
        return PEPEmbedding(inputs.fields, inputs.cardinalities, inputs.dim, DEFAULT_THRESHOLD_INIT, budget=budget)
    try:
        init = float(setting)
    except ValueError:
        init = math.nan
    if not (math.isfinite(init) and init < 0):
        raise ValueError(f"pep setting {setting!r} is neither a negative initial threshold (e.g. '-12') nor 'x<R>'")
    return PEPEmbedding(inputs.fields, inputs.cardinalities, inputs.dim, init)


METHOD = Method(
    name="pep",
    kind="train",
    settings=("-15", "-9", "-6", "x10"),
    description="PEP learnable soft-threshold pruning (Liu et al. 2021), no retrain; settings: initial threshold, or xR by magnitude",
    build=build,
)
