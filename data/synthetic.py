"""Synthetic Criteo / Avazu files in the real raw formats, with a planted click model.

    python -m data.synthetic --dataset criteo --rows 1000000 --out criteo.txt [--days D] [--drift X] [--seed S]

The file is read unchanged by the reader of the real data (``data.reader`` / ``data.prepare``).
With ``--dataset SCHEMA.toml`` (a dataset described by a schema file) the file is written by
``data.synthetic_schema`` instead, in that schema's format.
Metadata, among it the oracle AUC (the AUC of the true click probabilities on the file's
labels, overall and per day), goes to ``FILE.meta.json`` so tests and benchmarks know the
ceiling a model can reach.

Format
- Criteo: tab-separated, no header, 40 columns: label, I1..I13 (integers, heavy-tailed,
  sometimes empty, I2 sometimes negative), C1..C26 (8-hex-char tokens, sometimes empty;
  emptiness is shared by the field groups that are empty together in the real file).
- Avazu: CSV with the real header; ``id`` is a uint64, ``hour`` is YYMMDDHH from 14102100 over
  ``days`` consecutive days; site/app/device fields are 8-hex-char tokens, C1, banner_pos,
  device_type, device_conn_type and C14..C21 are integers from the real value ranges.
- Rows are in time order: with D days, day d is rows [d*N/D, (d+1)*N/D) (Avazu: the 24
  hours spread evenly over each day; Criteo has no time column, as in the real file).

Feature values
- Field f has K_f values: the real dataset's distinct count, capped at ``max(2, rows / 2)``
  so small files still repeat values. A row draws value rank r with P(r) ~ (r + 1)^-s_f,
  s_f in [1.05, 1.3] fixed per field. Ranks below 256 come from the exact pmf by inverse CDF
  (a guide table of 2^14 buckets, ``np.searchsorted`` in the few buckets that straddle two
  ranks); rarer ranks from the continuous power law x^-s on [r + 0.5, r + 1.5), which matches
  the pmf to better than 0.1%. Where the real field has one dominant value (Avazu device_id
  'a99f214a' ~82%, C1 1005 ~92%, Criteo C9 ~89%...) rank 0 gets that share and the rest stays
  Zipf. A value's token is a bijective 32-bit hash of the rank salted by (seed, field), so
  tokens within a field are distinct; Avazu's integer fields map ranks to real values.

Click model (the oracle)
    logit = b0[day] + g_f sum_f w_f a_f(v_f) + g_p sum_{(f,g) in P} <u_f(v_f), u_g(v_g)>
            + c_z z (Criteo)  |  + 0.2 sin(2 pi (hour - 8) / 24) + 0.1 weekend (Avazu)
- a_f (scalar) and u_f (k = 4 vector) are N(0, 1) draws times a strength (1 + r / 20)^-0.4
  that decays with the value's Zipf rank r, so rare values carry weaker effects. Draws are
  stored for the first 2^16 ranks of each field (a seeded float32 table per field); rarer
  ranks take the draw of a table slot chosen by hashing the rank (their own strength
  still applies). An empty (missing) value has its own draw at full strength. w_f are
  per-field weights (log-normal); P is a fixed set of field pairs. The field and pair sums
  are scaled to fixed standard deviations (1.1 and 0.65-0.72) on the pilot sample below.
- Criteo: z ~ N(0, 1) is a per-row latent that also drives the integer columns: I_j =
  max(floor(exp(mu_j + sd_j g)) - 1, 0), g = l_j z + sqrt(1 - l_j^2) e, e ~ N(0, 1), so the
  integers carry noisy signal about z (I2 is also -1..-3 on 5% of rows, as in the real file).
- b0[day] is solved by bisection on a 50k-row pilot sample under that day's model, so the
  click rate is ~22% (Criteo) / ~17% (Avazu) on every day, drift or not (Avazu weekends a
  little higher). Labels ~ Bernoulli(sigmoid(logit)). The oracle AUC (~0.80 for both
  datasets) is ``roc_auc_score(labels, p)`` on the file, computed by ``data.auc.auc``.

Drift (``--drift X``, 0 = none)
- Every effect has a second, independent draw e' next to e. On day d of D the effects are
  cos(theta) e + sin(theta) e' with theta = pi/2 * t and t = X * d / (D - 1): day 0 uses e,
  and with X = 1 the last day uses e' (a fully new model); X > 1 keeps rotating. The rotation
  keeps every effect's variance, so the oracle AUC stays comparable across days. For Avazu t
  is also scaled per site_category (the domain) by a factor in [0.5, 1.5] drawn per category,
  so domains drift at different speeds. The oracle AUC of a day uses that day's model.

Everything is seeded: the same arguments give a byte-identical file. Generation is
vectorised numpy in chunks of 200k rows; pyarrow's CSV writer writes chunk k in a background
thread while chunk k + 1 is drawn. The file is written to a temporary file in the same
directory and renamed (after the metadata), so a present file always has its metadata.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from tqdm.auto import tqdm

from data.artifacts import atomic_write_json
from data.auc import auc as auc  # re-exported: data.synthetic.auc
from data.auc import click_summary
from data.schema import (
    AVAZU_CAT_COLUMNS,
    CRITEO_CAT_COLUMNS,
    CRITEO_INT_COLUMNS,
    DatasetSchema,
    dataset_argument,
    get_schema,
)
from data.synthetic_schema import generate_for_schema
from data.transforms import splitmix64

GENERATOR_VERSION = 2
CHUNK_ROWS = 200_000
PILOT_ROWS = 50_000
CARD_CAP = 0.5  # cardinality cap as a fraction of the row count
EXACT_RANKS = 256  # ranks sampled from the exact pmf; rarer ones from the continuous power law
GUIDE_BUCKETS = 1 << 14  # guide table: u's bucket -> its rank when the bucket holds one rank
TABLE_RANKS = 1 << 16  # ranks with a stored effect draw; rarer ones hash to a slot
LATENT_DIM = 4
STRENGTH_R0, STRENGTH_POW = 20.0, 0.4
TARGET_CTR = {"criteo": 0.22, "avazu": 0.17}
START_DATE = np.datetime64("2014-10-21", "D")  # Avazu's first day (a Tuesday)

# Distinct values per field in the full public train files (Criteo Kaggle, Avazu).
CRITEO_CARDINALITY = dict(zip(CRITEO_CAT_COLUMNS, (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
), strict=True))
AVAZU_CARDINALITY = dict(zip(AVAZU_CAT_COLUMNS, (
    7, 7, 4737, 7745, 26, 8552, 559, 36, 2686408, 6729486, 8251, 5, 4, 2626, 8, 9, 435,
    4, 68, 172, 60,
), strict=True))
# Share of rows holding a field's most frequent value, where the real file has one dominant value.
HEAD_SHARE = {
    "criteo": {"C9": 0.89, "C17": 0.30, "C20": 0.35, "C23": 0.30},
    "avazu": {"C1": 0.92, "banner_pos": 0.72, "site_id": 0.36, "site_domain": 0.37, "site_category": 0.41,
              "app_id": 0.64, "app_domain": 0.67, "app_category": 0.65, "device_id": 0.82,
              "device_type": 0.92, "device_conn_type": 0.86, "C15": 0.93, "C16": 0.94, "C18": 0.42,
              "C20": 0.47},
}
# Avazu integer-coded fields: real values (most frequent first) or the real range to draw from.
AVAZU_INT_VALUES: dict[str, tuple[int, ...]] = {
    "C1": (1005, 1002, 1010, 1012, 1007, 1001, 1008),
    "banner_pos": (0, 1, 7, 2, 4, 5, 3),
    "device_type": (1, 0, 4, 5, 2),
    "device_conn_type": (0, 2, 3, 5),
    "C15": (320, 300, 216, 728, 120, 1024, 480, 768),
    "C16": (50, 250, 36, 480, 90, 20, 768, 320, 1024),
    "C18": (0, 3, 2, 1),
}
AVAZU_INT_RANGE = {"C14": (375, 24052), "C17": (112, 2758), "C19": (33, 1959), "C20": (100000, 100248),
                   "C21": (1, 219)}
# Criteo: fields that are empty together, and how often.
CRITEO_MISSING = (
    (("C19", "C20", "C25", "C26"), 0.44), (("C22",), 0.76), (("C6",), 0.12),
    (("C3", "C4", "C12", "C16", "C21", "C24"), 0.034),
)
# Criteo integer columns: (probability missing, log-scale mean, log-scale sd, loading on z).
CRITEO_INT_SHAPE = {
    "I1": (0.45, 0.5, 1.2, 0.7), "I2": (0.0, 2.0, 2.0, -0.5), "I3": (0.21, 1.8, 1.5, 0.6),
    "I4": (0.22, 1.5, 1.0, -0.6), "I5": (0.03, 7.0, 2.5, 0.5), "I6": (0.22, 3.5, 2.0, 0.7),
    "I7": (0.04, 1.5, 1.5, 0.6), "I8": (0.0, 2.3, 1.0, -0.5), "I9": (0.04, 3.5, 1.5, 0.6),
    "I10": (0.45, 0.3, 0.6, 0.7), "I11": (0.04, 0.8, 1.0, 0.7), "I12": (0.76, 0.2, 0.8, 0.5),
    "I13": (0.22, 1.7, 1.2, -0.6),
}
PAIRS = {
    "criteo": (("C1", "C2"), ("C3", "C4"), ("C5", "C6"), ("C10", "C13"), ("C14", "C17"), ("C7", "C11"),
               ("C12", "C16"), ("C2", "C19"), ("C24", "C26"), ("C15", "C18")),
    "avazu": (("site_id", "app_id"), ("site_category", "device_model"), ("C14", "banner_pos"),
              ("app_category", "device_conn_type"), ("C17", "C21"), ("device_ip", "site_domain"),
              ("C19", "device_type"), ("app_domain", "C16")),
}
# Standard deviations of the logit's field and pair terms (set on the pilot sample, so the
# oracle AUC is ~0.80 whatever the seed and row count), and the weight of Criteo's row latent.
FIELD_STD = {"criteo": 1.1, "avazu": 1.1}
PAIR_STD = {"criteo": 0.65, "avazu": 0.72}
Z_SCALE = 0.5

_U64 = np.uint64
_HEX = b"0123456789abcdef"
# Byte b -> its two hex characters as a little-endian uint16 (first character in the low byte).
_HEX_LUT = np.array([_HEX[b >> 4] | (_HEX[b & 15] << 8) for b in range(256)], dtype="<u2")


def _hash32(x: np.ndarray, salt: int) -> np.ndarray:
    """A bijection on uint32 (xor with salt, then lowbias32), elementwise."""
    z = x.astype(np.uint32) ^ np.uint32(salt & 0xFFFFFFFF)
    z ^= z >> np.uint32(16)
    z *= np.uint32(0x7FEB352D)
    z ^= z >> np.uint32(15)
    z *= np.uint32(0x846CA68B)
    z ^= z >> np.uint32(16)
    return z


def _salt(*parts: int | str) -> int:
    """A 64-bit salt from a tuple of ints and strings (stable across runs and platforms)."""
    h = _U64(0x243F6A8885A308D3)
    for p in parts:
        for v in [*(p.encode() if isinstance(p, str) else [p & 0xFFFFFFFFFFFFFFFF]), 0]:
            h = splitmix64(np.array([h ^ _U64(v)]))[0]
    return int(h)


def _hex_tokens(h: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """uint32 hashes -> fixed-size binary array of 8 lowercase hex chars (null where ``valid`` is False).

    pyarrow's CSV writer writes these as text; no per-value string objects are made.
    """
    n = len(h)
    chars = np.take(_HEX_LUT, h.astype(">u4").view(np.uint8))  # [n * 4] uint16 = [n * 8] chars
    validity = None
    if valid is not None and not valid.all():
        validity = pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(8), n, [validity, pa.py_buffer(chars)])


def _ints(v: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """int64 column (null where ``valid`` is False); the CSV writer formats it."""
    return pa.array(v.astype(np.int64), mask=None if valid is None else ~valid)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class _Effects:
    """One draw of a field's planted effects: scalar [T + 1] and latent [k, T + 1] (last slot = missing)."""

    bias: np.ndarray
    latent: np.ndarray


class _Field:
    """One categorical field: Zipf sampler, raw tokens, planted effects (two draws for drift)."""

    def __init__(self, dataset: str, index: int, name: str, full_card: int, rows: int, seed: int):
        self.name = name
        self.full_card = full_card
        self.card = max(1, min(full_card, max(2, int(rows * CARD_CAP))))
        unit = _salt("zipf", dataset, name) / 2.0**64
        self.exponent = 1.05 + 0.25 * unit
        self.int_values = self._int_values(dataset, name)
        if self.int_values is not None:
            self.card = min(self.card, len(self.int_values))
        self._build_sampler(HEAD_SHARE[dataset].get(name))
        self.token_salt = _salt("token", seed, dataset, name)
        self.slot_salt = _salt("slot", seed, dataset, name)
        self.table = min(self.card, TABLE_RANKS)
        ranks = np.arange(self.table, dtype=np.float64)
        self.head_strength = np.append((1.0 + ranks / STRENGTH_R0) ** -STRENGTH_POW, 1.0).astype(np.float32)
        self.draws = []
        for d in range(2):
            rng = np.random.default_rng([seed, 7919, index, d, 1 if dataset == "criteo" else 2])
            eff = rng.standard_normal((self.table + 1, 1 + LATENT_DIM), dtype=np.float32)
            self.draws.append(_Effects(np.ascontiguousarray(eff[:, 0]), np.ascontiguousarray(eff[:, 1:].T)))

    @staticmethod
    def _int_values(dataset: str, name: str) -> np.ndarray | None:
        if dataset != "avazu":
            return None
        if name in AVAZU_INT_VALUES:
            return np.array(AVAZU_INT_VALUES[name], dtype=np.int64)
        if name in AVAZU_INT_RANGE:
            lo, hi = AVAZU_INT_RANGE[name]
            k = AVAZU_CARDINALITY[name]
            rng = np.random.default_rng(_salt("values", name) >> 1)
            if name == "C20":  # -1 is the most frequent C20 value in the real file
                return np.concatenate([[-1], lo + rng.permutation(hi - lo + 1)[:k - 1]])
            return lo + rng.permutation(hi - lo + 1)[:k]
        return None

    def _build_sampler(self, head_share: float | None) -> None:
        s, k = self.exponent, self.card
        h = min(k, EXACT_RANKS)
        pmf = (np.arange(h, dtype=np.float64) + 1.0) ** -s
        # Ranks [h, k): density x^-s on [h + 0.5, k + 0.5), rank = floor(x - 0.5); the mass of
        # rank r is then (r + 1)^-s to within s(s+1)/24/(r+1)^2 (relative): the Zipf pmf.
        a, b = (h + 0.5) ** (1 - s), (k + 0.5) ** (1 - s)
        tail = (b - a) / (1 - s) if k > h else 0.0
        if head_share is not None and k > 1:
            pmf[0] = head_share / (1 - head_share) * (pmf[1:].sum() + tail)
        z = pmf.sum() + tail
        self.cdf = np.cumsum(pmf) / z
        self.p_tail = tail / z
        self.tail_ab = (a, b)
        # rank(u) = searchsorted(cdf, u, "right") is monotone, so a bucket [i/G, (i+1)/G) whose
        # two ends give the same rank holds one rank: a lookup replaces the binary search.
        ends = np.searchsorted(self.cdf, np.arange(GUIDE_BUCKETS + 1) / GUIDE_BUCKETS, side="right")
        self.guide = ends[:-1].astype(np.int64)
        self.ambiguous = ends[:-1] != ends[1:]

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` value ranks (int64)."""
        u = rng.random(n)
        bucket = (u * GUIDE_BUCKETS).astype(np.int64)
        r = np.take(self.guide, bucket)
        amb = np.take(self.ambiguous, bucket)
        if amb.any():
            r[amb] = np.searchsorted(self.cdf, u[amb], side="right")
        if self.p_tail > 0:
            t = r >= len(self.cdf)
            if t.any():
                s = self.exponent
                a, b = self.tail_ab
                v = np.clip((u[t] - (1.0 - self.p_tail)) / self.p_tail, 0.0, 1.0)
                x = (a + v * (b - a)) ** (1.0 / (1 - s))
                r[t] = np.clip(np.floor(x - 0.5).astype(np.int64), len(self.cdf), self.card - 1)
        return np.minimum(r, self.card - 1, out=r)

    def slots(self, ranks: np.ndarray, missing: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(effect-table slot [n], strength [n] float32) of value ranks; missing values use the last slot."""
        if self.card <= self.table:
            slot, strength = ranks.copy(), np.take(self.head_strength, ranks)
        else:
            slot = ranks.copy()
            strength = np.take(self.head_strength, np.minimum(ranks, self.table))
            tail = ranks >= self.table
            if tail.any():
                rt = ranks[tail]
                slot[tail] = _hash32(rt, self.slot_salt) % np.uint32(self.table)
                strength[tail] = (1.0 + rt / STRENGTH_R0) ** -STRENGTH_POW
        if missing is not None:
            slot[missing] = self.table
            strength[missing] = 1.0
        return slot, strength

    def tokens(self, ranks: np.ndarray, missing: np.ndarray | None) -> pa.Array:
        valid = None if missing is None else ~missing
        if self.int_values is not None:
            return _ints(np.take(self.int_values, ranks), valid)
        return _hex_tokens(_hash32(ranks, self.token_salt), valid)


class _Model:
    """The planted click model of one dataset: fields, weights, pairs, global bias."""

    def __init__(self, dataset: str, rows: int, seed: int, days: int = 1, drift: float = 0.0):
        self.dataset, self.days, self.drift = dataset, days, drift
        cards = CRITEO_CARDINALITY if dataset == "criteo" else AVAZU_CARDINALITY
        self.fields = {name: _Field(dataset, i, name, full, rows, seed) for i, (name, full) in enumerate(cards.items())}
        rng = np.random.default_rng([seed, 31337, 1 if dataset == "criteo" else 2])
        w = np.exp(0.6 * rng.standard_normal(len(self.fields)))
        self.weights = dict(zip(self.fields, w / np.sqrt((w**2).sum()), strict=True))
        self.pairs = PAIRS[dataset]
        self.field_gain = self.pair_gain = 1.0  # set by _calibrate
        self.paired = {f for pair in self.pairs for f in pair}
        self.domain_salt = _salt("domain", seed)
        self.b0 = np.zeros(days)  # global bias per day, set by _calibrate

    def draw_ranks(self, rng: np.random.Generator, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Value ranks per field and, for Criteo, missing masks per field."""
        ranks = {name: f.sample(rng, n) for name, f in self.fields.items()}
        missing: dict[str, np.ndarray] = {}
        if self.dataset == "criteo":
            for group, p in CRITEO_MISSING:
                m = rng.random(n) < p
                missing.update(dict.fromkeys(group, m))
        return ranks, missing

    def drift_angle(self, day: np.ndarray, ranks: dict[str, np.ndarray]) -> np.ndarray | None:
        """Per-row rotation angle theta between the two effect draws (None: no drift)."""
        if self.days <= 1 or self.drift == 0:
            return None
        t = self.drift * day / (self.days - 1)
        if self.dataset == "avazu":  # domains (site categories) drift at different speeds
            sc = ranks["site_category"].astype(np.uint32)
            t = t * (0.5 + _hash32(sc, self.domain_salt) / 2.0**32)
        return (math.pi / 2) * t

    def logits(self, ranks: dict[str, np.ndarray], missing: dict[str, np.ndarray], day: np.ndarray) -> np.ndarray:
        """The planted logit terms [n] (float32, without bias and row terms) on each row's day."""
        fields, pairs = self.logit_parts(ranks, missing, day)
        fields *= np.float32(self.field_gain)
        fields += np.float32(self.pair_gain) * pairs
        return fields

    def logit_parts(
        self, ranks: dict[str, np.ndarray], missing: dict[str, np.ndarray], day: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(sum_f w_f a_f, sum_P <u_f, u_g>) [n] float32 on each row's day, before the gains."""
        theta = self.drift_angle(day, ranks)
        logit = np.zeros(len(day), dtype=np.float32)
        pair = np.zeros(len(day), dtype=np.float32)
        c = s = None
        if theta is not None:
            c, s = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
        latents: dict[str, list[np.ndarray]] = {}
        for name, f in self.fields.items():
            slot, strength = f.slots(ranks[name], missing.get(name))
            d0, d1 = f.draws
            a = np.take(d0.bias, slot)  # np.take: much faster than fancy indexing here
            if c is not None:
                a *= c
                a += s * np.take(d1.bias, slot)
            a *= strength
            a *= np.float32(self.weights[name])
            logit += a
            if name in self.paired:
                us = []
                for j in range(LATENT_DIM):
                    u = np.take(d0.latent[j], slot)
                    if c is not None:
                        u *= c
                        u += s * np.take(d1.latent[j], slot)
                    u *= strength
                    us.append(u)
                latents[name] = us
        for f, g in self.pairs:
            for uf, ug in zip(latents[f], latents[g], strict=True):
                pair += uf * ug
        return logit, pair


def _criteo_ints(rng: np.random.Generator, z: np.ndarray) -> list[pa.Array]:
    """I1..I13 as string columns: heavy-tailed, partly missing, I2 sometimes negative."""
    n = len(z)
    z32 = z.astype(np.float32)
    cols = []
    for name in CRITEO_INT_COLUMNS:
        p_missing, mu, sd, load = CRITEO_INT_SHAPE[name]
        g = rng.standard_normal(n, dtype=np.float32)
        g *= np.float32(math.sqrt(1 - load * load))
        g += np.float32(load) * z32
        np.clip(g, -6, 6, out=g)
        g *= np.float32(sd)
        g += np.float32(mu)
        v = np.exp(g).astype(np.int64)
        v -= 1
        np.maximum(v, 0, out=v)
        if name == "I2":
            neg = rng.random(n) < 0.05
            v[neg] = -rng.choice(3, size=int(neg.sum()), p=(0.8, 0.15, 0.05)) - 1
        valid = None if p_missing == 0 else rng.random(n) >= p_missing
        cols.append(_ints(v, valid))
    return cols


def _day_bounds(rows: int, days: int) -> np.ndarray:
    """First row of each day and the end: day d is rows [ceil(d*N/D), ceil((d+1)*N/D))."""
    return np.array([-((-d * rows) // days) for d in range(days + 1)], dtype=np.int64)


def _avazu_time(idx: np.ndarray, bounds: np.ndarray, rows: int, days: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(day, hour of day, YYMMDDHH) of global row indices ``idx``."""
    day = (idx * days) // rows
    start, length = bounds[day], bounds[day + 1] - bounds[day]
    hour = ((idx - start) * 24) // np.maximum(length, 1)
    date = START_DATE + day
    year = date.astype("M8[Y]").astype(np.int64) + 1970
    month_start = date.astype("M8[M]")
    month = month_start.astype(np.int64) % 12 + 1
    dom = (date - month_start.astype("M8[D]")).astype(np.int64) + 1
    return day, hour, (year % 100) * 1_000_000 + month * 10_000 + dom * 100 + hour


@dataclass
class _Chunk:
    arrays: list[pa.Array]
    probs: np.ndarray
    labels: np.ndarray
    ranks: dict[str, np.ndarray]
    missing: dict[str, np.ndarray]


def _make_chunk(model: _Model, start: int, n: int, rows: int, seed: int, bounds: np.ndarray) -> _Chunk:
    """Draw rows [start, start + n): features, true probabilities, labels and their raw columns."""
    rng = np.random.default_rng([seed, start, 0xC0FFEE])
    idx = np.arange(start, start + n, dtype=np.int64)
    ranks, missing = model.draw_ranks(rng, n)
    days = model.days
    if model.dataset == "criteo":
        day = (idx * days) // rows
        z = rng.standard_normal(n)
        extra = Z_SCALE * z
    else:
        day, hour, yymmddhh = _avazu_time(idx, bounds, rows, days)
        weekend = ((START_DATE + day).astype(np.int64) - 4) % 7 >= 5  # 1970-01-01 was a Thursday
        extra = 0.2 * np.sin(2 * np.pi * (hour - 8) / 24) + 0.1 * weekend
    logit = model.logits(ranks, missing, day) + (model.b0[day] + extra).astype(np.float32)
    p = _sigmoid(logit)
    y = rng.random(n) < p
    label = _ints(y.astype(np.int64))
    if model.dataset == "criteo":
        arrays = [label, *_criteo_ints(rng, z)]
        arrays += [model.fields[c].tokens(ranks[c], missing.get(c)) for c in CRITEO_CAT_COLUMNS]
    else:
        ids = splitmix64(idx.astype(_U64) ^ _U64(_salt("id", seed)))
        arrays = [pa.array(ids), label, _ints(yymmddhh)]
        arrays += [model.fields[c].tokens(ranks[c], None) for c in AVAZU_CAT_COLUMNS]
    return _Chunk(arrays, p.astype(np.float32), y, ranks, missing)


def _calibrate(model: _Model, seed: int, target: float) -> np.ndarray:
    """Set the gains of the field and pair terms, and return the global bias per day that gives
    click rate ``target`` on a pilot sample under that day's model.

    Avazu's hour-of-day term averages out and its weekend term is left on top (weekends click more).
    """
    rng = np.random.default_rng([seed, 0xB1A5])
    ranks, missing = model.draw_ranks(rng, PILOT_ROWS)
    fields, pairs = model.logit_parts(ranks, missing, np.zeros(PILOT_ROWS, dtype=np.int64))
    model.field_gain = FIELD_STD[model.dataset] / max(float(fields.std()), 1e-6)
    model.pair_gain = PAIR_STD[model.dataset] / max(float(pairs.std()), 1e-6)
    extra = Z_SCALE * rng.standard_normal(PILOT_ROWS) if model.dataset == "criteo" else 0.0
    b0 = np.zeros(model.days)
    for d in range(model.days):
        if d > 0 and (model.drift == 0 or model.days == 1):
            b0[d] = b0[0]
            continue
        base = model.logits(ranks, missing, np.full(PILOT_ROWS, d)) + extra
        lo, hi = -20.0, 20.0
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _sigmoid(base + mid).mean() < target else (lo, mid)
        b0[d] = (lo + hi) / 2
    return b0


def generate(
    dataset: str | DatasetSchema,
    rows: int,
    out_path: str | os.PathLike,
    days: int = 1,
    drift: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``rows`` synthetic rows of ``dataset``'s raw train format to ``out_path`` (a schema
    file's dataset: ``data.synthetic_schema.generate_for_schema``).

    Returns the metadata, also written to ``<out_path>.meta.json``: parameters, click rate and
    oracle AUC (overall and per day), cardinalities (the generator's, the real dataset's, and
    the distinct values present in the file) and the generator version.
    """
    schema = get_schema(dataset)
    if not schema.builtin:  # a dataset described by a schema file
        return generate_for_schema(schema, rows, out_path, days, drift, seed, progress)
    if rows < 1 or days < 1 or days > rows:
        raise ValueError(f"need rows >= days >= 1, got rows={rows}, days={days}")
    if not math.isfinite(drift) or drift < 0:
        raise ValueError(f"drift must be a finite number >= 0, got {drift}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    model = _Model(schema.name, rows, seed, days, drift)
    model.b0 = _calibrate(model, seed, TARGET_CTR[schema.name])
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    bounds = _day_bounds(rows, days)

    probs = np.empty(rows, dtype=np.float32)
    labels = np.empty(rows, dtype=bool)
    seen = {name: np.zeros(f.card, dtype=bool) for name, f in model.fields.items()}
    options = pacsv.WriteOptions(include_header=False, delimiter=schema.delimiter, quoting_style="none",
                                 batch_size=CHUNK_ROWS)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as sink:
            if schema.has_header:
                sink.write((schema.delimiter.join(schema.columns) + "\n").encode())
            writer: pacsv.CSVWriter | None = None
            with ThreadPoolExecutor(max_workers=1) as pool, \
                    tqdm(total=rows, desc=f"synthetic {schema.name}", unit="row", disable=not progress) as bar:
                pending: Future | None = None
                for start in range(0, rows, CHUNK_ROWS):
                    n = min(CHUNK_ROWS, rows - start)
                    chunk = _make_chunk(model, start, n, rows, seed, bounds)
                    probs[start:start + n], labels[start:start + n] = chunk.probs, chunk.labels
                    for name, r in chunk.ranks.items():
                        m = chunk.missing.get(name)
                        seen[name][r if m is None else r[~m]] = True
                    table = pa.Table.from_arrays(chunk.arrays, names=list(schema.columns))
                    if writer is None:
                        writer = pacsv.CSVWriter(sink, table.schema, write_options=options)
                    if pending is not None:
                        pending.result()
                    # The writer formats and writes this chunk while the next one is drawn.
                    pending = pool.submit(writer.write_table, table)
                    bar.update(n)
                if pending is not None:
                    pending.result()
                if writer is not None:
                    writer.close()
            sink.flush()
            os.fsync(sink.fileno())
        meta = _metadata(schema.name, rows, days, drift, seed, model, probs, labels, bounds, seen)
        atomic_write_json(Path(f"{out}.meta.json"), meta)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return meta


def _metadata(dataset: str, rows: int, days: int, drift: float, seed: int, model: _Model, probs: np.ndarray,
              labels: np.ndarray, bounds: np.ndarray, seen: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
        "generator_version": GENERATOR_VERSION,
        "dataset": dataset,
        "rows": rows,
        "days": days,
        "drift": drift,
        "seed": seed,
        **click_summary(labels, probs, bounds[: days + 1]),
        "day_rows": {str(d): [int(bounds[d]), int(bounds[d + 1])] for d in range(days)},
        "cardinalities": {name: f.card for name, f in model.fields.items()},
        "cardinalities_full": {name: f.full_card for name, f in model.fields.items()},
        "distinct_values": {name: int(v.sum()) for name, v in seen.items()},
        "zipf_exponents": {name: round(f.exponent, 4) for name, f in model.fields.items()},
        "bias_per_day": [round(float(b), 6) for b in model.b0],
        "logit_gains": {"fields": round(model.field_gain, 6), "pairs": round(model.pair_gain, 6)},
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data.synthetic",
        description="Write a synthetic Criteo or Avazu train file in the real raw format, with a\n"
        "planted click model; metadata (click rate, oracle AUC per day) goes to OUT.meta.json.",
        epilog=__doc__.split("\n\n", 2)[2] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, type=dataset_argument, metavar="criteo|avazu|SCHEMA",
                   help="raw format to write: criteo (tab-separated, no header), avazu (CSV with header) or the "
                   "path of a schema file (its format and columns; data.synthetic_schema)")
    p.add_argument("--rows", type=int, required=True, help="number of rows to write")
    p.add_argument("--out", required=True, help="output file (written atomically); metadata to OUT.meta.json")
    p.add_argument("--days", type=int, default=1, help="number of days, rows in time order (default 1)")
    p.add_argument("--drift", type=float, default=0.0,
                   help="click-model drift over the days: 0 none, 1 = the last day has a fully new model (default 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same arguments give the same bytes (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        meta = generate(args.dataset, args.rows, args.out, args.days, args.drift, args.seed, not args.no_progress)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    per_day = ", ".join(f"{v:.4f}" for v in meta["oracle_auc_per_day"].values())
    print(f"{args.out}: {meta['rows']:,} rows, click rate {meta['click_rate']:.4f}, "
          f"oracle AUC {meta['oracle_auc']:.4f}" + (f" (per day {per_day})" if args.days > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
