"""Vectorised value transforms used by ``data.prepare`` (numpy / Arrow, never per-row Python).

- Criteo integer bucketing: floor(ln(x)^2) for x > 2, x itself otherwise, missing kept apart.
- Avazu ``hour`` (YYMMDDHH) and Unix seconds -> hour of day, weekday (Monday = 0), weekend flag.
- Deterministic split assignment (splitmix64 hash of the global row index and the seed; file
  position, or a time column's cut points; the last input file for ``by-file``).
- 64-bit keys of strings, for fast vocabulary lookups with ``np.searchsorted``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "val", "test")  # the splits, by code (TRAIN, VAL, TEST)
# how rows of ``--data`` are assigned to them: ``random_split``, ``time_split``, ``by_file_split``
SPLIT_METHODS = ("random", "time", "by-file")
PRESPLIT = "pre-split"  # the split of ``--train/--val/--test``: every row stays in its file's split

# splitmix64: the golden-ratio increment and the two multipliers of its finaliser (as unsigned
# ints; ``baselines.hashing.splitmix64_torch`` uses the same constants on int64 tensors).
SPLITMIX64_GOLDEN = 0x9E3779B97F4A7C15
SPLITMIX64_M1 = 0xBF58476D1CE4E5B9
SPLITMIX64_M2 = 0x94D049BB133111EB
_GOLDEN = np.uint64(SPLITMIX64_GOLDEN)
_M1 = np.uint64(SPLITMIX64_M1)
_M2 = np.uint64(SPLITMIX64_M2)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of ``x + golden`` (a bijection on uint64), elementwise."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def random_split(first_row: int, n: int, seed: int) -> np.ndarray:
    """Split codes (0 train, 1 val, 2 test; 8:1:1) of rows ``first_row .. first_row+n-1``.

    Each row's code depends only on its global index and ``seed``, so it does not depend on
    how the file was cut into blocks.
    """
    return random_split_codes(np.arange(first_row, first_row + n, dtype=np.uint64), seed)


def random_split_codes(rows: np.ndarray, seed: int) -> np.ndarray:
    """Split codes of the random split for arbitrary global row indices (``random_split``'s rule)."""
    salt = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    r = splitmix64(np.asarray(rows).astype(np.uint64) ^ salt) % np.uint64(10)
    codes = np.zeros(len(r), dtype=np.int8)
    codes[r == 8] = VAL
    codes[r == 9] = TEST
    return codes


def time_split(first_row: int, n: int, total: int) -> np.ndarray:
    """Split codes by position: the first 80% of ``total`` rows train, the next 10% val, the rest test."""
    idx = np.arange(first_row, first_row + n, dtype=np.int64)
    n_train, n_val = time_split_sizes(total)[:2]
    codes = np.zeros(n, dtype=np.int8)
    codes[idx >= n_train] = VAL
    codes[idx >= n_train + n_val] = TEST
    return codes


def by_file_split(first_row: int, n: int, file_rows: list[int] | tuple[int, ...]) -> np.ndarray:
    """Split codes of the ``by-file`` split (the DLRM / torchrec day split) of a concatenation.

    ``file_rows``: rows of each input file, in order. Rows of every file but the last are
    train; the last file's first half (``n_last // 2`` rows) is val, the rest test.
    """
    if len(file_rows) < 2:
        raise ValueError("the by-file split needs at least 2 input files")
    start = int(sum(file_rows[:-1]))
    half = int(file_rows[-1]) // 2
    idx = np.arange(first_row, first_row + n, dtype=np.int64)
    codes = np.zeros(n, dtype=np.int8)
    codes[idx >= start] = VAL
    codes[idx >= start + half] = TEST
    return codes


def time_value_cuts(values: np.ndarray, counts: np.ndarray, total: int) -> tuple[int, int]:
    """Cut points of the time split by a time column: ``(c1, c2)`` with train = rows whose time
    is below c1, val = [c1, c2), test = from c2.

    ``values``: the distinct times (int64), ``counts``: their rows. c1 is the time of the row
    at position ``n_train`` in time order (``time_split_sizes``), c2 that of the row at
    ``n_train + n_val``: rows of one timestamp stay together, so a boundary timestamp goes
    wholly to the later split. A cut past the last row is the largest int64.
    """
    order = np.argsort(values, kind="stable")
    v, c = np.asarray(values, dtype=np.int64)[order], np.asarray(counts, dtype=np.int64)[order]
    ends = np.cumsum(c)  # rows up to and including each time
    n_train, n_val, _ = time_split_sizes(total)
    cuts = []
    for position in (n_train, n_train + n_val):
        i = int(np.searchsorted(ends, position, side="right"))
        cuts.append(int(v[i]) if i < len(v) else int(np.iinfo(np.int64).max))
    return cuts[0], cuts[1]


def time_value_split(times: np.ndarray, cuts: tuple[int, int]) -> np.ndarray:
    """Split codes of rows by their time (``time_value_cuts``)."""
    t = np.asarray(times, dtype=np.int64)
    codes = np.zeros(len(t), dtype=np.int8)
    codes[t >= cuts[0]] = VAL
    codes[t >= cuts[1]] = TEST
    return codes


def time_split_sizes(total: int) -> tuple[int, int, int]:
    """(train, val, test) row counts of the time split of ``total`` rows."""
    n_train = (total * 8) // 10
    n_val = (total * 9) // 10 - n_train
    return n_train, n_val, total - n_train - n_val


def criteo_int_bucket(values: np.ndarray) -> np.ndarray:
    """floor(ln(x)^2) where x > 2, else x itself (int64 in, int64 out)."""
    v = np.asarray(values, dtype=np.int64)
    out = v.copy()
    big = v > 2
    out[big] = np.floor(np.log(v[big].astype(np.float64)) ** 2).astype(np.int64)
    return out


def criteo_int_categories(text: pa.Array) -> pa.Array:
    """Raw Criteo integer strings -> category strings: the bucket in decimal, missing ("") stays ""."""
    text = text.cast(pa.string())
    text = pc.replace_substring_regex(text, r"\.0+$", "")  # "5.0" (a pandas float column) is 5
    missing = pc.equal(text, "").to_numpy(zero_copy_only=False)
    safe = pc.if_else(pa.array(missing), "0", text)
    values = pc.cast(safe, pa.int64()).to_numpy(zero_copy_only=False)
    cats = pa.array(criteo_int_bucket(values)).cast(pa.string())
    return pc.if_else(pa.array(missing), "", cats)


def _hour_parts(text: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    text = text.cast(pa.string())
    ok = pc.match_substring_regex(text, r"^[0-9]{8}$").to_numpy(zero_copy_only=False)
    safe = pc.if_else(pa.array(ok), text, "14010100")
    v = pc.cast(safe, pa.int64()).to_numpy(zero_copy_only=False)
    yy, mm, dd, hh = v // 1_000_000, (v // 10_000) % 100, (v // 100) % 100, v % 100
    ok &= (mm >= 1) & (mm <= 12) & (dd >= 1) & (hh <= 23)
    mm_c = np.clip(mm, 1, 12)
    month = (yy + 30).astype("datetime64[Y]").astype("datetime64[M]") + (mm_c - 1).astype("timedelta64[M]")
    days_in_month = ((month + np.timedelta64(1, "M")).astype("datetime64[D]") - month.astype("datetime64[D]")).astype(
        np.int64
    )
    ok &= dd <= days_in_month
    day = month.astype("datetime64[D]") + (np.clip(dd, 1, 31) - 1).astype("timedelta64[D]")
    weekday = (day.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    return ok, hh, weekday, yy, mm


def avazu_hour_bad(text: pa.Array) -> np.ndarray:
    """Bool mask of values that are not a valid Avazu ``hour`` (YYMMDDHH, year 20YY)."""
    return ~_hour_parts(text)[0]


def avazu_hour_fields(text: pa.Array) -> dict[str, pa.Array]:
    """Avazu ``hour`` strings -> {hour_of_day, weekday, is_weekend} category strings."""
    _, hh, weekday, _, _ = _hour_parts(text)
    return {
        "hour_of_day": pa.array(hh).cast(pa.string()),
        "weekday": pa.array(weekday).cast(pa.string()),
        "is_weekend": pa.array((weekday >= 5).astype(np.int64)).cast(pa.string()),
    }


def integer_values(text: pa.Array) -> np.ndarray:
    """int64 of integer strings ("5.0", as pandas writes floats, is 5).

    The reader has rejected rows whose value is no integer, but a block's dictionary may still
    hold such a value (of a skipped row): it reads as 0, and no row refers to it.
    """
    text = text.cast(pa.string())
    ok = pc.match_substring_regex(text, r"^-?[0-9]{1,18}(\.0+)?$")
    text = pc.if_else(ok, pc.replace_substring_regex(text, r"\.0+$", ""), "0")
    return pc.cast(text, pa.int64()).to_numpy(zero_copy_only=False)


def unix_time_fields(text: pa.Array) -> dict[str, pa.Array]:
    """Unix seconds (UTC) -> {hour_of_day, weekday (Monday = 0), is_weekend} category strings."""
    seconds = integer_values(text)
    days = np.floor_divide(seconds, 86_400)
    hh = np.floor_divide(seconds - days * 86_400, 3_600)
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    return {
        "hour_of_day": pa.array(hh).cast(pa.string()),
        "weekday": pa.array(weekday).cast(pa.string()),
        "is_weekend": pa.array((weekday >= 5).astype(np.int64)).cast(pa.string()),
    }


DATETIME_FIELDS = {"yymmddhh": avazu_hour_fields, "unix_seconds": unix_time_fields}


def string_keys(arr: pa.Array) -> np.ndarray:
    """64-bit hash keys of a string/binary array (nulls not allowed), fully vectorised.

    Equal strings get equal keys; different strings collide with probability ~2^-64, and
    callers that need exactness check their key set for duplicates.
    """
    if pa.types.is_dictionary(arr.type):
        raise TypeError("pass the dictionary, not the dictionary array")
    if arr.null_count:
        raise ValueError("string_keys: nulls are not allowed")
    if pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type):
        arr = arr.cast(pa.binary())
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4).astype(np.int64)
    starts, lengths = offsets[:-1], np.diff(offsets)
    lo, hi = int(offsets[0]), int(offsets[-1])
    data = np.zeros(hi - lo + 8, dtype=np.uint8)
    if hi > lo:
        data[: hi - lo] = np.frombuffer(bufs[2], dtype=np.uint8, count=hi - lo, offset=lo)
    starts = starts - lo
    # every byte offset as the start of an unaligned little-endian uint64
    words = np.ndarray(shape=(hi - lo + 1,), dtype="<u8", buffer=data, strides=(1,))
    h = splitmix64(lengths.astype(np.uint64))
    maxlen = int(lengths.max())
    for j in range(0, maxlen, 8):
        rem = np.clip(lengths - j, 0, 8)
        w = words[np.minimum(starts + j, hi - lo)]
        mask = np.where(rem >= 8, np.uint64(0xFFFFFFFFFFFFFFFF), (np.uint64(1) << (rem * 8).astype(np.uint64)) - np.uint64(1))
        mixed = splitmix64(h ^ (w & mask))
        h = np.where(rem > 0, mixed, h)  # only words inside the string
    return h
