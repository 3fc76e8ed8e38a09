"""Renders the compat run as markdown: the result table, the backends' observed surface, and the request headers
each client sent (from fake_backend.py's log). Exit status 1 if any row is FAIL.

Usage: python report.py RESULTS_JSONL [--headers FAKE_LOG_JSONL] [--title TEXT]
"""
import argparse
import json
from collections import Counter

CELL = 300  # characters of detail in a table cell; longer ones are given whole under the table


def cell(text, n=CELL):
    text = text.replace("|", "\\|")
    return text if len(text) <= n else text[:n] + " …"


def header_groups(path):
    """The first POST /v1/... after each marker in the fake backend's log: (marker, record)."""
    groups, mark = [], None
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "mark" in r:
                mark = r["mark"]
            elif mark and mark != "end" and r["method"] == "POST" and r["path"].startswith("/v1/"):
                if not groups or groups[-1][0] != mark:
                    groups.append((mark, r))
    return groups


def main():
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--headers", default="")
    p.add_argument("--title", default="nanogate compatibility")
    a = p.parse_args()
    rows = [json.loads(line) for line in open(a.results) if line.strip()]
    checks = [r for r in rows if r["result"] != "info"]
    infos = [r for r in rows if r["result"] == "info"]
    count = Counter(r["result"] for r in checks)

    print(f"# {a.title}\n")
    print("| component | kind | version | check | result | detail |")
    print("|---|---|---|---|---|---|")
    for r in checks:
        result = {"pass": "pass", "FAIL": "**FAIL**", "skipped": "skipped"}.get(r["result"], r["result"])
        print(f"| {r['component']} | {r['kind']} | {r['version']} | {cell(r['check'])} | {result} "
              f"| {cell(r['detail'])} |")
    print(f"\n{count['pass']} passed, {count['FAIL']} failed, {count['skipped']} skipped\n")

    long = [r for r in checks if len(r["detail"]) > CELL and r["result"] != "pass"]
    if long:
        print("## Whole details of the failures cut above\n")
        for r in long:
            print(f"- {r['component']} {r['version']}, {r['check']}: {r['detail']}")
        print()
    if infos:
        print("## What the third-party backends answer by themselves (direct, not through the gateway)\n")
        print("| component | version | observed |")
        print("|---|---|---|")
        for r in infos:
            print(f"| {r['component']} | {r['version']} | {cell(r['detail'], 2000)} |")
        print()
    if a.headers:
        print("## Request headers as received by fake_backend.py\n")
        print("`via gateway` is what the gateway forwarded upstream for the openai checks; the others were sent "
              "straight to the fake backend.\n")
        print("| sender | request | headers (name: value) | body keys |")
        print("|---|---|---|---|")
        for mark, r in header_groups(a.headers):
            hdrs = "; ".join(f"{k}: {v}" for k, v in r["headers"].items())
            keys = ", ".join(sorted((r.get("body") or {}).keys()))
            print(f"| {mark} | {r['method']} {r['path']} | {cell(hdrs, 1500)} | {keys} |")
        print()
    return 1 if count["FAIL"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
