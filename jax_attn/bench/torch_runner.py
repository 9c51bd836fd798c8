"""torch rows: each of SDPA's four kernels, and FlashAttention-4's `flash_attn_func` where it is
installed on a CUDA machine, checked and timed like the JAX rows.

The same shapes, the same correctness gate and the same sampling rules as `jax_runner`, so the
table compares JAX backends with torch's kernels on equal terms; short calls are replayed from
a CUDA graph. torch is imported lazily: without it, `torch_kernels()` is empty and nothing here
runs.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings

from .gate import _check_slices, _reference_errors, _short_message, _tolerance
from .shapes import GiB, Shape
from .timing import _time_samples, _timing_fields, _torch_graph

log = logging.getLogger(__name__)

TORCH_KERNELS = {"torch-flash": "FLASH_ATTENTION", "torch-efficient": "EFFICIENT_ATTENTION",
                 "torch-cudnn": "CUDNN_ATTENTION", "torch-math": "MATH",
                 "torch-fa4": None}  # not an SDPA kernel: flash_attn.cute.flash_attn_func


def _fa4_importable() -> bool:
    """torch-fa4 is a row only where it can run: FA4 installed and a CUDA device present."""
    import importlib.util
    try:
        import torch
        return importlib.util.find_spec("flash_attn.cute") is not None and torch.cuda.is_available()
    except (ImportError, ValueError):
        return False


def torch_kernels(wanted=None) -> list[str]:
    """The torch rows to run: SDPA's four when torch is installed (each reports if it cannot), and
    torch-fa4 where FA4 is importable on a CUDA machine."""
    try:
        import torch  # noqa: F401
        from torch.nn.attention import SDPBackend  # noqa: F401
    except ImportError:
        return []
    have = [k for k in TORCH_KERNELS if k != "torch-fa4" or _fa4_importable()]
    return [k for k in have if wanted is None or k in wanted]


class TorchInputs:
    def __init__(self, shape: Shape, n_sets: int, seed: int):
        import torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dt = getattr(torch, shape.dtype)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        qs, ks = (shape.b, shape.n, shape.sq, shape.d), (shape.b, shape.n, shape.skv, shape.d)
        self.sets = [tuple(torch.randn(s, generator=gen, device=self.device, dtype=dt)
                           for s in (qs, ks, ks, qs)) for _ in range(n_sets)]
        for s in self.sets:
            for x in s[:3]:
                x.requires_grad_(True)
        rows, pairs = _check_slices(shape)
        q, k, v, do = self.sets[0]
        f64 = lambda x: x.detach().double().cpu().numpy()
        self.host = {bh: (f64(q[bh]), f64(k[bh]), f64(v[bh]), f64(do[bh])) for bh in pairs}
        mask = torch.zeros((shape.b, shape.n, shape.sq, 1), dtype=torch.bool, device=self.device)
        for bh in pairs:
            mask[bh[0], bh[1], torch.as_tensor(rows, device=self.device)] = True
        self.do_check = torch.where(mask, do, torch.zeros((), dtype=dt, device=self.device))

    def sync(self):
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()


def _torch_call(kernel: str, mode: str):
    import torch
    if kernel == "torch-fa4":
        return _fa4_call(mode)
    from torch.nn.attention import SDPBackend
    sdpa = torch.nn.functional.scaled_dot_product_attention
    backend = getattr(SDPBackend, TORCH_KERNELS[kernel])

    def call(q, k, v, do=None):
        with torch.nn.attention.sdpa_kernel(backend):
            out = sdpa(q, k, v)
        if mode == "fwd":
            return out
        return torch.autograd.grad(out, (q, k, v), do)

    return call


def _fa4_call(mode: str):
    import torch
    from flash_attn.cute import flash_attn_func

    def call(q, k, v, do=None):
        # FA4 reads (b, s, h, d); the transposed views are what a torch model would hand it.
        out, _ = flash_attn_func(*(x.transpose(1, 2) for x in (q, k, v)))
        out = out.transpose(1, 2)
        if mode == "fwd":
            return out
        return torch.autograd.grad(out, (q, k, v), do)

    return call


def measure_torch(kernel: str, shape: Shape, mode: str, inputs: TorchInputs, opts) -> dict:
    import torch
    call = _torch_call(kernel, mode)
    cuda = inputs.device == "cuda"
    if kernel == "torch-math" and cuda:
        free = torch.cuda.mem_get_info()[0]
        need = shape.score_bytes() * (2 if mode == "fwd" else 4)
        if need > 0.9 * free:
            return {"status": "skip", "note": f"math materializes the scores: about {need / GiB:.0f} GiB, "
                                              f"{free / GiB:.0f} GiB free"}
    q, k, v, do = inputs.sets[0]
    row = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
                res = call(q, k, v, inputs.do_check)
            inputs.sync()
            if cuda:
                out_bytes = sum(x.numel() * x.element_size() for x in (res if mode != "fwd" else [res]))
                row["temp_bytes"] = int(max(torch.cuda.max_memory_allocated() - base - out_bytes, 0))
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run reports why
            why = "; ".join(dict.fromkeys(str(w.message).splitlines()[0][:160] for w in caught))
            if cuda and isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            return {"status": "skip", "note": (why + "; " if why else "") + _short_message(e)}
    rows, pairs = _check_slices(shape)
    to_host = lambda x: x.detach().double().cpu().numpy()
    if mode == "fwd":
        got = {bh: (to_host(res[bh][rows]),) for bh in pairs}
        finite = bool(torch.isfinite(res).all())
    else:
        got = {bh: (to_host(res[0][bh][rows]), to_host(res[1][bh]), to_host(res[2][bh])) for bh in pairs}
        finite = all(bool(torch.isfinite(g).all()) for g in res)
    del res
    err = _reference_errors(shape, mode, inputs.host, got) if finite else float("inf")
    row.update(err=err, tol=_tolerance(shape, mode))
    if not err <= row["tol"]:
        return {**row, "status": "FAIL", "note": f"relative error {err:.2e} over tolerance {row['tol']:.0e}"}

    n_sets = len(inputs.sets)

    def body(i):
        s = inputs.sets[i % n_sets]
        with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
            return call(*s[:3], s[3])

    def eager(k):
        inputs.sync()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(k):
                body(i)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, k
        t = time.perf_counter()
        for i in range(k):
            body(i)
        return time.perf_counter() - t, k

    eager(2)
    est = eager(5)
    est_s = est[0] / est[1]
    method = f"eager, {n_sets} input set(s)"
    sample = eager
    if cuda and est_s * 1e6 < opts.short_us and opts.inner_loop != "never":
        try:
            sample, method = _torch_graph(body, n_sets, est_s, opts), f"CUDA graph, {n_sets} input set(s)"
        except Exception as e:  # noqa: BLE001 - fall back to eager timing, and say so
            log.info("bench: CUDA graph capture failed for %s (%s); timing eagerly", kernel, e)
            method += " (graph capture failed: launch overhead included)"
    t = _time_samples(sample, est_s, opts.min_runs, opts.measure_s, opts.sample_s, opts.deadline, method)
    return {**row, "status": "ok", **_timing_fields(t)}


def _release_torch_memory():
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
