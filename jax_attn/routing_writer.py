"""The routing-table writer: bench results -> the routing data that `jax_attn.autoselect` reads.

Beside its reader: it keys buckets with `autoselect.bucket_key`, names the two preference lists
with its `TABLE_KEYS`, reads orders back with its `orders`, writes to its `TABLE_PATH` (by
default `jax_attn/data/routing.json`, through `jax_attn.data.write`, under the device kind the
run measured) and clears its `table` cache, so the two sides cannot drift apart.
`routing_from_results` orders backends per bucket and mode from a results document,
`predicted_auto` says what `auto` would pick with a table, `merge_tables` lays a run's buckets
over an earlier table of the same device (`jax-attn tune`), `write_routing` writes it
(`python -m jax_attn bench --write-routing`, `--update-routing`; re-exported by
`jax_attn.bench`).
"""
from __future__ import annotations

import json
import logging
import math
import pathlib

from . import data

log = logging.getLogger(__name__)

# The routing mode each measured mode orders: training reads forward+backward, inference (calls
# nothing differentiates) reads forward.
ROUTING_MODES = {"fwd+bwd": "train", "fwd": "forward"}


def routing_from_results(doc: dict, tie: float = 0.01) -> dict:
    """Preferences per bucket and mode from a bench results document.

    For every (shape, mode) a JAX backend served correctly, its time over the fastest JAX backend
    of that shape and mode. Within a bucket (device, dtype, head-dim bucket, sequence bucket) and
    mode the backends are ordered by their worst such ratio over the bucket's shapes (the 3%
    target is per shape and mode), then by the geometric mean; worst ratios within `tie` of each
    other count as equal. Backends that failed the correctness gate in a bucket are left out of
    its preferences, and so are lossy ones (`sage`: `auto` must never pick them, however fast).
    Where lossy backends were measured forward and passed the gate (the same float64 tolerance
    as every row) on every shape of a bucket, those faster than the fastest exact backend on
    each of its shapes (worst ratio below 1, no tie allowance) lead `preferences_forward_lossy`,
    fastest first, followed by the exact forward order: what the opt-in `auto+8bit` reads
    (their scores under `"fwd_lossy"`). A lossy backend that failed, errored or went unmeasured
    on any shape of the bucket is not ranked there.
    A bucket and mode where the time budget left a row unmeasured gets no order (a partial
    comparison could put a slow backend first); its scores say `"incomplete"`, with a warning. `preferences` (training) orders by forward+backward, `preferences_forward`
    (inference) by forward; a bucket measured forward only gets its training order from forward.
    """
    from . import autoselect
    from .bench.report import _add_ratios, is_lossy  # late: jax_attn.bench imports this module
    device = doc["meta"]["device_key"]
    _add_ratios(doc["results"])
    from .bench.suite import BUDGET_SKIP
    entries: dict = {}
    lossy: dict = {}  # (key, "fwd") -> lossy impl -> ratios over the fastest exact JAX backend
    lossy_out: dict = {}  # key -> lossy impls that failed, errored or went unmeasured there
    failed: dict = {}
    incomplete: dict = {}
    for r in doc["results"]:
        if r["framework"] != "jax" or r["impl"].startswith("auto"):
            continue
        key = autoselect.bucket_key(device, r["dtype"], r["d"], r["skv"])
        if is_lossy(r["impl"]):
            if r["mode"] != "fwd":  # forward-only kernels: only their forward can route
                continue
            if r.get("status") == "ok" and "ratio_jax" in r:
                lossy.setdefault((key, r["mode"]), {}).setdefault(r["impl"], []).append(r["ratio_jax"])
            else:
                lossy_out.setdefault(key, set()).add(r["impl"])
            continue
        if r.get("reason") == BUDGET_SKIP:
            incomplete.setdefault(key, set()).add(r["mode"])
        elif r.get("status") in ("FAIL", "error"):
            failed.setdefault(key, set()).add(r["impl"])
        elif r.get("status") == "ok" and "ratio_jax" in r and r["mode"] in ROUTING_MODES:
            entries.setdefault((key, r["mode"]), {}).setdefault(r["impl"], []).append(r["ratio_jax"])
    prefs = {name: {} for name in autoselect.TABLE_KEYS.values()}
    scores: dict = {}
    for key, modes in sorted(incomplete.items()):
        log.warning("routing: %s %s left out: the time budget ended before every backend was timed",
                    key, "/".join(sorted(modes)))
    def ranked(key, per):  # impl -> ratios: (order, stats)
        stats = {n: {"worst": max(v), "geomean": math.exp(sum(map(math.log, v)) / len(v)), "entries": len(v)}
                 for n, v in per.items() if n not in failed.get(key, ())}
        # Worst ratios quantized to steps of `tie`: near-equal ones are ordered by the geomean.
        order = sorted(stats, key=lambda n: (round(math.log(stats[n]["worst"]) / math.log1p(tie)),
                                             stats[n]["geomean"]))
        return order, {n: {k: round(v, 4) if isinstance(v, float) else v for k, v in stats[n].items()}
                       for n in order}

    for (key, mode), per in sorted(entries.items()):
        if mode in incomplete.get(key, ()):
            continue
        order, stats = ranked(key, per)
        prefs[autoselect.TABLE_KEYS[ROUTING_MODES[mode]]][key] = order
        scores.setdefault(key, {})[mode] = stats
        measured = {n: v for n, v in lossy.get((key, mode), {}).items()
                    if n not in lossy_out.get(key, ()) and len(v) == max(map(len, per.values()))}
        if measured:  # the bucket's shapes, each with every lossy backend that stays ranked
            _, lstats = ranked(key, measured)
            scores[key]["fwd_lossy"] = lstats
            ahead = sorted((n for n in lstats if lstats[n]["worst"] < 1.0),
                           key=lambda n: (lstats[n]["worst"], lstats[n]["geomean"]))
            if ahead:
                prefs[autoselect.TABLE_KEYS["lossy"]][key] = ahead + order
    for key, names in failed.items():
        if key in scores:
            scores[key]["failed"] = sorted(names)
    for key, modes in incomplete.items():
        scores.setdefault(key, {})["incomplete"] = sorted(modes)
    if not prefs[autoselect.TABLE_KEYS["lossy"]]:  # nothing lossy measured: no such key
        del prefs[autoselect.TABLE_KEYS["lossy"]]
    train, forward = (prefs[autoselect.TABLE_KEYS[m]] for m in ("train", "forward"))
    for key, order in forward.items():  # measured forward only
        train.setdefault(key, order)
    meta = doc["meta"]
    return {"comment": "Written by `python -m jax_attn bench --write-routing/--update-routing`; "
                       "autoselect.py reads `preferences` (training: forward+backward) and "
                       "`preferences_forward` (inference), bucket -> backends, fastest first.",
            "source": {k: meta.get(k) for k in ("date", "device", "gpu", "driver", "device_key", "jax", "jaxlib",
                                                "jax_cudnn", "torch", "command") if meta.get(k)},
            **{name: dict(sorted(v.items())) for name, v in prefs.items()}, "scores": scores}


def _keep_unmeasured(old: list, new: list, unmeasurable: set) -> list:
    """`new` (a run's order for one bucket and mode) with the backends `old` ranked there that
    the run could not measure (`unmeasurable`: unavailable on its machine) put back, each just
    ahead of the best-placed backend (in `new`) of those it was ahead of in `old`, else last: a
    run without FlashAttention-4 cannot time `fa4`, and must not drop it from where it won.
    In a lossy order this keeps the exact tail only: the lossy backends at its head were
    measured against the exact backends the run could time, not against the ones put back."""
    out = list(new)
    for i, name in enumerate(old):
        if name in out or name not in unmeasurable:
            continue
        beaten = [out.index(n) for n in old[i + 1:] if n in out]
        out.insert(min(beaten) if beaten else len(out), name)
    return out


def merge_tables(base: dict, new: dict) -> dict:
    """`new` (from `routing_from_results`) over `base` (an earlier table of the same device),
    bucket by bucket and mode by mode: an order `new` measured replaces `base`'s, the rest of
    `base` stays, so a run on a few shapes does not drop the buckets it did not measure (a
    device's table is read as a whole). A bucket `new` measured forward only keeps `base`'s
    training order; only where `base` has none does it take the forward order (as
    `routing_from_results` does). A bucket `new` measured forward takes `new`'s lossy order
    (`auto+8bit`), or none where `new` has none: an earlier one would rank lossy backends
    against exact timings this run replaced. In every order `new` replaces, the backends
    `base`'s order has and `new`'s run could not measure (its source's `not_written` says
    "unavailable") stay (`_keep_unmeasured`; a lossy order keeps them as `base`'s forward order
    placed them); backends a run left out by choice go. The source is `new`'s, with
    `inherited` naming the buckets kept from `base` and where they were measured, and
    `kept_unmeasured` the backends kept that way."""
    from . import autoselect
    train, forward = autoselect.TABLE_KEYS["train"], autoselect.TABLE_KEYS["forward"]
    lossy = autoselect.TABLE_KEYS["lossy"]
    prefs = {train: dict(base.get(train, {})), forward: dict(base.get(forward, {}))}
    remeasured = {k for k, m in new.get("scores", {}).items() if "fwd" in m}
    lossy_prefs = {k: v for k, v in base.get(lossy, {}).items() if k not in remeasured}
    scores = {k: dict(v) for k, v in base.get("scores", {}).items()}
    kept: dict = {}
    unmeasurable = {n for n, why in new.get("source", {}).get("not_written", {}).items()
                    if str(why).startswith("unavailable")}

    def refreshed(name, key, order, old):  # order with old's unmeasurable backends put back
        out = _keep_unmeasured(old, order, unmeasurable)
        if len(out) > len(order):
            kept.setdefault(name, {})[key] = [n for n in out if n not in order]
        return out

    def old_forward(key):  # base's forward order of a bucket, else its training one
        return base.get(forward, {}).get(key) or base.get(train, {}).get(key, [])

    for key, order in new.get(lossy, {}).items():
        lossy_prefs[key] = refreshed(lossy, key, order, old_forward(key))
    for key, measured in new.get("scores", {}).items():
        if "fwd" in measured and key in new.get(forward, {}):
            prefs[forward][key] = refreshed(forward, key, new[forward][key], old_forward(key))
        if key in new.get(train, {}) and ("fwd+bwd" in measured or key not in prefs[train]):
            prefs[train][key] = refreshed(train, key, new[train][key],
                                          base.get(train, {}).get(key) or old_forward(key))
        # Base's timings of a mode this run did not measure stay; its notes (failed, incomplete)
        # were about its run and go.
        scores[key] = {**{m: v for m, v in scores.get(key, {}).items()
                          if m in ROUTING_MODES or m == "fwd_lossy"}, **measured}
    out = {k: v for k, v in new.items() if k not in (train, forward, lossy, "scores")}
    if lossy_prefs:
        out[lossy] = dict(sorted(lossy_prefs.items()))
    inherited = sorted((set(prefs[train]) | set(prefs[forward])) - set(new.get(train, {}))
                       - set(new.get(forward, {})))
    origin = base.get("source", {})
    if inherited:
        out["source"] = {**out.get("source", {}), "inherited": {
            "buckets": inherited, **{k: origin[k] for k in ("device", "date", "command") if origin.get(k)}}}
    if kept:
        out["source"] = {**out.get("source", {}), "kept_unmeasured": {
            name: dict(sorted(v.items())) for name, v in sorted(kept.items())}}
    return {**out, train: dict(sorted(prefs[train].items())), forward: dict(sorted(prefs[forward].items())),
            "scores": dict(sorted(scores.items()))}


def predicted_auto(doc: dict, table: dict) -> str:
    """What `auto` would get with routing `table`, per shape and mode, from the rows of `doc`."""
    from . import autoselect
    device = doc["meta"]["device_key"]
    lines = []
    by = {}
    for r in doc["results"]:
        if r["framework"] == "jax" and not r["impl"].startswith("auto"):
            by.setdefault((r["shape"], r["dtype"], r["mode"]), {})[r["impl"]] = r
    for (shape, dtype, mode), rows in by.items():
        any_row = next(iter(rows.values()))
        key = autoselect.bucket_key(device, dtype, any_row["d"], any_row["skv"])
        order = autoselect.orders(table, ROUTING_MODES.get(mode, "train")).get(key, [])
        pick = next((n for n in order if rows.get(n, {}).get("status") == "ok"), None)
        ratio = rows[pick].get("ratio_jax") if pick else None
        lines.append(f"  {shape} {dtype} {mode}: {pick or '-'}" + (f" x{ratio:.3f}" if ratio else ""))
    return "\n".join(lines)


def write_routing(doc: dict, path=None, merge: bool = True) -> dict:
    """Write the routing table for `doc` to `path` (default `autoselect.TABLE_PATH`, the
    package's routing data); returns the table.

    Into a document keyed by device kind (the package's, or any file that already is one) the
    table goes under the device kind `doc` was measured on, made its generation's fallback if
    that generation has none; with `merge` the other devices' tables are kept. Any other path
    gets the one table (the form results folders keep); with `merge`, buckets of other devices
    already in that file are kept.
    """
    from . import autoselect
    path = pathlib.Path(path or autoselect.TABLE_PATH)
    table = routing_from_results(doc)
    old = data.read(path)
    if path.resolve() == data.path("routing") or "tables" in old:
        meta = doc["meta"]
        generation = meta["device_key"] if data.is_generation(meta["device_key"]) else None
        table.pop("comment")  # the document's comment says it
        data.write(path, meta.get("device") or meta["device_key"], table, generation, merge=merge)
    else:
        if merge and old:
            device = doc["meta"]["device_key"] + "|"
            for name in (*autoselect.TABLE_KEYS.values(), "scores"):
                kept = {k: v for k, v in old.get(name, {}).items() if not k.startswith(device)}
                merged = dict(sorted({**kept, **table.get(name, {})}.items()))
                if merged or name in table:  # no empty lossy order where none was measured
                    table[name] = merged
            if old.get("source") and old["source"].get("device_key") != doc["meta"]["device_key"]:
                table["other_sources"] = [old["source"]] + old.get("other_sources", [])
        path.write_text(json.dumps(table, indent=1) + "\n")
    autoselect.table.cache_clear()
    return table
