#!/usr/bin/env python3
"""Summary of a routing-bench.sh run: one table per fleet x workload cell (medians over rounds), then whether the
default policy met its targets in every cell: p50 TTFT at or below sglang-router cache_aware's, p99 TTFT at or below
both round robin's (nanogate's) and sglang-router cache_aware's; and whether p2c and least_load kept their p99 TTFT at or
below round robin's (each build of them, where POLICY@LABEL named builds).

Usage: routing-summary.py OUT REQUESTS ROUNDS CACHE_BLOCKS kind:policy...
"""
import glob
import json
import statistics
import sys

DEFAULT = ("nanogate", "cache_aware")
FLEETS = {
    "unequal": "fast, fast, half speed, fast with 5 % 1 s spikes",
    "equal": "four at speed 1",
}
WORKLOADS = {
    "p16": "16 shared system prompts of 8,000 chars, uniform",
    "p40": "40 shared system prompts of 8,000 chars, uniform",
    "z128": "128 shared system prompts of 8,000 chars, Zipf(1.0)",
    "turns": "64 conversations x 6 turns over 8 system prompts of 4,000 chars",
    "unique": "no shared prefix: every request its own 4,000-char system prompt",
}


def med(xs):
    # routing-bench.sh runs an odd number of rounds: an even one's median would be a mean.
    return statistics.median(xs) if xs else float("nan")


def main():
    out, n, rounds, blocks = sys.argv[1:5]
    targets = [t.split(":", 1) for t in sys.argv[5:]]
    rates = dict(line.split("\t") for line in open(f"{out}/rates.tsv").read().split("\n") if line)
    print(f"# Routing quality: open loop at round robin's knee, {n} streamed requests per run, median of {rounds} rounds\n")
    print(f"4 simulators per fleet, --max-batch 16, --prefix-cache-blocks {blocks}; 32 tokens out.\n")
    verdicts = []
    spreads = []
    spread_policies = [p for kind, p in targets if kind == "nanogate" and p.split("@")[0] in ("p2c", "least_load")]
    for cell, rate in rates.items():
        rate = rate.strip()
        fleet, workload = cell.split("-", 1)
        print(f"## {fleet} fleet ({FLEETS.get(fleet, fleet)}), {workload} ({WORKLOADS.get(workload, workload)}), "
              f"{float(rate):g} req/s\n")
        print("| router | policy | mean TTFT ms | p50 TTFT ms | p90 TTFT ms | p99 TTFT ms | p99 total ms | ok/s | errors "
              "| prefix hit % | requests per simulator |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        figures = {}
        for kind, pol in targets:
            runs = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/raw/{cell}-{kind}-{pol}-rate{rate}-r[0-9]*.json"))]
            runs = [r for r in runs if r["loadtest"]]
            if not runs:
                print(f"| {kind} | {pol} | not run | | | | | | | | |")
                continue
            lt = [r["loadtest"] for r in runs]
            # A run with no stream answered has no TTFT: it counts as the worst, not as 0 ms.
            worst = {"mean": float("inf"), "p50": float("inf"), "p90": float("inf"), "p99": float("inf")}
            ttft = [s.get("ttft_ms") or worst for s in lt]
            failed = sum(s["failed"] for s in lt)
            hits = []
            for r in runs:
                sims = [x or {} for x in r["sims"]]
                q = sum(x.get("prefix_query_tokens", 0) for x in sims)
                hits.append(100 * sum(x.get("prefix_hit_tokens", 0) for x in sims) / q if q else 0)
            split = "/".join(str(round(med([(r["sims"][i] or {}).get("requests", 0) for r in runs])))
                             for i in range(len(runs[0]["sims"])))
            mean, p50, p90, p99 = (med([x[k] for x in ttft]) for k in ("mean", "p50", "p90", "p99"))
            # By round as well: a p50 that sits where warm requests give way to cold ones jumps
            # between rounds (15 / 92 / 47 ms), and the median of three hides which way.
            by_round = ["/".join(f"{x[k]:.0f}" for x in ttft) for k in ("p50", "p99")]
            figures[(kind, pol)] = (p50, p99, failed, mean, *by_round)
            bold = "**" if (kind, pol) == DEFAULT else ""
            print(f"| {bold}{kind}{bold} | {bold}{pol}{bold} | {mean:.1f} | {p50:.1f} | {p90:.1f} | {p99:.1f} "
                  f"| {med([s['latency_ms']['p99'] for s in lt]):.1f} | {med([s['ok_rps'] for s in lt]):.1f} "
                  f"| {med([s['failed'] for s in lt]):g} | {med(hits):.0f} | {split} |")
        print()
        own, sg, rr = figures.get(DEFAULT), figures.get(("sglang", "cache_aware")), figures.get(("nanogate", "round_robin"))
        if rr:
            spreads.append((cell, rr[1], [figures.get(("nanogate", p), (None, None))[1] for p in spread_policies]))
        if own and sg and rr:
            # Failed requests leave the latency percentiles: a router that fails its slowest
            # requests would look faster, so ours meets no target with any failure.
            p50_ok = own[0] <= sg[0] and own[2] == 0
            p99_ok = own[1] <= min(rr[1], sg[1]) and own[2] == 0
            verdicts.append((cell, own, sg, rr, p50_ok, p99_ok))
    if verdicts:
        print("## Targets: default policy (cache_aware) against sglang-router cache_aware and round robin\n")
        print("| cell | p50 TTFT: ours / sglang cache_aware | met | p99 TTFT: ours / min(round robin, sglang cache_aware) "
              "| met | by round, p50: ours; sglang | by round, p99: ours; round robin; sglang | mean TTFT: ours / sglang |")
        print("|---|---:|---|---:|---|---|---|---:|")
        for cell, own, sg, rr, p50_ok, p99_ok in verdicts:
            print(f"| {cell} | {own[0]:.1f} / {sg[0]:.1f} | {'yes' if p50_ok else '**no**'} "
                  f"| {own[1]:.1f} / {min(rr[1], sg[1]):.1f} | {'yes' if p99_ok else '**no**'} "
                  f"| {own[4]}; {sg[4]} | {own[5]}; {rr[5]}; {sg[5]} | {own[3]:.1f} / {sg[3]:.1f} |")
        print()
    if spreads and spread_policies:
        print("## p2c and least_load against round robin (p99 TTFT ms)\n")
        print("| cell | round robin | " + " | ".join(f"{p} | met" for p in spread_policies) + " |")
        print("|---|---:|" + "---:|---|" * len(spread_policies))
        for cell, rr99, others in spreads:
            row = f"| {cell} | {rr99:.1f} |"
            for v in others:
                row += " not run | |" if v is None else f" {v:.1f} | {'yes' if v <= rr99 else '**no**'} |"
            print(row)
        print()


main()
