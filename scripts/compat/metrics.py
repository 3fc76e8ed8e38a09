"""The gateway's /metrics against Prometheus tooling. Prints result rows (common.py).

Usage: python metrics.py METRICS_URL [--promtool PATH] [--save FILE]
  promtool check metrics   the exposition read from stdin: its exit status and every line it prints (lint problems
                           like "no help text" or counters without _total, and parse errors)
  prometheus_client        text_string_to_metric_families: each family's name and type; a family typed "unknown"
                           means its samples did not match its # TYPE line
"""
import argparse
import subprocess
import urllib.request
from collections import Counter

from common import Checker, emit


def main():
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--promtool", default="")
    p.add_argument("--save", default="")
    a = p.parse_args()
    with urllib.request.urlopen(a.url, timeout=10) as r:
        ctype = r.headers.get("content-type", "")
        text = r.read().decode()
    if a.save:
        with open(a.save, "w") as f:
            f.write(text)

    if a.promtool:
        version = subprocess.run([a.promtool, "--version"], capture_output=True, text=True, timeout=30)
        version = (version.stdout or version.stderr).split()[2] if version.returncode == 0 else "?"
        out = subprocess.run([a.promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        problems = (out.stdout + out.stderr).strip().splitlines()
        detail = f"exit {out.returncode}; " + ("; ".join(problems) if problems else "no problems")
        emit("promtool", "tool", version, "check metrics < /metrics", "pass" if out.returncode == 0 else "FAIL",
             detail)
    else:
        emit("promtool", "tool", "-", "check metrics < /metrics", "skipped", "promtool not available")

    from importlib.metadata import version
    from prometheus_client.parser import text_string_to_metric_families

    c = Checker("prometheus_client", "tool", version("prometheus-client"))

    def parse():
        # The parser starts a new family at every sample that does not belong to the one before it, so one name
        # may come back as several families: count them, with their samples.
        families = list(text_string_to_metric_families(text))
        seen = Counter((f.name, f.type) for f in families)
        samples = Counter()
        for f in families:
            samples[(f.name, f.type)] += len(f.samples)
        listing = ", ".join(f"{n} {t} ({samples[(n, t)]} samples" + (f" in {k} families)" if k > 1 else ")")
                            for (n, t), k in seen.items())
        unknown = sorted({n for n, t in seen if t == "unknown"})
        assert not unknown, f"typed unknown (samples not matching their # TYPE line): {unknown}; all: {listing}"
        return f"content-type {ctype!r}; {len(seen)} families: {listing}"

    c.run("text_string_to_metric_families(/metrics)", parse)


if __name__ == "__main__":
    main()
