"""Bad input is refused before any backend runs, with an error naming the argument."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_attn
from jax_attn.contract import validate

f32 = jnp.float32


def arr(*shape, dtype=f32):
    return jax.ShapeDtypeStruct(shape, dtype)


Q, K, V = arr(2, 4, 16, 8), arr(2, 2, 12, 8), arr(2, 2, 12, 6)

BAD = [
    (dict(q=arr(4, 16, 8)), ValueError, r"q must have rank 4 \(b, n, s, d\)"),
    (dict(k=arr(3, 2, 12, 8)), ValueError, "same batch size"),
    (dict(k=arr(2, 2, 12, 7)), ValueError, "k must have q's head dim d=8"),
    (dict(v=arr(2, 2, 11, 6)), ValueError, r"v must have k's heads and sequence length"),
    (dict(k=arr(2, 3, 12, 8), v=arr(2, 3, 12, 6)), ValueError, r"multiple of k/v's heads \(3\)"),
    (dict(q=arr(2, 4, 16, 8, dtype=jnp.int32)), TypeError, "q must have a floating dtype"),
    (dict(v=arr(2, 2, 12, 6, dtype=jnp.bfloat16)), TypeError, "share one dtype"),
    (dict(attn_mask=arr(2, 4, 16, 13, dtype=jnp.bool_)), ValueError, "not broadcastable to"),
    (dict(attn_mask=arr(1, 2, 4, 16, 12, dtype=jnp.bool_)), ValueError, "attn_mask must have rank <= 4"),
    (dict(attn_mask=arr(16, 12, dtype=jnp.int32)), TypeError, "attn_mask must be bool"),
    (dict(kv_lengths=arr(2, 1, dtype=jnp.int32)), ValueError, r"kv_lengths must have shape \(b,\) = \(2,\)"),
    (dict(kv_lengths=arr(2, dtype=f32)), TypeError, "kv_lengths must have an integer dtype"),
    (dict(layout="sbnd"), ValueError, "layout must be one of"),
    (dict(q=np.ones((2, 4, 16, 8), np.float32).tolist()), TypeError, "q must be an array"),
    (dict(is_causal=1), TypeError, "is_causal must be a bool"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(q=arr(2, 0, 16, 8)), ValueError, "no zero-sized dimension"),
]


@pytest.mark.parametrize("change,error,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_names_the_argument(change, error, message):
    args = dict(q=Q, k=K, v=V)
    args.update(change)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error, match=message):
        validate(q, k, v, **args)
    if "layout" not in change and not isinstance(q, list):  # the public call raises the same
        with pytest.raises(error, match=message):
            jax_attn.explain(q, k, v, **args)


def test_bsnd_shapes_are_read_as_b_s_n_d():
    spec = validate(arr(2, 16, 4, 8), arr(2, 12, 2, 8), arr(2, 12, 2, 6), layout="bsnd")
    assert (spec.heads, spec.kv_heads, spec.q_len, spec.kv_len, spec.value_dim) == (4, 2, 16, 12, 6)
    with pytest.raises(ValueError, match=r"q must have rank 4 \(b, s, n, d\)"):
        validate(arr(16, 4, 8), arr(2, 12, 2, 8), arr(2, 12, 2, 6), layout="bsnd")


def test_spec_describes_the_call():
    spec = validate(Q, K, V, attn_mask=arr(16, 12, dtype=jnp.bool_), kv_lengths=arr(2, dtype=jnp.int32),
                    is_causal=True)
    assert spec.groups == 2 and spec.mask_kind == "bool" and spec.mask_shape == (1, 1, 16, 12)
    assert spec.scale == pytest.approx(8 ** -0.5) and spec.can_have_empty_rows and not spec.per_key_mask
    assert spec.flops() == pytest.approx(2 * 2 * 4 * 16 * 12 * (8 + 6) / 2)


def test_renamed_capability_flags_keep_working_with_a_warning():
    """Capability flags are `supports_*`; the old names read and (in subclasses) write with a warning."""
    import warnings as _w

    from jax_attn.backends import BACKENDS
    from jax_attn.backends.naive import Naive

    with pytest.warns(DeprecationWarning, match="supports_window"):
        assert BACKENDS["naive"].window is True
    with pytest.warns(DeprecationWarning, match="supports_bias"):
        class NoBias(Naive):
            name = "nobias"
            bias = False
    assert NoBias.supports_bias is False and NoBias().supports_causal is True
    with _w.catch_warnings():
        _w.simplefilter("error")
        assert BACKENDS["naive"].supports_window is True
