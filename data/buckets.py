"""Numeric columns of a schema -> categories, vectorised over a block's distinct values.

Bucketings (``bucket = ...`` in a schema file; an empty value is always its own category ""):

- ``log2``: x > 0 -> ``2^k`` with k = floor(log2(x)) (the bucket [2^k, 2^(k+1))), computed
  exactly from the float's exponent; x = 0 -> ``0``; x < 0 -> ``-2^k`` with k = floor(log2(-x)).
- ``ln_squared`` (Criteo's): x > 2 -> floor(ln(x)^2), else x itself (floor(x) for decimals).
  Integer columns use ``data.transforms.criteo_int_categories``, the Criteo code path.
- ``quantile:N``: ``q0`` .. ``q{N-1}``: bucket i holds b_i <= x < b_(i+1), the b_i being the
  i/N quantiles of the column over the training rows (equal cut points merge, so a column
  with few distinct values gets fewer buckets). The quantiles come from ``QuantileSample``.
- ``none``: the value as written is the category (and ``min_count`` applies to it).

Bucketed columns (all but ``none``) are never folded into OOV: their categories are few.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.transforms import criteo_int_categories, splitmix64, string_keys

NUMBER_RE = r"^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"  # what a float column holds
QUANTILE_SAMPLE_ROWS = 100_000  # rows kept per quantile column: ~0.3% rank error, 2.4 MB
_QUANTILE_SALT = 0x5155414E54494C45  # "QUANTILE": keeps the sample apart from the random split's hash


def parse_numbers(text: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(float64 values, missing mask)`` of number strings (a dictionary array is parsed
    through its dictionary); an empty value is missing (its value 0).

    The reader has rejected rows whose value is not a number, but a block's dictionary may
    still hold such a value (of a skipped row): it parses as missing, and no row refers to it.
    """
    if pa.types.is_dictionary(text.type):
        values, missing = parse_numbers(text.dictionary)
        idx = text.indices.to_numpy(zero_copy_only=False)
        return values[idx], missing[idx]
    text = text.cast(pa.string())
    ok = pc.match_substring_regex(text, NUMBER_RE).to_numpy(zero_copy_only=False)
    missing = ~ok
    safe = pc.if_else(pa.array(ok), text, "0")
    with np.errstate(over="ignore"):
        values = pc.cast(safe, pa.float64()).to_numpy(zero_copy_only=False)
    return values, missing


def _strings(prefix: str, k: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pa.array(k).cast(pa.string()), "")


def log2_categories(text: pa.Array) -> pa.Array:
    """Number strings -> ``2^k`` / ``0`` / ``-2^k`` / "" (see the module docstring)."""
    x, missing = parse_numbers(text)
    _, exponent = np.frexp(np.abs(x))  # |x| = m * 2^e, 0.5 <= m < 1: floor(log2 |x|) = e - 1
    k = exponent.astype(np.int64) - 1
    out = pc.if_else(pa.array(x > 0), _strings("2^", k), _strings("-2^", k))
    out = pc.if_else(pa.array(x == 0), "0", out)
    return pc.if_else(pa.array(missing), "", out)


def ln_squared_categories(text: pa.Array) -> pa.Array:
    """Decimal strings -> floor(ln(x)^2) for x > 2, else floor(x); "" stays ""."""
    x, missing = parse_numbers(text)
    big = x > 2
    out = np.floor(x)
    out[big] = np.floor(np.log(x[big]) ** 2)
    cats = pa.array(out.astype(np.int64)).cast(pa.string())
    return pc.if_else(pa.array(missing), "", cats)


def quantile_categories(text: pa.Array, boundaries: np.ndarray) -> pa.Array:
    """Number strings -> ``q{i}``, i = the number of cut points <= x; "" stays ""."""
    x, missing = parse_numbers(text)
    i = np.searchsorted(np.asarray(boundaries, dtype=np.float64), x, side="right")
    return pc.if_else(pa.array(missing), "", _strings("q", i))


def bucket_function(bucket: str, integer: bool, boundaries: np.ndarray | None = None
                    ) -> Callable[[pa.Array], pa.Array] | None:
    """The categories function of a numeric column (None for ``none``: the value itself)."""
    if bucket == "none":
        return None
    if bucket == "log2":
        return log2_categories
    if bucket == "ln_squared":
        return criteo_int_categories if integer else ln_squared_categories
    if bucket == "quantile":
        if boundaries is None:
            raise ValueError("quantile bucketing needs the cut points of the counting pass")
        cuts = np.asarray(boundaries, dtype=np.float64)
        return lambda text: quantile_categories(text, cuts)
    raise ValueError(f"unknown bucketing {bucket!r}")


class QuantileSample:
    """A uniform sample of at most ``size`` non-missing values of one column, in bounded memory.

    Row ``i`` (its index among the good rows of the whole input) gets the priority
    ``splitmix64(i ^ salt)``, the salt made of the seed and the column's name; the sample is
    the ``size`` rows of lowest priority (a bottom-k sample). splitmix64 is a bijection, so the
    priorities are distinct and the sample depends only on the rows and the seed, not on how
    the input was cut into blocks. Each kept row keeps its index and, when the split cuts by a
    time column, its time, so ``boundaries`` can keep the training rows only.
    """

    def __init__(self, column: str, seed: int, size: int = QUANTILE_SAMPLE_ROWS):
        if size < 1:
            raise ValueError(f"sample size must be >= 1, got {size}")
        self.column, self.size = column, int(size)
        seed_salt = splitmix64(np.array([(int(seed) ^ _QUANTILE_SALT) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
        self._salt = seed_salt ^ string_keys(pa.array([column], pa.string()))[0]
        self.priority = np.zeros(0, dtype=np.uint64)
        self.rows = np.zeros(0, dtype=np.int64)
        self.values = np.zeros(0, dtype=np.float64)
        self.times = np.zeros(0, dtype=np.int64)

    def add(self, first_row: int, text: pa.Array, times: np.ndarray | None = None) -> None:
        """Offer the rows ``first_row ..`` of one block (``text``: their values, in row order)."""
        x, missing = parse_numbers(text)
        rows = np.arange(first_row, first_row + len(x), dtype=np.int64)[~missing]
        t = np.zeros(len(rows), dtype=np.int64) if times is None else np.asarray(times, dtype=np.int64)[~missing]
        self.priority = np.concatenate([self.priority, splitmix64(rows.astype(np.uint64) ^ self._salt)])
        self.rows = np.concatenate([self.rows, rows])
        self.values = np.concatenate([self.values, x[~missing]])
        self.times = np.concatenate([self.times, t])
        if len(self.priority) > 2 * self.size:
            self._shrink()

    def _shrink(self) -> None:
        if len(self.priority) <= self.size:
            return
        keep = np.argpartition(self.priority, self.size - 1)[: self.size]
        keep.sort()
        self.priority, self.rows = self.priority[keep], self.rows[keep]
        self.values, self.times = self.values[keep], self.times[keep]

    def boundaries(self, buckets: int, train: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
                   ) -> np.ndarray:
        """The distinct i/``buckets`` quantiles (i = 1 .. buckets-1) of the sampled values of the
        rows ``train(rows, times)`` keeps (all when None); empty when no such row has a value."""
        self._shrink()
        keep = np.ones(len(self.rows), dtype=bool) if train is None else np.asarray(train(self.rows, self.times), bool)
        values = self.values[keep]
        if len(values) == 0:
            return np.zeros(0, dtype=np.float64)
        q = np.quantile(values, np.arange(1, buckets) / buckets, method="inverted_cdf")
        return np.unique(q)
