"""Result rows shared by the compat helpers: one JSON object per line on stdout, gathered by compat.sh.

A row is {component, kind, version, check, result, detail}, result one of "pass", "FAIL", "skipped".
"""
import json
import sys


def emit(component, kind, version, check, result, detail=""):
    row = {"component": component, "kind": kind, "version": version, "check": check, "result": result,
           "detail": " ".join(str(detail).split())[:2000]}
    print(json.dumps(row), flush=True)
    print(f"  {result:7} {component} {version}: {check}  {row['detail'][:200]}", file=sys.stderr, flush=True)
    return result == "pass"


def describe(exc):
    """What a failed call showed: exception type, HTTP status and body when the exception carries a response."""
    text = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    resp = getattr(exc, "response", None)
    status = getattr(exc, "status_code", None) or getattr(resp, "status_code", None)
    if status is not None:
        text += f" | status {status}"
    try:
        body = resp.text if resp is not None else None
    except Exception:  # a streamed response that was not read
        body = None
    if body:
        text += f" | body {body[:300]}"
    return text


class Checker:
    """Runs named checks for one component; each check returns a detail string or raises (AssertionError or any
    exception from the client) to fail."""

    def __init__(self, component, kind, version):
        self.component, self.kind, self.version = component, kind, version
        self.failed = 0

    def run(self, check, fn):
        try:
            detail = fn()
        except Exception as e:  # every failure becomes a row; the run goes on
            self.failed += 1
            return emit(self.component, self.kind, self.version, check, "FAIL", describe(e))
        return emit(self.component, self.kind, self.version, check, "pass", detail or "")

    def skip(self, check, reason):
        return emit(self.component, self.kind, self.version, check, "skipped", reason)
