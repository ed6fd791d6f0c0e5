"""Synthetic Criteo / Avazu files in the real raw formats, with a planted click model.

    python -m data.synthetic --dataset criteo --rows 1000000 --out criteo.txt [--days D] [--drift X]

The file is read by the same reader as the real data (``data.prepare``). Metadata, among
it the oracle AUC (the AUC of the true click probabilities on the file, overall and per
day), goes to ``FILE.meta.json`` so tests and benchmarks know the ceiling.

Generative model
- Every categorical field f has a cardinality K_f (the real dataset's, capped at
  ``rows * CARD_CAP`` so small files still repeat values) and a Zipf law over value ranks,
  P(rank r) ~ (r + 1)^-s_f. A value's raw token is a hash of (field, rank): 8 hex chars for
  hashed fields, a small integer for integer-coded fields.
- Click logit = b0 + sum_f a_f(v_f) + sum_{(f,g) in P} <u_f(v_f), u_g(v_g)> + c * z.
  Effects a_f (scalar) and u_f (k = 4 vector) are pseudo-random normals derived from a
  hash of (seed, field, rank), so no table is stored; their scale shrinks with rank,
  (1 + r / 50)^-0.35: rare values carry weaker effects. P is a fixed set of field pairs.
  z ~ N(0, 1) is a per-row latent that also drives the Criteo integer columns, which
  are heavy-tailed (exp of a normal) and sometimes missing or negative, as in the real file.
- b0 is solved on a pilot sample so the click rate is ~22% (Criteo) / ~17% (Avazu).
- Drift: with D days and drift X, day d uses effects (1 - t) * e + t * e', t = X * d / (D - 1),
  where e' is a second, independent draw of every effect. For Avazu, t is further scaled
  per site_category (the domain) by a factor in [0.5, 1.5], so domains drift differently.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from data.artifacts import atomic_write_json
from data.schema import AVAZU_CAT_COLUMNS, CRITEO_CAT_COLUMNS, CRITEO_INT_COLUMNS, get_schema
from data.transforms import splitmix64

GENERATOR_VERSION = 1
CHUNK_ROWS = 200_000
CARD_CAP = 0.5
LATENT_DIM = 4

# Distinct values per field in the full public train files (Criteo Kaggle, Avazu).
CRITEO_CARDINALITY = dict(zip(CRITEO_CAT_COLUMNS, (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
), strict=True))
AVAZU_CARDINALITY = dict(zip(AVAZU_CAT_COLUMNS, (
    7, 7, 4737, 7745, 26, 8552, 559, 36, 2686408, 6729486, 8251, 5, 4, 2626, 8, 9, 435,
    4, 68, 172, 60,
), strict=True))
AVAZU_INT_CODED = {"C1", "banner_pos", "device_type", "device_conn_type", "C14", "C15", "C16",
                   "C17", "C18", "C19", "C20", "C21"}
# Criteo integer columns: (probability missing, log-scale mean, log-scale sd).
CRITEO_INT_SHAPE = {
    "I1": (0.45, 0.5, 1.2), "I2": (0.0, 2.0, 2.0), "I3": (0.21, 1.8, 1.5), "I4": (0.22, 1.5, 1.0),
    "I5": (0.03, 7.0, 2.5), "I6": (0.22, 3.5, 2.0), "I7": (0.04, 1.5, 1.5), "I8": (0.0, 2.3, 1.0),
    "I9": (0.04, 3.5, 1.5), "I10": (0.45, 0.3, 0.6), "I11": (0.04, 0.8, 1.0), "I12": (0.76, 0.2, 0.8),
    "I13": (0.22, 1.7, 1.2),
}
TARGET_CTR = {"criteo": 0.22, "avazu": 0.17}
PAIRS = {
    "criteo": (("C1", "C2"), ("C3", "C4"), ("C5", "C6"), ("C10", "C13"), ("C14", "C17"), ("C7", "C11"),
               ("C12", "C16"), ("C2", "C19")),
    "avazu": (("site_id", "app_id"), ("site_category", "device_model"), ("C14", "banner_pos"),
              ("app_category", "device_conn_type"), ("C17", "C21"), ("device_ip", "site_domain")),
}
FIELD_SCALE = {"criteo": 0.4, "avazu": 0.55}
PAIR_SCALE = 0.45


def _field_salt(seed: int, field: str, draw: int) -> np.uint64:
    h = np.uint64(seed * 1_000_003 + draw * 7919)
    for ch in field.encode():
        h = splitmix64(np.array([h ^ np.uint64(ch)], dtype=np.uint64))[0]
    return h


def _normals(ranks: np.ndarray, salt: np.uint64, k: int) -> np.ndarray:
    """Deterministic N(0, 1) draws [n, k] keyed by (salt, rank, j) (Box-Muller on hashes)."""
    base = ranks.astype(np.uint64)[:, None] * np.uint64(2 * k + 1) + np.arange(2 * k, dtype=np.uint64)
    u = (splitmix64(base ^ salt) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    u1, u2 = np.maximum(u[:, :k], 1e-12), u[:, k:]
    return np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)


class _Field:
    """One categorical field: Zipf sampler, raw tokens, planted effects."""

    def __init__(self, name: str, card: int, exponent: float, seed: int, int_coded: bool):
        self.name, self.card, self.int_coded = name, card, int_coded
        pmf = (np.arange(card, dtype=np.float64) + 1.0) ** -exponent
        self.cdf = np.cumsum(pmf / pmf.sum())
        self.salts = [_field_salt(seed, name, d) for d in range(2)]
        self.token_salt = _field_salt(seed, name, 99)
        self.int_base = int(splitmix64(np.array([self.token_salt]))[0] % np.uint64(2000))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self.cdf, rng.random(n)), self.card - 1)

    def effects(self, ranks: np.ndarray, draw: int) -> tuple[np.ndarray, np.ndarray]:
        """(scalar effect [n], latent [n, k]) for value ranks, scaled down for rare values."""
        z = _normals(ranks, self.salts[draw], LATENT_DIM + 1)
        strength = (1.0 + ranks / 50.0) ** -0.35
        return z[:, 0] * strength, z[:, 1:] * strength[:, None]

    def tokens(self, ranks: np.ndarray) -> pa.Array:
        if self.int_coded:
            return pa.array((self.int_base + ranks).astype(np.int64)).cast(pa.string())
        h = (splitmix64(ranks.astype(np.uint64) ^ self.token_salt) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        nibbles = (h[:, None] >> np.arange(28, -1, -4, dtype=np.uint32)) & np.uint32(15)
        ascii_ = np.where(nibbles < 10, nibbles + 48, nibbles + 87).astype(np.uint8)
        return pa.array(np.ascontiguousarray(ascii_).view("S8").ravel()).cast(pa.string())


class _Model:
    """The planted click model of one dataset (fields, pairs, calibration)."""

    def __init__(self, dataset: str, rows: int, seed: int):
        self.dataset = dataset
        cards = CRITEO_CARDINALITY if dataset == "criteo" else AVAZU_CARDINALITY
        rng = np.random.default_rng(seed)
        self.fields = {
            name: _Field(name, max(2, min(full, int(rows * CARD_CAP))), float(rng.uniform(1.05, 1.3)), seed,
                         dataset == "avazu" and name in AVAZU_INT_CODED)
            for name, full in cards.items()
        }
        self.pairs = PAIRS[dataset]
        self.domain_salt = _field_salt(seed, "domain", 7)
        self.b0 = 0.0

    def logits(self, ranks: dict[str, np.ndarray], z: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Click logits [n] for value ranks per field, row latent z [n] and drift t [n]."""
        n = len(z)
        nf = len(self.fields)
        logit = np.full(n, self.b0) + 0.4 * z
        latents = {}
        for name, f in self.fields.items():
            a0, u0 = f.effects(ranks[name], 0)
            if np.any(t > 0):
                a1, u1 = f.effects(ranks[name], 1)
                a0 = (1 - t) * a0 + t * a1
                u0 = (1 - t)[:, None] * u0 + t[:, None] * u1
            logit += FIELD_SCALE[self.dataset] * a0 / math.sqrt(nf) * 2.2
            latents[name] = u0
        for f, g in self.pairs:
            logit += PAIR_SCALE * (latents[f] * latents[g]).sum(axis=1)
        return logit

    def drift(self, day: np.ndarray, days: int, drift: float, ranks: dict[str, np.ndarray]) -> np.ndarray:
        t = np.zeros(len(day)) if days <= 1 or drift == 0 else drift * day / (days - 1)
        if self.dataset == "avazu" and drift:
            u = (splitmix64(ranks["site_category"].astype(np.uint64) ^ self.domain_salt) >> np.uint64(11))
            t = t * (0.5 + u.astype(np.float64) / (1 << 53))
        return t


def _criteo_ints(rng: np.random.Generator, z: np.ndarray) -> list[pa.Array]:
    cols = []
    for i, name in enumerate(CRITEO_INT_COLUMNS):
        p_missing, mu, sd = CRITEO_INT_SHAPE[name]
        signal = (0.5 if i % 2 else -0.4) * z
        v = np.floor(np.exp(mu + sd * (0.6 * rng.standard_normal(len(z)) + signal)) - 1).astype(np.int64)
        if name == "I2":
            v = np.where(rng.random(len(z)) < 0.05, -rng.integers(1, 4, len(z)), v)
        cols.append(pa.array(v, mask=rng.random(len(z)) < p_missing).cast(pa.string()))
    return cols


def _avazu_prefix(rows: np.ndarray, n_total: int, days: int, seed: int) -> tuple[np.ndarray, pa.Array, pa.Array]:
    """(day [n], id column, hour column YYMMDDHH) for global row indices ``rows``."""
    per_day = n_total / days
    day = np.minimum((rows / per_day).astype(np.int64), days - 1)
    hour = np.minimum(((rows - day * per_day) / per_day * 24).astype(np.int64), 23)
    dd = 21 + day  # 2014-10-21 onwards
    month = np.where(dd > 31, 11, 10)
    dd = np.where(dd > 31, dd - 31, dd)
    yymmddhh = 14_000_000 + month * 10_000 + dd * 100 + hour
    ids = splitmix64(rows.astype(np.uint64) ^ np.uint64(seed))
    return day, pa.array(ids).cast(pa.string()), pa.array(yymmddhh).cast(pa.string())


def generate(
    dataset: str,
    rows: int,
    out_path: str | os.PathLike,
    days: int = 1,
    drift: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write ``rows`` synthetic rows of ``dataset``'s raw train format to ``out_path``.

    Returns the metadata (also written to ``<out_path>.meta.json``): click rate, oracle AUC
    overall and per day, cardinalities, parameters.
    """
    schema = get_schema(dataset)
    if rows < 1 or days < 1 or days > rows:
        raise ValueError(f"need rows >= days >= 1, got rows={rows}, days={days}")
    if drift < 0:
        raise ValueError(f"drift must be >= 0, got {drift}")
    model = _Model(schema.name, rows, seed)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)

    # Calibrate the global bias on a day-0 pilot sample.
    pilot_rng = np.random.default_rng(seed + 1)
    n_pilot = 50_000
    pilot = {name: f.sample(pilot_rng, n_pilot) for name, f in model.fields.items()}
    base = model.logits(pilot, pilot_rng.standard_normal(n_pilot), np.zeros(n_pilot))
    lo, hi = -15.0, 15.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(1 / (1 + np.exp(-(base + mid)))) < TARGET_CTR[schema.name] else (lo, mid)
    model.b0 = (lo + hi) / 2

    rng = np.random.default_rng(seed)
    probs = np.empty(rows, dtype=np.float32)
    labels = np.empty(rows, dtype=np.int8)
    day_of_row = np.empty(rows, dtype=np.int16)
    columns = list(schema.columns)
    write_schema = pa.schema([(c, pa.string()) for c in columns])
    options = pacsv.WriteOptions(include_header=False, delimiter=schema.delimiter, quoting_style="none")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as sink, pacsv.CSVWriter(sink, write_schema, write_options=options) as writer, \
                tqdm(total=rows, desc=f"synthetic {schema.name}", unit="row", disable=not progress) as bar:
            if schema.has_header:  # pyarrow would quote the names
                sink.write((schema.delimiter.join(columns) + "\n").encode())
            for start in range(0, rows, CHUNK_ROWS):
                idx = np.arange(start, min(rows, start + CHUNK_ROWS), dtype=np.int64)
                n = len(idx)
                ranks = {name: f.sample(rng, n) for name, f in model.fields.items()}
                z = rng.standard_normal(n)
                if schema.name == "avazu":
                    day, id_col, hour_col = _avazu_prefix(idx, rows, days, seed)
                else:
                    day = np.minimum((idx * days) // rows, days - 1)
                logit = model.logits(ranks, z, model.drift(day, days, drift, ranks))
                if schema.name == "avazu":  # hour of day and weekend matter a little
                    hod = (idx - day * rows / days) / (rows / days) * 24
                    logit += 0.15 * np.sin(hod / 24 * 2 * np.pi)
                p = 1 / (1 + np.exp(-logit))
                y = (rng.random(n) < p).astype(np.int8)
                probs[idx], labels[idx], day_of_row[idx] = p, y, day
                label_col = pa.array(y.astype(np.int64)).cast(pa.string())
                if schema.name == "criteo":
                    arrays = [label_col, *_criteo_ints(rng, z),
                              *[model.fields[c].tokens(ranks[c]) for c in CRITEO_CAT_COLUMNS]]
                    # Real Criteo has empty categorical values in some fields.
                    for j, c in enumerate(CRITEO_CAT_COLUMNS):
                        if c in ("C19", "C20", "C22", "C25", "C26"):
                            arrays[14 + j] = pa.array(arrays[14 + j].to_numpy(zero_copy_only=False),
                                                      mask=(ranks[c] % 7 == 3), type=pa.string())
                else:
                    arrays = [id_col, label_col, hour_col, *[model.fields[c].tokens(ranks[c]) for c in AVAZU_CAT_COLUMNS]]
                writer.write_table(pa.Table.from_arrays(arrays, schema=write_schema))
                bar.update(n)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

    per_day = {}
    for d in range(days):
        m = day_of_row == d
        if len(np.unique(labels[m])) == 2:
            per_day[str(d)] = float(roc_auc_score(labels[m], probs[m]))
    meta = {
        "generator_version": GENERATOR_VERSION,
        "dataset": schema.name,
        "rows": rows,
        "days": days,
        "drift": drift,
        "seed": seed,
        "click_rate": float(labels.mean()),
        "oracle_auc": float(roc_auc_score(labels, probs)) if len(np.unique(labels)) == 2 else float("nan"),
        "oracle_auc_per_day": per_day,
        "cardinalities": {name: f.card for name, f in model.fields.items()},
        "bias": model.b0,
    }
    atomic_write_json(Path(f"{out}.meta.json"), meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="criteo or avazu")
    p.add_argument("--rows", type=int, required=True, help="number of rows")
    p.add_argument("--out", required=True, help="output raw file")
    p.add_argument("--days", type=int, default=1, help="days in time order (default 1)")
    p.add_argument("--drift", type=float, default=0.0, help="click-model drift over the days (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        meta = generate(args.dataset, args.rows, args.out, args.days, args.drift, args.seed, not args.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {meta['rows']:,} rows, click rate {meta['click_rate']:.4f}, oracle AUC {meta['oracle_auc']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
