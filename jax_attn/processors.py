"""Attention processors, written once for `jax_attn.Attention` (Flax NNX) and `torch_ref.Attention`.

This module imports no array framework. A processor is a callable that receives the attention
module itself and does all of its math through that module's methods, attributes and `attn.ops`;
so the same class runs wherever a module implements the protocol below.

The protocol (what a module must provide; `b` batch, `sq`/`skv` query/key lengths, `n = heads`,
`d = dim_head`, `c_q = query_dim`, `c_kv = cross_attention_dim or query_dim`, `inner = n * d`)
------------------------------------------------------------------------------------------------
Attributes
  heads, dim_head, inner_dim, query_dim         ints
  cross_attention_dim                            int: width of `encoder_hidden_states` (c_kv)
  is_cross_attention                             bool: built with a `cross_attention_dim`
  scale                                          float, dim_head ** -0.5
  layer_name                                     str: path in the model ("" until
                                                 `set_attn_processor` names it; no ".processor")
  ops                                            the array-op namespace below
Sub-modules (callables)
  to_q (b, s, c_q) -> (b, s, inner)              to_k, to_v (b, s, c_kv) -> (b, s, inner)
  to_out[0] (b, s, inner) -> (b, s, c_q)         to_out[1] dropout (identity in inference)
  norm_q, norm_k                                 None, or (b, n, s, d) -> (b, n, s, d)
Head layout
  split_heads(x (b, s, n*d)) -> (b, n, s, d)     merge_heads(x (b, n, s, d)) -> (b, s, n*d)
  head_to_batch_dim(x (b, s, n*d), out_dim=3) -> (b*n, s, d), or (b, n, s, d) for out_dim=4
  batch_to_head_dim(x (b*n, s, d)) -> (b, s, n*d)
Attention
  attention_forward(q, k, v, attn_mask=None, kv_lengths=None, scale=None, return_lse=False)
      q (b, n, sq, d), k/v (b, n, skv, d) -> out (b, n, sq, d) [, lse (b, n, sq) float32]:
      the framework's routed attention with the module's backend; scale defaults to `attn.scale`.
  attention_logits(q, k, attn_mask=None, kv_lengths=None, query_index=None)
      -> float32 (b, n, nq, skv): scale * q.k + bias, masked keys at -inf, for the queries in
      `query_index` (a tuple of ints; all queries when None). Never more than asked.
  mask_to_bias(attn_mask, kv_lengths=None, kv_len=None) -> additive float32 rank-4 bias
      (-inf = dropped), or None when there is neither; `kv_len` = skv, needed for kv_lengths alone.
  prepare_attention_mask(attention_mask, target_length, batch_size, out_dim=3, kv_lengths=None)
      -> additive float32 (b*n, 1 or sq, skv) (or (b, n, 1 or sq, skv) for out_dim=4), or None.
  get_attention_scores(query (b*n, sq, d), key (b*n, skv, d), attention_mask=None)
      -> probabilities (b*n, sq, skv) in query's dtype (softmax in float32; fully masked rows 0).
Processor-owned state (lives in the module, one copy per layer, reset by `set_processor`)
  new_param(name, shape, init="zeros" | "normal", std=1.0)  trainable (nnx.Param / nn.Parameter)
  get_param(name) -> array
  new_state(name, value)                         non-trainable (nnx Variable / buffer)
  get_state(name) -> array                       set_state(name, value) (shape may change)
  has_state(name) -> bool                        (params and states share one namespace)
attn.ops: einsum(spec, *xs), matmul(a, b), exp, log, isfinite(x), where(cond, a, b),
  softmax(x, axis=-1) (a row of all -inf gives zeros), sum/mean(x, axis, keepdims=False),
  concatenate(xs, axis), take(x, index: tuple[int, ...], axis), cast(x, dtype),
  asarray(nested python list, like: an array whose dtype to use), zeros(shape) (float32),
  swapaxes(x, a, b). `where` and arithmetic accept Python scalars.
  Arrays also support `.shape`, `.reshape(shape_tuple)`, `.dtype`, indexing and arithmetic.

Calling convention
------------------
`attn(hidden_states, encoder_hidden_states=None, attention_mask=None, kv_lengths=None, **kw)`
runs `processor(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)` where the module
has already normalized `attention_mask` to `attention_forward`'s convention (rank 4, broadcastable
to (b, n, sq, skv); bool True = attend, or an additive float bias) and passes `kv_lengths=` only
when given. `kw` are the model's `cross_attention_kwargs`; the module raises a `TypeError` naming
the processor and the key when the processor's `__call__` does not accept one.

State and mutability
--------------------
A processor object is configuration: under `nnx.jit` it is a static part of the graph, so it is
frozen once attached to a layer (setting an attribute raises; build a new one and set it). One
instance may be shared by many layers. Everything that changes or trains lives in the layer,
created through `attn.new_param` / `attn.new_state` in `setup(attn)`, which the module calls once
per layer on attach; `nnx.jit`, `nnx.grad` and optimizers see it as ordinary module state
(`jax_attn.attention.ProcessorState` for the non-trainable part). Setting another processor drops
the previous processor's state. Setting is all or nothing (`set_layer_processors`): a request is
checked whole before any layer changes, and a `setup` that raises leaves every layer with its
previous processor and state (modules provide `_save_processor()` / `_restore_processor(saved)`).
"""
from __future__ import annotations

import inspect

import math

# Finders from a model to its attention layers, registered by the frameworks: fn(model) returns
# {layer path: attention module}, or None when `model` is not one of that framework's modules.
LAYER_FINDERS: list = []


def _shape(x) -> str:
    return "(" + ", ".join(map(str, x.shape)) + ")"


def check_call(attn, hidden_states, encoder_hidden_states) -> tuple[int, int, int]:
    """Validate an `Attention` call's inputs (either framework); returns `(b, sq, skv)`."""
    if getattr(hidden_states, "ndim", None) != 3 or hidden_states.shape[-1] != attn.query_dim:
        got = _shape(hidden_states) if hasattr(hidden_states, "shape") else type(hidden_states).__name__
        raise ValueError(f"hidden_states must have shape (b, sq, query_dim={attn.query_dim}), got {got}")
    b, sq, _ = hidden_states.shape
    if encoder_hidden_states is None:
        return b, sq, sq
    if (getattr(encoder_hidden_states, "ndim", None) != 3 or encoder_hidden_states.shape[0] != b
            or encoder_hidden_states.shape[-1] != attn.cross_attention_dim):
        raise ValueError(f"encoder_hidden_states must have shape (b={b}, skv, "
                         f"cross_attention_dim={attn.cross_attention_dim}), got "
                         f"{_shape(encoder_hidden_states)}")
    return b, sq, encoder_hidden_states.shape[1]


def check_processor_kwargs(processor, kwargs, layer_name) -> None:
    """A `TypeError` naming the processor, the layer and the keys its `__call__` does not take."""
    if not kwargs:
        return
    fn = processor if inspect.isfunction(processor) or inspect.ismethod(processor) else processor.__call__
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = {p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                     inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    accepted -= {"self", "attn", "hidden_states", "encoder_hidden_states", "attention_mask"}
    bad = sorted(set(kwargs) - accepted)
    if bad:
        raise TypeError(f"attention processor {type(processor).__name__} at layer {layer_name!r} does "
                        f"not accept {', '.join(map(repr, bad))} (from cross_attention_kwargs or "
                        f"kv_lengths); it accepts: {', '.join(sorted(accepted)) or 'nothing extra'}")


def register_layer_finder(fn):
    """Let processors find the attention layers of a model (each framework registers one)."""
    if fn not in LAYER_FINDERS:
        LAYER_FINDERS.append(fn)
    return fn


def attention_layers(model) -> dict:
    """`{layer path: attention module}` for any model a registered framework understands."""
    for fn in LAYER_FINDERS:
        found = fn(model)
        if found is not None:
            return found
    raise TypeError(f"model of type {type(model).__name__} is not a module tree of a framework "
                    "with attention layers (jax_attn / torch_ref)")


def _layer_key(name: str) -> str:
    return name[: -len(".processor")] if name.endswith(".processor") else name


def _processor_key(path: str) -> str:
    return f"{path}.processor" if path else "processor"


def check_processor(processor, key=None) -> None:
    """A `TypeError` naming `key` (a layer key) unless `processor` is a callable processor instance."""
    where = "processor" if key is None else f"processor for {key!r}"
    if isinstance(processor, type):
        raise TypeError(f"{where} is the class {processor.__name__}, not a processor: "
                        "pass an instance, e.g. AttnProcessor()")
    if not callable(processor):
        raise TypeError(f"{where} must be callable as processor(attn, hidden_states, ...), "
                        f"got {type(processor).__name__}")


def resolve_processors(layers: dict, request) -> dict:
    """`set_attn_processor`'s request (one processor, or a dict `{layer key: processor}` naming
    every layer once) checked against `{layer path: module}`: `{layer path: processor}`.

    Touches no layer; every error names the offending key."""
    if not isinstance(request, dict):
        if not callable(request):
            raise TypeError("set_attn_processor wants a processor instance or a dict "
                            f"{{layer key: processor}}, got {type(request).__name__}")
        check_processor(request)
        return dict.fromkeys(layers, request)
    given, keys = {}, {}
    for key, processor in request.items():
        if not isinstance(key, str):
            raise TypeError(f"set_attn_processor: dict keys must be layer keys (str), got {key!r} "
                            f"({type(key).__name__})")
        path = "" if key == "processor" else _layer_key(key)
        if path in given:
            raise ValueError(f"set_attn_processor: {keys[path]!r} and {key!r} name the same layer "
                             f"{_processor_key(path)!r}")
        given[path], keys[path] = processor, key
    missing = sorted(set(layers) - set(given))
    unknown = sorted(set(given) - set(layers))
    if missing or unknown:
        raise ValueError(
            "set_attn_processor: the processor dict must name every attention layer exactly; "
            + (f"missing {[_processor_key(p) for p in missing]}; " if missing else "")
            + (f"unknown {[_processor_key(p) for p in unknown]}; " if unknown else "")
            + f"known: {[_processor_key(p) for p in layers]}")
    for path, processor in given.items():
        check_processor(processor, keys[path])
    return {path: given[path] for path in layers}


def set_layer_processors(layers: dict, request, attach) -> None:
    """All or nothing: `attach(module, processor)` on every layer of `resolve_processors(layers,
    request)`. When one raises, the layers changed so far get their previous processor and state
    back (`module._save_processor()` / `module._restore_processor(saved)`, the one framework-specific
    part), processors this call froze are thawed, and the exception propagates."""
    plan = resolve_processors(layers, request)
    for path, layer in layers.items():
        layer.layer_name = path
    thaw = [p for p in {id(p): p for p in plan.values()}.values()
            if isinstance(p, AttnProcessorBase) and not p._frozen]
    done = []
    try:
        for path, processor in plan.items():
            done.append((layers[path], layers[path]._save_processor()))
            attach(layers[path], processor)
    except BaseException:
        for layer, saved in reversed(done):
            layer._restore_processor(saved)
        for p in thaw:
            object.__setattr__(p, "_frozen", False)
        raise


class AttnProcessorBase:
    """Optional base: `setup(attn)` to create per-layer state, and freezing once attached."""

    _frozen = False

    def setup(self, attn) -> None:
        """Called once for each layer this processor is attached to; create state here."""

    def freeze(self) -> None:
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name, value):
        if self._frozen:
            raise AttributeError(
                f"{type(self).__name__} is attached to attention layers and is frozen (it is static "
                f"under nnx.jit): build a new processor and set it, instead of setting {name!r}")
        object.__setattr__(self, name, value)

    def __repr__(self):
        items = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({items})"


def _project(attn, hidden_states, encoder_hidden_states):
    """q, k, v in (b, n, s, d), with the module's optional q/k norms."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    q = attn.split_heads(attn.to_q(hidden_states))
    k = attn.split_heads(attn.to_k(context))
    v = attn.split_heads(attn.to_v(context))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


def _output(attn, out):
    """(b, n, sq, d) -> merged heads -> output projection -> dropout."""
    return attn.to_out[1](attn.to_out[0](attn.merge_heads(out)))


def _check_layers(layers, kind):
    if kind not in ("all", "self", "cross"):
        raise ValueError(f"kind must be 'all', 'self' or 'cross', got {kind!r}")
    if layers is None:
        return None
    if isinstance(layers, str):
        raise TypeError("layers must be a collection of layer paths, not a single string")
    return frozenset(_layer_key(x) for x in layers)


def _selected(attn, layers, kind) -> bool:
    if kind == "cross" and not attn.is_cross_attention or kind == "self" and attn.is_cross_attention:
        return False
    return layers is None or attn.layer_name in layers


class AttnProcessor(AttnProcessorBase):
    """The default: project, `attn.attention_forward` (routed to the module's backend), project out."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 kv_lengths=None):
        q, k, v = _project(attn, hidden_states, encoder_hidden_states)
        out = attn.attention_forward(q, k, v, attn_mask=attention_mask, kv_lengths=kv_lengths)
        return _output(attn, out)


class SlicedAttnProcessor(AttnProcessorBase):
    """diffusers' sliced attention: materialized scores, `slice_size` of the `b*n` maps at a time.

    Peak memory `slice_size * sq * skv` scores instead of `b * n * sq * skv`; the loop is unrolled
    at trace time (`ceil(b*n / slice_size)` matmul pairs). Uses `get_attention_scores`, so it does
    not use the fast backend: prefer `AttnProcessor` unless you need the diffusers behavior.
    """

    def __init__(self, slice_size: int):
        if not isinstance(slice_size, int) or isinstance(slice_size, bool) or slice_size < 1:
            raise ValueError(f"slice_size must be a positive int, got {slice_size!r}")
        self.slice_size = slice_size

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 kv_lengths=None):
        q, k, v = _project(attn, hidden_states, encoder_hidden_states)
        b, n, sq, d = q.shape
        skv = k.shape[2]
        mask = attn.prepare_attention_mask(attention_mask, skv, b, kv_lengths=kv_lengths)
        q, k, v = (x.reshape((b * n, x.shape[2], x.shape[3])) for x in (q, k, v))
        outs = []
        for i in range(0, b * n, self.slice_size):
            j = min(i + self.slice_size, b * n)
            m = None if mask is None else mask[i:j]
            probs = attn.get_attention_scores(q[i:j], k[i:j], m)
            outs.append(attn.ops.matmul(attn.ops.cast(probs, v.dtype), v[i:j]))
        out = attn.batch_to_head_dim(attn.ops.concatenate(outs, 0))
        return attn.to_out[1](attn.to_out[0](out))


def _maps_from_lse(attn, q, k, lse, attention_mask, kv_lengths, queries):
    """p = exp(logits - lse) for the chosen queries: (b, n, nq, skv) float32; empty rows give 0."""
    ops = attn.ops
    logits = attn.attention_logits(q, k, attn_mask=attention_mask, kv_lengths=kv_lengths,
                                   query_index=queries)
    if queries is not None:
        lse = ops.take(lse, queries, 2)
    lse = lse[..., None]
    finite = ops.isfinite(lse)
    # A row with no key has lse = -inf and all logits -inf; subtract 0 there so exp gives 0, not NaN.
    return ops.exp(logits - ops.where(finite, lse, 0.0))


class AttentionMapStore(AttnProcessorBase):
    """Attention maps for visualization (prompt-to-prompt, attend-and-excite), on the fast path.

    The output still comes from `attn.attention_forward` (any backend), asked for its log-sum-exp;
    the maps are then recomputed for the chosen layers and queries only as
    `p = exp(scale * q.k + bias - lse)`, which is exactly the kernel's softmax row.

    Args:
      layers: layer paths to record (as in `attn_processors`, with or without ".processor");
        None records every layer that `kind` admits. Other layers run `AttnProcessor`.
      kind: "all", "cross" (cross-attention layers only) or "self".
      queries: query positions to record (ints); None records every query: the full map.
      average_heads: store the mean over heads, `(b, nq, skv)`, instead of `(b, n, nq, skv)`.

    Memory: per recorded layer and call, a transient `b * n * nq * skv` float32 (logits, then
    probabilities) and a stored `b * nq * skv` (averaged) or `b * n * nq * skv` float32 array,
    with `nq = len(queries)`. Nothing of size `sq * skv` per head exists unless `queries` is None.
    The attention kernel itself keeps its own memory behavior (linear in s for flash backends).

    The maps are module state (`ProcessorState` variables), so they are captured inside `nnx.jit`;
    read them after a call with `maps(model)`.
    """

    STATE = "attention_maps"

    def __init__(self, layers=None, *, kind: str = "all", queries=None, average_heads: bool = True):
        self.layers = _check_layers(layers, kind)
        self.kind = kind
        if queries is not None:
            queries = tuple(int(i) for i in queries)
            if not queries:
                raise ValueError("queries must name at least one query position (or be None for all)")
        self.queries = queries
        self.average_heads = bool(average_heads)

    def setup(self, attn):
        if _selected(attn, self.layers, self.kind):
            # An empty placeholder: the first call sets the real (b, [n,] nq, skv) shape.
            attn.new_state(self.STATE, attn.ops.zeros((0,)))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 kv_lengths=None):
        q, k, v = _project(attn, hidden_states, encoder_hidden_states)
        if not _selected(attn, self.layers, self.kind):
            out = attn.attention_forward(q, k, v, attn_mask=attention_mask, kv_lengths=kv_lengths)
            return _output(attn, out)
        sq = q.shape[2]
        if self.queries is not None and not all(-sq <= i < sq for i in self.queries):
            raise ValueError(f"AttentionMapStore.queries {self.queries} out of range for {sq} queries "
                             f"at layer {attn.layer_name!r}")
        queries = None if self.queries is None else tuple(i % sq for i in self.queries)
        out, lse = attn.attention_forward(q, k, v, attn_mask=attention_mask, kv_lengths=kv_lengths,
                                          return_lse=True)
        p = _maps_from_lse(attn, q, k, lse, attention_mask, kv_lengths, queries)
        attn.set_state(self.STATE, attn.ops.mean(p, 1) if self.average_heads else p)
        return _output(attn, out)

    def maps(self, model) -> dict:
        """`{layer path: maps}` recorded by the last call, for the layers this store records."""
        found = {}
        for path, layer in attention_layers(model).items():
            if layer.processor is self and layer.has_state(self.STATE):
                value = layer.get_state(self.STATE)
                if value.shape != (0,):
                    found[path] = value
        return found


class AttentionReweightProcessor(AttnProcessorBase):
    """Prompt-to-prompt token re-weighting, on any backend.

    `token_weights` maps key positions (text tokens) to weights `w`. With `renormalize=True` the
    probabilities become `w_j p_j / sum_k w_k p_k`: an additive bias `log w` on those keys (w = 0
    drops the key). With `renormalize=False` they become `w_j p_j` (rows no longer sum to one), the
    original prompt-to-prompt edit: `sum_j w_j p_j v_j` is attention over values scaled by `w`, so
    only `v` changes. Weights need `w >= 0` when renormalizing; any real `w` otherwise.

    Args:
      token_weights: {key position: weight}.
      renormalize: see above.
      batch_indices: batch entries to edit (others unchanged); None edits all.
      layers / kind: which layers edit, as in `AttentionMapStore`; default cross-attention only.
    """

    def __init__(self, token_weights, *, renormalize: bool = True, batch_indices=None, layers=None,
                 kind: str = "cross"):
        if not hasattr(token_weights, "items") or not token_weights:
            raise TypeError("token_weights must be a non-empty {key position: weight} mapping")
        weights = tuple(sorted((int(j), float(w)) for j, w in token_weights.items()))
        if renormalize and any(w < 0 for _, w in weights):
            raise ValueError(f"token_weights must be >= 0 with renormalize=True, got {dict(weights)}")
        self.token_weights = weights
        self.renormalize = bool(renormalize)
        self.batch_indices = None if batch_indices is None else frozenset(int(i) for i in batch_indices)
        self.layers = _check_layers(layers, kind)
        self.kind = kind

    def _weights(self, b, skv):
        rows = []
        for i in range(b):
            row = [1.0] * skv
            if self.batch_indices is None or i in self.batch_indices:
                for j, w in self.token_weights:
                    if not -skv <= j < skv:
                        raise ValueError(f"token position {j} out of range for {skv} keys")
                    row[j] = w
            rows.append(row)
        return rows

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 kv_lengths=None):
        q, k, v = _project(attn, hidden_states, encoder_hidden_states)
        if _selected(attn, self.layers, self.kind):
            b, skv = k.shape[0], k.shape[2]
            rows = self._weights(b, skv)
            ops = attn.ops
            if self.renormalize:
                with_log = [[math.log(w) if w > 0 else -math.inf for w in r] for r in rows]
                bias = ops.asarray(with_log, ops.zeros((1,)))[:, None, None, :]
                base = attn.mask_to_bias(attention_mask, kv_lengths, kv_len=skv)
                attention_mask = bias if base is None else base + bias
                kv_lengths = None  # folded into the bias
            else:
                v = v * ops.asarray(rows, v)[:, None, :, None]
        out = attn.attention_forward(q, k, v, attn_mask=attention_mask, kv_lengths=kv_lengths)
        return _output(attn, out)


class AttentionMapReplaceProcessor(AttnProcessorBase):
    """Prompt-to-prompt map replacement: inject source maps into a target pass.

    Call the model with `cross_attention_kwargs={"source_maps": {layer path: maps}}` (e.g. from an
    `AttentionMapStore(kind="cross", average_heads=False)` pass on the source prompt). Selected layers
    named in `source_maps` compute `out = P_source @ v_target`; maps may be `(b, n, sq, skv)` or
    head-averaged `(b, sq, skv)` (then used for every head). Other layers, and calls without
    `source_maps`, run `AttnProcessor`. The maps arrive as call arguments, so switching prompts or
    steps under `nnx.jit` does not retrace. The injected maps are materialized (`b*n*sq*skv`): meant
    for cross-attention, where `skv` is the text length.
    """

    def __init__(self, *, layers=None, kind: str = "cross"):
        self.layers = _check_layers(layers, kind)
        self.kind = kind

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 kv_lengths=None, source_maps=None):
        q, k, v = _project(attn, hidden_states, encoder_hidden_states)
        p = None
        if source_maps is not None and _selected(attn, self.layers, self.kind):
            p = source_maps.get(attn.layer_name)
        if p is None:
            out = attn.attention_forward(q, k, v, attn_mask=attention_mask, kv_lengths=kv_lengths)
            return _output(attn, out)
        b, n, sq, _ = q.shape
        skv = k.shape[2]
        want = [(b, n, sq, skv), (b, sq, skv)]
        if tuple(p.shape) not in want:
            raise ValueError(f"source_maps[{attn.layer_name!r}] must have shape (b, n, sq, skv) = "
                             f"{want[0]} or (b, sq, skv) = {want[1]}, got {tuple(p.shape)}")
        if len(p.shape) == 3:
            out = attn.ops.einsum("bqk,bnkd->bnqd", attn.ops.cast(p, v.dtype), v)
        else:
            out = attn.ops.einsum("bnqk,bnkd->bnqd", attn.ops.cast(p, v.dtype), v)
        return _output(attn, out)


class LoRAAttnProcessor(AttnProcessorBase):
    """Low-rank updates of the q, k, v and output projections: `W x + (alpha / r) * up(down(x))`.

    Per layer and target t in `targets`, trainable `to_{t}_lora_down (in, rank)` (normal, std
    1/rank, as diffusers) and `to_{t}_lora_up (rank, out)` (zeros, so a fresh LoRA is the identity
    edit). `alpha = network_alpha or rank`. The model's `cross_attention_kwargs={"scale": s}`
    scales the update at call time (diffusers' LoRA scale). Train with
    `nnx.grad(..., argnums=nnx.DiffState(0, nnx.Param))` and freeze the base weights by filtering
    on the parameter names (`nnx.PathContains("lora")`).
    """

    TARGETS = ("q", "k", "v", "out")

    def __init__(self, rank: int = 4, network_alpha: float | None = None, targets=TARGETS):
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        targets = tuple(targets)
        bad = [t for t in targets if t not in self.TARGETS]
        if bad or not targets:
            raise ValueError(f"targets must be a non-empty subset of {self.TARGETS}, got {targets}")
        self.rank = rank
        self.network_alpha = network_alpha
        self.targets = targets

    def _dims(self, attn, t):
        if t == "q":
            return attn.query_dim, attn.inner_dim
        if t == "out":
            return attn.inner_dim, attn.query_dim
        return attn.cross_attention_dim, attn.inner_dim

    def setup(self, attn):
        for t in self.targets:
            d_in, d_out = self._dims(attn, t)
            attn.new_param(f"to_{t}_lora_down", (d_in, self.rank), init="normal", std=1.0 / self.rank)
            attn.new_param(f"to_{t}_lora_up", (self.rank, d_out), init="zeros")

    def _delta(self, attn, t, x, scale):
        ops = attn.ops
        down = ops.cast(attn.get_param(f"to_{t}_lora_down"), x.dtype)
        up = ops.cast(attn.get_param(f"to_{t}_lora_up"), x.dtype)
        factor = scale * (self.network_alpha or self.rank) / self.rank
        return ops.matmul(ops.matmul(x, down), up) * factor

    def _proj(self, attn, t, layer, x, scale):
        y = layer(x)
        return y + self._delta(attn, t, x, scale) if t in self.targets else y

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 kv_lengths=None, scale: float = 1.0):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.split_heads(self._proj(attn, "q", attn.to_q, hidden_states, scale))
        k = attn.split_heads(self._proj(attn, "k", attn.to_k, context, scale))
        v = attn.split_heads(self._proj(attn, "v", attn.to_v, context, scale))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = attn.merge_heads(attn.attention_forward(q, k, v, attn_mask=attention_mask,
                                                      kv_lengths=kv_lengths))
        return attn.to_out[1](self._proj(attn, "out", attn.to_out[0], out, scale))


__all__ = ["AttnProcessorBase", "AttnProcessor", "SlicedAttnProcessor", "AttentionMapStore",
           "AttentionReweightProcessor", "AttentionMapReplaceProcessor", "LoRAAttnProcessor",
           "attention_layers", "register_layer_finder"]
