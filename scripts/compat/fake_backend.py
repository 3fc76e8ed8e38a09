"""A small OpenAI-compatible backend (standard library only) for what the simulator does not serve.

Usage: python fake_backend.py --port P [--models fake,fake-slow,fake-drip] [--slow-s 5] [--log requests.jsonl]
Listens on 127.0.0.1 only.
  POST /v1/responses         the Responses API: one JSON `response` object, or with "stream": true the SSE events
                             response.created, .in_progress, .output_item.added, .content_part.added,
                             .output_text.delta (one per word), .output_text.done, .content_part.done,
                             .output_item.done, .completed (each as `event: TYPE` + `data: JSON` with `type` and
                             `sequence_number`; no `data: [DONE]`, as OpenAI sends none on this route)
  POST /v1/chat/completions  a short answer (JSON or SSE ending in `data: [DONE]`); a model whose name contains
                             "slow" waits --slow-s seconds first, one with "drip" streams DRIP_CHUNKS chunks
                             DRIP_GAP_S apart (for client timeout checks: a stream longer than a read timeout)
  GET  /v1/models, /v1/models/{id}, /health
  GET  /_compat/mark?name=X  writes a marker line to the log (to attribute the following requests to a client)
  anything else              404 with an OpenAI-style error body
Every request (method, path, headers, body) is appended to --log as one JSON line.
"""
import argparse
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

ANSWER = "Hello from the fake Responses backend."
DRIP_CHUNKS, DRIP_GAP_S = 25, 0.1
ARGS = None
LOG_LOCK = threading.Lock()


def log(record):
    if ARGS.log:
        with LOG_LOCK, open(ARGS.log, "a") as f:
            f.write(json.dumps(record) + "\n")


def response_object(rid, model, status, text):
    """A Responses API `response` object; `text` None gives the empty output of a response just created."""
    output = []
    if text is not None:
        output = [{"id": "msg_" + rid[5:], "type": "message", "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}]
    words = len(ANSWER.split())
    return {
        "id": rid, "object": "response", "created_at": int(time.time()), "status": status, "model": model,
        "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "error": None,
        "incomplete_details": None, "instructions": None, "metadata": {}, "temperature": 1.0, "top_p": 1.0,
        "usage": None if text is None else {
            "input_tokens": 5, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": words, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 5 + words},
    }


def response_events(model):
    """The SSE events of a streamed Responses API answer, in OpenAI's order."""
    rid = "resp_" + uuid.uuid4().hex
    mid = "msg_" + rid[5:]
    item = {"id": mid, "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    where = {"item_id": mid, "output_index": 0, "content_index": 0}
    yield {"type": "response.created", "response": response_object(rid, model, "in_progress", None)}
    yield {"type": "response.in_progress", "response": response_object(rid, model, "in_progress", None)}
    yield {"type": "response.output_item.added", "output_index": 0, "item": item}
    yield {"type": "response.content_part.added", **where, "part": part}
    words = ANSWER.split(" ")
    for i, w in enumerate(words):
        yield {"type": "response.output_text.delta", **where, "delta": w if i == 0 else " " + w, "logprobs": []}
    yield {"type": "response.output_text.done", **where, "text": ANSWER, "logprobs": []}
    yield {"type": "response.content_part.done", **where, "part": {**part, "text": ANSWER}}
    done_item = {**item, "status": "completed", "content": [{**part, "text": ANSWER}]}
    yield {"type": "response.output_item.done", "output_index": 0, "item": done_item}
    yield {"type": "response.completed", "response": response_object(rid, model, "completed", ANSWER)}


def chat_chunks(model, include_usage):
    cid = "chatcmpl-" + uuid.uuid4().hex
    base = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    words = ANSWER.split(" ")
    if "drip" in model:
        words = [f"w{i}" for i in range(DRIP_CHUNKS)]
    for i, w in enumerate(words):
        if "drip" in model:
            time.sleep(DRIP_GAP_S)
        yield {**base, "choices": [{"index": 0, "delta": {"content": w if i == 0 else " " + w},
                                    "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    if include_usage:
        yield {**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet: the JSONL log has everything
        pass

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_sse(self, events, named):
        """Chunked text/event-stream; `named` adds an `event: TYPE` line (Responses API style)."""
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

        def chunk(data):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        for seq, ev in enumerate(events):
            if named:
                ev = {**ev, "sequence_number": seq}
                chunk(f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n".encode())
            else:
                chunk(f"data: {json.dumps(ev)}\n\n".encode())
            time.sleep(0.005)
        if not named:
            chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def not_found(self):
        self.send_json(404, {"error": {"message": f"no route {self.command} {self.path}",
                                       "type": "invalid_request_error", "code": "not_found"}})

    def record(self, body=None):
        log({"t": time.time(), "method": self.command, "path": self.path, "headers": dict(self.headers.items()),
             "body": body})

    def do_GET(self):
        self.record()
        url = urlparse(self.path)
        models = ARGS.models.split(",")
        if url.path == "/_compat/mark":
            log({"mark": parse_qs(url.query).get("name", ["?"])[0]})
            self.send_json(200, {"ok": True})
        elif url.path == "/health":
            self.send_json(200, {"status": "ok"})
        elif url.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "compat"} for m in models]})
        elif url.path.startswith("/v1/models/") and url.path[len("/v1/models/"):] in models:
            self.send_json(200, {"id": url.path[len("/v1/models/"):], "object": "model", "created": 0,
                                 "owned_by": "compat"})
        else:
            self.not_found()

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            req = json.loads(raw or b"{}")
        except ValueError:
            req = None
        self.record(req)
        if not isinstance(req, dict):
            return self.send_json(400, {"error": {"message": "body is not a JSON object",
                                                  "type": "invalid_request_error", "code": None}})
        model = req.get("model") or "fake"
        path = urlparse(self.path).path
        if path == "/v1/responses":
            if req.get("stream"):
                self.send_sse(response_events(model), named=True)
            else:
                self.send_json(200, response_object("resp_" + uuid.uuid4().hex, model, "completed", ANSWER))
        elif path == "/v1/chat/completions":
            if "slow" in model:
                time.sleep(ARGS.slow_s)
            if req.get("stream"):
                usage = (req.get("stream_options") or {}).get("include_usage", False)
                self.send_sse(chat_chunks(model, usage), named=False)
            else:
                self.send_json(200, {
                    "id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
                    "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER},
                                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}})
        else:
            self.not_found()


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that hung up (the timeout checks do) is no error here


def main():
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--models", default="fake,fake-slow,fake-drip")
    p.add_argument("--slow-s", type=float, default=5.0)
    p.add_argument("--log", default="")
    ARGS = p.parse_args()
    Server(("127.0.0.1", ARGS.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
