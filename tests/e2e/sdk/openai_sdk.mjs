// The official OpenAI JS SDK against a Kith node, unmodified.
// Env: KITH_BASE_URL (http://127.0.0.1:PORT/v1), KITH_TOKEN. Prints one JSON object.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.KITH_BASE_URL, apiKey: process.env.KITH_TOKEN, maxRetries: 0 });
const models = [];
for await (const model of client.models.list()) models.push(model.id);
const answer = await client.chat.completions.create({
  model: "smollm2-135m",
  messages: [{ role: "user", content: "Say hello." }],
  temperature: 0,
  max_tokens: 12,
});
let streamed = "";
let finish = null;
const stream = await client.chat.completions.create({
  model: "smollm2-135m",
  messages: [{ role: "user", content: "Say goodbye." }],
  temperature: 0,
  max_tokens: 12,
  stream: true,
});
for await (const chunk of stream) {
  if (chunk.choices.length > 0) {
    streamed += chunk.choices[0].delta.content ?? "";
    finish = chunk.choices[0].finish_reason ?? finish;
  }
}
const embedding = await client.embeddings.create({ model: "minilm-l6", input: "My cat is called Miso." });
let error = null;
try {
  await client.chat.completions.create({ model: "smollm2-135m", messages: [{ role: "user", content: "x" }], max_tokens: 1e9 });
} catch (exc) {
  error = { class: exc.constructor.name, status: exc.status ?? null };
}
console.log(JSON.stringify({
  models,
  text: answer.choices[0].message.content,
  usage: answer.usage.completion_tokens,
  streamed,
  finish,
  dims: embedding.data[0].embedding.length,
  error,
}));
