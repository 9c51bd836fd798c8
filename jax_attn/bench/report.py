"""What a run reports: ratios, the table, the `auto` summary, CSV and the PNG plot.

Everything here reads a results document (`{"meta": ..., "results": [...]}`) and nothing
measures, so a saved `--json` can be reported again. `_add_ratios` adds each row's time over
the fastest row (and the fastest JAX backend) of its shape and mode; `auto_summary` holds `auto`
to the fastest peer, counting the very same compiled program as equal.

A peer is every other row the run timed and checked, whatever produced it: each JAX backend
(also those `auto` may not pick, like `fa4`), each torch kernel (SDPA's, and any other torch row
a runner adds), so the 3% target means "as fast as anything the user could call instead".
Lossy backends (`is_lossy`: 8-bit `sage`) are no peer: their speed comes from precision `auto`
must keep.
"""
from __future__ import annotations

import csv

import numpy as np

from .shapes import MiB
from .torch_runner import TORCH_KERNELS


def is_lossy(impl: str) -> bool:
    """A JAX backend that trades precision for speed (declared `lossy`); never a peer of `auto`."""
    from ..backends import BACKENDS
    backend = BACKENDS.get(impl)
    return bool(backend.lossy) if backend is not None else False


def is_peer(row: dict) -> bool:
    """A row `auto` is held to: timed and checked, not `auto` itself, not lossy (a runner marks a
    lossy row of another framework with `"lossy": True`)."""
    return (row.get("status") == "ok" and not row["impl"].startswith("auto") and not row.get("lossy")
            and not (row["framework"] == "jax" and is_lossy(row["impl"])))


def _add_ratios(results: list[dict]) -> None:
    """`ratio`: time over the fastest peer of the same shape and mode (any framework; `auto` and
    lossy backends excluded); `ratio_jax`: over the fastest such JAX backend (what the routing
    orders by)."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["shape"], r["dtype"], r["mode"]), []).append(r)
    for rows in groups.values():
        timed = [r for r in rows if is_peer(r)]
        best = min((r["ms"] for r in timed), default=None)
        best_jax = min((r["ms"] for r in timed if r["framework"] == "jax"), default=None)
        for r in rows:
            if r.get("status") == "ok" and best:
                r["ratio"] = r["ms"] / best
                if best_jax:
                    r["ratio_jax"] = r["ms"] / best_jax


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def format_table(doc: dict) -> str:
    """The full table: one line per shape and implementation, forward and forward+backward."""
    by = {}
    for r in doc["results"]:
        by.setdefault((r["shape"], r["dtype"], r["impl"]), {})[r["mode"]] = r
    lines = []
    header = ("shape (b x n x sq x skv x d)", "dtype", "impl", "fwd ms", "TF/s", "x best", "f+b ms", "TF/s",
              "x best", "temp MiB fwd/f+b", "note")
    table = []
    for (shape, dtype, impl), modes in by.items():
        f, b = modes.get("fwd", {}), modes.get("fwd+bwd", {})
        temp = "/".join(_fmt(m.get("temp_bytes") and m["temp_bytes"] / MiB, ".0f") if "temp_bytes" in m else "-"
                        for m in (f, b) if m)
        notes = []
        for m in (f, b):
            if m and m.get("status") not in ("ok", "memory"):
                notes.append(f"{m['mode']}: {m['status']}: {m.get('note', '')}")
        if f.get("auto_choice"):
            notes.insert(0, f"-> {f['auto_choice']}")
        if (f or b).get("kernel"):
            notes.insert(0, f"kernel: {(f or b)['kernel']}")
        note = "; ".join(notes)
        if notes and len(modes) == 2 and f.get("note") and f.get("note") == b.get("note"):
            note = (f"-> {f['auto_choice']}; " if f.get("auto_choice") else "") + f"{f['status']}: {f['note']}"
        table.append((shape, dtype, impl, _fmt(f.get("ms"), ".3f"), _fmt(f.get("tflops"), ".1f"),
                      _fmt(f.get("ratio"), ".2f"), _fmt(b.get("ms"), ".3f"), _fmt(b.get("tflops"), ".1f"),
                      _fmt(b.get("ratio"), ".2f"), temp, note[:120]))
    widths = [max(len(h), *(len(str(row[i])) for row in table)) if table else len(h)
              for i, h in enumerate(header)]
    widths[-1] = len(header[-1])
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    lines.append(fmt.format(*header))
    lines.append(fmt.format(*("-" * w for w in widths)))
    prev = None
    for row in table:
        if prev is not None and row[0] != prev:
            lines.append("")
        prev = row[0]
        lines.append(fmt.format(*row).rstrip())
    return "\n".join(lines)


def auto_summary(doc: dict, target: float = 1.03) -> tuple[str, bool]:
    """Per shape and mode: the fastest peer (`is_peer`: every JAX backend and torch kernel timed),
    and how `auto` compares; `auto` misses when it is more than `target` times slower, unless it
    compiled to the very program of that peer (then the difference is noise)."""
    by = {}
    for r in doc["results"]:
        by.setdefault((r["shape"], r["dtype"]), []).append(r)
    lines, ok_all, any_auto = [], True, False
    for (shape, dtype), rows in by.items():
        parts = [f"{shape} {dtype}:"]
        for mode in doc["meta"]["modes"]:
            peers = [r for r in rows if r["mode"] == mode and is_peer(r)]
            auto = next((r for r in rows if r["mode"] == mode and r["impl"] == "auto"), None)
            if not peers:
                parts.append(f"{mode}: nothing timed")
                continue
            best = min(peers, key=lambda r: r["ms"])
            txt = f"{mode}: best {best['impl']} {best['ms']:.3f} ms"
            jax_peers = [r for r in peers if r["framework"] == "jax"]
            best_jax = min(jax_peers, key=lambda r: r["ms"]) if jax_peers else None
            if best_jax is not None and best_jax is not best:
                txt += f" (best JAX: {best_jax['impl']} {best_jax['ms']:.3f} ms)"
            if auto is not None:
                any_auto = True
                if auto.get("status") == "ok":
                    ratio = auto["ms"] / best["ms"]
                    txt += f", auto ({auto.get('auto_choice')}) x{ratio:.3f}"
                    if auto.get("program") and auto["program"] == best.get("program"):
                        txt += " (same compiled program as the best: equal)"
                    elif ratio > target:
                        ok_all = False
                        txt += " MISS"
                else:
                    ok_all = False
                    txt += f", auto {auto.get('status')}"
            parts.append(txt)
        lines.append("  ".join(parts))
    if any_auto:
        lines.append(f"auto within {100 * (target - 1):.0f}% of the fastest peer (every JAX backend and torch "
                     f"kernel timed; lossy ones excluded) on every shape and mode: {'yes' if ok_all else 'NO'}")
    return "\n".join(lines), ok_all


CSV_FIELDS = ("shape", "b", "n", "sq", "skv", "d", "dtype", "impl", "framework", "auto_choice", "mode", "status",
              "method", "ms", "tflops", "ratio", "ratio_jax", "flops", "temp_bytes", "peak_bytes", "err", "tol", "runs",
              "calls_per_sample", "spread", "timing", "compile_s", "program", "note")


def write_csv(doc: dict, path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in doc["results"]:
            w.writerow(r)


def write_plot(doc: dict, path) -> None:
    """Bars of TFLOP/s per shape (groups) and implementation (colors), one panel per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = doc["meta"]["modes"]
    shapes = list(dict.fromkeys(r["shape"] + (f" {r['dtype']}" if r["dtype"] != "bfloat16" else "")
                                for r in doc["results"]))
    impls = [i for i in doc["meta"]["impls"]  # `auto-before` is a diagnostic: table and JSON only
             if i != "auto-before" and any(r["impl"] == i and r.get("tflops") for r in doc["results"])]
    fig, axes = plt.subplots(len(modes), 1, squeeze=False,
                             figsize=(max(9, 0.25 * len(shapes) * max(1, len(impls)) + 2), 4.2 * len(modes)))
    width = 0.8 / max(1, len(impls))
    cmap = plt.get_cmap("tab10")
    for ax, mode in zip(axes[:, 0], modes):
        for j, impl in enumerate(impls):
            vals = []
            for s in shapes:
                r = next((r for r in doc["results"] if r["mode"] == mode and r["impl"] == impl and
                          r["shape"] + (f" {r['dtype']}" if r["dtype"] != "bfloat16" else "") == s), None)
                vals.append(r.get("tflops") or 0.0 if r else 0.0)
            xs = np.arange(len(shapes)) + (j - (len(impls) - 1) / 2) * width
            ax.bar(xs, vals, width, label=impl, color="black" if impl == "auto" else cmap(j % 10),
                   hatch="//" if impl in TORCH_KERNELS else None, edgecolor="white", linewidth=0.3)
        ax.set_xticks(np.arange(len(shapes)), shapes, fontsize=8)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{mode}  (b x n x sq x skv x d; missing bar = cannot serve / skipped)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    meta = doc["meta"]
    fig.suptitle(f"jax-attn bench: {meta.get('gpu') or meta.get('device')}, jax {meta.get('jax')}, "
                 f"torch {meta.get('torch', '-')}, {meta.get('date', '')[:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
