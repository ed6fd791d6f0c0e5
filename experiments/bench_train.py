"""Training-step cost of MPE against fp32, measured in one run on the same batches and tower.

    python -m experiments.bench_train [--rows-per-field 20000] [--batch-size 4096] [--steps 20]

Times one optimiser step (forward, backward, Adam) of: the fp32 torchrec model, the MPE
search in ``expected`` mode (the reference: all |B| quantizations mixed), the MPE search in
``sample`` mode (one quantization per row), and the MPE retrain (fixed bits). Prints the
ratio of each to fp32 and writes ``OUT/bench_train.json``. Not a test: figures depend on
the machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ctr.model import CTRModel, FP32Embedding
from data.artifacts import atomic_write_json
from data.batches import to_kjt
from data.schema import get_schema
from genlora_rec.towers import build_tower
from mpe.embedding import MixedPrecisionEmbedding
from mpe.grouping import frequency_groups, group_penalty_weights


def time_steps(model: CTRModel, optimizers: list[torch.optim.Optimizer], batches, warmup: int = 3) -> float:
    """Median seconds of one training step over ``batches`` (after ``warmup`` steps)."""
    times = []
    for i, (kjt, labels) in enumerate(batches):
        t0 = time.perf_counter()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(kjt), labels)
        if (extra := model.extra_loss()) is not None:
            loss = loss + extra
        loss.backward()
        for opt in optimizers:
            opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="criteo")
    p.add_argument("--rows-per-field", type=int, default=20000, help="table rows per field")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--tower", default="dnn")
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="tower hidden sizes (default per tower)")
    p.add_argument("--out", default="runs/bench_train")
    args = p.parse_args(argv)
    schema = get_schema(args.dataset)
    fields, card = list(schema.fields), [args.rows_per_field] * schema.num_fields
    rng = np.random.default_rng(0)
    zipf = np.minimum(rng.zipf(1.2, size=(args.steps + 3, args.batch_size, len(fields))) - 1, args.rows_per_field - 1)
    batches = [(to_kjt(z.astype(np.int32), fields), torch.from_numpy((rng.random(args.batch_size) < 0.2).astype(np.float32)))
               for z in zipf]
    freq = np.concatenate([np.bincount(zipf[..., f].ravel(), minlength=args.rows_per_field) for f in range(len(fields))])
    group_of_row = frequency_groups(freq, 128)
    weights = group_penalty_weights(freq, group_of_row)

    def model_of(embedding) -> CTRModel:
        torch.manual_seed(0)
        return CTRModel(embedding, build_tower(args.tower, len(fields), args.dim, tuple(args.hidden) if args.hidden else None))

    results = {}
    torch.manual_seed(0)
    fp32 = model_of(FP32Embedding(fields, card, args.dim))
    results["fp32"] = time_steps(fp32, [torch.optim.Adam(fp32.parameters(), lr=1e-3)], batches)
    for name in ("search_expected", "search_sample", "retrain"):
        mode = "sample" if name == "search_sample" else "expected"
        emb = MixedPrecisionEmbedding(fields, card, args.dim, group_of_row, weights, mode=mode)
        if name == "retrain":
            emb.fix_bits(np.full(emb.num_groups, 4))
        model = model_of(emb)
        quant = {id(q) for q in emb.quant_parameters()}
        opts = [torch.optim.Adam([q for q in emb.quant_parameters() if q.requires_grad], lr=1e-3),
                torch.optim.Adam([q for q in model.parameters() if id(q) not in quant], lr=1e-3)]
        results[name] = time_steps(model, opts, batches)
    print(f"one training step, batch {args.batch_size}, {len(fields)} fields x {args.rows_per_field:,} rows, "
          f"tower {args.tower} {args.hidden or 'default'}, {torch.get_num_threads()} threads")
    for name, sec in results.items():
        print(f"  {name:<16} {sec * 1e3:8.1f} ms   {sec / results['fp32']:.2f}x fp32")
    out = Path(args.out)
    atomic_write_json(out / "bench_train.json", {
        "seconds_per_step": results,
        "ratio_to_fp32": {k: v / results["fp32"] for k, v in results.items()},
        "config": vars(args), "threads": torch.get_num_threads(),
    })
    print(f"-> {out / 'bench_train.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
