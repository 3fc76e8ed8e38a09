#!/usr/bin/env python3
"""A stream whose backend dies mid-way must raise an error in the official OpenAI Python SDK, not
end as a silently truncated answer.

Usage:  .venv/bin/python tests/openai_sdk_stream_error.py BASE_URL
Prints READY once the first content delta arrived (the test then takes the backend down), then
OK if iterating the stream raised openai.APIError; exits 1 if the stream ended without an error.
"""
import sys

import openai


def main():
    client = openai.OpenAI(base_url=sys.argv[1], api_key="sk-test", max_retries=0, timeout=30)
    stream = client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "a long answer"}], max_tokens=500, stream=True)
    deltas = 0
    try:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                deltas += 1
                if deltas == 1:
                    print("READY", flush=True)
    except openai.APIError as e:
        print(f"OK the SDK raised {type(e).__name__}: {e}", flush=True)
        return 0
    print(f"FAIL the stream ended after {deltas} deltas without an error", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
