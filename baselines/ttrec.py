"""TT-Rec: each large table as a tensor train of three small cores.

Registry name ``"ttrec"`` (kind ``"train"``). Yin, Acun, Wu and Liu, "TT-Rec: Tensor Train
Decomposition for Embedding Tables in Recommendation Models", MLSys 2021; reference code
github facebookresearch/FBTT-Embedding (``tt_embeddings_ops.py``). Its lookup and update
kernels are CUDA-only (``TTEmbeddingBag`` asserts ``torch.cuda.is_available()``; fbgemm's
TT ops likewise), so this module computes the same rows with ordinary torch operations
(``F.embedding`` gathers and matmuls, autograd for the gradients) on CPU or GPU: a table of
at most 16 B padded rows is rebuilt whole with two matmuls and gathered, a larger one is
contracted per looked-up id as the reference kernel does (``tt_rows``). No cache of frequent
rows (the reference's optional LFU cache).

Decomposition of a table of n rows x D
    ``n <= p1 p2 p3`` (``tt_row_shape``: balanced, ``p1 = ceil(n^(1/3))``, the padding rows are
    never looked up) and ``D = q1 q2 q3`` (``tt_dim_shape``: the most balanced exact factors,
    16 = 2 x 2 x 4 as the reference's ``suggested_tt_shapes``). Cores, stored as the reference
    stores them (its ``[p, r, q, r']`` permutation)::

        G1 [p1, 1, q1, r]    G2 [p2, r, q2, r]    G3 [p3, r, q3, 1]

    Row i = (i1, i2, i3) in mixed radix (``i = (i1 p2 + i2) p3 + i3``) has the entries
    ``row[(j1 q2 + j2) q3 + j3] = sum_{s,t} G1[i1, 0, j1, s] G2[i2, s, j2, t] G3[i3, t, j3, 0]``.
    Parameters: ``r (p1 q1 + p3 q3) + r^2 p2 q2``.

Rank and small tables
    The paper sweeps TT ranks 8, 16, 32, 64 and finds 16 and 32 about as accurate
    (``DEFAULT_RANK = 16``). One rank r is used for every decomposed table; a table whose cores
    at rank r would not be smaller than its dense rows (the small fields) stays a dense fp32
    table, as the paper decomposes only the large tables and keeps the others. Settings:
    ``"r<k>"`` fixes the rank (``"r16"``, the paper's); ``"x<R>"`` takes the largest rank
    r <= ``MAX_RANK`` (64, the largest the paper tries) whose export fits fp32 bytes / R
    (the choice of dense or TT per table is redone at every r), ``ValueError`` when even rank
    1 does not fit.

Initialisation
    The paper samples the cores from a Gaussian, scaled so that the reconstructed rows have the
    spread of a usual embedding init (the reference's default, ``"approx-normal"``, scales
    every core by ``(3 n)^(-1/6)``). Here every core is N(0, s^2) with
    ``s = (sigma^2 / r^2)^(1/6)``, so a row entry (a sum of r^2 products of three independent
    entries) has mean 0 and std ``sigma = init_std``, the fp32 tables' N(0, 0.003) (torch's
    global RNG), like every other method's rows. The dense tables start N(0, init_std).

Export
    ``cores.npy`` float32 [sum of the core sizes]: for every TT field in field order G1, G2, G3,
    each flattened in C order; ``dense.npy`` float32 [rows of the dense fields, D], the dense
    fields' tables in field order. ``header.json`` holds the ranks (0 = dense) and the shapes.
    ``num_bytes()`` is the two ``.npy`` files, headers included.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchrec import KeyedJaggedTensor

from baselines.base import CompressedEmbedding, read_tables
from baselines.budget import budget_bytes, is_ratio, parse_ratio
from baselines.registry import Method, MethodInputs
from ctr.model import DEFAULT_INIT_STD
from data.layout import field_offsets
from encoding.sizes import npy_file_bytes

DEFAULT_RANK = 16  # the paper: ranks 16 and 32 reach about the same accuracy
MAX_RANK = 64  # the largest rank of the paper's sweep (8, 16, 32, 64)
NUM_CORES = 3
_RANK_SETTING = re.compile(r"r(\d+)")


# -- shapes ------------------------------------------------------------------------------------
def _ceil_root(n: int, k: int) -> int:
    """Smallest integer x >= 1 with x^k >= n."""
    x = max(1, round(n ** (1.0 / k)))
    while x**k < n:
        x += 1
    while x > 1 and (x - 1) ** k >= n:
        x -= 1
    return x


def tt_row_shape(n: int) -> tuple[int, int, int]:
    """Balanced ``(p1, p2, p3)`` with ``p1 p2 p3 >= n``: ``p1 = ceil(n^(1/3))``,
    ``p2 = ceil(sqrt(n / p1))``, ``p3 = ceil(n / (p1 p2))``. E.g. 1200 -> (11, 11, 10)."""
    if n < 1:
        raise ValueError(f"a table needs at least one row, got {n}")
    p1 = _ceil_root(n, 3)
    p2 = _ceil_root(math.ceil(n / p1), 2)
    return p1, p2, math.ceil(n / (p1 * p2))


def tt_dim_shape(dim: int) -> tuple[int, int, int]:
    """The most balanced ``q1 <= q2 <= q3`` with ``q1 q2 q3 = dim`` (smallest q3 / q1, then
    smallest q3). E.g. 16 -> (2, 2, 4), 8 -> (2, 2, 2)."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    best: tuple[int, int, int] | None = None
    for q1 in range(1, dim + 1):
        if dim % q1 or q1**3 > dim:
            continue
        for q2 in range(q1, dim // q1 + 1):
            if (dim // q1) % q2 or q2 * q2 > dim // q1:
                continue
            q = (q1, q2, dim // (q1 * q2))
            if best is None or (q[2] / q[0], q[2]) < (best[2] / best[0], best[2]):
                best = q
    assert best is not None
    return best


def tt_core_shapes(rows: tuple[int, int, int], dims: tuple[int, int, int], rank: int) -> list[tuple[int, int, int, int]]:
    """The cores' shapes ``[(p1, 1, q1, r), (p2, r, q2, r), (p3, r, q3, 1)]``."""
    ranks = (1, rank, rank, 1)
    return [(rows[k], ranks[k], dims[k], ranks[k + 1]) for k in range(NUM_CORES)]


def tt_num_params(n: int, dim: int, rank: int) -> int:
    """Float count of the cores of an n x dim table at ``rank``."""
    return sum(math.prod(s) for s in tt_core_shapes(tt_row_shape(n), tt_dim_shape(dim), rank))


def tt_ranks(cardinalities: Sequence[int], dim: int, rank: int) -> list[int]:
    """Per field: ``rank`` where its cores are smaller than its dense rows, else 0 (dense)."""
    if rank < 1:
        raise ValueError(f"TT rank must be >= 1, got {rank}")
    return [rank if tt_num_params(int(n), dim, rank) < int(n) * dim else 0 for n in cardinalities]


def tt_export_bytes(cardinalities: Sequence[int], dim: int, ranks: Sequence[int]) -> int:
    """Export bytes for per-field ``ranks`` (0 = dense): ``cores.npy`` + ``dense.npy``."""
    cores = sum(tt_num_params(int(n), dim, r) for n, r in zip(cardinalities, ranks, strict=True) if r > 0)
    dense = sum(int(n) for n, r in zip(cardinalities, ranks, strict=True) if r == 0)
    return npy_file_bytes((cores,), np.float32) + npy_file_bytes((dense, dim), np.float32)


def fit_rank(cardinalities: Sequence[int], dim: int, budget: int, max_rank: int = MAX_RANK) -> int:
    """Largest rank in 1..``max_rank`` whose export (``tt_ranks`` at that rank) fits ``budget`` bytes.

    The bytes grow with the rank (each table takes the smaller of its cores and its dense
    rows), so the answer is the last rank that fits; ``ValueError`` when rank 1 does not.
    """
    best = 0
    for rank in range(1, max_rank + 1):
        if tt_export_bytes(cardinalities, dim, tt_ranks(cardinalities, dim, rank)) > budget:
            break
        best = rank
    if best == 0:
        smallest = tt_export_bytes(cardinalities, dim, tt_ranks(cardinalities, dim, 1))
        raise ValueError(f"TT-Rec cannot fit {budget:,} bytes: at rank 1 its cores and dense tables take {smallest:,} bytes")
    return best


# -- lookup ------------------------------------------------------------------------------------
def tt_table(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Every row of a TT table, padding rows included: float [p1 p2 p3, q1 q2 q3] (two matmuls)."""
    g1, g2, g3 = cores
    (p1, _, q1, r1), (p2, _, q2, r2), (p3, _, q3, _) = g1.shape, g2.shape, g3.shape
    g12 = g1.reshape(p1 * q1, r1) @ g2.permute(1, 0, 2, 3).reshape(r1, p2 * q2 * r2)  # [p1 q1, p2 q2 r2]
    g12 = g12.view(p1, q1, p2, q2 * r2).transpose(1, 2).reshape(p1 * p2 * q1 * q2, r2)  # [(i1 i2 j1 j2), r2]
    full = g12 @ g3.permute(1, 0, 2, 3).reshape(r2, p3 * q3)  # [(i1 i2 j1 j2), (i3 j3)]
    return full.view(p1 * p2, q1 * q2, p3, q3).transpose(1, 2).reshape(p1 * p2 * p3, q1 * q2 * q3)


def tt_rows(cores: Sequence[torch.Tensor], ids: torch.Tensor, whole_table: bool | None = None) -> torch.Tensor:
    """Rows of a TT table: int64 [B] ids -> float [B, q1 q2 q3].

    ``cores``: G1 [p1, 1, q1, r], G2 [p2, r, q2, r], G3 [p3, r, q3, 1]; id i is
    ``(i1, i2, i3) = (i // (p2 p3), (i // p3) % p2, i % p3)``. Two exact ways (they differ
    only in float rounding): ``whole_table=True`` builds every row with two matmuls
    (``tt_table``) and gathers; ``False`` gathers the three core slices of each id and
    contracts them per id (batched matmuls, the reference kernel's way). ``None`` builds the
    whole table when it has at most 16 B rows: on CPU a few large matmuls beat B tiny ones.
    """
    g1, g2, g3 = cores
    (p1, _, _, r1), (p2, _, q2, r2), (p3, _, q3, _) = g1.shape, g2.shape, g3.shape
    batch = ids.shape[0]
    if whole_table is None:
        whole_table = p1 * p2 * p3 <= 16 * batch
    if whole_table:
        return F.embedding(ids, tt_table(cores))
    # F.embedding on the cores as [p, r q r'] matrices: its backward is a segment sum, cheaper
    # on CPU than the accumulate-index_put of advanced indexing
    first = F.embedding(ids // (p2 * p3), g1.reshape(p1, -1)).view(batch, -1, r1)  # [B, q1, r1]
    mid = F.embedding((ids // p3) % p2, g2.reshape(p2, -1)).view(batch, r1, q2 * r2)  # [B, r1, q2 r2]
    last = F.embedding(ids % p3, g3.reshape(p3, -1)).view(batch, r2, q3)  # [B, r2, q3]
    head = torch.bmm(first, mid).reshape(batch, -1, r2)  # [B, q1 q2, r2]
    return torch.bmm(head, last).reshape(batch, -1)  # [B, q1 q2 q3]


class TTEmbedding(CompressedEmbedding):
    """TT-Rec: per field three TT cores (rank ``ranks[f]``) or, where ``ranks[f] == 0``, a dense table.

    forward(kjt) -> Tensor[B, F, D]. Trainable: ``cores`` (3 per TT field, in field order) and
    ``dense`` [rows of the dense fields, D].

    Args:
        fields, cardinalities: the fields and their vocabulary sizes (local id 0 = OOV).
        dim: embedding dimension D.
        ranks: per field the TT rank, 0 for a dense table (``tt_ranks``).
        init_std: std of the reconstructed rows at initialisation (module docstring).
    """

    method = "ttrec"

    def __init__(
        self,
        fields: Sequence[str],
        cardinalities: Sequence[int],
        dim: int,
        ranks: Sequence[int],
        init_std: float = DEFAULT_INIT_STD,
    ):
        super().__init__()
        self.fields = list(fields)
        self.cardinalities = [int(c) for c in cardinalities]
        self.dim = int(dim)
        self.ranks = [int(r) for r in ranks]
        if not (len(self.fields) == len(self.cardinalities) == len(self.ranks)):
            raise ValueError(f"{len(self.fields)} fields, {len(self.cardinalities)} cardinalities, {len(self.ranks)} ranks")
        if min(self.cardinalities, default=1) < 1 or min(self.ranks, default=0) < 0:
            raise ValueError(f"cardinalities {self.cardinalities} must be >= 1 and ranks {self.ranks} >= 0")
        self.dim_shape = tt_dim_shape(self.dim)
        self.row_shapes = [tt_row_shape(n) if r > 0 else None for n, r in zip(self.cardinalities, self.ranks, strict=True)]
        self.cores = nn.ParameterList()
        self.core_index: dict[int, int] = {}  # field -> index of its G1 in ``cores``
        for f, (rows, rank) in enumerate(zip(self.row_shapes, self.ranks, strict=True)):
            if rows is None:
                continue
            self.core_index[f] = len(self.cores)
            std = (init_std**2 / (rank * rank)) ** (1.0 / 6.0)
            for shape in tt_core_shapes(rows, self.dim_shape, rank):
                self.cores.append(nn.Parameter(torch.empty(shape).normal_(0.0, std)))
        self.dense_fields = [f for f, r in enumerate(self.ranks) if r == 0]
        dense_cards = [self.cardinalities[f] for f in self.dense_fields]
        self.dense = nn.Parameter(torch.empty(sum(dense_cards), self.dim).normal_(0.0, init_std))
        dense_offsets = np.concatenate([[0], np.cumsum(dense_cards)[:-1]]).astype(np.int64) if dense_cards else []
        self.register_buffer("dense_offsets", torch.tensor(dense_offsets, dtype=torch.int64), persistent=False)
        self.register_buffer("dense_index", torch.tensor(self.dense_fields, dtype=torch.int64), persistent=False)
        self.register_buffer("field_offsets", torch.from_numpy(field_offsets(self.cardinalities)), persistent=False)

    def field_cores(self, field: int) -> list[torch.Tensor]:
        """The three cores of TT field ``field`` (index into ``fields``)."""
        i = self.core_index[field]
        return [self.cores[i], self.cores[i + 1], self.cores[i + 2]]

    def local_ids(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """int64 [B, F] local ids of a single-valued KJT whose keys are ``fields`` in order."""
        if list(kjt.keys()) != self.fields:
            raise ValueError(f"TTEmbedding: KJT keys {list(kjt.keys())} are not the fields {self.fields}")
        return self.global_ids(kjt) - self.field_offsets

    def lookup(self, local_ids: torch.Tensor) -> torch.Tensor:
        """int64 [B, F] local ids -> float32 [B, F, D]."""
        cols: list[torch.Tensor | None] = [None] * len(self.fields)
        if self.dense_fields:
            dense = F.embedding(local_ids[:, self.dense_index] + self.dense_offsets, self.dense)  # [B, F_dense, D]
            for k, f in enumerate(self.dense_fields):
                cols[f] = dense[:, k]
        for f, rows in enumerate(self.row_shapes):
            if rows is not None:
                cols[f] = tt_rows(self.field_cores(f), local_ids[:, f])
        return torch.stack(cols, dim=1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.lookup(self.local_ids(kjt))

    def field_table(self, field: int) -> torch.Tensor:
        """The full [n, D] table of field ``field`` (reconstructed from its cores, or the dense rows)."""
        n = self.cardinalities[field]
        if self.row_shapes[field] is None:
            start = int(self.dense_offsets[self.dense_fields.index(field)])
            return self.dense[start:start + n]
        return tt_table(self.field_cores(field))[:n]

    # -- sizes and export ------------------------------------------------------------
    def num_bytes(self) -> int:
        """Payload bytes of ``export()``: ``cores.npy`` + ``dense.npy``."""
        return tt_export_bytes(self.cardinalities, self.dim, self.ranks)

    def export_arrays(self) -> dict[str, np.ndarray]:
        """``cores`` float32 [sum of core sizes] (G1, G2, G3 of each TT field, flattened) and
        ``dense`` float32 [dense rows, D]."""
        flat = [c.detach().reshape(-1) for c in self.cores]
        cores = torch.cat(flat) if flat else torch.zeros(0)
        return {"cores": cores.cpu().numpy(), "dense": self.dense.detach().cpu().numpy()}

    def load_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Copy exported ``cores`` and ``dense`` back into the parameters (sizes must match)."""
        cores, dense = arrays["cores"], arrays["dense"]
        total = sum(c.numel() for c in self.cores)
        if cores.dtype != np.float32 or cores.shape != (total,):
            raise ValueError(f"cores: {cores.dtype} {cores.shape}, expected float32 ({total},)")
        if dense.dtype != np.float32 or dense.shape != tuple(self.dense.shape):
            raise ValueError(f"dense: {dense.dtype} {dense.shape}, expected float32 {tuple(self.dense.shape)}")
        with torch.no_grad():
            start = 0
            for c in self.cores:
                c.copy_(torch.from_numpy(cores[start:start + c.numel()]).view_as(c))
                start += c.numel()
            self.dense.copy_(torch.from_numpy(dense))

    def export_config(self) -> dict[str, Any]:
        return {
            "cardinalities": self.cardinalities,
            "ranks": self.ranks,
            "row_shapes": [list(p) if p is not None else None for p in self.row_shapes],
            "dim_shape": list(self.dim_shape),
            "layout": "cores: per TT field (rank > 0) G1 [p1,1,q1,r], G2 [p2,r,q2,r], G3 [p3,r,q3,1] flattened; "
            "dense: the rank-0 fields' rows in field order",
        }

    @classmethod
    def from_export(cls, export_dir: str | os.PathLike) -> TTEmbedding:
        """Rebuild from an ``export()`` directory (checksums verified, no pickle)."""
        header, arrays = read_tables(export_dir, cls.method)
        cfg = header["config"]
        emb = cls(header["fields"], cfg["cardinalities"], header["dim"], cfg["ranks"])
        if emb.export_config() != cfg:
            raise ValueError(f"{export_dir}: the shapes in header.json are not the ones this version derives")
        emb.load_arrays(arrays)
        return emb


def parse_rank(setting: str) -> int:
    """``"r16"`` -> 16; ``ValueError`` unless ``r<k>`` with k >= 1."""
    m = _RANK_SETTING.fullmatch(setting)
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f"ttrec setting {setting!r} is neither a TT rank 'r<k>' (e.g. 'r16') nor a ratio 'x<R>'")
    return int(m.group(1))


def build(inputs: MethodInputs, setting: str) -> TTEmbedding:
    """TT-Rec at ``setting``: ``"r<k>"`` (fixed rank) or ``"x<R>"`` (largest rank <= 64 within the budget)."""
    if is_ratio(setting):
        budget = budget_bytes(inputs.fp32_bytes, parse_ratio(setting, "ttrec"))
        rank = fit_rank(inputs.cardinalities, inputs.dim, budget)
    else:
        rank = parse_rank(setting)
    return TTEmbedding(inputs.fields, inputs.cardinalities, inputs.dim, tt_ranks(inputs.cardinalities, inputs.dim, rank))


METHOD = Method(
    name="ttrec",
    kind="train",
    settings=("r16", "x10", "x50", "x200", "x1000"),  # x500 would be rank 1 too (1151x)
    description="TT-Rec (Yin et al. 2021): 3 tensor-train cores per large table (pure torch; fbgemm's TT kernels "
    "are CUDA-only), rank 16 (r16) or the largest rank <= 64 within xR, small tables dense",
    build=build,
)
