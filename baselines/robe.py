"""ROBE-Z: every table's rows read as blocks of one shared array at hashed offsets.

Registry name ``"robe"`` (kind ``"train"``, settings ``"x<R>"``). Desai, Chou and
Shrivastava, "Random Offset Block Embedding (ROBE) for compressed embedding tables in deep
learning recommendation systems", MLSys 2022; reference code github apd10/dlrm
(``RobezEmbeddingCPU.py``) and apd10/universal_memory_allocation (the CUDA kernel).

Lookup
    All fields share one trainable float32 array ``A`` of ``M`` values. The D values of the
    row of global id g (field offset + local id, so the field is part of the key, as the
    reference's ``val_offset``) are cut into chunks of Z consecutive dimensions; chunk
    ``c = j // Z`` is read as a contiguous block of A starting at a hashed offset::

        offset(g, c) = ((a * g + b * c + k) mod P) mod (M - Z + 1)
        row(g)[j]    = A[offset(g, j // Z) + j % Z]

    a universal hash with the reference's prime ``P = 2038074743`` and fixed parameters
    ``a in [1, P)``, ``b, k in [0, P)`` drawn from ``numpy.random.default_rng(seed)``. As in
    the reference a block never wraps around: offsets stop at ``M - Z``. Ids must be below P
    (2.04e9 rows), and every product fits int64 (a * g < 2^62).

Block size Z
    The reference's final MLPerf run (``bench/train_tb_rma_final.chunk32.sh``: Criteo 1TB,
    D = 128, 1000x) uses Z = 32 (``DEFAULT_BLOCK``; it also has Z = 8 and 128 variants). A
    block cannot be longer than a row, so at the project's D = 16 the default is
    ``Z = min(32, D) = 16``: one block per row, a row is a window of D consecutive values of A
    at one hashed offset (the windows of different ids may overlap: rows share single values,
    not whole rows as in the hashing trick).

Size and export
    ``array.npy`` float32 [M] (the trained array) and ``hash_params.npy`` int64 [4]
    ``(P, a, b, k)``; ``header.json`` holds M, Z, the seed and the formula. ``"x<R>"`` sets M
    to the largest value with ``bytes(array.npy) + bytes(hash_params.npy) <= fp32 bytes / R``
    (``.npy`` headers counted, ``baselines.budget``). ``A`` starts N(0, ``init_std``) like the
    fp32 tables (torch's global RNG), so every row value starts with that std. Pure torch
    (gather + index backward), CPU or GPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from baselines.base import CompressedEmbedding, read_tables
from baselines.budget import budget_bytes, parse_ratio
from baselines.registry import Method, MethodInputs
from ctr.model import DEFAULT_INIT_STD
from encoding.sizes import npy_file_bytes

ROBE_PRIME = 2038074743  # the reference's prime (random_numbers[0])
DEFAULT_BLOCK = 32  # Z of the reference's MLPerf runs (train_tb_rma_final.chunk32.sh)
NUM_HASH_PARAMS = 4  # (P, a, b, k)


def robe_hash_params(seed: int) -> np.ndarray:
    """int64 [4] ``(P, a, b, k)``: ``a`` in [1, P), ``b`` and ``k`` in [0, P), from ``default_rng(seed)``."""
    rng = np.random.default_rng(int(seed))
    a = int(rng.integers(1, ROBE_PRIME))
    b, k = (int(v) for v in rng.integers(0, ROBE_PRIME, size=2))
    return np.array([ROBE_PRIME, a, b, k], dtype=np.int64)


def check_hash_params(params: np.ndarray, num_rows: int) -> None:
    """``ValueError`` unless ``params`` is int64 [4] ``(P, a, b, k)`` with 0 < a < P, 0 <= b, k < P
    and every global id (``< num_rows``) below P."""
    p = np.asarray(params)
    if p.shape != (NUM_HASH_PARAMS,) or p.dtype != np.int64:
        raise ValueError(f"hash parameters must be int64 [{NUM_HASH_PARAMS}] (P, a, b, k), got {p.dtype} {p.shape}")
    prime, a, b, k = (int(v) for v in p)
    if not (1 < prime < 2**31 and 0 < a < prime and 0 <= b < prime and 0 <= k < prime):
        raise ValueError(f"hash parameters (P, a, b, k) = {tuple(p.tolist())} are out of range")
    if num_rows > prime:
        raise ValueError(f"{num_rows:,} rows: ROBE's hash takes ids below P = {prime:,}")


def robe_indices(global_ids: torch.Tensor, params: torch.Tensor, size: int, block: int, dim: int) -> torch.Tensor:
    """Array positions of the rows of ``global_ids``: int64 [...] -> int64 [..., D].

    ``positions[..., j] = ((a * g + b * (j // Z) + k) mod P) mod (M - Z + 1) + j % Z`` with
    ``params`` int64 [4] ``(P, a, b, k)``, M = ``size``, Z = ``block``, D = ``dim``.
    """
    j = torch.arange(dim, dtype=torch.int64, device=global_ids.device)
    prime, a, b, k = params.to(global_ids.device).unbind()
    h = (a * global_ids.to(torch.int64).unsqueeze(-1) + b * (j // block) + k) % prime
    return h % (size - block + 1) + j % block


def robe_bytes(size: int) -> int:
    """Export bytes of an array of ``size`` values: ``array.npy`` + ``hash_params.npy``."""
    return npy_file_bytes((int(size),), np.float32) + npy_file_bytes((NUM_HASH_PARAMS,), np.int64)


def robe_size(budget: int, block: int) -> int:
    """Largest array size M whose export fits ``budget`` bytes; ``ValueError`` when M < ``block``."""
    size = max((int(budget) - robe_bytes(0)) // np.dtype(np.float32).itemsize, 0)
    while size > 0 and robe_bytes(size) > budget:  # the .npy header can grow with the shape's digits
        size -= 1
    if size < block:
        raise ValueError(
            f"a budget of {budget:,} bytes holds a ROBE array of {size} values, less than one block of {block} "
            f"({robe_bytes(block):,} bytes with the .npy headers and hash parameters)"
        )
    return size


class RobeEmbedding(CompressedEmbedding):
    """ROBE-Z: one shared array ``array`` [M]; forward(kjt) -> Tensor[B, F, D] (``robe_indices``).

    Args:
        fields, cardinalities: the fields and their vocabulary sizes (local id 0 = OOV).
        dim: embedding dimension D.
        size: M, the number of float32 values of the shared array (>= ``block``).
        block: Z, 1..D.
        seed: seeds the hash parameters (``robe_hash_params``) unless ``hash_params`` is given.
        hash_params: int64 [4] ``(P, a, b, k)`` (e.g. read back from an export).
        init_std: std of the N(0, init_std) initial array (torch's global RNG).
    """

    method = "robe"

    def __init__(
        self,
        fields: Sequence[str],
        cardinalities: Sequence[int],
        dim: int,
        size: int,
        block: int = DEFAULT_BLOCK,
        seed: int = 0,
        hash_params: np.ndarray | None = None,
        init_std: float = DEFAULT_INIT_STD,
    ):
        super().__init__()
        self.fields = list(fields)
        self.cardinalities = [int(c) for c in cardinalities]
        self.dim = int(dim)
        if len(self.fields) != len(self.cardinalities) or min(self.cardinalities, default=0) < 1:
            raise ValueError(f"fields {self.fields} need one cardinality >= 1 each, got {self.cardinalities}")
        self.block = int(block)
        self.size = int(size)
        if not 1 <= self.block <= self.dim:
            raise ValueError(f"ROBE block size Z must be in 1..D = {self.dim}, got {self.block}")
        if self.size < self.block:
            raise ValueError(f"ROBE array of {self.size} values is smaller than one block of {self.block}")
        self.seed = int(seed)
        params = robe_hash_params(self.seed) if hash_params is None else np.asarray(hash_params)
        check_hash_params(params, self.num_rows())
        self.register_buffer("hash_params", torch.from_numpy(params.astype(np.int64)), persistent=False)
        self.array = nn.Parameter(torch.empty(self.size).normal_(0.0, init_std))

    def positions(self, global_ids: torch.Tensor) -> torch.Tensor:
        """int64 [...] global ids -> int64 [..., D] positions in ``array`` (``robe_indices``)."""
        return robe_indices(global_ids, self.hash_params, self.size, self.block, self.dim)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        if list(kjt.keys()) != self.fields:
            raise ValueError(f"RobeEmbedding: KJT keys {list(kjt.keys())} are not the fields {self.fields}")
        return self.array[self.positions(self.global_ids(kjt))]

    # -- sizes and export ------------------------------------------------------------
    def num_bytes(self) -> int:
        """Payload bytes of ``export()``: ``array.npy`` + ``hash_params.npy``."""
        return robe_bytes(self.size)

    def export_arrays(self) -> dict[str, np.ndarray]:
        """``array`` float32 [M] as trained and ``hash_params`` int64 [4] ``(P, a, b, k)``."""
        return {"array": self.array.detach().cpu().numpy(), "hash_params": self.hash_params.cpu().numpy()}

    def export_config(self) -> dict[str, Any]:
        return {
            "cardinalities": self.cardinalities,
            "size": self.size,
            "block": self.block,
            "seed": self.seed,
            "hash": "row(g)[j] = array[((a*g + b*(j // block) + k) mod P) mod (size - block + 1) + j % block], "
            "g = field offset + local id, (P, a, b, k) = hash_params",
        }

    @classmethod
    def from_export(cls, export_dir: str | os.PathLike) -> RobeEmbedding:
        """Rebuild from an ``export()`` directory (checksums verified, no pickle)."""
        header, arrays = read_tables(export_dir, cls.method)
        cfg = header["config"]
        array = arrays["array"]
        if array.dtype != np.float32 or array.shape != (cfg["size"],):
            raise ValueError(f"{export_dir}: array is {array.dtype} {array.shape}, expected float32 ({cfg['size']},)")
        emb = cls(header["fields"], cfg["cardinalities"], header["dim"], cfg["size"], cfg["block"], cfg["seed"],
                  hash_params=arrays["hash_params"])
        with torch.no_grad():
            emb.array.copy_(torch.from_numpy(array))
        return emb


def build(inputs: MethodInputs, setting: str) -> RobeEmbedding:
    """ROBE-Z within ``setting`` (``"x<R>"``): Z = min(32, D), hash seeded by ``inputs.seed``."""
    budget = budget_bytes(inputs.fp32_bytes, parse_ratio(setting, "robe"))
    block = min(DEFAULT_BLOCK, inputs.dim)
    size = robe_size(budget, block)
    return RobeEmbedding(inputs.fields, inputs.cardinalities, inputs.dim, size, block, inputs.seed)


METHOD = Method(
    name="robe",
    kind="train",
    settings=("x10", "x50", "x200", "x500", "x1000"),
    description="ROBE-Z (Desai et al. 2022): rows read as Z-value blocks of one shared array at hashed offsets, "
    "Z = min(32, D), array sized to the xR budget",
    build=build,
)
