"""Which modules of a model are attention layers, and attaching processors to them all or nothing.

Framework-free: each framework registers a finder (`register_layer_finder`) and the module methods
`_save_processor()` / `_restore_processor(saved)`; everything else (the request's keys, its
errors, the rollback) is decided here once for both, as is which layers a processor's `layers=` /
`kind=` arguments select (`_check_layers`, `_selected`).
"""
from __future__ import annotations

from .base import AttnProcessorBase

# Finders from a model to its attention layers, registered by the frameworks: fn(model) returns
# {layer path: attention module}, or None when `model` is not one of that framework's modules.
LAYER_FINDERS: list = []


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
