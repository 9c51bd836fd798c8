"""Measured data: JSON files keyed by the GPU they were measured on, and their one loader.

Code holds no measurements; what a GPU measured lives here, one file per kind of data:

  routing.json         `autoselect`'s backend orders per bucket, training and inference, with
                       the scores behind them (`python -m jax_attn bench --write-routing`)
  pallas_tuning.json   block sizes, warps and stages of the Triton-lowered kernels
                       (`benchmarks/tune_pallas.py --apply`), read by `kernels.configs`
  mosaic_routing.json  shape buckets where the Mosaic forward beat the Triton one, read by the
                       `pallas` backend's kernel choice (kept by hand from
                       `benchmarks/mosaic_gpu.py` runs; each entry cites its results file)

A file is `{"comment": ..., "tables": {key: table}}`. A key is a device kind as JAX reports it
(`jax.devices()[0].device_kind`, e.g. "NVIDIA H100 80GB HBM3", "NVIDIA H200") or a generation
("sm90"); a string in place of a table names the key whose table it shares, so a generation's
fallback is the table of the GPU measured for it ("sm90": "NVIDIA H100 80GB HBM3"). Every entry
says the device it was measured on and the date ("device", "date"; a routing table says them once,
in its "source", since one bench run makes the whole table).

Lookup (`load`): the device kind's table; else its generation's, with one INFO note ("no
measurements for NVIDIA H200 in routing; using the sm90 table measured on NVIDIA H100 80GB
HBM3"); else `{}`, and callers use their defaults. Off GPUs there is no generation.

Per-user cache, read first: `$JAX_ATTN_CACHE/<name>.json` when that variable is set, else
`$XDG_CACHE_HOME/jax_attn/<name>.json` (`~/.cache/jax_attn/<name>.json`). Same format; its
tables replace the package's tables of the same key; an absent file changes nothing. It is where
measurements of the user's own GPU go (`write(cache_path(name), ...)`; `python -m jax_attn tune`
writes routing there), so an installed package never has to be rewritten. The order for a
device is therefore: the cache's table for its kind, the package's table for its kind, its
generation's table (with the note above), nothing.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import re

log = logging.getLogger(__name__)

DATA_DIR = pathlib.Path(__file__).resolve().parent
CACHE_ENV = "JAX_ATTN_CACHE"
_GENERATION = re.compile(r"sm\d+")
_noted: set = set()


@functools.lru_cache(maxsize=None)
def device() -> tuple[str | None, str | None]:
    """(device kind, generation) of the first JAX device: the kind as JAX reports it, the
    generation "sm<major><minor>" on NVIDIA GPUs, else None."""
    import jax
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None) if dev.platform == "gpu" else None
    generation = "sm" + "".join(str(cc).split(".")[:2]) if cc else None
    return getattr(dev, "device_kind", None), generation


def is_generation(key: str) -> bool:
    return bool(_GENERATION.fullmatch(key))


def path(name: str) -> pathlib.Path:
    """The packaged file of data `name` (e.g. "routing")."""
    return DATA_DIR / f"{name}.json"


def cache_path(name: str) -> pathlib.Path:
    """The per-user file of data `name`, read before the packaged one."""
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV]).expanduser() / f"{name}.json"
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "jax_attn" / f"{name}.json"


def read(file) -> dict:
    """The JSON document at `file`, `{}` when it is absent or empty."""
    file = pathlib.Path(file)
    text = file.read_text() if file.exists() else ""
    return json.loads(text) if text.strip() else {}


@functools.lru_cache(maxsize=None)
def tables(name: str) -> dict:
    """Key -> table (or alias) of data `name`: the per-user cache's over the package's."""
    merged = dict(read(path(name)).get("tables", {}))
    try:
        merged.update(read(cache_path(name)).get("tables", {}))
    except (OSError, ValueError, AttributeError) as e:  # a broken cache must not break attention
        log.warning("ignoring the jax_attn cache file %s: %s", cache_path(name), e)
    return merged


def lookup(keyed: dict, device: tuple[str | None, str | None], what: str = "") -> dict:
    """The table of `device` = (kind, generation) in `keyed` (a document's "tables"): the
    kind's, else the generation's (noted once at INFO), else `{}`. `what` names the data."""
    kind, generation = device

    def resolve(key):
        value = keyed.get(key)
        for _ in range(4):  # an alias names another key
            if not isinstance(value, str):
                break
            key, value = value, keyed.get(value)
        return (value, key) if isinstance(value, dict) else (None, None)

    found, _ = resolve(kind) if kind else (None, None)
    if found is not None:
        return found
    found, source = resolve(generation) if generation else (None, None)
    if kind and generation and (what, kind, generation) not in _noted:
        _noted.add((what, kind, generation))
        if found is not None:
            log.info("no measurements for %s%s; using the %s table measured on %s", kind,
                     f" in {what}" if what else "", generation, source)
        else:
            log.info("no measurements for %s (%s)%s; using the defaults", kind, generation,
                     f" in {what}" if what else "")
    return found if found is not None else {}


def _this_machine():
    return device()  # looked up when called, so a test can monkeypatch `device`


@functools.lru_cache(maxsize=None)
def _load(name: str, device: tuple) -> dict:
    return lookup(tables(name), device, name)


def load(name: str, device: tuple[str | None, str | None] | None = None) -> dict:
    """The table of data `name` for `device` = (kind, generation), default this machine's
    (`device()`); `{}` when nothing was measured for it. Cached; do not modify the result."""
    return _load(name, tuple(device) if device is not None else _this_machine())


def write(file, kind: str, table: dict, generation: str | None = None, *,
          comment: str | None = None, merge: bool = True) -> dict:
    """Put `table` under device `kind` in the document at `file` (its other keys kept when
    `merge`, its comment unless `comment` is given), make it `generation`'s fallback if that
    generation has none, write it, and clear the caches; returns the document."""
    file = pathlib.Path(file)
    old = read(file)
    doc = {"comment": comment or old.get("comment", ""),
           "tables": dict(old.get("tables", {})) if merge else {}}
    doc["tables"][kind] = table
    if generation and generation != kind:
        doc["tables"].setdefault(generation, kind)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(doc, indent=1) + "\n")
    clear_cache()
    return doc


def clear_cache() -> None:
    """Forget what was read (and which notes were logged): after a file changed."""
    tables.cache_clear()
    _load.cache_clear()
    _noted.clear()
