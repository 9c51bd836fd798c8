"""Weights between Flax NNX modules and torch state dicts, under diffusers' parameter names.

Names: a Flax parameter path joined by "." with the leaf renamed as torch names it:
`kernel` -> `weight` (transposed: Linear `(in, out)` -> `(out, in)`; Conv `(..., in, out)` ->
`(out, in, ...)`), `scale` -> `weight` (LayerNorm, RMSNorm, GroupNorm), `embedding` -> `weight`;
other leaves (biases, processor parameters such as `processor_state.to_q_lora_down`) keep their
name and layout. So `jax_attn.Attention.to_out[0].kernel` is `to_out.0.weight`, as in diffusers.
This one rule serves `torch_ref.Attention`, diffusers' `Attention` and the example models, as long
as the torch twin uses the Flax module's attribute names.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

_RENAME = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def _torch_name(path) -> str:
    *head, leaf = (str(p) for p in path)
    return ".".join([*head, _RENAME.get(leaf, leaf)])


def _to_torch_layout(leaf: str, x):
    """Flax array (NumPy) -> torch layout."""
    if leaf != "kernel" or x.ndim < 2:
        return x
    # (..., in, out) -> (out, in, ...): Linear is the 2-d case, a plain transpose.
    return np.transpose(x, (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2)))


def _to_flax_layout(leaf: str, x):
    if leaf != "kernel" or x.ndim < 2:
        return x
    return np.transpose(x, (*range(2, x.ndim), 1, 0))


def _params(flax_module):
    """(state, [(torch name, path, variable)]) for every `nnx.Param` of the module."""
    if not isinstance(flax_module, nnx.Module):
        raise TypeError(f"flax_module must be a flax.nnx.Module, got {type(flax_module).__name__}")
    state = nnx.state(flax_module, nnx.Param)
    flat = nnx.to_flat_state(state)
    return state, [(_torch_name(path), path, var) for path, var in flat]


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _jax_to_torch(x) -> torch.Tensor:
    if _dtype_name(x.dtype) == "bfloat16":  # ml_dtypes' NumPy bfloat16, which torch cannot read
        return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(x))  # a writable copy


def flax_state_dict(flax_module) -> dict[str, torch.Tensor]:
    """The module's parameters as a torch state dict (diffusers names and layouts, same dtypes).

    Load it with `torch_module.load_state_dict(...)` (strict by default, so names are checked).
    """
    _, params = _params(flax_module)
    out = {}
    for name, path, var in params:
        out[name] = _jax_to_torch(_to_torch_layout(str(path[-1]), np.asarray(var.get_value())))
    return out


def load_state_dict_into_flax(flax_module, state_dict, *, cast: bool = False) -> None:
    """Load a torch state dict (torch_ref / diffusers names and layouts) into `flax_module`, in place.

    Every parameter must be given exactly once, with the torch shape that matches the Flax one and
    the Flax parameter's dtype (`cast=True` converts dtypes instead). All problems are reported in
    one `ValueError`: missing keys, unexpected keys, mis-shaped and mis-typed tensors.
    """
    if not hasattr(state_dict, "items"):
        raise TypeError(f"state_dict must be a mapping of name -> torch.Tensor, got {type(state_dict).__name__}")
    state, params = _params(flax_module)
    expected = {name for name, _, _ in params}
    problems = []
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    updates = []
    for name, path, var in params:
        if name not in state_dict:
            continue
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            problems.append(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            continue
        current = var.get_value()
        want = tuple(_to_torch_layout(str(path[-1]), np.empty(current.shape, np.int8)).shape)
        if tuple(t.shape) != want:
            problems.append(f"{name}: shape {tuple(t.shape)} does not match the Flax parameter "
                            f"{'.'.join(map(str, path))} {tuple(current.shape)} (torch layout {want})")
            continue
        if _dtype_name(t.dtype) != _dtype_name(current.dtype) and not cast:
            problems.append(f"{name}: dtype {_dtype_name(t.dtype)} differs from the Flax parameter's "
                            f"{_dtype_name(current.dtype)} (pass cast=True to convert)")
            continue
        if not t.dtype.is_floating_point:
            problems.append(f"{name}: dtype {_dtype_name(t.dtype)} is not floating point")
            continue
        x = _to_flax_layout(str(path[-1]), t.detach().to("cpu", torch.float32).numpy())
        updates.append((var, jnp.asarray(x, dtype=current.dtype)))
    if problems:
        raise ValueError(f"cannot load the state dict into {type(flax_module).__name__}:\n  "
                         + "\n  ".join(problems))
    for var, value in updates:
        var.set_value(value)
    nnx.update(flax_module, state)


__all__ = ["flax_state_dict", "load_state_dict_into_flax"]
