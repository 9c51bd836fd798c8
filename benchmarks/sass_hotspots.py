"""Where a kernel's warps spend their time, per SASS instruction, from Nsight Compute's source
page (`ncu -i REPORT --page source --csv --print-source sass > source.csv`, optionally gzipped).

    python benchmarks/sass_hotspots.py source.csv[.gz] [--logits N]

Prints the stall-reason totals, the instructions holding at least 1% of the warp samples (with
their top two reasons), and per opcode the executed-instruction count (per logit with
`--logits`, the number of attention logits the profiled launch computed), its share of the warp
samples and how much of that is `wait` (a fixed-latency dependency or the pipe's issue rate).
"""
import argparse
import collections
import csv
import gzip
import io

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def _rows(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        lines = list(csv.reader(io.StringIO(f.read())))
    header = next(i for i, r in enumerate(lines) if r and r[0] == "Address")
    return lines[header], lines[header + 1:]


def _num(x):
    return int(x.replace(",", "") or 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--logits", type=float, default=0.0)
    args = ap.parse_args()
    hdr, rows = _rows(args.csv)
    ix = {h: i for i, h in enumerate(hdr)}
    stalls = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    total = sum(_num(r[ix[SAMPLES]]) for r in rows)
    by_reason = {s[6:]: sum(_num(r[ix[s]]) for r in rows) for s in stalls}
    print(f"{len(rows)} instructions, {total} warp samples")
    print("by reason: " + ", ".join(f"{k} {v / total:.1%}" for k, v in
                                     sorted(by_reason.items(), key=lambda kv: -kv[1])[:8]))
    print("\ninstructions with >= 1% of the samples:")
    for n, r in enumerate(rows):
        smp = _num(r[ix[SAMPLES]])
        if smp >= 0.01 * total:
            top = sorted(((_num(r[ix[s]]), s[6:]) for s in stalls), reverse=True)[:2]
            print(f"  #{n:<5d} {smp / total:6.1%}  {r[ix['Source']].strip()[:58]:58s} "
                  + ", ".join(f"{name} {v / smp:.0%}" for v, name in top))
    ops, samples, waits = collections.Counter(), collections.Counter(), collections.Counter()
    for r in rows:
        words = r[ix["Source"]].split()
        op = words[1] if words and words[0].startswith("@") else (words[0] if words else "?")
        op = op.split(".")[0]
        ops[op] += _num(r[ix[EXECUTED]])
        samples[op] += _num(r[ix[SAMPLES]])
        waits[op] += _num(r[ix["stall_wait"]]) if "stall_wait" in ix else 0
    scale = 32.0 / args.logits if args.logits else 1.0  # warp instructions -> per logit
    unit = "thread instructions per logit" if args.logits else "warp instructions"
    print(f"\nper opcode: executed ({unit}), share of the warp samples, their `wait` share:")
    for op, count in ops.most_common(20):
        print(f"  {op:12s} {count * scale:10.3f} {samples[op] / total:7.1%} "
              f"{waits[op] / max(samples[op], 1):6.0%}")
    if args.logits:
        print(f"  {'(all)':12s} {sum(ops.values()) * scale:10.3f}")


if __name__ == "__main__":
    main()
