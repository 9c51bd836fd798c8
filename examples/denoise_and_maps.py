"""Denoise a random latent with a tiny (untrained) DiT, save cross-attention maps, edit with processors.

    python examples/denoise_and_maps.py --out /tmp/maps --steps 4 --token cat

1. DDIM-denoises a random latent for the prompt, recording the head-averaged cross-attention maps
   of every layer with `AttentionMapStore` (the output still comes from the fast backend).
2. Saves a PNG: the chosen token's map per step, and the final latents of the edits below.
3. Edits: prompt-to-prompt re-weighting of the token (`AttentionReweightProcessor`), and a word
   swap ("cat" -> "dog") with and without injecting the source prompt's cross-attention maps
   (`AttentionMapReplaceProcessor`); prints how far each result moved from the baseline.
4. With `--attention-8bit`: the baseline again in bfloat16, with the default attention and with
   8-bit attention (`jax_attn.use_backend("sage")`, and `"sage16"`, its 16-bit P V variant),
   each saved as an 8-bit PNG, and the PSNR and largest pixel difference of each 8-bit PNG
   against the bf16 one. The 8-bit kernels need a Hopper GPU; on a
   CPU the kernel runs in Pallas interpret mode (same arithmetic, a minute or so).
The weights are random, so the pictures show the mechanics, not a cat. Runs on a CPU in seconds.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_attn
from jax_attn.attention import set_attn_processor
from jax_attn.models import DiTConfig, TinyDiT, ddim_schedule, ddim_step, embed_prompt
from jax_attn.processors import (AttentionMapReplaceProcessor, AttentionMapStore,
                                 AttentionReweightProcessor, AttnProcessor)

log = logging.getLogger("denoise_and_maps")


@nnx.jit
def _predict(model, x, t, text, kv_lengths, cross_attention_kwargs):
    return model(x, t, text, kv_lengths=kv_lengths, cross_attention_kwargs=cross_attention_kwargs)


def denoise(model, x, text, kv_lengths, steps, *, store=None, kwargs_per_step=None, on_step=None,
            predict=_predict):
    """DDIM loop; `on_step(i)` runs after each model call (e.g. to read a store)."""
    ts, alphas = ddim_schedule(steps)
    for i, t in enumerate(ts):
        kw = kwargs_per_step(i) if kwargs_per_step else None
        eps = predict(model, x, jnp.full((x.shape[0],), float(t)), text, kv_lengths, kw)
        if on_step:
            on_step(i)
        x = ddim_step(x, eps, int(t), int(ts[i + 1]) if i + 1 < len(ts) else -1, alphas)
    return x


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="denoise_out", help="output folder")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompt", default="a photo of a cat on a mat")
    ap.add_argument("--token", default="cat", help="word whose cross-attention map is drawn")
    ap.add_argument("--swap", default="dog", help="word replacing --token for the word-swap edit")
    ap.add_argument("--weight", type=float, default=4.0, help="re-weighting factor for --token")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default=None, help="jax-attn backend (default: routing)")
    ap.add_argument("--attention-8bit", action="store_true",
                    help="also sample in bf16 with 8-bit attention (sage, sage16) and compare the PNGs")
    args = ap.parse_args(argv)
    if args.attention_8bit and jax.default_backend() == "cpu":
        os.environ.setdefault("JAX_ATTN_INTERPRET", "1")  # the sage kernel in interpret mode
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    words = args.prompt.split()
    if args.token not in words:
        ap.error(f"--token {args.token!r} is not a word of --prompt {args.prompt!r}")
    tok = words.index(args.token)
    cfg = DiTConfig(backend=args.backend)
    model = TinyDiT(cfg, rngs=nnx.Rngs(args.seed))
    length = len(words) + 2  # two padding slots, masked out through kv_lengths
    text = embed_prompt(words, cfg.cross_attention_dim, length)[None]
    swapped = [args.swap if w == args.token else w for w in words]
    text_swap = embed_prompt(swapped, cfg.cross_attention_dim, length)[None]
    kv_lengths = jnp.array([len(words)], jnp.int32)
    x0 = jax.random.normal(jax.random.key(args.seed), (1, cfg.sample_size, cfg.sample_size, cfg.in_channels))

    # 1. baseline, recording head-averaged cross-attention maps of every cross-attention layer
    store = AttentionMapStore(kind="cross", average_heads=True)
    set_attn_processor(model, store)
    token_maps = []

    def record(i):
        maps = store.maps(model)  # {layer: (b, sq, skv)}
        mean = np.mean([np.asarray(m[0, :, tok]) for m in maps.values()], axis=0)
        token_maps.append(mean.reshape(cfg.grid, cfg.grid))

    base = denoise(model, x0, text, kv_lengths, args.steps, on_step=record)

    # 2. prompt-to-prompt re-weighting of the token (renormalized, on the fast path)
    set_attn_processor(model, AttentionReweightProcessor({tok: args.weight}))
    reweighted = denoise(model, x0, text, kv_lengths, args.steps)

    # 3. word swap, plain and with the source prompt's per-head maps injected, step by step
    set_attn_processor(model, AttnProcessor())
    swap_plain = denoise(model, x0, text_swap, kv_lengths, args.steps)
    per_head = AttentionMapStore(kind="cross", average_heads=False)
    replace = AttentionMapReplaceProcessor()
    ts, alphas = ddim_schedule(args.steps)
    xs, xt = x0, x0
    for i, t in enumerate(ts):
        tt = jnp.full((1,), float(t))
        set_attn_processor(model, per_head)
        eps_s = _predict(model, xs, tt, text, kv_lengths, None)
        source_maps = per_head.maps(model)
        set_attn_processor(model, replace)
        eps_t = _predict(model, xt, tt, text_swap, kv_lengths, {"source_maps": source_maps})
        t_prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
        xs, xt = ddim_step(xs, eps_s, int(t), t_prev, alphas), ddim_step(xt, eps_t, int(t), t_prev, alphas)
    swap_replaced = xt

    def dist(a):
        return float(jnp.linalg.norm(a - base) / jnp.linalg.norm(base))

    results = {"reweighted": dist(reweighted), "swap": dist(swap_plain),
               "swap_with_source_maps": dist(swap_replaced)}
    for name, d in results.items():
        log.info("relative distance to the baseline: %-22s %.4f", name, d)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    n = len(token_maps)
    fig, axes = plt.subplots(2, max(n, 4), figsize=(2.2 * max(n, 4), 4.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, m in enumerate(token_maps):
        axes[0, i].imshow(m, cmap="magma")
        axes[0, i].set_title(f"'{args.token}' step {i}", fontsize=8)
    finals = [("baseline", base), (f"x{args.weight:g} '{args.token}'", reweighted),
              (f"'{args.swap}'", swap_plain), (f"'{args.swap}' + maps", swap_replaced)]
    lo, hi = np.percentile(np.asarray(base[0, :, :, :3]), [2, 98])  # one colour scale for all
    for i, (title, lat) in enumerate(finals):
        axes[1, i].imshow(((np.asarray(lat[0, :, :, :3]) - lo) / (hi - lo)).clip(0, 1))
        axes[1, i].set_title(title, fontsize=8)
    fig.suptitle(f"cross-attention of '{args.token}' in \"{args.prompt}\" (untrained tiny DiT)", fontsize=9)
    fig.tight_layout()
    path = os.path.join(args.out, "cross_attention_maps.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    np.save(os.path.join(args.out, "token_maps.npy"), np.stack(token_maps))
    print(path)
    if args.attention_8bit:
        results.update(compare_8bit(model, x0, text, kv_lengths, args.steps, args.out, (lo, hi)))
    return {"png": path, "token_maps": np.stack(token_maps), **results}


def _to_png(latent, lo, hi, path):
    """The first three latent channels as an 8-bit RGB PNG on the colour scale (lo, hi); returns
    the uint8 pixels written."""
    from PIL import Image
    rgb = ((np.asarray(latent[0, :, :, :3], np.float32) - lo) / (hi - lo)).clip(0, 1)
    pixels = (rgb * 255).round().astype(np.uint8)
    Image.fromarray(pixels).resize((256, 256), Image.NEAREST).save(path)
    return np.asarray(Image.open(path))


def compare_8bit(model, x0, text, kv_lengths, steps, out, scale) -> dict:
    """The baseline in bf16 with the default attention, with `sage` (FP8 P V) and with `sage16`
    (16-bit P V); for each 8-bit run the PSNR (dB) and the largest pixel difference between its
    saved PNG and the bf16 one, and the latents' relative L2 difference (what the PNG rounds)."""
    set_attn_processor(model, AttnProcessor())
    graph, state = nnx.split(model)
    bf16 = lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    model16 = nnx.merge(graph, jax.tree.map(bf16, state))
    x16, text16 = bf16(x0), bf16(text)
    reference = denoise(model16, x16, text16, kv_lengths, steps)
    a = _to_png(reference, *scale, os.path.join(out, "bf16.png")).astype(np.float64)
    ref32 = np.asarray(reference, np.float32)
    results = {}
    for backend in ("sage", "sage16"):
        # Routing is decided when a function is traced: a program already compiled keeps its
        # backend, so each 8-bit run traces its own (a fresh jit, not `_predict`'s cached one).
        with jax_attn.use_backend(backend):
            lat = denoise(model16, x16, text16, kv_lengths, steps, predict=nnx.jit(_predict.fun))
        b = _to_png(lat, *scale, os.path.join(out, f"{backend}.png")).astype(np.float64)
        mse = float(np.mean((a - b) ** 2))
        psnr = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
        diff = int(np.abs(a - b).max())
        rel = float(np.linalg.norm(np.asarray(lat, np.float32) - ref32) / np.linalg.norm(ref32))
        log.info("%s vs bf16: PSNR %.1f dB, largest pixel difference %d / 255, latents' relative "
                 "L2 difference %.2e", backend, psnr, diff, rel)
        results.update({f"psnr_{backend}": psnr, f"max_pixel_diff_{backend}": diff,
                        f"latent_rel_l2_{backend}": rel})
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
