// The official OpenAI SDK for Node (openai-node) against the gateway: argv[2] is its /v1 URL, in
// front of a simulator that streams a token every ~70 ms. Exits non-zero with the reason on the
// first check that fails. Run by tests/compatibility.rs with the SDK scripts/install-test-deps.sh
// puts in .node.
import { createRequire } from "node:module";
import assert from "node:assert/strict";

const require = createRequire(new URL("../.node/", import.meta.url));
const { default: OpenAI } = await import(require.resolve("openai"));

// The SDK sends its timeout as `X-Stainless-Timeout` (whole seconds) and clears its own timer once
// the answer's head is in: a stream may run past it, so the gateway bounds only the head by it.
const client = new OpenAI({ baseURL: process.argv[2], apiKey: "sk-test", timeout: 1000, maxRetries: 0 });
const messages = [{ role: "user", content: "Say hello" }];

const answer = await client.chat.completions.create({ model: "sim", messages, max_tokens: 4 });
assert.ok(answer.choices[0].message.content.length > 0, "a non-streamed answer has content");
assert.equal(answer.usage.completion_tokens, 4);

const started = Date.now();
const stream = await client.chat.completions.create({
  model: "sim",
  messages,
  max_tokens: 30,
  stream: true,
  stream_options: { include_usage: true },
});
let text = "";
let usage = null;
for await (const chunk of stream) {
  text += chunk.choices[0]?.delta?.content ?? "";
  if (chunk.usage) usage = chunk.usage;
}
const took = Date.now() - started;
assert.ok(took > 1000, `the stream outlasted the SDK's 1 s timeout (${took} ms)`);
assert.ok(text.length > 0, "the stream has content");
assert.equal(usage?.completion_tokens, 30, "the usage chunk the client asked for arrives");

const models = await client.models.list();
assert.ok(models.data.some((m) => m.id === "sim"), "the model is listed");

try {
  await client.chat.completions.create({ model: "no-such-model", messages });
  assert.fail("an unknown model is refused");
} catch (error) {
  assert.equal(error.status, 404);
  assert.equal(error.code, "model_not_found");
}
console.log(`ok: openai-node, a ${took} ms stream past the SDK's 1 s timeout`);
