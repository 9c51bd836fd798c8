"""`python -m jax_attn check` rows for torch_ref: each torch backend against the float64 reference,
and each (JAX backend, torch backend) pair against each other, forward and gradients.

Cases, their inputs and the reference come from `jax_attn.cases` (NumPy, imports no framework),
as for `python -m jax_attn check`, so both frameworks see the very same numbers. Rows use the
CLI's keys: backend, case, dtype, status, out_err, grad_err, tol, fwd_ms, fwd_bwd_ms, note.
"""
from __future__ import annotations

import dataclasses
import logging
import statistics
import time

import numpy as np
import torch

from jax_attn import cases as case_data  # `cases` names lists of them below
from jax_attn import reference

from .api import attention_forward, available_backends
from .backends import BACKENDS
from .inputs import describe

log = logging.getLogger(__name__)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case_inputs(case, dtype: str, seed: int):
    """`jax_attn.cases.inputs` for `case` as float64 NumPy in bnsd (holding `dtype`'s values) plus the
    keyword arguments, d_out, and the reference's `q_lengths`/`window` keywords."""
    q, k, v, kw = case_data.inputs(case, dtype, seed)
    f64 = lambda x: x.astype(np.float64)  # noqa: E731
    mask = kw.get("attn_mask")
    mask = mask if mask is None or mask.dtype == bool else f64(mask)
    extra = dict(q_lengths=kw.get("query_seq_lengths"), window=case.window,
                 q_segment_ids=kw.get("q_segment_ids"), kv_segment_ids=kw.get("kv_segment_ids"))
    d_out = case_data.output_cotangent(case, seed)
    return f64(q), f64(k), f64(v), mask, kw.get("kv_lengths"), d_out, extra


def _run(case, dtype, arrays, backend):
    """Forward (with lse when the backend has it) and gradients of q, k, v on torch, as float64 bnsd."""
    q, k, v, mask, lengths, d_out, extra = arrays
    tdt = getattr(torch, dtype)
    swap = (lambda x: x.transpose(1, 2)) if case.layout == "bsnd" else (lambda x: x)
    q, k, v = (swap(torch.tensor(x, dtype=tdt, device=DEVICE)).requires_grad_() for x in (q, k, v))
    d_out_t = swap(torch.tensor(d_out, dtype=tdt, device=DEVICE))
    kw = dict(is_causal=case.causal, layout=case.layout,
              attn_mask=None if mask is None else torch.tensor(mask, device=DEVICE).to(
                  torch.bool if mask.dtype == bool else tdt),
              kv_lengths=None if lengths is None else torch.tensor(lengths, device=DEVICE),
              query_seq_lengths=None if extra["q_lengths"] is None else torch.tensor(extra["q_lengths"],
                                                                                    device=DEVICE),
              local_window_size=extra["window"], **_segment_ids(extra, DEVICE))
    with_lse = BACKENDS[backend].supports_lse

    def fwd():
        res = attention_forward(q, k, v, backend=backend, return_lse=with_lse, **kw)
        return res if with_lse else (res, None)

    def fwd_bwd():
        return torch.autograd.grad(fwd()[0], (q, k, v), d_out_t)

    out, lse = fwd()
    grads = fwd_bwd()
    f64 = lambda x: swap(x.detach()).cpu().to(torch.float64).numpy()
    res = {"out": f64(out), "lse": None if lse is None else lse.detach().cpu().double().numpy(),
           "grads": [f64(g) for g in grads]}
    return res, {"fwd_ms": _median_ms(fwd), "fwd_bwd_ms": _median_ms(fwd_bwd)}


def _segment_ids(extra, device) -> dict:
    """The case's segment ids as torch keyword arguments (none when the case has none)."""
    if extra["q_segment_ids"] is None:
        return {}
    return {name: torch.tensor(extra[name], device=device) for name in ("q_segment_ids", "kv_segment_ids")}


def _median_ms(fn, repeats=5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _reasons(case, dtype, arrays, backend):
    q, k, v, mask, lengths, _, extra = arrays
    tdt = getattr(torch, dtype)
    swap = (lambda s: (s[0], s[2], s[1], s[3])) if case.layout == "bsnd" else (lambda s: s)
    meta = lambda x: torch.empty(swap(x.shape), dtype=tdt, device="meta", requires_grad=True)
    spec, call = describe(
        meta(q), meta(k), meta(v), is_causal=case.causal, layout=case.layout,
        attn_mask=None if mask is None else torch.empty(mask.shape, device="meta",
                                                        dtype=torch.bool if mask.dtype == bool else tdt),
        kv_lengths=None if lengths is None else torch.tensor(lengths), return_lse=BACKENDS[backend].supports_lse,
        query_seq_lengths=None if extra["q_lengths"] is None else torch.tensor(extra["q_lengths"]),
        local_window_size=extra["window"], **_segment_ids(extra, "cpu"))
    # Shapes travel on the meta device; the reasons must be those of the device the case runs on.
    return BACKENDS[backend].reasons(spec, dataclasses.replace(call, device=DEVICE))


def compare_with_reference(cases, seed: int = 0, dtypes=("float32",), backends=None) -> list[dict]:
    """Each available torch backend (or `backends`) on each case and dtype vs the float64 reference.

    Tolerances as `jax_attn check`: `reference.TOLERANCE[dtype]` for outputs and lse, 2x for grads.
    """
    rows = []
    for dtype in dtypes:
        for case in cases:
            arrays = _case_inputs(case, dtype, seed)
            q, k, v, mask, lengths, d_out, extra = arrays
            ref, ref_lse, ref_grads = case_data.expected(
                case, q, k, v, d_out, mask, lengths, extra["q_lengths"],
                q_segment_ids=extra["q_segment_ids"], kv_segment_ids=extra["kv_segment_ids"])
            ref_grads = ref_grads[:3]  # q, k, v: these rows do not differentiate a bias
            for name in backends or available_backends():
                row = {"backend": f"torch:{name}", "case": case.name, "dtype": dtype}
                why = _reasons(case, dtype, arrays, name)
                if why:
                    rows.append({**row, "status": "skip", "note": "; ".join(why)})
                    continue
                try:
                    res, times = _run(case, dtype, arrays, name)
                except Exception as e:  # a crash is a failure, reported with its message
                    rows.append({**row, "status": "FAIL",
                                 "note": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
                    continue
                tol = reference.TOLERANCE[dtype]
                out_err = reference.relative_error(res["out"], ref)
                lse_err = 0.0 if res["lse"] is None else reference.relative_error(res["lse"], ref_lse)
                grad_err = max(reference.relative_error(g, r) for g, r in zip(res["grads"], ref_grads))
                ok = out_err <= tol and lse_err <= max(tol, reference.TOLERANCE["float32"]) and grad_err <= 2 * tol
                rows.append({**row, "status": "pass" if ok else "FAIL", "out_err": out_err,
                             "lse_err": lse_err, "grad_err": grad_err, "tol": tol, **times,
                             "note": "" if res["lse"] is not None else "no lse"})
    return rows


def compare_with_jax(cases, seed: int = 0, dtypes=("float32",), jax_backends=None,
                     torch_backends=None) -> list[dict]:
    """Each (JAX backend, torch backend) pair on the same inputs: max relative difference of the
    outputs and of the q, k, v gradients; passes within 2x (outputs) and 4x (grads) the per-dtype
    tolerance, since each side is within 1x (2x) of the float64 reference."""
    import jax
    import jax.numpy as jnp

    import jax_attn
    from jax_attn.backends import BACKENDS as JAX_BACKENDS

    rows = []
    for dtype in dtypes:
        for case in cases:
            arrays = _case_inputs(case, dtype, seed)
            jq, jk, jv, jkw = case_data.inputs(case, dtype, seed, jnp.asarray)
            swap = (lambda x: jnp.swapaxes(x, 1, 2)) if case.layout == "bsnd" else (lambda x: x)
            d_out = jnp.asarray(arrays[5], dtype)
            for jname in jax_backends or jax_attn.available_backends():
                spec = jax_attn.contract.validate(*map(swap, (jq, jk, jv)), **jkw)
                if JAX_BACKENDS[jname].reasons(spec):
                    continue
                f = lambda q, k, v: swap(jax_attn.attention_forward(*map(swap, (q, k, v)), backend=jname, **jkw))
                out, vjp = jax.vjp(f, jq, jk, jv)
                j_out = np.asarray(out.astype(jnp.float32), np.float64)
                j_grads = [np.asarray(g.astype(jnp.float32), np.float64) for g in vjp(d_out)]
                for tname in torch_backends or available_backends():
                    row = {"backend": f"jax:{jname} vs torch:{tname}", "case": case.name, "dtype": dtype}
                    if _reasons(case, dtype, arrays, tname):
                        continue
                    try:
                        res, times = _run(case, dtype, arrays, tname)
                    except Exception as e:
                        rows.append({**row, "status": "FAIL",
                                     "note": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
                        continue
                    tol = reference.TOLERANCE[dtype]
                    out_err = reference.relative_error(res["out"], j_out)
                    grad_err = max(reference.relative_error(g, r) for g, r in zip(res["grads"], j_grads))
                    ok = out_err <= 2 * tol and grad_err <= 4 * tol
                    rows.append({**row, "status": "pass" if ok else "FAIL", "out_err": out_err,
                                 "grad_err": grad_err, "tol": 2 * tol, "note": ""})
    return rows
