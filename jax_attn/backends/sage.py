"""`sage` and `sage16`: 8-bit attention for inference on Hopper: INT8 Q K^T with K smoothed, and
P V in FP8 (e4m3; `sage`) or in the inputs' 16 bits (`sage16`, the accurate variant).

The scheme and its accuracy are `jax_attn.quantization`'s; the kernel is
`kernels/sage_forward.py` behind `kernels/sage_attention.py`. It is lossy (cosine ~0.9993 to
float64 on standard-normal inputs, limited by e4m3's 3 mantissa bits in P and V), so automatic
selection never picks it: ask for it with `backend="sage"` or `jax_attn.use_backend("sage")`.

Forward only. `Needs` reports forward-mode autodiff (declined here, as everywhere a custom VJP
rules it out) but not reverse mode, which cannot be seen at trace time. In a preference list
(`use_backend("sage,pallas")`) routing differentiates through the next backend that can
(`backward_reasons`), so one program samples in 8 bits and trains exactly; named alone, a
reverse-mode gradient through it raises from the custom VJP's backward with a message naming
the backend (`backend='sage'` or `'sage16'`). Its lse has no gradient either (`supports_lse_grad=False`).

On a machine without a GPU, `JAX_ATTN_INTERPRET=1` runs the kernel in Mosaic GPU's interpret mode
(tests only), as for `pallas`.
"""
from __future__ import annotations

from ..kernels import sage_attention
from .base import Backend, gpu_compute_capability, platform
from .pallas import ENV_INTERPRET, interpreting


class Sage(Backend):
    name = "sage"
    description = "8-bit (INT8 QK, FP8 PV) attention for inference on Hopper; lossy, forward only"
    platforms = ("gpu",)
    dtypes = ("float16", "bfloat16")
    head_dims = (1, 128)  # run at 64 or 128 (smaller ones zero-padded)
    value_dim_differs = False
    supports_bool_mask = True  # per-key masks only: `reasons` declines a full (sq, skv) mask
    supports_bias = False
    supports_bias_grad = False
    supports_causal = False
    supports_kv_lengths = True
    supports_segment_ids = True  # compared in the kernel per (row, key), no tile skipping
    supports_lse_grad = False
    supports_window = False
    supports_forward_ad = False
    automatic = False  # lossy: only on request
    lossy = True

    def unavailable(self) -> list[str]:
        if interpreting():
            why = []
        elif platform() != "gpu":
            return [f"no GPU: the default JAX platform is {platform()}; set {ENV_INTERPRET}=1 to run "
                    "in Pallas interpret mode (slow; tests only)"]
        else:
            cc = gpu_compute_capability()
            why = [] if cc is not None and cc[0] == 9 else [
                "needs a Hopper (sm90) GPU: its kernel uses sm90 wgmma on INT8 and FP8 operands "
                f"(found compute capability {'unknown' if cc is None else '%d.%d' % cc})"]
        avail = sage_attention.available()
        if avail is not None:
            why.append(f"Mosaic GPU Pallas is not importable ({avail})")
        return why

    def reasons(self, spec, needs=None):
        why = super().reasons(spec, needs)
        if spec.mask_kind == "bool" and not spec.per_key_mask:
            why.append("a full (sq, skv) bool mask is not supported (per-key masks (b, 1|n, 1, skv) are)")
        return why

    def backward_reasons(self, spec):
        return ["forward only: 8-bit inference attention has no backward kernel"]

    config = None  # the kernel's default SageConfig (FP8 P V)

    def _forward(self, inputs, return_lse):
        spec = inputs.spec
        return sage_attention.sage_attention(
            inputs.q, inputs.k, inputs.v, kv_lengths=inputs.kv_lengths,
            key_mask=inputs.mask if spec.mask_kind == "bool" else None, scale=spec.scale,
            layout=spec.layout, return_lse=return_lse, interpret=interpreting(),
            q_segment_ids=inputs.q_segment_ids, kv_segment_ids=inputs.kv_segment_ids,
            config=self.config)


class Sage16(Sage):
    """`sage16`: the accurate variant, only Q K^T in INT8 (smoothed K, per-token scales), P and V
    in the inputs' 16-bit dtype (`SageConfig(pv_bits=16)`): no FP8 rounding of P and V, so it
    meets cosine >= 0.9995 / rel. L1 <= 0.02 on standard-normal inputs where `sage` does not,
    and the pre-pass leaves V alone. Same contract, refusals and opt-in as `sage`."""
    name = "sage16"
    description = ("8-bit Q K^T (INT8, smoothed K), 16-bit P V attention for inference on Hopper; "
                   "lossy, forward only")
    config = sage_attention.SageConfig(pv_bits=16)
