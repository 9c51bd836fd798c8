"""Packed sequences on the GPU: does a packed batch cost about the sum of its prompts?

For each packing (prompt lengths summing to one sequence), bf16 `(1, n, S, d)` self-attention:
- `packed`: one call over all S tokens with `q_segment_ids = kv_segment_ids` (prompt index);
- `parts`: each prompt alone, `(1, n, len_i, d)`, their times summed (what the packed call should
  approach: the flash kernels skip tiles whose segment-id ranges cannot meet);
- `whole`: one call over S tokens without ids (what the packing would cost with no skipping).
Forward and forward+backward, per backend (`pallas` = the Triton kernels, which skip tiles, forced
for all three rows with `JAX_ATTN_PALLAS_KERNEL=triton` so that one kernel is compared with
itself; `cudnn` and `xla`, which take the ids as a full mask). Each timing sample is 10 calls
dispatched back to back (`median_ms(calls=10)`), as a model step issues them. First a check: the packed output equals
the parts' outputs, prompt by prompt (bf16 tolerance). A table is printed last; `packed_gpu.json`
and `packed_gpu.md` go to `--out` (default `$OUT`).

    PYTHONPATH=. python benchmarks/packed_gpu.py --out $OUT [--backends pallas,cudnn,xla]
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import pathlib
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
import jax_attn  # noqa: E402
from jax_attn import reference  # noqa: E402
from jax_attn.arrays import random_normal  # noqa: E402
from jax_attn.bench.timing import median_ms as _median_ms  # noqa: E402
from jax_attn.routing import ENV_PALLAS_KERNEL  # noqa: E402

log = logging.getLogger("packed_gpu")

# (name, heads, head dim, prompt lengths): LTX-Video-like packing of uneven prompts, and equal ones.
PACKINGS = [
    ("4 x 4096, d=128", 24, 128, [4096] * 4),
    ("uneven 16k, d=128", 24, 128, [1024, 2048, 3072, 4096, 6144]),
    ("8 x 1024, d=64", 10, 64, [1024] * 8),
]


def median_ms(fn, *args):
    return _median_ms(fn, *args, calls=10)


def _ids(lengths):
    return jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None], jnp.int32)


def _fns(backend, train):
    def fwd(q, k, v, ids=None):
        kw = {} if ids is None else dict(q_segment_ids=ids, kv_segment_ids=ids)
        return jax_attn.attention_forward(q, k, v, backend=backend, **kw)

    if not train:
        return jax.jit(fwd)

    def loss(q, k, v, ids=None):
        return jnp.sum(fwd(q, k, v, ids).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def check(backend, n, d, lengths):
    """max relative error of the packed output against each prompt run alone (prompt by prompt)."""
    total = sum(lengths)
    ks = jax.random.split(jax.random.key(1), 3)
    q, k, v = (random_normal(kk, (1, n, total, d), jnp.bfloat16) for kk in ks)
    packed = np.asarray(_fns(backend, False)(q, k, v, _ids(lengths)), np.float64)
    worst, start = 0.0, 0
    for length in lengths:
        part = [x[:, :, start:start + length] for x in (q, k, v)]
        alone = np.asarray(_fns(backend, False)(*part), np.float64)
        worst = max(worst, reference.relative_error(packed[:, :, start:start + length], alone))
        start += length
    return worst


def measure(backend, n, d, lengths, train):
    total = sum(lengths)
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (random_normal(kk, (1, n, total, d), jnp.bfloat16) for kk in ks)
    f = _fns(backend, train)
    row = {"packed": median_ms(f, q, k, v, _ids(lengths)), "whole": median_ms(f, q, k, v)}
    parts, start = 0.0, 0
    for length in lengths:
        parts += median_ms(f, *(x[:, :, start:start + length] for x in (q, k, v)))
        start += length
    row["parts"] = parts
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="pallas,cudnn,xla")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--budget", type=float, default=150.0, help="start no measurement after this many s")
    ap.add_argument("--pallas-kernel", default="triton", help="JAX_ATTN_PALLAS_KERNEL for every row")
    args = ap.parse_args(argv)
    os.environ[ENV_PALLAS_KERNEL] = args.pallas_kernel
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "rows": []}
    for backend in args.backends.split(","):
        for name, n, d, lengths in PACKINGS:
            row = {"backend": backend, "packing": name, "tokens": sum(lengths)}
            try:
                row["max_rel_err_vs_parts"] = check(backend, n, d, lengths)
                for step in ("fwd", "fwd+bwd"):
                    if time.perf_counter() - t0 > args.budget:
                        row[step] = "skipped (budget)"
                        continue
                    row[step] = measure(backend, n, d, lengths, step == "fwd+bwd")
                    log.info("%s %s %s: %s", backend, name, step, row[step])
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"
                log.error("%s %s: %s", backend, name, traceback.format_exc())
            results["rows"].append(row)
    lines = [f"# Packed sequences, {results['date']}", "",
             f"Device: {results['device']}; jax {results['jax']}; bf16, b=1, self-attention.", "",
             "| backend | packing | check (rel err vs parts) | step | packed ms | parts ms | whole ms "
             "| packed / parts | packed / whole |", "|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        for step in ("fwd", "fwd+bwd"):
            t = row.get(step)
            err = row.get("max_rel_err_vs_parts")
            err = f"{err:.1e}" if isinstance(err, float) else row.get("error", "—")
            if not isinstance(t, dict):
                lines.append(f"| {row['backend']} | {row['packing']} | {err} | {step} | {t or '—'} | | | | |")
                continue
            lines.append(f"| {row['backend']} | {row['packing']} | {err} | {step} | {t['packed']:.3f} | "
                         f"{t['parts']:.3f} | {t['whole']:.3f} | {t['packed'] / t['parts']:.2f} | "
                         f"{t['packed'] / t['whole']:.2f} |")
    table = "\n".join(lines)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "packed_gpu.json").write_text(json.dumps(results, indent=1))
        (out / "packed_gpu.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
