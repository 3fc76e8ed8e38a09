"""Third-party clients through the gateway: the openai SDK, litellm, langchain-openai. Prints result rows (common.py).

Usage: python clients.py openai|litellm|langchain GATEWAY_URL [--label NAME]
       python clients.py headers FAKE_BACKEND_URL    (one chat call per installed client straight to fake_backend.py,
                                                       each after a /_compat/mark, so its log tells who sent what)
GATEWAY_URL is the gateway's base URL (http://127.0.0.1:PORT). The gateway must route model `sim` to simulators and
models `fake`, `fake-slow` and `fake-drip` to fake_backend.py (which speaks the Responses API; `fake-slow` answers
after 5 s; `fake-drip` streams 25 chunks 0.1 s apart).
"""
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from common import Checker, describe

MSG = [{"role": "user", "content": "Say hello."}]
FAKE_ANSWER = "Hello from the fake Responses backend."
TIMEOUT_TRIES = 10  # at once


def check_openai(base, label):
    import openai

    c = Checker(label, "client", openai.__version__)
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=30)

    def models_list():
        ids = [m.id for m in client.models.list()]
        assert "sim" in ids, f"'sim' not in {ids}"
        return f"ids {ids}"

    def models_retrieve():
        m = client.models.retrieve("sim")
        assert m.id == "sim", f"id {m.id!r}"
        return f"id {m.id}, owned_by {m.owned_by}"

    def chat():
        r = client.chat.completions.create(model="sim", messages=MSG, max_tokens=8)
        assert r.choices[0].message.content, "empty content"
        assert r.usage and r.usage.total_tokens > 0, f"usage {r.usage}"
        return f"{r.usage.completion_tokens} tokens, finish_reason {r.choices[0].finish_reason}"

    def chat_stream():
        chunks = list(client.chat.completions.create(model="sim", messages=MSG, max_tokens=8, stream=True,
                                                     stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text, "no content deltas"
        last = chunks[-1]
        assert last.usage is not None and not last.choices, "last chunk is not the usage chunk (empty choices)"
        return f"{len(chunks)} chunks, usage {last.usage.total_tokens} tokens in the last (choices=[])"

    def completions():
        r = client.completions.create(model="sim", prompt="Once upon", max_tokens=8)
        assert r.choices[0].text, "empty text"
        return f"{r.usage.completion_tokens} tokens"

    def completions_stream():
        chunks = list(client.completions.create(model="sim", prompt="Once upon", max_tokens=8, stream=True))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        assert text, "no text"
        return f"{len(chunks)} chunks"

    def embeddings():
        # No encoding_format: the SDK asks for base64 and decodes it itself (float lists pass through too).
        r = client.embeddings.create(model="sim", input=["hello", "world"])
        assert len(r.data) == 2 and len(r.data[0].embedding) > 0, f"data {r.data!r:.200}"
        return f"2 vectors of {len(r.data[0].embedding)} floats"

    def responses():
        r = client.responses.create(model="fake", input="Say hello.")
        assert r.output_text == FAKE_ANSWER, f"output_text {r.output_text!r}"
        return f"status {r.status}, usage {r.usage.total_tokens} tokens"

    def responses_stream():
        events = list(client.responses.create(model="fake", input="Say hello.", stream=True))
        types = [e.type for e in events]
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert types and types[-1] == "response.completed", f"event types {types}"
        assert text == FAKE_ANSWER, f"deltas {text!r}"
        return f"{len(events)} events, {types[0]} .. {types[-1]}"

    def timeout():
        # The SDK sends its timeout upstream (x-stainless-read-timeout); a gateway that enforces exactly that
        # deadline races the client's own timer, so one try may miss what several at once show.
        def one(_):
            t0 = time.monotonic()
            try:
                client.with_options(timeout=1.0).chat.completions.create(model="fake-slow", messages=MSG)
                return "answered", None
            except openai.APITimeoutError:
                return "APITimeoutError", None
            except Exception as e:
                return type(e).__name__, f"{describe(e)} after {time.monotonic() - t0:.2f} s"

        with ThreadPoolExecutor(TIMEOUT_TRIES) as pool:
            outcomes = list(pool.map(one, range(TIMEOUT_TRIES)))
        tally = ", ".join(f"{n}/{TIMEOUT_TRIES} {k}" for k, n in sorted(Counter(k for k, _ in outcomes).items()))
        other = next((d for _, d in outcomes if d), None)
        assert tally == f"{TIMEOUT_TRIES}/{TIMEOUT_TRIES} APITimeoutError", tally + (f"; e.g. {other}" if other else "")
        return f"{tally} (backend answers after 5 s)"

    def drip():
        # The SDK's timeout is httpx's: connect, write, and each read (the gap between two chunks), not the whole
        # request. It sends it as x-stainless-read-timeout; a stream may outlast it as long as chunks keep coming.
        t0, n = time.monotonic(), 0
        try:
            for ch in client.with_options(timeout=1.0).chat.completions.create(model="fake-drip", messages=MSG,
                                                                              stream=True):
                n += bool(ch.choices and ch.choices[0].delta.content)
        except Exception as e:
            raise AssertionError(f"{describe(e)} after {n}/25 content chunks, {time.monotonic() - t0:.2f} s") from e
        assert n == 25, f"{n}/25 content chunks"
        return f"25 chunks in {time.monotonic() - t0:.2f} s"

    c.run("models.list()", models_list)
    c.run('models.retrieve("sim")', models_retrieve)
    c.run("chat.completions", chat)
    c.run("chat.completions stream + include_usage", chat_stream)
    c.run("completions", completions)
    c.run("completions stream", completions_stream)
    c.run("embeddings", embeddings)
    c.run("responses.create (fake backend)", responses)
    c.run("responses.create stream (fake backend)", responses_stream)
    c.run("timeout=1.0, stream of 2.5 s with a chunk every 0.1 s -> completes", drip)
    # Last: the gateway may count these timeouts as the backend's failures and eject it for a while.
    c.run(f"timeout=1.0 < backend's 5 s -> APITimeoutError ({TIMEOUT_TRIES} at once)", timeout)


def check_litellm(base, label):
    import litellm

    c = Checker(label, "client", litellm_version())
    kw = dict(model="openai/sim", api_base=base + "/v1", api_key="x", messages=MSG, max_tokens=8, timeout=30,
              num_retries=0)

    def completion():
        r = litellm.completion(**kw)
        assert r.choices[0].message.content, "empty content"
        return f"{r.usage.completion_tokens} tokens"

    def completion_stream():
        chunks = list(litellm.completion(stream=True, **kw))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text, "no content"
        return f"{len(chunks)} chunks"

    c.run('completion(model="openai/sim")', completion)
    c.run('completion(model="openai/sim", stream=True)', completion_stream)


def litellm_version():
    from importlib.metadata import version
    return version("litellm")


def check_langchain(base, label):
    from importlib.metadata import version

    from langchain_openai import ChatOpenAI

    c = Checker(label, "client", version("langchain-openai"))
    llm = ChatOpenAI(base_url=base + "/v1", model="sim", api_key="x", max_tokens=8, timeout=30, max_retries=0)

    def invoke():
        m = llm.invoke("Say hello.")
        assert m.content, "empty content"
        return f"content {m.content[:40]!r}"

    def stream():
        chunks = list(llm.stream("Say hello."))
        text = "".join(ch.content for ch in chunks)
        assert text, "no content"
        return f"{len(chunks)} chunks"

    c.run("ChatOpenAI.invoke", invoke)
    c.run("ChatOpenAI.stream", stream)


def headers(fake):
    """One chat call per client straight to the fake backend, each announced by a marker in its log."""
    def mark(name):
        urllib.request.urlopen(f"{fake}/_compat/mark?name={urllib.parse.quote(name)}", timeout=5).read()

    try:
        import openai
        mark(f"openai {openai.__version__}")
        openai.OpenAI(base_url=fake + "/v1", api_key="x", max_retries=0, timeout=10).chat.completions.create(
            model="fake", messages=MSG, max_tokens=8)
    except ImportError:
        pass
    try:
        import litellm
        mark(f"litellm {litellm_version()}")
        litellm.completion(model="openai/fake", api_base=fake + "/v1", api_key="x", messages=MSG, max_tokens=8,
                           timeout=10)
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        from langchain_openai import ChatOpenAI
        mark(f"langchain-openai {version('langchain-openai')}")
        ChatOpenAI(base_url=fake + "/v1", model="fake", api_key="x", max_tokens=8, timeout=10).invoke("hi")
    except ImportError:
        pass
    mark("end")


def main():
    what, url = sys.argv[1], sys.argv[2].rstrip("/")
    default = {"langchain": "langchain-openai"}.get(what, what)
    label = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--label" else default
    if what == "headers":
        return headers(url)
    {"openai": check_openai, "litellm": check_litellm, "langchain": check_langchain}[what](url, label)


if __name__ == "__main__":
    main()
