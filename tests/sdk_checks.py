"""What the OpenAI SDK check scripts share: the SDK import (exit 3 where it is missing), a failed
check, and a one-line description of the SDK's exceptions."""
import sys

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
