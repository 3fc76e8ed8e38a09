"""What the OpenAI SDK check scripts share: the SDK import (exit 3 where it is missing), a failed
check, a one-line description of the SDK's exceptions, and the loop that runs the checks."""
import sys
import time

try:
    import openai
except ImportError:
    print("FAIL setup: the openai package is missing; run scripts/install-test-deps.sh and use .venv/bin/python",
          file=sys.stderr)
    sys.exit(3)


class CheckFailed(Exception):
    pass


def expect(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def describe(e):
    if isinstance(e, openai.APIStatusError):
        body = e.response.text if e.response is not None else ""
        return f"{type(e).__name__}: HTTP {e.status_code}: {body[:300]!r}"
    if isinstance(e, openai.APITimeoutError):
        return f"APITimeoutError: no answer in time ({e})"
    if isinstance(e, openai.APIConnectionError):
        return f"APIConnectionError: cannot reach the server ({e.__cause__ or e})"
    return f"{type(e).__name__}: {e}"


MESSAGES = [{"role": "user", "content": "Say hello in a few words."}]


def run_checks(checks, call, wait_until=None):
    """Runs each (name, fn) of `checks` as call(fn), printing a line for each; returns 1 at the first
    failure, else 0. Until `wait_until` (a time.monotonic() deadline), the first check is tried again
    while the server refuses connections (it is still starting)."""
    for i, (name, fn) in enumerate(checks):
        while True:
            try:
                detail = call(fn)
                break
            except CheckFailed as e:
                print(f"FAIL {name}: {e}")
                return 1
            except openai.APIConnectionError as e:
                starting = i == 0 and wait_until is not None and not isinstance(e, openai.APITimeoutError)
                if starting and time.monotonic() < wait_until:
                    time.sleep(0.5)
                    continue
                print(f"FAIL {name}: {describe(e)}")
                return 1
            except Exception as e:  # noqa: BLE001 - any SDK/parse error is a failed check, reported plainly
                print(f"FAIL {name}: {describe(e)}")
                return 1
        print(f"ok   {name}: {detail}")
    print(f"all {len(checks)} checks passed")
    return 0
