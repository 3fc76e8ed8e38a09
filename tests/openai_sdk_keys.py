#!/usr/bin/env python3
"""API keys, per-key model access and rate limits of a gateway in API-key mode, seen through the official
OpenAI Python SDK (1.x): the SDK must raise the exception classes OpenAI itself would cause, and its own
retry logic must follow the gateway's retry-after headers.

Usage:  .venv/bin/python tests/openai_sdk_keys.py BASE_URL GOOD_KEY LIMITED_KEY MODEL FORBIDDEN_MODEL [--timeout 20]
        BASE_URL like http://127.0.0.1:PORT/v1   (scripts/install-test-deps.sh creates .venv with the SDK)
        GOOD_KEY: may use MODEL but not FORBIDDEN_MODEL; 1000 requests/min, 1000000 tokens/min.
        LIMITED_KEY: may use MODEL; 30 requests/min (GCRA: a burst of 30, then one more every 2 s).

Checks, in order, one line each; exits 1 at the first failure (2 on bad usage, 3 if the SDK is missing):
  no-key               no Authorization header: openai.AuthenticationError, HTTP 401, code invalid_api_key
  wrong-key            key "sk-wrong": the same
  forbidden-model      GOOD_KEY asking for FORBIDDEN_MODEL: openai.PermissionDeniedError, HTTP 403, code
                       model_not_found (what OpenAI answers when a project's key may not use a model)
  chat                 GOOD_KEY + MODEL: a chat completion (max_tokens=4) succeeds
  models               models.list() with GOOD_KEY lists MODEL and not FORBIDDEN_MODEL
  ratelimit-headers    a GOOD_KEY response carries x-ratelimit-{limit,remaining,reset}-requests (limit 1000)
  rate-limit           LIMITED_KEY, max_retries=0: request 29, 30 or 31 (one later per 2 s the burst takes)
                       raises openai.RateLimitError, HTTP 429,
                       code rate_limit_exceeded, retry-after 1..2 (integer s), retry-after-ms 1..2000,
                       x-ratelimit-limit-requests 30, x-ratelimit-remaining-requests 0
  retry-backoff        LIMITED_KEY, max_retries=2: the next request succeeds, after waiting at least
                       0.8 x retry-after-ms - 300 ms (the SDK slept as told instead of failing)
  stream-no-usage      stream=True without stream_options: no chunk has usage (the gateway asks the backend
                       for usage itself and must drop that chunk), content is non-empty
  stream-usage         stream_options.include_usage: the last chunk has usage (prompt and completion tokens
                       > 0) and choices == []
"""
import argparse
import sys
import time

# sdk_checks exits with 3, saying why, where the SDK is missing; so it comes first.
from sdk_checks import MESSAGES, CheckFailed, describe, expect, run_checks

import openai  # noqa: E402


class Ctx:
    def __init__(self, a):
        self.a = a
        self.retry_after_ms = None  # set by check_rate_limit, used by check_retry_backoff

    def client(self, key, max_retries=0):
        # max_retries=0 unless retrying is what is tested: a retried error would hide a gateway bug.
        return openai.OpenAI(base_url=self.a.base_url.rstrip("/"), api_key=key, timeout=self.a.timeout,
                             max_retries=max_retries)

    def chat(self, key, model, max_tokens=4, **kw):
        return self.client(key, **kw).chat.completions.create(model=model, messages=MESSAGES, max_tokens=max_tokens)


def expect_error(call, cls, status, code):
    """Runs call(), which must raise `cls` with this HTTP status and error code; returns the exception."""
    want = f"openai.{cls.__name__} (HTTP {status}, code {code!r})"
    try:
        r = call()
    except cls as e:
        expect(e.status_code == status, f"expected {want}, got HTTP {e.status_code}")
        expect(isinstance(e.body, dict) and e.code == code,
               f"expected {want}, got code {e.code!r} (error body {e.body!r})")
        return e
    except openai.APIStatusError as e:
        raise CheckFailed(f"expected {want}, got {describe(e)}")
    raise CheckFailed(f"expected {want}, got a success: {str(r)[:200]}")


def check_no_key(ctx):
    # api_key="": the SDK then sends no Authorization header at all.
    e = expect_error(lambda: ctx.chat("", ctx.a.model), openai.AuthenticationError, 401, "invalid_api_key")
    return f"HTTP {e.status_code} {e.code}"


def check_wrong_key(ctx):
    e = expect_error(lambda: ctx.chat("sk-wrong", ctx.a.model), openai.AuthenticationError, 401, "invalid_api_key")
    return f"HTTP {e.status_code} {e.code}"


def check_forbidden_model(ctx):
    e = expect_error(lambda: ctx.chat(ctx.a.good_key, ctx.a.forbidden_model), openai.PermissionDeniedError, 403,
                     "model_not_found")
    return f"HTTP {e.status_code} {e.code}: {str(e.body.get('message'))[:80]!r}"


def check_chat(ctx):
    r = ctx.chat(ctx.a.good_key, ctx.a.model)
    expect(r.choices, "choices is empty")
    return f"id={r.id} content={r.choices[0].message.content!r}"


def check_models(ctx):
    ids = [m.id for m in ctx.client(ctx.a.good_key).models.list()]
    expect(ctx.a.model in ids, f"{ctx.a.model!r} not in model ids {ids!r}")
    expect(ctx.a.forbidden_model not in ids, f"forbidden {ctx.a.forbidden_model!r} is listed: {ids!r}")
    return f"ids={ids}"


def check_ratelimit_headers(ctx):
    raw = ctx.client(ctx.a.good_key).chat.completions.with_raw_response.create(
        model=ctx.a.model, messages=MESSAGES, max_tokens=4)
    raw.parse()
    h = raw.headers
    names = ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"]
    missing = [n for n in names if not h.get(n)]
    expect(not missing, f"missing header(s) {missing}; headers: {dict(h)}")
    expect(h["x-ratelimit-limit-requests"] == "1000", f"x-ratelimit-limit-requests is {h['x-ratelimit-limit-requests']!r}, not '1000'")
    remaining = h["x-ratelimit-remaining-requests"]
    expect(remaining.isdigit() and int(remaining) < 1000, f"x-ratelimit-remaining-requests is {remaining!r}")
    return ", ".join(f"{n}={h[n]}" for n in names)


def check_rate_limit(ctx):
    client = ctx.client(ctx.a.limited_key)
    t0 = time.monotonic()
    n, err = 0, None
    while err is None:
        n += 1
        try:
            client.chat.completions.create(model=ctx.a.model, messages=MESSAGES, max_tokens=1)
        except openai.RateLimitError as e:
            err = e
            continue
        # GCRA admits 30 at once and one more per 2 s since: normally the 31st fails, but a slow burst
        # (a loaded machine) may legitimately earn more.
        elapsed = time.monotonic() - t0
        expect(n <= 30 + int(elapsed // 2),
               f"{n} requests in {elapsed:.2f}s all succeeded (limit: a burst of 30, then one per 2 s)")
    expect(n >= 29, f"RateLimitError already at request {n} (the burst is 30): {describe(err)}")
    expect(err.status_code == 429, f"HTTP {err.status_code}, not 429")
    expect(err.code == "rate_limit_exceeded", f"code {err.code!r}, not 'rate_limit_exceeded' (body {err.body!r})")
    h = err.response.headers
    ra, ra_ms = h.get("retry-after"), h.get("retry-after-ms")
    expect(ra is not None and ra.isdigit() and 1 <= int(ra) <= 2, f"retry-after is {ra!r}, not an integer in 1..=2")
    try:
        ms = float(ra_ms)
    except (TypeError, ValueError):
        raise CheckFailed(f"retry-after-ms is {ra_ms!r}, not a number")
    expect(1 <= ms <= 2000, f"retry-after-ms is {ra_ms!r}, not in 1..=2000")
    for name, want in [("x-ratelimit-limit-requests", "30"), ("x-ratelimit-remaining-requests", "0")]:
        expect(h.get(name) == want, f"{name} is {h.get(name)!r}, not {want!r}")
    ctx.retry_after_ms = ms
    return f"429 at request {n} after {time.monotonic() - t0:.2f}s: retry-after={ra} retry-after-ms={ra_ms}"


def check_retry_backoff(ctx):
    client = ctx.client(ctx.a.limited_key, max_retries=2)
    t0 = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(model=ctx.a.model, messages=MESSAGES, max_tokens=1)
    elapsed = time.monotonic() - t0
    raw.parse()
    need = 0.8 * ctx.retry_after_ms / 1000 - 0.3
    expect(elapsed >= need, f"succeeded after {elapsed:.2f}s with {raw.retries_taken} retries, but retry-after-ms "
                            f"was {ctx.retry_after_ms:g}: expected a wait of at least {need:.2f}s")
    return f"succeeded after {elapsed:.2f}s and {raw.retries_taken} retr{'y' if raw.retries_taken == 1 else 'ies'}"


def read_stream(ctx, **kw):
    """Streams a chat completion with GOOD_KEY; returns (chunks, concatenated content)."""
    stream = ctx.client(ctx.a.good_key).chat.completions.create(
        model=ctx.a.model, messages=MESSAGES, max_tokens=16, stream=True, **kw)
    chunks, text = [], []
    try:
        for c in stream:
            chunks.append(c)
            for ch in c.choices or []:
                if ch.delta is not None and ch.delta.content:
                    text.append(ch.delta.content)
    finally:
        stream.close()
    return chunks, "".join(text)


def check_stream_no_usage(ctx):
    chunks, text = read_stream(ctx)
    with_usage = [i + 1 for i, c in enumerate(chunks) if getattr(c, "usage", None) is not None]
    expect(not with_usage, f"chunk(s) {with_usage} of {len(chunks)} carry usage although the client did not ask "
                           f"(last: {chunks[with_usage[-1] - 1] if with_usage else None})")
    expect(text, f"no content in {len(chunks)} chunks")
    return f"{len(chunks)} chunks, none with usage, text={text[:40]!r}"


def check_stream_usage(ctx):
    chunks, text = read_stream(ctx, stream_options={"include_usage": True})
    expect(chunks, "no chunks")
    last = chunks[-1]
    expect(last.usage is not None, f"the last of {len(chunks)} chunks has no usage: {last}")
    expect(not last.choices, f"the usage chunk has choices {last.choices!r} (must be [])")
    u = last.usage
    expect((u.prompt_tokens or 0) > 0 and (u.completion_tokens or 0) > 0,
           f"usage has prompt_tokens={u.prompt_tokens!r} completion_tokens={u.completion_tokens!r}")
    expect(text, f"no content in {len(chunks)} chunks")
    return f"{len(chunks)} chunks, usage prompt={u.prompt_tokens} completion={u.completion_tokens}"


CHECKS = [("no-key", check_no_key), ("wrong-key", check_wrong_key), ("forbidden-model", check_forbidden_model),
          ("chat", check_chat), ("models", check_models), ("ratelimit-headers", check_ratelimit_headers),
          ("rate-limit", check_rate_limit), ("retry-backoff", check_retry_backoff),
          ("stream-no-usage", check_stream_no_usage), ("stream-usage", check_stream_usage)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base_url", help="e.g. http://127.0.0.1:18090/v1")
    ap.add_argument("good_key")
    ap.add_argument("limited_key")
    ap.add_argument("model")
    ap.add_argument("forbidden_model")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per request (default 20)")
    ctx = Ctx(ap.parse_args())
    print(f"openai SDK {openai.__version__} -> {ctx.a.base_url} (model {ctx.a.model!r}, "
          f"forbidden {ctx.a.forbidden_model!r})")
    return run_checks(CHECKS, lambda fn: fn(ctx))

if __name__ == "__main__":
    sys.exit(main())
