"""Load and report for scripts/llama-routing.sh: shared-prompt chat requests through a gateway to real llama-servers.

Subcommands (standard library only):
  prompts   write N system prompts of about T tokens each (deterministic English-ish text from a seed; lengths fitted
            with a llama-server's /tokenize, so they are the model's tokens, not a guess)
  load      send the requests (each prompt R times in a seeded shuffled order, plus a unique question) streamed,
            closed loop at a fixed concurrency; one JSON line per request: TTFT, backend, llama-server's timings
  report    the markdown summary of one or more runs

A request is a cold prefill when the backend processed more than half of its prompt (llama-server's
timings.prompt_n > usage.prompt_tokens / 2): its slot and its RAM prompt cache held no usable prefix.
"""
import argparse
import http.client
import json
import math
import queue
import random
import resource
import statistics
import sys
import threading
import time
import urllib.request

WORDS = """
the a of to and in is that for it as with was on be by this are from at or have an they which one you were all we
her she there would their will when who him been has more if no out so up said what its about than into them can only
other new some could time these two may then do first any my now such like our over man me even most made after also
did many before must through back years where much your way well down should because each just those people how too
little state good very make world still own see men work long get here between both life being under never day same
another know while last might us great old year off come since against go came right used take three states himself
few house use during without again place american around however home small found thought went say part once general
high upon school every does got united left number course war until always away something fact though water less
public put think almost hand enough far took head yet government system better set told nothing night end why called
didn't eyes find going look asked later knew point next city business give group toward young let room president
side social given present several order national possible rather second face per among form important often things
looked early white case john become large big need four within felt along children saw best church ever least power
development light thing seemed family interest want members mind country area others done turned although open god
service certain kind problem began different door thus help sense means whole matter perhaps itself york times human
law line above name example action company hands local show whether five history gave today either act feet across
taken past quite anything seen having death experience body word half really week field car words already themselves
information tell together college shall money period held keep sure probably free seems political real behind cannot
miss question air office making brought whose special heard major problems ago became federal moment study available
known result street economic boy position reason change south board individual job society areas west close turn love
community true court force full seem am wife age policy voice center woman common control necessary following front
sometimes six girl clear further land run students provide feel party able mother music education university child
effect level stood military short town morning total figure private son art class rest outside black
""".split()

TOPICS = ["tax law", "marine biology", "railway history", "kitchen chemistry", "medieval music", "orbital mechanics",
          "bee keeping", "typography", "glaciers", "ancient trade routes", "opera", "soil science"]


def post_json(url, body, timeout=30):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


def count_tokens(base, text):
    return len(post_json(f"{base}/tokenize", {"content": text})["tokens"])


def text_of(rng, n_words):
    out, sentence = [], []
    for _ in range(n_words):
        sentence.append(rng.choice(WORDS))
        if len(sentence) >= rng.randint(8, 16):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return " ".join(out)


def cmd_prompts(a):
    prompts = []
    for i in range(a.n):
        # Each prompt's own seed and its own opening: prompts differ within their first bytes (the gateway's affinity
        # key hashes the first prefix_bytes of the system prompt).
        head = f"You are assistant number {i + 1}, an expert in {TOPICS[i % len(TOPICS)]}. Use the notes below.\n\n"
        words = a.tokens * 3 // 4
        for _ in range(8):  # fit the word count to the token target with the model's own tokenizer
            body = text_of(random.Random(a.seed * 1000 + i), words)
            n = count_tokens(a.tokenize_url, head + body)
            if abs(n - a.tokens) <= a.tokens // 50:
                break
            words = max(1, round(words * a.tokens / n))
        prompts.append({"id": i, "text": head + body, "tokens": n})
    json.dump({"seed": a.seed, "prompts": prompts}, open(a.out, "w"), indent=1)
    print(f"{len(prompts)} prompts, tokens {[p['tokens'] for p in prompts]}", file=sys.stderr)


def one_request(host, port, body, timeout):
    """One streamed chat completion; what the client saw and what llama-server reported."""
    rec = {"status": None, "endpoint": None, "ttft_ms": None, "total_ms": None, "done": False, "error": None,
           "prompt_tokens": None, "prompt_n": None, "cache_n": None, "prompt_ms": None, "predicted_n": None,
           "content": ""}
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"content-type": "application/json", "cache-control": "no-cache"})
        resp = conn.getresponse()
        rec["status"] = resp.status
        rec["endpoint"] = resp.getheader("x-nanogate-endpoint")
        if resp.status != 200:
            rec["error"] = f"HTTP {resp.status}: {resp.read(500).decode(errors='replace')}"
            return rec
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators and SSE comments (llama-server pings with ":")
            data = line[5:].strip()
            if data == b"[DONE]":
                rec["done"] = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                rec["error"] = f"stream error: {json.dumps(chunk['error'])[:300]}"
                break
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if rec["ttft_ms"] is None:
                        rec["ttft_ms"] = (time.perf_counter() - t0) * 1000
                    rec["content"] += piece
            if chunk.get("usage"):
                rec["prompt_tokens"] = chunk["usage"].get("prompt_tokens")
            timings = chunk.get("timings")
            if timings:
                for k in ("prompt_n", "cache_n", "prompt_ms", "predicted_n"):
                    rec[k] = timings.get(k)
        rec["total_ms"] = (time.perf_counter() - t0) * 1000
        if not rec["done"] and not rec["error"]:
            rec["error"] = "stream ended without [DONE]"
        elif rec["prompt_n"] is None and not rec["error"]:
            rec["error"] = "no timings.prompt_n in the stream"
    except Exception as e:  # any failure is a row, the run goes on
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return rec


def cmd_load(a):
    prompts = json.load(open(a.prompts))["prompts"]
    order = [p["id"] for p in prompts for _ in range(a.repeat)]
    random.Random(a.seed).shuffle(order)
    host, port = a.gateway.rsplit(":", 1)
    jobs = queue.Queue()
    for i, pid in enumerate(order):
        jobs.put((i, pid))
    out, lock = open(a.out, "w"), threading.Lock()
    words = random.Random(a.seed + 1)
    questions = [f"Question {i + 1}: what does the note say about {words.choice(WORDS)} and {words.choice(WORDS)}?"
                 for i in range(len(order))]

    def worker():
        while True:
            try:
                i, pid = jobs.get_nowait()
            except queue.Empty:
                return
            body = {"model": a.model, "stream": True, "stream_options": {"include_usage": True},
                    "max_tokens": a.max_tokens, "temperature": 0,
                    "messages": [{"role": "system", "content": prompts[pid]["text"]},
                                 {"role": "user", "content": questions[i]}]}
            started = time.time()
            rec = one_request(host, int(port), body, a.timeout)
            rec.update({"i": i, "prompt": pid, "started": started})
            with lock:
                out.write(json.dumps(rec) + "\n")
                out.flush()
            if rec["error"]:
                print(f"  request {i} (prompt {pid}): {rec['error']}", file=sys.stderr)

    threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if a.cpu_out:  # the client's own CPU seconds, so the caller can tell the machine's other load from it
        usage = resource.getrusage(resource.RUSAGE_SELF)
        open(a.cpu_out, "w").write(f"{usage.ru_utime + usage.ru_stime:.2f}\n")


def pct(xs, q):
    xs = sorted(xs)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)] if xs else float("nan")  # nearest rank


def is_cold(r):
    return r["prompt_n"] is not None and r["prompt_tokens"] and r["prompt_n"] > r["prompt_tokens"] / 2


def cmd_report(a):
    names = json.load(open(a.backends)) if a.backends else {}
    n_prompts = len(json.load(open(a.prompts))["prompts"])
    print("| policy | requests | errors | TTFT mean ms | TTFT p50 ms | TTFT p90 ms | cold prefills | prefills per prompt "
          "| requests per backend | TTFT cold / warm mean ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---|")
    details = []
    for spec in a.runs:
        policy, path = spec.split("=", 1)
        try:
            rows = [json.loads(line) for line in open(path)]
        except OSError:
            print(f"| {policy} | not run | | | | | | | | |")
            continue
        errors = sum(1 for r in rows if r["error"])
        ttft = [r["ttft_ms"] for r in rows if r["ttft_ms"] is not None]
        cold = [r for r in rows if is_cold(r)]
        per_prompt = [sum(1 for r in cold if r["prompt"] == p) for p in range(n_prompts)]
        backends = sorted({r["endpoint"] for r in rows if r["endpoint"]})
        label = lambda e: names.get(policy, {}).get(e, f"id {e}")
        split = ", ".join(f"{label(e)}: {sum(1 for r in rows if r['endpoint'] == e)}" for e in backends)
        cold_t = [r["ttft_ms"] for r in cold if r["ttft_ms"] is not None]
        warm_t = [r["ttft_ms"] for r in rows if not is_cold(r) and r["ttft_ms"] is not None]
        mean = lambda xs: statistics.mean(xs) if xs else float("nan")
        print(f"| {policy} | {len(rows)} | {errors} | {mean(ttft):.0f} | {pct(ttft, 50):.0f} | {pct(ttft, 90):.0f} "
              f"| {len(cold)} | {per_prompt} (ideal {[1] * n_prompts}) | {split} | {mean(cold_t):.0f} / {mean(warm_t):.0f} |")
        lines = [f"\n### {policy}: per prompt\n", "| prompt | requests | cold prefills per backend | backends used |",
                 "|---:|---:|---|---|"]
        for p in range(n_prompts):
            mine = [r for r in rows if r["prompt"] == p]
            by = ", ".join(f"{label(e)}: {sum(1 for r in mine if is_cold(r) and r['endpoint'] == e)}" for e in backends)
            used = ", ".join(f"{label(e)}: {sum(1 for r in mine if r['endpoint'] == e)}" for e in backends)
            lines.append(f"| {p} | {len(mine)} | {by} | {used} |")
        details.append("\n".join(lines))
    print("\n".join(details))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts")
    p.add_argument("--tokenize-url", required=True, help="a llama-server's base URL (its /tokenize counts tokens)")
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--tokens", type=int, default=700)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", required=True)
    p = sub.add_parser("load")
    p.add_argument("--gateway", required=True, help="host:port")
    p.add_argument("--prompts", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--repeat", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--cpu-out", help="write this process's CPU seconds here at the end")
    p.add_argument("--out", required=True)
    p = sub.add_parser("report")
    p.add_argument("--prompts", required=True)
    p.add_argument("--backends", help="JSON {policy: {endpoint header: name}}")
    p.add_argument("runs", nargs="+", help="POLICY=RAW.jsonl")
    a = ap.parse_args()
    {"prompts": cmd_prompts, "load": cmd_load, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
