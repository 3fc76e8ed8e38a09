"""A third-party OpenAI-compatible server behind the gateway. Prints result rows (common.py).

Usage: python backends.py NAME VERSION GATEWAY_URL BACKEND_URL MODEL
  observed (result "info")  what the backend itself answers on /health, /v1/models, /metrics and unknown routes
  checks, through the gateway with the openai SDK: the gateway keeps it healthy (/ready, watched for 6 s),
  GET /v1/models lists MODEL, chat (JSON and streamed), and a request the backend rejects (max_tokens "eight") comes
  back with the backend's own status and error body, as a client talking to the backend directly would see it.
"""
import json
import sys
import time
import urllib.error
import urllib.request

from common import Checker, emit

MSG = [{"role": "user", "content": "Say hello."}]
READY_WATCH_S = 6


def http(method, url, body=None, timeout=10):
    """(status, content-type, body text) of one request; HTTP errors are answers too."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("content-type", ""), r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read().decode(errors="replace")


def short(text, n=120):
    return " ".join(text.split())[:n]


def main():
    name, version, gateway, backend, model = sys.argv[1:6]
    probes = [("GET", "/health"), ("GET", "/v1/models"), ("GET", f"/v1/models/{model}"), ("GET", "/metrics"),
              ("GET", "/no-such-route"), ("POST", "/v1/no-such-route"), ("GET", "/v1/chat/completions")]
    seen = []
    for method, path in probes:
        try:
            status, ctype, text = http(method, backend + path, {} if method == "POST" else None)
            seen.append(f"{method} {path} -> {status} {ctype.split(';')[0]} {short(text, 90)}")
        except Exception as e:
            seen.append(f"{method} {path} -> {type(e).__name__}: {e}")
    emit(name, "backend", version, "direct: what it serves", "info", " ; ".join(seen))

    import openai

    c = Checker(name, "backend", version)
    client = openai.OpenAI(base_url=gateway + "/v1", api_key="x", max_retries=0, timeout=30)

    def ready():
        # The gateway starts with its endpoints in and takes one out after `fall` (3) failed probes 1 s apart: watch
        # /ready for a while and judge where it settles, so that the checks after this one see the steady state.
        polls, end = [], time.monotonic() + READY_WATCH_S
        while time.monotonic() < end:
            status, _, text = http("GET", gateway + "/ready")
            if not polls or polls[-1][0] != status:
                polls.append([status, 0])
            polls[-1][1] += 1
            time.sleep(0.5)
        path = " -> ".join(f"{st} x{n}" for st, n in polls)
        assert status == 200, f"/ready {status} {short(text)} after {READY_WATCH_S} s (polls: {path})"
        return f"{short(text)} (polls: {path})"

    def models():
        ids = [m.id for m in client.models.list()]
        assert model in ids, f"{model!r} not in {ids}"
        return f"ids {ids}"

    def chat():
        r = client.chat.completions.create(model=model, messages=MSG, max_tokens=8)
        assert r.choices[0].message.content, "empty content"
        return f"content {short(r.choices[0].message.content, 40)!r}"

    def chat_stream():
        chunks = list(client.chat.completions.create(model=model, messages=MSG, max_tokens=8, stream=True))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text, "no content"
        return f"{len(chunks)} chunks"

    def error_passthrough():
        # The gateway validates the request's shape itself (a missing `messages` never leaves it), so this one is
        # well-formed to the gateway but rejected by the backend's own validation.
        bad = {"model": model, "messages": MSG, "max_tokens": "eight"}
        d_status, _, d_body = http("POST", backend + "/v1/chat/completions", bad)
        g_status, _, g_body = http("POST", gateway + "/v1/chat/completions", bad)
        detail = f"direct {d_status} {short(d_body, 150)} | via gateway {g_status} {short(g_body, 150)}"
        assert g_status == d_status and g_body.strip() == d_body.strip(), detail
        return detail

    c.run(f"gateway /ready after {READY_WATCH_S} s of health probes", ready)
    c.run("GET /v1/models via gateway", models)
    c.run("chat via gateway", chat)
    c.run("chat stream via gateway", chat_stream)
    c.run('max_tokens "eight": backend\'s status + body pass through', error_passthrough)


if __name__ == "__main__":
    main()
