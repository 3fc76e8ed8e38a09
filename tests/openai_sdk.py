#!/usr/bin/env python3
"""Compatibility check of a running gateway with the official OpenAI Python SDK (1.x).

Usage:  .venv/bin/python tests/openai_sdk.py BASE_URL [--model sim] [--timeout 30] [--wait 0]
        BASE_URL like http://127.0.0.1:PORT/v1   (scripts/install-test-deps.sh creates .venv with the SDK)

Checks, in order, one line each; exits 1 at the first failure (2 on bad usage, 3 if the SDK is missing):
  chat                 non-streaming chat completion: object chat.completion, choices[0].message.content non-empty,
                       usage.total_tokens > 0
  chat-stream          stream=True with stream_options.include_usage: >= 2 content deltas, chunks are
                       chat.completion.chunk, a final usage chunk (choices == [], usage.total_tokens > 0)
  chat-stream-wire     the same stream read raw: every event is `data: {json}`, the last one is `data: [DONE]`
  models               models.list() contains the model
  embeddings           embeddings.create(encoding_format="float") returns a vector of length > 0
  unknown-model        model "no-such-model" raises openai.NotFoundError (HTTP 404)
--wait N retries the first request for up to N seconds while the connection is refused (gateway still starting).
"""
import argparse
import json
import sys
import time

# sdk_checks exits with 3, saying why, where the SDK is missing; so it comes first.
from sdk_checks import MESSAGES, CheckFailed, describe, expect, run_checks

import openai  # noqa: E402


def check_chat(client, model):
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16)
    expect(getattr(r, "object", None) == "chat.completion", f"object is {getattr(r, 'object', None)!r}, not 'chat.completion'")
    expect(r.choices, "choices is empty")
    content = r.choices[0].message.content
    expect(isinstance(content, str) and content != "", f"choices[0].message.content is {content!r}")
    expect(r.usage is not None, "usage is missing")
    expect((r.usage.total_tokens or 0) > 0, f"usage.total_tokens is {r.usage.total_tokens!r}")
    return f"id={r.id} content={content[:40]!r} total_tokens={r.usage.total_tokens}"


def check_chat_stream(client, model):
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True})
    deltas, chunks, usage, after_usage, text = 0, 0, None, 0, []
    try:
        for c in stream:
            chunks += 1
            expect(getattr(c, "object", None) == "chat.completion.chunk",
                   f"chunk {chunks}: object is {getattr(c, 'object', None)!r}, not 'chat.completion.chunk'")
            if usage is not None:
                after_usage += 1
            if c.usage is not None:
                expect(not c.choices, f"chunk {chunks}: usage chunk has choices {c.choices!r} (must be [])")
                usage = c.usage
                continue
            for ch in c.choices or []:
                if ch.delta is not None and ch.delta.content:
                    deltas += 1
                    text.append(ch.delta.content)
    finally:
        stream.close()
    expect(deltas >= 2, f"{deltas} content deltas in {chunks} chunks (need >= 2)")
    expect(usage is not None, f"no usage chunk in {chunks} chunks despite stream_options.include_usage")
    expect((usage.total_tokens or 0) > 0, f"usage chunk has total_tokens={usage.total_tokens!r}")
    expect(after_usage == 0, f"{after_usage} chunk(s) after the usage chunk (it must be the last before [DONE])")
    return f"chunks={chunks} content_deltas={deltas} text={''.join(text)[:40]!r} total_tokens={usage.total_tokens}"


def check_chat_stream_wire(client, model):
    with client.chat.completions.with_streaming_response.create(
            model=model, messages=MESSAGES, max_tokens=16, stream=True,
            stream_options={"include_usage": True}) as resp:
        ctype = resp.headers.get("content-type", "")
        expect(ctype.startswith("text/event-stream"), f"content-type is {ctype!r}, not text/event-stream")
        data = []
        for line in resp.iter_lines():
            if line.startswith("data:"):
                data.append(line[5:].strip())
            elif line and not line.startswith(":") and not line.startswith(("event:", "id:", "retry:")):
                raise CheckFailed(f"unexpected SSE line {line[:120]!r}")
    expect(data, "no `data:` events")
    expect(data[-1] == "[DONE]", f"last event is {data[-1][:120]!r}, not [DONE]")
    expect(data.count("[DONE]") == 1, f"[DONE] appears {data.count('[DONE]')} times")
    for i, d in enumerate(data[:-1]):
        try:
            obj = json.loads(d)
        except ValueError:
            raise CheckFailed(f"event {i + 1} is not JSON: {d[:120]!r}")
        expect(obj.get("object") == "chat.completion.chunk", f"event {i + 1}: object is {obj.get('object')!r}")
    return f"{len(data) - 1} JSON events then [DONE]"


def check_models(client, model):
    ids = [m.id for m in client.models.list()]
    expect(model in ids, f"{model!r} not in model ids {ids!r}")
    return f"ids={ids}"


def check_embeddings(client, model):
    r = client.embeddings.create(model=model, input="hello world", encoding_format="float")
    expect(r.data, "data is empty")
    vec = r.data[0].embedding
    expect(isinstance(vec, list) and len(vec) > 0, f"data[0].embedding is {str(vec)[:80]!r}")
    expect(all(isinstance(x, (int, float)) for x in vec), "data[0].embedding has non-numbers")
    return f"dim={len(vec)}"


def check_unknown_model(client, model):
    try:
        r = client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)
    except openai.NotFoundError as e:
        return f"NotFoundError HTTP {e.status_code}: {str(e)[:100]}"
    except openai.APIStatusError as e:
        raise CheckFailed(f"expected openai.NotFoundError (HTTP 404), got {describe(e)}")
    raise CheckFailed(f"expected openai.NotFoundError (HTTP 404), got a success: {str(r)[:200]}")


CHECKS = [("chat", check_chat), ("chat-stream", check_chat_stream), ("chat-stream-wire", check_chat_stream_wire),
          ("models", check_models), ("embeddings", check_embeddings), ("unknown-model", check_unknown_model)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base_url", help="e.g. http://127.0.0.1:18090/v1")
    ap.add_argument("--model", default="sim")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    ap.add_argument("--wait", type=float, default=0.0, help="retry the first request this long while refused")
    a = ap.parse_args()
    # max_retries=0: a retried 5xx would hide a gateway bug; every check must pass on its first request.
    client = openai.OpenAI(base_url=a.base_url.rstrip("/"), api_key="sk-test", timeout=a.timeout, max_retries=0)
    print(f"openai SDK {openai.__version__} -> {a.base_url} (model {a.model!r})")
    return run_checks(CHECKS, lambda fn: fn(client, a.model), wait_until=time.monotonic() + a.wait)

if __name__ == "__main__":
    sys.exit(main())
