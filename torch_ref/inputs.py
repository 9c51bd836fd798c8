"""`AttentionInputs`: the tensors of one call, their validated `Spec`, and the runtime facts a
torch backend also decides on (device, autograd), built once per call.

Building applies the parts of the contract no backend should repeat, as `jax_attn.inputs` does:
the masks (`attn_mask`, `bias`, `mask`) merge into one; lengths are clamped to `[0, s]` in their
own dtype (no integer wrap) and negatives raise; unbatched inputs get a batch axis of 1; segment
ids (packed sequences) become int64 `(b, s)` tensors equal exactly where the caller's were; keys that
no query can see and queries past `query_seq_lengths` are zeroed, so whatever they hold reaches no
output and no gradient on any backend.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from jax_attn import visibility
from jax_attn.contract import Spec, validate

from . import masking

# torch has next to no arithmetic for these; their lengths are clamped in Python.
_FEW_OPS = tuple(getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n))


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What routing needs beyond the `Spec`: torch decides kernels at run time, per device."""

    device: str = "cpu"  # "cpu", "cuda", ...; "meta" for shape-only `explain`
    grad: bool = False  # autograd will differentiate through q, k or v
    bias_grad: bool = False  # autograd will differentiate through a float mask (attn_mask or bias)
    return_lse: bool = False


def describe(q, k, v, *, attn_mask=None, kv_lengths=None, scale=None, is_causal=False, layout="bnsd",
             return_lse=False, bias=None, mask=None, query_seq_lengths=None,
             local_window_size=None, q_segment_ids=None, kv_segment_ids=None) -> tuple[Spec, RunContext]:
    """Validate a call (shapes only: meta tensors work) and describe it as `(Spec, RunContext)`."""
    spec = validate(q, k, v, attn_mask=attn_mask, kv_lengths=kv_lengths, scale=scale,
                    is_causal=is_causal, layout=layout, bias=bias, mask=mask,
                    query_seq_lengths=query_seq_lengths, local_window_size=local_window_size,
                    q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    masks = {"attn_mask": attn_mask, "bias": bias, "mask": mask}
    for name, x in (("q", q), ("k", k), ("v", v), *masks.items(), ("kv_lengths", kv_lengths),
                    ("query_seq_lengths", query_seq_lengths), ("q_segment_ids", q_segment_ids),
                    ("kv_segment_ids", kv_segment_ids)):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    devices = {x.device for x in (q, k, v, *masks.values()) if x is not None}
    if len(devices) > 1:
        names = ["q", "k", "v"] + [n for n, x in masks.items() if x is not None]
        raise ValueError(f"{', '.join(names[:-1])} and {names[-1]} must be on one device, "
                         f"got {sorted(map(str, devices))}")
    grad_on = torch.is_grad_enabled()
    floats = [x for x in masks.values() if x is not None and x.dtype != torch.bool]
    call = RunContext(device=q.device.type, grad=grad_on and any(x.requires_grad for x in (q, k, v)),
                bias_grad=grad_on and any(x.requires_grad for x in floats), return_lse=return_lse)
    return spec, call


def _lengths(x, name: str, s: int, device):
    """int64 `(b,)` lengths clamped to `[0, s]` in the caller's own dtype first (no wrap)."""
    if x is None:
        return None
    if x.dtype in _FEW_OPS:
        return torch.tensor([min(int(n), s) for n in x.reshape(-1).tolist()], dtype=torch.int64,
                            device=device)
    if not x.is_meta:
        visibility.check_lengths(x, name)
    if s < torch.iinfo(x.dtype).max:
        x = x.clamp(0, s)
    return x.to(device=device, dtype=torch.int64).reshape(-1)


def _segment_ids(q_ids, kv_ids, batch: int, device):
    """int64 `(batch, s)` segment ids on `device`, equal exactly where the given ones are, or
    (None, None). Casting to int64 is exact for every dtype torch computes with; the unsigned ones
    torch has next to no arithmetic for are read as Python ints, and renumbered in value order if
    some exceed int64 (only equality matters)."""
    if q_ids is None:
        return None, None
    if q_ids.is_meta or kv_ids.is_meta:
        return tuple(x.to(torch.int64).reshape(batch, -1) for x in (q_ids, kv_ids))
    if q_ids.dtype not in _FEW_OPS and kv_ids.dtype not in _FEW_OPS:
        return tuple(x.to(device=device, dtype=torch.int64).reshape(batch, -1) for x in (q_ids, kv_ids))
    values = [x.reshape(-1).tolist() for x in (q_ids, kv_ids)]
    if any(v > 2**63 - 1 for vs in values for v in vs):
        rank = {v: i for i, v in enumerate(sorted(set(values[0]) | set(values[1])))}
        values = [[rank[v] for v in vs] for vs in values]
    return tuple(torch.tensor(vs, dtype=torch.int64, device=device).reshape(batch, -1) for vs in values)


def _rank4(x):
    return x.reshape((1,) * (4 - x.dim()) + tuple(x.shape))


def merge_masks(attn_mask, bias, mask):
    """One mask from `attn_mask`, `bias` and `mask` (`jax_attn.visibility.merge_masks`): bool where
    all parts are bool (AND), else an additive bias (float parts added, keys a bool part drops at
    -inf). Rank 4, not broadcast."""
    minus_inf = lambda x: torch.full((), float("-inf"), dtype=x.dtype, device=x.device)  # noqa: E731
    return visibility.merge_masks([None if x is None else _rank4(x) for x in (attn_mask, bias, mask)],
                                  lambda x: x.dtype == torch.bool,
                                  lambda keep, add: torch.where(keep, add, minus_inf(add)))


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """Tensors in the caller's layout (a batch axis of 1 added to unbatched ones); `spec` in bnsd
    terms; `mask` the merged mask, left-padded to rank 4. `q_lengths` is applied around the
    backends (`finish`). `q_segment_ids (b, sq)`, `kv_segment_ids (b, skv)`: int64, both or neither."""

    q: Any
    k: Any
    v: Any
    mask: Any
    kv_lengths: Any
    spec: Spec
    call: RunContext
    q_lengths: Any = None
    q_segment_ids: Any = None
    kv_segment_ids: Any = None

    @classmethod
    def build(cls, q, k, v, *, attn_mask=None, kv_lengths=None, scale=None, is_causal=False,
              layout="bnsd", return_lse=False, bias=None, mask=None, query_seq_lengths=None,
              local_window_size=None, q_segment_ids=None, kv_segment_ids=None) -> "AttentionInputs":
        spec, call = describe(q, k, v, attn_mask=attn_mask, kv_lengths=kv_lengths, scale=scale,
                              is_causal=is_causal, layout=layout, return_lse=return_lse, bias=bias,
                              mask=mask, query_seq_lengths=query_seq_lengths,
                              local_window_size=local_window_size, q_segment_ids=q_segment_ids,
                              kv_segment_ids=kv_segment_ids)
        if spec.unbatched:
            q, k, v = q[None], k[None], v[None]
        return cls(q, k, v, merge_masks(attn_mask, bias, mask),
                   _lengths(kv_lengths, "kv_lengths", spec.kv_len, q.device), spec, call,
                   _lengths(query_seq_lengths, "query_seq_lengths", spec.q_len, q.device),
                   *_segment_ids(q_segment_ids, kv_segment_ids, spec.batch, q.device))

    @property
    def segments(self):
        """`(q_segment_ids, kv_segment_ids)`, or None for a call without packed sequences."""
        return None if self.q_segment_ids is None else (self.q_segment_ids, self.kv_segment_ids)

    def padding_zeroed(self) -> "AttentionInputs":
        """A new `AttentionInputs` (this one is left as it is) with the keys no query sees and the
        padding queries zeroed (`jax_attn.inputs.AttentionInputs.padding_zeroed`)."""
        spec, q, k, v = self.spec, self.q, self.k, self.v
        seen = masking.seen_keys(spec, self.mask, self.kv_lengths, self.q_lengths, q.device,
                                 self.q_segment_ids, self.kv_segment_ids)
        if seen is not None:  # (b|1, n_kv|1, skv)
            seen = seen[..., None] if spec.layout == "bnsd" else seen.transpose(1, 2)[..., None]
            k = torch.where(seen, k, torch.zeros((), dtype=k.dtype, device=k.device))
            v = torch.where(seen, v, torch.zeros((), dtype=v.dtype, device=v.device))
        if self.q_lengths is not None:
            q = torch.where(self._valid_rows(), q, torch.zeros((), dtype=q.dtype, device=q.device))
        return dataclasses.replace(self, q=q, k=k, v=v)

    def _valid_rows(self):
        """bool `(b, sq)`, as `(b, 1, sq, 1)` or `(b, sq, 1, 1)` in the caller's layout."""
        valid = torch.arange(self.spec.q_len, device=self.q.device)[None, :] < self.q_lengths[:, None]
        return valid[:, None, :, None] if self.spec.layout == "bnsd" else valid[:, :, None, None]

    def finish(self, result, return_lse: bool):
        """A backend's result as the caller gets it: padding queries zeroed (lse -inf), the batch
        axis of unbatched inputs removed."""
        out, lse = result if return_lse else (result, None)
        if self.q_lengths is not None:
            out = torch.where(self._valid_rows(), out, torch.zeros((), dtype=out.dtype, device=out.device))
            if lse is not None:
                valid = torch.arange(self.spec.q_len, device=lse.device) < self.q_lengths[:, None]
                lse = lse.masked_fill(~valid[:, None], float("-inf"))
        if self.spec.unbatched:
            out, lse = out[0], None if lse is None else lse[0]
        return (out, lse) if return_lse else out

    def bnsd(self):
        """`(q, k, v)` in `(b, n, s, d)`: strided views, no copies."""
        if self.spec.layout == "bnsd":
            return self.q, self.k, self.v
        return tuple(x.transpose(1, 2) for x in (self.q, self.k, self.v))

    def bsnd(self):
        if self.spec.layout == "bsnd":
            return self.q, self.k, self.v
        return tuple(x.transpose(1, 2) for x in (self.q, self.k, self.v))

    def from_bnsd(self, out):
        return out if self.spec.layout == "bnsd" else out.transpose(1, 2)

    def from_bsnd(self, out):
        return out if self.spec.layout == "bsnd" else out.transpose(1, 2)


def __getattr__(name):
    # `Call` read as a function call's name; `RunContext` says what it is: the run-time facts of a call.
    if name == "Call":
        import warnings
        warnings.warn("torch_ref.inputs.Call is renamed RunContext", DeprecationWarning, stacklevel=2)
        return RunContext
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
