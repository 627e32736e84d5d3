"""Summarise a jax.profiler perfetto trace: device time per kernel name, largest first.

    python bench/trace_top.py TRACE_DIR [N] [--seq K]

--seq K also prints K kernels in launch order from the middle of the trace, each with
the idle gap before it (where small kernels and launch gaps add up). --gaps K prints the
K longest idle stretches of the device, with the kernels on either side (where the host
keeps the device waiting), and the idle time in gaps over 20 us.
"""
import argparse
import collections
import gzip
import json
from pathlib import Path


def load_kernels(trace_dir: Path) -> tuple[Path, list]:
    """The trace file under ``trace_dir`` and its device kernels in start order."""
    f = next(trace_dir.rglob("perfetto_trace.json.gz"))
    ev = json.load(gzip.open(f))
    return f, _kernels(ev["traceEvents"] if isinstance(ev, dict) else ev)


def _kernels(ev):
    pids = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    dev = {p for p, n in pids.items() if "GPU" in n or "/device:" in n}
    return sorted((e for e in ev if e.get("ph") == "X" and e.get("pid") in dev), key=lambda e: e["ts"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace_dir", type=Path)
    ap.add_argument("n", type=int, nargs="?", default=25, help="kernel names to list")
    ap.add_argument("--seq", type=int, default=0, help="also print this many kernels in launch order")
    ap.add_argument("--gaps", type=int, default=0, help="also print the longest idle gaps")
    args = ap.parse_args()
    seq = args.seq
    f, ks = load_kernels(args.trace_dir)
    tot = collections.Counter()
    cnt = collections.Counter()
    for e in ks:
        key = e["name"][:90]
        tot[key] += e.get("dur", 0)
        cnt[key] += 1
    all_us = sum(tot.values())
    span = (max(e["ts"] + e.get("dur", 0) for e in ks) - ks[0]["ts"]) if ks else 0
    print(f"{f.parent.name}: device time {all_us / 1e3:.2f} ms over {len(ks)} kernels; "
          f"first start to last end {span / 1e3:.2f} ms")
    for k, v in tot.most_common(args.n):
        print(f"{v / 1e3:9.3f} ms {100 * v / max(all_us, 1):5.1f}% x{cnt[k]:<5d} {k}")
    if seq:
        mid = len(ks) // 2
        print(f"\n{seq} kernels in order from #{mid} (gap before, duration, name), in us")
        prev_end = ks[mid - 1]["ts"] + ks[mid - 1].get("dur", 0)
        for e in ks[mid:mid + seq]:
            print(f"{e['ts'] - prev_end:7.1f} {e.get('dur', 0):8.1f}  {e['name'][:100]}")
            prev_end = max(prev_end, e["ts"] + e.get("dur", 0))
    if args.gaps:
        gaps, end = [], None
        for i, e in enumerate(ks):
            if end is not None and e["ts"] > end:
                gaps.append((e["ts"] - end, i))
            end = max(end or 0, e["ts"] + e.get("dur", 0))
        big = sum(g for g, _ in gaps if g > 20)
        print(f"\nidle: {sum(g for g, _ in gaps) / 1e3:.2f} ms in all, {big / 1e3:.2f} ms in gaps over 20 us")
        for g, i in sorted(gaps, reverse=True)[:args.gaps]:
            before = " | ".join(e["name"][:40] for e in ks[max(i - 3, 0):i])
            after = " | ".join(e["name"][:40] for e in ks[i:i + 3])
            print(f"{g / 1e3:8.3f} ms at #{i}: {before}  ||  {after}")


if __name__ == "__main__":
    main()
