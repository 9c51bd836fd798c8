"""Registers and spills of every Mosaic GPU kernel we ship, as ptxas reports them (GPU only).

    PYTHONPATH=. python benchmarks/kernel_registers.py [--out DIR]

Each case is one `benchmarks/profile_forward.py` call (compile and one run) under
MOSAIC_GPU_DUMP_PTXAS=1; the table lists every kernel it compiled with ptxas's registers per
thread (the launch's: warpgroups then move registers with setmaxnreg) and spill bytes. Round 8
found the fused backward spilling this way (LLVM hoisted loop-invariant wgmma descriptors out of
its loop; `mosaic_backward`), which Nsight Compute had shown only as local-memory traffic.
"""
import argparse
import os
import pathlib
import re
import subprocess
import sys

# name -> profile_forward.py arguments: impl b n s d mode [MosaicConfig changes]
CASES = {
    "forward d64": ["mosaic", "2", "10", "4096", "64"],
    "forward d128": ["mosaic", "1", "24", "4608", "128"],
    "fwd+bwd d64": ["mosaic", "2", "10", "4096", "64", "bwd"],
    "fwd+bwd d128": ["mosaic", "1", "24", "4608", "128", "bwd"],
    "fwd+bwd d128 fused": ["mosaic", "1", "24", "4608", "128", "bwd", '{"bwd_fused": true}'],
    "sage d64": ["sage", "2", "10", "4096", "64"],
    "sage d128": ["sage", "1", "24", "4608", "128"],
    "sage16 d128": ["sage16", "1", "24", "4608", "128"],
}
ENTRY = re.compile(r"Compiling entry function '([^']+)'")
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")


def kernels(text: str):
    """(kernel, registers, spill stores, spill loads) per ptxas report in `text`."""
    rows, name, spill = [], None, None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            name, spill = m.group(1), None
        elif (m := SPILL.search(line)) and name:
            spill = (int(m.group(1)), int(m.group(2)))
        elif (m := USED.search(line)) and name:
            rows.append((name, int(m.group(1)), *(spill or (0, 0))))
            name = None
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="folder for each case's full output")
    ap.add_argument("--only", default="", help="comma-separated case names")
    args = ap.parse_args()
    out = pathlib.Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MOSAIC_GPU_DUMP_PTXAS": "1"}
    script = pathlib.Path(__file__).with_name("profile_forward.py")
    table = []
    for name, argv in CASES.items():
        if args.only and name not in args.only.split(","):
            continue
        try:
            res = subprocess.run([sys.executable, str(script), *argv], env=env, timeout=300,
                                 capture_output=True, text=True)
            text = res.stdout + res.stderr
        except subprocess.TimeoutExpired as e:
            text = f"timed out after {e.timeout} s"
        if out:
            (out / (name.replace(" ", "_") + ".txt")).write_text(text)
        rows = kernels(text)
        table += [(name, *r) for r in rows] or [(name, "(no ptxas report: see its output)", 0, 0, 0)]
        print(f"{name}: {len(rows)} kernels", flush=True)
    print(f"\n{'case':22s} {'kernel':32s} {'regs':>5s} {'spill st':>9s} {'spill ld':>9s}")
    for case, kernel, regs, st, ld in table:
        print(f"{case:22s} {kernel:32s} {regs:>5} {st:>9} {ld:>9}" + ("  SPILLS" if st or ld else ""))


if __name__ == "__main__":
    main()
