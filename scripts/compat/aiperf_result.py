"""Reads an `aiperf profile` run's artifacts and prints result rows (common.py).

Usage: python aiperf_result.py ARTIFACT_DIR EXIT_STATUS VERSION REQUESTS LOG
  profile         aiperf exited 0, completed REQUESTS requests and recorded no error
  server metrics  aiperf's own scrape of the gateway's /metrics (it scrapes base URL + /metrics by default): the
                  endpoint answered, and every family got a type (aiperf types a family "unknown" when its samples
                  do not match its # TYPE line)
"""
import json
import os
import sys

from common import emit


def tail(path, n=6):
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        return " / ".join(lines[-n:])
    except OSError:
        return "(no log)"


def main():
    art, status, version, requests, log = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    check = f"profile chat --streaming, {requests} requests, concurrency 2"
    try:
        with open(os.path.join(art, "profile_export_aiperf.json")) as f:
            prof = json.load(f)
    except (OSError, ValueError):
        prof = None
    if prof is None:
        emit("aiperf", "tool", version, check, "FAIL",
             f"exit {status}, no profile_export_aiperf.json; log: {tail(log)}")
    else:
        done = (prof.get("request_count") or {}).get("avg", 0)
        errors = (prof.get("error_request_count") or {}).get("avg", 0)
        summary = prof.get("error_summary") or []
        ttft = (prof.get("time_to_first_token") or {}).get("p50")
        rps = (prof.get("request_throughput") or {}).get("avg")
        ok = status == 0 and done == requests and not errors and not summary
        detail = (f"exit {status}; {done:g} requests ok, {errors or 0:g} errors"
                  + (f" {json.dumps(summary)[:300]}" if summary else "")
                  + (f"; TTFT p50 {ttft:.1f} ms" if ttft is not None else "")
                  + (f"; {rps:.1f} req/s" if rps else ""))
        emit("aiperf", "tool", version, check, "pass" if ok else "FAIL", detail)

    check = "server metrics: its scrape of gateway /metrics"
    try:
        with open(os.path.join(art, "server_metrics_export.json")) as f:
            sm = json.load(f)
    except (OSError, ValueError):
        emit("aiperf", "tool", version, check, "FAIL", "no server_metrics_export.json")
        return
    s = sm.get("summary") or {}
    metrics = sm.get("metrics") or {}
    unknown = sorted(n for n, m in metrics.items() if m.get("type") == "unknown")
    listing = ", ".join(f"{n} {m.get('type')}" for n, m in sorted(metrics.items()))
    ok = bool(s.get("endpoints_successful")) and metrics and not unknown
    detail = (f"endpoints ok {s.get('endpoints_successful')}; {len(metrics)} families"
              + (f"; typed unknown: {unknown}" if unknown else "") + f"; {listing}")
    emit("aiperf", "tool", version, check, "pass" if ok else "FAIL", detail)


if __name__ == "__main__":
    main()
