"""Does Hopper's exp2 pipe (MUFU) take two half-precision exponentials per lane per issue?

    PYTHONPATH=. python benchmarks/mufu_probe.py

A Triton kernel per PTX form runs `ITERS` rounds of exp2 over a register tile (independent
chains, so the pipe's rate, not its latency, sets the time) and stores a checksum so nothing is
eliminated. Prints each form's SASS exp2 instructions (from Triton's SASS, where available) and
its time per element-exponential against `ex2.approx.ftz.f32`. Round 17 (issue 16) asks
whether P's exponentials could run at twice the rate as f16x2 / bf16x2 pairs.
"""
import re
import time

import torch
import triton
import triton.language as tl

ITERS = 256
BLOCK = 2048  # elements per program (16 per thread at 4 warps)

# One kernel per PTX form (Triton takes inline asm and its dtype only as literals): `ITERS`
# rounds of exp2 of a value in (-1, 0], each depending on the last, so it stays finite and
# nothing is eliminated.
@triton.jit
def exp2_f32(x_ptr, y_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.load(x_ptr + offs)
    for _ in range(ITERS):
        acc = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [acc * 0.5 - 0.5],
                                        dtype=tl.float32, is_pure=True, pack=1)
    tl.store(y_ptr + offs, acc)


@triton.jit
def exp2_f16(x_ptr, y_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.load(x_ptr + offs)
    for _ in range(ITERS):
        acc = tl.inline_asm_elementwise("ex2.approx.f16 $0, $1;", "=h,h", [acc * 0.5 - 0.5],
                                        dtype=tl.float16, is_pure=True, pack=1)
    tl.store(y_ptr + offs, acc)


@triton.jit
def exp2_f16x2(x_ptr, y_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.load(x_ptr + offs)
    for _ in range(ITERS):
        acc = tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [acc * 0.5 - 0.5],
                                        dtype=tl.float16, is_pure=True, pack=2)
    tl.store(y_ptr + offs, acc)


@triton.jit
def exp2_bf16x2(x_ptr, y_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.load(x_ptr + offs)
    for _ in range(ITERS):
        acc = tl.inline_asm_elementwise("ex2.approx.ftz.bf16x2 $0, $1;", "=r,r",
                                        [acc * 0.5 - 0.5], dtype=tl.bfloat16, is_pure=True,
                                        pack=2)
    tl.store(y_ptr + offs, acc)


FORMS = {"f32": (exp2_f32, torch.float32), "f16": (exp2_f16, torch.float16),
         "f16x2": (exp2_f16x2, torch.float16), "bf16x2": (exp2_bf16x2, torch.bfloat16)}


def main():
    n = 132 * 64 * BLOCK
    rows = []
    for name, (kernel, tdt) in FORMS.items():
        x = -torch.rand(n, device="cuda").to(tdt)
        y = torch.empty_like(x)
        kw = dict(ITERS=ITERS, BLOCK=BLOCK)
        try:
            compiled = kernel[(n // BLOCK,)](x, y, **kw)
            torch.cuda.synchronize()
            try:
                sass = compiled.asm["sass"]
            except Exception as e:  # noqa: BLE001 (no nvdisasm: the rate alone answers)
                sass = f"(no SASS: {type(e).__name__})"
            mufu = sorted(set(re.findall(r"MUFU\.[A-Z0-9_.]+", sass)))
            reps = 20
            t0 = time.perf_counter()
            for _ in range(reps):
                kernel[(n // BLOCK,)](x, y, **kw)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / reps * 1e3
            rows.append((name, ms, ms * 1e6 / (n * ITERS), mufu, len(re.findall(r"MUFU", sass))))
        except Exception as e:  # noqa: BLE001
            rows.append((name, float("nan"), float("nan"), [f"{type(e).__name__}: {str(e)[-300:]}"], 0))
    base = rows[0][1]
    print(f"{'form':8s} {'ms':>8s} {'ps/exp':>8s} {'x f32':>6s}  SASS MUFU (count)")
    for name, ms, ps, mufu, cnt in rows:
        print(f"{name:8s} {ms:8.3f} {ps:8.3f} {base / ms:6.2f}  {' '.join(mufu)} ({cnt})")


if __name__ == "__main__":
    main()
