"""Hashing trick and quotient-remainder (QR) embeddings at a size budget.

Both store compact fp32 tables in one torchrec ``EmbeddingBagCollection``
(``baselines.remapped``); a setting ``"x<R>"`` sizes them so that the export holds at most
fp32 bytes / R bytes (``baselines.budget``). Bytes = the stored tables as exported
(float32, one ``.npy`` header per stored table); the hash parameters and bucket counts are
a few integers in ``header.json``, as the fp32 export keeps its cardinalities there.

Hashing trick (registry ``"hash"``)
    Every field f gets ``b_f = min(n_f, cap)`` rows (``n_f`` its vocabulary size), with one
    ``cap`` for all fields chosen as the largest that fits the budget: the small fields keep
    a collision-free table, the large ones are hashed into ``cap`` buckets each (DLRM's
    ``--max-ind-range`` with a real hash instead of a modulo). All fields' rows are stored
    in one table. A hashed id's bucket is
    ``h = splitmix64(global_id XOR splitmix64(seed))`` (the bijective 64-bit finaliser of
    ``data.transforms.splitmix64``; global id = field offset + local id), reduced to
    ``b_f`` buckets by multiply-shift on its top 32 bits: ``((h >> 32) * b_f) >> 32``.

QR embeddings (registry ``"qr"``; Shi et al., KDD 2020, "Compositional Embeddings Using
Complementary Partitions")
    Field f with ``m_f`` remainder buckets looks id x up as
    ``R_f[x mod m_f] * Q_f[x div m_f]`` (element-wise product; the paper also studies sum
    and concatenation): distinct ids get distinct (quotient, remainder) pairs, so there are
    no collisions.
    Sizing follows the hashing trick: one remainder-row cap for all fields,
    ``m_f = max(min(n_f, cap), ceil(sqrt(n_f)))`` (m + n/m is smallest at sqrt(n)) and
    ``ceil(n_f / m_f)`` quotient rows; a field that would not shrink keeps a plain table.
    The largest cap within the budget is used, so small fields stay exact and the large
    ones get QR. (A first version gave every field the same number of quotient rows, the
    paper's "collisions"; it compressed the small fields too and lost 0.01 AUC at x2 on
    100k synthetic rows.) Remainder rows start N(0, 0.003) like the fp32 tables, quotient
    rows start at 1, so that at initialisation a QR row is its remainder row. The export holds ``remainder.npy`` (all
    fields' remainder or plain rows) and ``quotient.npy``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from baselines.base import read_tables
from baselines.budget import budget_bytes, parse_ratio
from baselines.registry import Method, MethodInputs
from baselines.remapped import RemappedTables, StoredTable
from ctr.model import DEFAULT_INIT_STD
from data.transforms import SPLITMIX64_GOLDEN, SPLITMIX64_M1, SPLITMIX64_M2, splitmix64
from encoding.sizes import npy_file_bytes

_MAX_BUCKETS = 1 << 31  # multiply-shift on 32 bits: (h32 * b) must fit in int64


def _signed(c: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``c``."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def splitmix64_torch(x: torch.Tensor) -> torch.Tensor:
    """int64 tensor -> int64 tensor with the bits of ``data.transforms.splitmix64`` (wrapping arithmetic)."""
    z = x.to(torch.int64) + _signed(SPLITMIX64_GOLDEN)
    z = (z ^ _srl(z, 30)) * _signed(SPLITMIX64_M1)
    z = (z ^ _srl(z, 27)) * _signed(SPLITMIX64_M2)
    return z ^ _srl(z, 31)


def hash_salt(seed: int) -> int:
    """The 64-bit salt of ``seed``: ``splitmix64(seed)`` as an unsigned int."""
    return int(splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0])


def hash_buckets(global_ids: torch.Tensor, salt: int, buckets: torch.Tensor) -> torch.Tensor:
    """Bucket in ``[0, buckets)`` of every id: ``((splitmix64(id ^ salt) >> 32) * buckets) >> 32``.

    ``global_ids`` int64 [...], ``buckets`` int64 broadcastable to it (each < 2^31).
    """
    h = splitmix64_torch(global_ids ^ _signed(salt))
    return (_srl(h, 32) * buckets) >> 32


# -- hashing trick ---------------------------------------------------------------------------
def hash_cap(cardinalities: Sequence[int], dim: int, budget: int) -> int:
    """Largest per-field row cap whose table ``sum_f min(n_f, cap) x dim`` float32 fits ``budget`` bytes.

    ``ValueError`` when even one row per field does not fit, or when no field needs hashing.
    """
    cards = np.asarray(cardinalities, dtype=np.int64)

    def nbytes(cap: int) -> int:
        return npy_file_bytes((int(np.minimum(cards, cap).sum()), dim), np.float32)

    if nbytes(1) > budget:
        raise ValueError(f"a budget of {budget:,} bytes cannot hold one row per field ({nbytes(1):,} bytes)")
    if nbytes(int(cards.max())) <= budget:
        raise ValueError(f"a budget of {budget:,} bytes holds every row: nothing to hash")
    lo, hi = 1, int(cards.max())  # nbytes(lo) fits, nbytes(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if nbytes(mid) <= budget else (lo, mid)
    return lo


class HashedEmbedding(RemappedTables):
    """The hashing trick: field f's ids share ``buckets[f]`` rows of one stored table.

    A field with ``buckets[f] == n_f`` is looked up directly (no hash); otherwise its ids go
    to ``hash_buckets``. forward(kjt) -> Tensor[B, F, D].
    """

    method = "hash"

    def __init__(
        self,
        fields: Sequence[str],
        cardinalities: Sequence[int],
        dim: int,
        buckets: Sequence[int],
        seed: int,
        init_std: float = DEFAULT_INIT_STD,
    ):
        buckets = [int(b) for b in buckets]
        if len(buckets) != len(cardinalities) or any(not 1 <= b <= int(n) for b, n in zip(buckets, cardinalities, strict=True)):
            raise ValueError(f"buckets {buckets} must be 1..cardinality per field {list(cardinalities)}")
        if max(buckets) >= _MAX_BUCKETS:
            raise ValueError(f"at most {_MAX_BUCKETS - 1} buckets per field")
        super().__init__(fields, cardinalities, dim, [StoredTable("table", tuple(fields), sum(buckets))], init_std)
        self.buckets = buckets
        self.seed = int(seed)
        self.salt = hash_salt(self.seed)
        row_offsets = np.concatenate([[0], np.cumsum(buckets)[:-1]]).astype(np.int64)
        self.register_buffer("row_offsets", torch.from_numpy(row_offsets), persistent=False)
        self.register_buffer("bucket_counts", torch.tensor(buckets, dtype=torch.int64), persistent=False)
        hashed = [b < int(n) for b, n in zip(buckets, self.cardinalities, strict=True)]
        self.register_buffer("hashed", torch.tensor(hashed, dtype=torch.bool), persistent=False)

    def rows(self, local_ids: torch.Tensor) -> torch.Tensor:
        """int64 [B, F] local ids -> int64 [B, F] rows of the stored table."""
        hashed = hash_buckets(local_ids + self.field_offsets, self.salt, self.bucket_counts)
        return torch.where(self.hashed, hashed, local_ids) + self.row_offsets

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.lookup(self.rows(self.local_ids(kjt)))

    def export_config(self) -> dict[str, Any]:
        return {
            "cardinalities": self.cardinalities,
            "buckets": self.buckets,
            "seed": self.seed,
            "salt": self.salt,
            "hash": "((splitmix64(global_id ^ salt) >> 32) * buckets) >> 32 where buckets < cardinality",
        }

    @classmethod
    def from_export(cls, export_dir: str | os.PathLike) -> HashedEmbedding:
        """Rebuild from an ``export()`` directory (checksums verified, no pickle)."""
        header, arrays = read_tables(export_dir, cls.method)
        cfg = header["config"]
        emb = cls(header["fields"], cfg["cardinalities"], header["dim"], cfg["buckets"], cfg["seed"])
        if emb.salt != cfg["salt"]:
            raise ValueError(f"{export_dir}: salt {cfg['salt']} does not follow from seed {cfg['seed']}")
        emb.load_arrays(arrays)
        return emb


def build_hash(inputs: MethodInputs, setting: str) -> HashedEmbedding:
    """Hashed tables within ``setting`` (``"x<R>"``), hash seeded by ``inputs.seed``."""
    budget = budget_bytes(inputs.fp32_bytes, parse_ratio(setting, "hash"))
    cap = hash_cap(inputs.cardinalities, inputs.dim, budget)
    buckets = [min(int(n), cap) for n in inputs.cardinalities]
    return HashedEmbedding(inputs.fields, inputs.cardinalities, inputs.dim, buckets, inputs.seed)


# -- quotient-remainder ----------------------------------------------------------------------
def qr_shape(n: int, cap: int) -> tuple[int, int]:
    """(remainder rows m, quotient rows) of a field of ``n`` ids under a remainder-row ``cap``.

    ``m = max(min(n, cap), ceil(sqrt(n)))`` (m + n/m is smallest at sqrt(n)), quotient rows
    ``ceil(n / m)``; ``(n, 0)`` (a plain table) when QR would not store fewer rows.
    """
    m = max(min(n, cap), math.isqrt(n - 1) + 1)
    q = math.ceil(n / m)
    return (n, 0) if m + q >= n else (m, q)


def qr_remainders(cardinalities: Sequence[int], dim: int, budget: int) -> list[int]:
    """Remainder rows per field (``n_f`` = plain table) at the largest cap within ``budget`` bytes.

    ``ValueError`` names the smallest size QR reaches when the budget is below it, or says
    that the budget holds every row.
    """
    cards = [int(n) for n in cardinalities]
    if min(cards) < 1:
        raise ValueError(f"every field needs at least one id, got cardinalities {cards}")

    def shapes_bytes(cap: int) -> tuple[list[tuple[int, int]], int]:
        shapes = [qr_shape(n, cap) for n in cards]
        rem = sum(m for m, _ in shapes)
        quo = sum(q for _, q in shapes)
        return shapes, npy_file_bytes((rem, dim), np.float32) + npy_file_bytes((quo, dim), np.float32)

    best, best_bytes = shapes_bytes(1)  # every field at its sqrt(n) minimum
    if best_bytes > budget:
        raise ValueError(
            f"QR cannot fit {budget:,} bytes: its smallest tables (ceil(sqrt(n)) remainder rows per field) "
            f"take {best_bytes:,} bytes"
        )
    if shapes_bytes(max(cards))[1] <= budget:
        raise ValueError(f"a budget of {budget:,} bytes holds every row: nothing to compress")
    lo, hi = 1, max(cards)  # sizes grow with the cap (up to rounding): bisect, keep the largest that fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        shapes, nbytes = shapes_bytes(mid)
        if nbytes <= budget:
            lo = mid
            if nbytes > best_bytes:
                best, best_bytes = shapes, nbytes
        else:
            hi = mid
    return [m for m, _ in best]


class QREmbedding(RemappedTables):
    """Quotient-remainder embeddings: row of id x = ``R[x mod m_f] * Q[x div m_f]`` (element-wise).

    ``remainders[f] == n_f`` means field f keeps a plain table (no quotient lookup).
    forward(kjt) -> Tensor[B, F, D].
    """

    method = "qr"

    def __init__(
        self,
        fields: Sequence[str],
        cardinalities: Sequence[int],
        dim: int,
        remainders: Sequence[int],
        init_std: float = DEFAULT_INIT_STD,
    ):
        fields = list(fields)
        cards = [int(n) for n in cardinalities]
        rem = [int(m) for m in remainders]
        if len(rem) != len(cards) or any(not 1 <= m <= n for m, n in zip(rem, cards, strict=True)):
            raise ValueError(f"remainders {rem} must be 1..cardinality per field {cards}")
        qr_fields = [i for i, (m, n) in enumerate(zip(rem, cards, strict=True)) if m < n]
        quotients = [math.ceil(cards[i] / rem[i]) for i in qr_fields]
        tables = [StoredTable("remainder", tuple(fields), sum(rem))]
        if qr_fields:
            tables.append(StoredTable("quotient", tuple(f"{fields[i]}@q" for i in qr_fields), sum(quotients), "ones"))
        super().__init__(fields, cards, dim, tables, init_std)
        self.remainders = rem
        self.qr_fields = qr_fields
        self.register_buffer("modulus", torch.tensor(rem, dtype=torch.int64), persistent=False)
        rem_offsets = np.concatenate([[0], np.cumsum(rem)[:-1]]).astype(np.int64)
        self.register_buffer("rem_offsets", torch.from_numpy(rem_offsets), persistent=False)
        quo_offsets = np.concatenate([[0], np.cumsum(quotients)[:-1]]).astype(np.int64)
        self.register_buffer("quo_offsets", torch.from_numpy(quo_offsets), persistent=False)
        self.register_buffer("qr_index", torch.tensor(qr_fields, dtype=torch.int64), persistent=False)
        # field -> column of the multiplier (its quotient row, or the trailing column of ones)
        gather = np.full(len(fields), len(qr_fields), dtype=np.int64)
        gather[qr_fields] = np.arange(len(qr_fields))
        self.register_buffer("gather", torch.from_numpy(gather), persistent=False)

    def rows(self, local_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 [B, F] local ids -> (remainder rows [B, F], quotient rows [B, F_qr])."""
        rem = local_ids % self.modulus + self.rem_offsets
        quo = local_ids[:, self.qr_index] // self.modulus[self.qr_index] + self.quo_offsets
        return rem, quo

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        rem, quo = self.rows(self.local_ids(kjt))
        out = self.lookup(torch.cat([rem, quo], dim=1))
        num_fields = len(self.fields)
        if not self.qr_fields:
            return out
        ones = out.new_ones(out.shape[0], 1, self.dim)
        multiplier = torch.cat([out[:, num_fields:], ones], dim=1)[:, self.gather]
        return out[:, :num_fields] * multiplier

    def export_arrays(self) -> dict[str, np.ndarray]:
        """``remainder`` [sum m_f, D] and ``quotient`` [sum q_f, D] float32 (q_f = ceil(n_f / m_f))."""
        arrays = super().export_arrays()
        arrays.setdefault("quotient", np.zeros((0, self.dim), dtype=np.float32))
        return arrays

    def export_config(self) -> dict[str, Any]:
        return {"cardinalities": self.cardinalities, "remainders": self.remainders, "operation": "mult"}

    @classmethod
    def from_export(cls, export_dir: str | os.PathLike) -> QREmbedding:
        """Rebuild from an ``export()`` directory (checksums verified, no pickle)."""
        header, arrays = read_tables(export_dir, cls.method)
        cfg = header["config"]
        emb = cls(header["fields"], cfg["cardinalities"], header["dim"], cfg["remainders"])
        emb.load_arrays(arrays)
        return emb


def build_qr(inputs: MethodInputs, setting: str) -> QREmbedding:
    """QR tables within ``setting`` (``"x<R>"``)."""
    budget = budget_bytes(inputs.fp32_bytes, parse_ratio(setting, "qr"))
    remainders = qr_remainders(inputs.cardinalities, inputs.dim, budget)
    return QREmbedding(inputs.fields, inputs.cardinalities, inputs.dim, remainders)


HASH_METHOD = Method(
    name="hash",
    kind="train",
    settings=("x2", "x10", "x50", "x200", "x500", "x1000"),
    description="hashing trick: large fields hashed (seeded splitmix64) into a per-field row cap that meets the xR budget",
    build=build_hash,
)

QR_METHOD = Method(
    name="qr",
    kind="train",
    settings=("x2", "x5", "x10"),
    description="quotient-remainder embeddings (Shi et al. 2020), element-wise product, collision-free, at xR",
    build=build_qr,
)
