#!/usr/bin/env python3
"""Where each prompt went, run by run, from the simulators' request logs of a routing-bench run
(REQUEST_LOG=1 scripts/routing-bench.sh; one file per run and simulator in OUT/requests/).

Usage: scripts/routing-requests.py OUT

Per run: the share of requests that found at least 90 % of their prompt cached (warm), the
distinct prompts each simulator served, how many prompts went to more than one simulator, how
many times a prompt's request went to another simulator than its previous one (moves, by arrival
order), how many requests waited for a batch slot, and the cold prefills (requests not warm) by
why: the prompt's first in the run, again where its previous request went (that cache let it
go), a copy to a simulator it had never reached, or back to one it had left. Then per
simulator: its requests, the share of them that were warm, and how many prompts it effectively
kept cycling through (the inverse of the sum of its prompts' squared shares of its requests: a
prompt it saw once barely counts). An LRU cache that holds c of n equally popular prompts finds a
request's prompt c/n of the time, so a simulator whose effective prompts are fewer than its cache
holds has room left over, and one with many more misses on most of them. A prompt is its first
64-byte block, so these say something only for workloads of shared system prompts (p16, p40,
z128, turns).
"""
import glob
import json
import os
import re
import sys
from collections import defaultdict

RUN = re.compile(r"^(?P<run>.+)-sim(?P<sim>\d+)\.jsonl$")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    runs = defaultdict(list)
    for path in glob.glob(os.path.join(sys.argv[1], "requests", "*.jsonl")):
        m = RUN.match(os.path.basename(path))
        if not m:
            continue
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                # The next router's readiness probe lands in a run's file after it ends: no prompt.
                if r.get("prompt") is None:
                    continue
                r["sim"] = int(m["sim"])
                runs[m["run"]].append(r)
    if not runs:
        sys.exit(f"no request logs in {sys.argv[1]}/requests (run routing-bench.sh with REQUEST_LOG=1)")
    print("| run | requests | warm % | prompts per simulator | prompts on 2+ | moves | waited for a slot "
          "| cold: first / again / copy / back | per simulator: requests, warm %, effective prompts |")
    print("|---|---:|---:|---|---:|---:|---:|---|---|")
    for run in sorted(runs):
        rs = sorted(runs[run], key=lambda r: r["at_ms"])
        sims = sorted({r["sim"] for r in rs})
        per_sim = defaultdict(set)
        where = defaultdict(set)
        last = {}
        moves = 0
        cold = defaultdict(int)
        for r in rs:
            if not is_warm(r):
                if r["prompt"] not in last:
                    cold["first"] += 1
                elif last[r["prompt"]] == r["sim"]:
                    cold["again"] += 1
                elif r["sim"] in where[r["prompt"]]:
                    cold["back"] += 1
                else:
                    cold["copy"] += 1
            per_sim[r["sim"]].add(r["prompt"])
            where[r["prompt"]].add(r["sim"])
            if last.get(r["prompt"], r["sim"]) != r["sim"]:
                moves += 1
            last[r["prompt"]] = r["sim"]
        warm = sum(map(is_warm, rs))
        spread = sum(len(s) > 1 for s in where.values())
        waited = sum(r["wait_ms"] > 1.0 for r in rs)
        print(f"| {run} | {len(rs)} | {100 * warm / len(rs):.0f} | {'/'.join(str(len(per_sim[s])) for s in sims)} "
              f"| {spread} of {len(where)} | {moves} | {waited} "
              f"| {' / '.join(str(cold[k]) for k in ('first', 'again', 'copy', 'back'))} "
              f"| {' · '.join(per_simulator(rs, s) for s in sims)} |")


def is_warm(r):
    return r["cached_tokens"] >= 0.9 * r["prompt_tokens"]


def per_simulator(rs, sim):
    mine = [r for r in rs if r["sim"] == sim]
    warm = sum(map(is_warm, mine))
    counts = defaultdict(int)
    for r in mine:
        counts[r["prompt"]] += 1
    effective = 1 / sum((c / len(mine)) ** 2 for c in counts.values())
    return f"{len(mine)}, {100 * warm / len(mine):.0f} %, {effective:.1f}"


main()
