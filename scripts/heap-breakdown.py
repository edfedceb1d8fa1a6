#!/usr/bin/env python3
"""Where a heaptrack profile's peak memory went, grouped by the innermost frames of the
crates that matter (Tiandi's, quinn's, rustls', sled's, prost's, axum's...).

    heaptrack_print -f heaptrack.X.zst --print-flamegraph stacks.txt --flamegraph-cost-type peak
    rustfilt < stacks.txt > stacks.d.txt          # cargo install rustfilt
    scripts/heap-breakdown.py stacks.d.txt [PATTERN] [N]

Each line of the output: megabytes at the peak, then up to three frames (innermost first).
"""
import collections
import re
import sys

DEFAULT = r"(tiandi_|quinn|rustls|sled|prost|hyper|axum|h2::|webpki|ring::)"


def main() -> None:
    path = sys.argv[1]
    pat = re.compile(sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else DEFAULT)
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    agg: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            try:
                cost = int(n)
            except ValueError:
                continue
            total += cost
            frames = stack.split(";")
            hits = [re.sub(r"::h[0-9a-f]{16}", "", fr) for fr in frames if pat.search(fr)]
            key = " <- ".join(reversed(hits[-3:])) if hits else frames[-1]
            agg[key] += cost
    print(f"total {total / 1e6:.1f} MB at the peak")
    for k, v in agg.most_common(top):
        print(f"{v / 1e6:8.2f} MB  {k[:300]}")


if __name__ == "__main__":
    main()
