"""Summarise a jax.profiler perfetto trace: device time per kernel name, largest first.

    python bench/trace_top.py TRACE_DIR [N]
"""
import collections
import gzip
import json
import sys
from pathlib import Path


def main():
    root = Path(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    f = next(root.rglob("perfetto_trace.json.gz"))
    ev = json.load(gzip.open(f))
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    pids = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    tot = collections.Counter()
    cnt = collections.Counter()
    for e in ev:
        if e.get("ph") == "X" and "GPU" in pids.get(e.get("pid"), "") or (e.get("ph") == "X" and "/device:" in pids.get(e.get("pid"), "")):
            key = e["name"][:90]
            tot[key] += e.get("dur", 0)
            cnt[key] += 1
    all_us = sum(tot.values())
    print(f"{f.parent.name}: device time {all_us / 1e3:.2f} ms over {sum(cnt.values())} events")
    for k, v in tot.most_common(n):
        print(f"{v / 1e3:9.3f} ms {100 * v / max(all_us, 1):5.1f}% x{cnt[k]:<5d} {k}")


if __name__ == "__main__":
    main()
