"""FA4's kernels as JAX FFI targets: registration, the calls, and the custom VJP.

How a call reaches FA4: each (kind, FA4 arguments, has kv_lengths) key registers one XLA FFI
target through `jax_tvm_ffi`. Its handler is a Python function (a `tvm_ffi.Function`), not
FA4's compiled kernel directly, because that kernel's tvm-ffi signature also takes `None`
placeholders, Python floats and dataclasses that an XLA custom call cannot pass. The handler runs
on XLA's stream (jax_tvm_ffi sets tvm-ffi's environment stream), wraps XLA's buffers as torch
tensors without copying, makes that stream torch's current one, and calls FA4's own
`_flash_attn_fwd` / `_flash_attn_bwd` with `out=`/`lse=`/`dq=`... pointing at XLA's result
buffers. So FA4's tile heuristics, compile cache, backward pre/post-processing and GQA reduction
are used unchanged, and its scratch buffers (torch's allocator) are ordered on XLA's stream.

Either layout is handed over as it is: for `(b, n, s, d)` operands (`heads_major`) the handler
views XLA's buffers as FA4's `(b, s, n, d)` by a stride swap (torch's `transpose(1, 2)`, no copy;
FA4 takes any strides with a contiguous last dim), so no transpose runs on either side.

Packed sequences (segment ids) have their own targets (`_seg_fwd_target`, `_seg_bwd_target`):
the ids, `kv_lengths` and the block-sparse lists travel as extra operands and reach FA4 as
`aux_tensors` and `block_sparse_tensors` beside our `mask_mod` (`fa4_segments`); calls without
ids take the targets above, unchanged.

Costs of this route, known: one Python call per kernel launch (host time, hidden behind the GPU
for large shapes), the first call of a key compiles the CuTe kernel (seconds), the target is not
CUDA-graph safe (registered so; XLA then never captures it), and torch's caching allocator holds
FA4's scratch beside XLA's pool (keep XLA_PYTHON_CLIENT_MEM_FRACTION below 1).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import threading

import jax
import jax.numpy as jnp

from ..masking import EmptyRows
from . import fa4_segments
from .fa4 import VERIFIED_BACKWARD_HEAD_DIMS

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_TARGETS: dict[tuple, str] = {}


@functools.lru_cache(maxsize=None)
def _torch_tensor_delivery():
    """How the handler gets torch tensors: tvm-ffi's C-level DLPack exchange when torch offers it,
    else `torch.from_dlpack` inside the handler (slower, same result)."""
    import torch
    return torch.Tensor if hasattr(torch.Tensor, "__dlpack_c_exchange_api__") else None


def _as_torch(x):
    import torch
    return x if isinstance(x, torch.Tensor) else torch.from_dlpack(x)


def _on_xla_stream(fn):
    """Run `fn(*torch_tensors)` with XLA's stream (tvm-ffi's environment stream) as torch's current stream."""
    import torch
    import tvm_ffi

    def handler(*args):
        index = args[0].device.index  # torch.Tensor and tvm_ffi.Tensor both have it
        stream = tvm_ffi.get_raw_stream(tvm_ffi.device("cuda", index))
        device = torch.device("cuda", index)
        with torch.cuda.device(device), torch.cuda.stream(torch.cuda.ExternalStream(stream, device=device)):
            fn(*(_as_torch(a) for a in args))

    return handler


def _register(kind: str, key: tuple, fn) -> str:
    """Register `fn` (torch tensors in, written in place) as an FFI target once per key; its name."""
    full = (kind, *key)
    with _LOCK:
        if full in _TARGETS:
            return _TARGETS[full]
        import jax_tvm_ffi
        import torch
        import tvm_ffi
        torch.cuda.init()  # here, at trace time, not inside XLA's execution thread
        name = f"jax_attn_fa4_{kind}_" + hashlib.sha1(repr(full).encode()).hexdigest()[:16]
        tensor_cls = _torch_tensor_delivery()
        handler = _on_xla_stream(fn)
        func = tvm_ffi.convert_func(handler, tensor_cls=tensor_cls) if tensor_cls else tvm_ffi.convert(handler)
        # pass_owned_tensor: the handler turns the buffers into torch tensors (DLPack needs owners).
        jax_tvm_ffi.register_ffi_target(name, func, arg_spec=["args", "rets"], platform="gpu",
                                        allow_cuda_graph=False, pass_owned_tensor=True)
        log.info("fa4: registered FFI target %s for %s", name, full)
        _TARGETS[full] = name
        return name


def _as_bsnd(heads_major: bool):
    """FA4's (b, s, n, d) view of a rank-4 buffer: a stride swap for (b, n, s, d) buffers."""
    return (lambda t: t.transpose(1, 2)) if heads_major else (lambda t: t)


def _fwd_target(args, has_lengths: bool, heads_major: bool) -> str:
    return _register("fwd", (args, has_lengths, heads_major), _fwd_runner(args, has_lengths, heads_major))


def _fwd_runner(args, has_lengths: bool, heads_major: bool):
    """The forward handler's body: torch tensors in (XLA's buffers), FA4's forward into out/lse."""
    view = _as_bsnd(heads_major)

    def run(q, k, v, *rest):
        from flash_attn.cute.interface import _flash_attn_fwd
        seqused_k, (out, lse) = (rest[0], rest[1:]) if has_lengths else (None, rest)
        _flash_attn_fwd(view(q), view(k), view(v), seqused_k=seqused_k,
                        softmax_scale=args.softmax_scale, causal=args.causal,
                        window_size_left=args.window_size_left, window_size_right=args.window_size_right,
                        return_lse=True, out=view(out), lse=lse)
    return run


def _bwd_target(args, has_lengths: bool, heads_major: bool) -> str:
    return _register("bwd", (args, has_lengths, heads_major), _bwd_runner(args, has_lengths, heads_major))


def _bwd_runner(args, has_lengths: bool, heads_major: bool):
    """The backward handler's body: FA4's backward into dq/dk/dv."""
    view = _as_bsnd(heads_major)

    def run(q, k, v, out, dout, lse, *rest):
        from flash_attn.cute.interface import _flash_attn_bwd
        seqused_k, grads = (rest[0], rest[1:]) if has_lengths else (None, rest)
        dq, dk, dv = (view(g) for g in grads)
        _flash_attn_bwd(view(q), view(k), view(v), view(out), view(dout), lse,
                        softmax_scale=args.softmax_scale, causal=args.causal,
                        window_size_left=args.window_size_left, window_size_right=args.window_size_right,
                        seqused_k=seqused_k, dq=dq, dk=dk, dv=dv)
    return run


def _seg_fwd_target(args, plan, heads_major: bool) -> str:
    return _register("seg_fwd", (args, plan, heads_major), _seg_fwd_runner(args, plan, heads_major))


def _segment_extras(plan, rest):
    """Split a segment handler's trailing operands: `(aux_tensors, block-sparse tensors, rest)`.
    Operands: q_ids, kv_ids, [kv_lengths], 4 block-sparse lists, then the results."""
    n_aux = 3 if plan.has_lengths else 2
    return list(rest[:n_aux]), rest[n_aux:n_aux + 4], rest[n_aux + 4:]


def _block_sparse(lists, block):
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    partial_count, partial_index, full_count, full_index = lists
    return BlockSparseTensorsTorch(mask_block_cnt=partial_count, mask_block_idx=partial_index,
                                   full_block_cnt=full_count, full_block_idx=full_index, block_size=block)


def _seg_fwd_runner(args, plan, heads_major: bool):
    """The forward handler with segment ids: our mask_mod over the ids, FA4's block sparsity."""
    view = _as_bsnd(heads_major)

    def run(q, k, v, *rest):
        from flash_attn.cute.interface import _flash_attn_fwd
        aux, lists, (out, lse) = _segment_extras(plan, rest)
        _flash_attn_fwd(view(q), view(k), view(v), softmax_scale=args.softmax_scale, causal=False,
                        mask_mod=fa4_segments.segment_mask_mod(plan.window, plan.has_lengths),
                        aux_tensors=aux, block_sparse_tensors=_block_sparse(lists, plan.fwd_block),
                        return_lse=True, out=view(out), lse=lse)
    return run


def _seg_bwd_target(args, plan, heads_major: bool) -> str:
    return _register("seg_bwd", (args, plan, heads_major), _seg_bwd_runner(args, plan, heads_major))


def _seg_bwd_runner(args, plan, heads_major: bool):
    """The backward handler with segment ids (the backward's own, query-direction block lists)."""
    view = _as_bsnd(heads_major)

    def run(q, k, v, out, dout, lse, *rest):
        from flash_attn.cute.interface import _flash_attn_bwd
        aux, lists, grads = _segment_extras(plan, rest)
        dq, dk, dv = (view(g) for g in grads)
        _flash_attn_bwd(view(q), view(k), view(v), view(out), view(dout), lse,
                        softmax_scale=args.softmax_scale, causal=False,
                        mask_mod=fa4_segments.segment_mask_mod(plan.window, plan.has_lengths),
                        aux_tensors=aux, block_sparse_tensors=_block_sparse(lists, plan.bwd_block),
                        dq=dq, dk=dk, dv=dv)
    return run


def _call(target, results, *operands):
    # sequential: under vmap each slice is its own FA4 call (the handler reads rank-4 buffers).
    return jax.ffi.ffi_call(target, results, vmap_method="sequential")(*operands)


def _forward_results(q, v, heads_major: bool):
    """The forward's results: out (q's layout and dtype, v's head dim) and lse (b, h, sq) f32."""
    b, h, sq = (q.shape[0], q.shape[1], q.shape[2]) if heads_major else (q.shape[0], q.shape[2], q.shape[1])
    return (jax.ShapeDtypeStruct(q.shape[:-1] + v.shape[-1:], q.dtype),
            jax.ShapeDtypeStruct((b, h, sq), jnp.float32))


def fa4_forward(q, k, v, seqused_k, args, layout="bsnd"):
    """`(out, lse (b, h, sq) f32)` of FA4's forward; q, k, v and out in `layout`."""
    heads_major = layout == "bnsd"
    operands = (q, k, v) + ((seqused_k,) if seqused_k is not None else ())
    return _call(_fwd_target(args, seqused_k is not None, heads_major),
                 _forward_results(q, v, heads_major), *operands)


def fa4_backward(q, k, v, out, dout, lse, seqused_k, args, layout="bsnd"):
    """`(dq, dk, dv)` of FA4's backward (pre- and post-processing kernels included)."""
    results = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    operands = (q, k, v, out, dout.astype(out.dtype), lse) + ((seqused_k,) if seqused_k is not None else ())
    return _call(_bwd_target(args, seqused_k is not None, layout == "bnsd"), results, *operands)


def _segment_operands(q_ids, kv_ids, kv_lengths, lists):
    ids = (fa4_segments.padded_ids(q_ids), fa4_segments.padded_ids(kv_ids))
    return ids + (() if kv_lengths is None else (kv_lengths,)) + tuple(lists)


def fa4_segment_forward(q, k, v, q_ids, kv_ids, kv_lengths, args, plan, layout="bsnd"):
    """`(out, lse)` of FA4's forward with segment ids `(b, sq)`, `(b, skv)` (and `kv_lengths`,
    given exactly when `plan.has_lengths`)."""
    heads_major = layout == "bnsd"
    lists = fa4_segments.forward_blocks(q_ids, kv_ids, kv_lengths, plan)
    operands = (q, k, v) + _segment_operands(q_ids, kv_ids, kv_lengths, lists)
    return _call(_seg_fwd_target(args, plan, heads_major), _forward_results(q, v, heads_major),
                 *operands)


def fa4_segment_backward(q, k, v, out, dout, lse, q_ids, kv_ids, kv_lengths, args, plan, layout="bsnd"):
    """`(dq, dk, dv)` of FA4's backward with segment ids."""
    results = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    lists = fa4_segments.backward_blocks(q_ids, kv_ids, kv_lengths, plan)
    operands = ((q, k, v, out, dout.astype(out.dtype), lse)
                + _segment_operands(q_ids, kv_ids, kv_lengths, lists))
    return _call(_seg_bwd_target(args, plan, layout == "bnsd"), results, *operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(args, layout, q, k, v, seqused_k):
    return fa4_forward(q, k, v, seqused_k, args, layout)


def _attention_fwd(args, layout, q, k, v, seqused_k):
    out, lse = fa4_forward(q, k, v, seqused_k, args, layout)
    return (out, lse), (q, k, v, out, lse, seqused_k)


def check_backward_head_dim(d: int) -> None:
    if d not in VERIFIED_BACKWARD_HEAD_DIMS:
        raise ValueError(
            f"backend='fa4': its backward at head dim {d} is not verified (FA4 4.0.0b36's sm90 backward "
            f"gave wrong gradients at d=40 on an H200; verified: {VERIFIED_BACKWARD_HEAD_DIMS}); "
            "differentiate through backend='cudnn' or 'pallas', or use fa4 for inference only")


def _attention_bwd(args, layout, res, cotangents):
    q, k, v, out, lse, seqused_k = res
    check_backward_head_dim(q.shape[-1])
    dout, _ = cotangents  # the lse cotangent: the caller's lse is wrapped so that it raises instead
    dq, dk, dv = fa4_backward(q, k, v, out, dout, lse, seqused_k, args, layout)
    if seqused_k is not None:
        # Keys past seqused_k are outside every FA4 tile that is computed, so nothing promises
        # their dk/dv rows are written: zero them here (the contract wants exact zeros).
        seq = 2 if layout == "bnsd" else 1
        keep = jnp.arange(k.shape[seq])[None, :] < seqused_k[:, None]
        keep = keep[:, None, :, None] if layout == "bnsd" else keep[:, :, None, None]
        dk = jnp.where(keep, dk, jnp.zeros((), dk.dtype))
        dv = jnp.where(keep, dv, jnp.zeros((), dv.dtype))
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _segment_attention(args, plan, layout, q, k, v, q_ids, kv_ids, kv_lengths):
    return fa4_segment_forward(q, k, v, q_ids, kv_ids, kv_lengths, args, plan, layout)


def _segment_attention_fwd(args, plan, layout, q, k, v, q_ids, kv_ids, kv_lengths):
    out, lse = fa4_segment_forward(q, k, v, q_ids, kv_ids, kv_lengths, args, plan, layout)
    return (out, lse), (q, k, v, out, lse, q_ids, kv_ids, kv_lengths)


def _segment_attention_bwd(args, plan, layout, res, cotangents):
    q, k, v, out, lse, q_ids, kv_ids, kv_lengths = res
    check_backward_head_dim(q.shape[-1])
    dout, _ = cotangents  # the lse cotangent: the caller's lse is wrapped so that it raises instead
    # No dk/dv fix-up as for seqused_k: kv_lengths live in the mask_mod, so every key tile is
    # computed or, holding no kept pair, written as zeros by FA4 (flash_bwd_sm90.py:1442).
    dq, dk, dv = fa4_segment_backward(q, k, v, out, dout, lse, q_ids, kv_ids, kv_lengths, args, plan, layout)
    return dq, dk, dv, None, None, None


_segment_attention.defvjp(_segment_attention_fwd, _segment_attention_bwd)


def forward(inputs, args, return_lse: bool):
    """The backend's `_forward`: our inputs in their layout, FA4 arguments from `fa4.fa4_arguments`."""
    spec = inputs.spec
    if inputs.segments is not None:
        # Rows with no key of their segment (kv_lengths 0 included) come back from FA4 as zeros
        # with lse -inf (fa4_segments docstring): no EmptyRows fix-up.
        out, lse = _segment_attention(args, fa4_segments.plan(spec), spec.layout, inputs.q, inputs.k,
                                      inputs.v, inputs.q_segment_ids, inputs.kv_segment_ids,
                                      inputs.kv_lengths)
        return (out, lse) if return_lse else out
    fix = EmptyRows.fix(spec, None, inputs.kv_lengths)  # kv_lengths 0 -> full length, zeroed below
    seqused_k = None if fix.kv_lengths is None else fix.kv_lengths.astype(jnp.int32)
    out, lse = _attention(args, spec.layout, inputs.q, inputs.k, inputs.v, seqused_k)
    out, lse = fix.zero(out, lse, spec.layout)
    return (out, lse) if return_lse else out
