// The official `openai` npm package against a running Tollgate that routes between a real
// llama.cpp CPU backend and a premium backend (config/local-cpu.toml).
// Run by scripts/e2e-real.sh: `TOLLGATE_URL=http://127.0.0.1:PORT node --test tests/e2e/`.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import OpenAI from 'openai';

const baseURL = `${process.env.TOLLGATE_URL}/v1`;
const client = (apiKey) => new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 90_000 });
const cost = client('tg-local-cost-key');
const quality = client('tg-local-quality-key');
// SmolLM2 needs a short system message of its own (see config/local-cpu.toml).
const ask = (text) => [
  { role: 'system', content: 'You are a helpful assistant. Answer briefly.' },
  { role: 'user', content: text },
];
const hasWords = (text) => /[A-Za-z]{2,}/.test(text ?? '');

test('cost-first user, non-streaming: the real CPU backend answers with text and usage', async () => {
  const { data, response } = await cost.chat.completions
    .create({ model: 'auto', messages: ask('What is the largest ocean?'), max_tokens: 48, temperature: 0 })
    .withResponse();
  assert.equal(response.headers.get('x-tollgate-backend'), 'cpu-smollm2');
  assert.equal(response.headers.get('x-tollgate-reason'), 'cost-first');
  assert.ok(hasWords(data.choices[0].message.content), data.choices[0].message.content);
  assert.ok(data.usage.prompt_tokens > 0 && data.usage.completion_tokens > 0, JSON.stringify(data.usage));
  assert.ok(Number(response.headers.get('x-tollgate-cost-usd')) > 0);
});

test('cost-first user, streaming: text from the CPU backend, then the usage chunk asked for', async () => {
  const { data: stream, response } = await cost.chat.completions
    .create({
      model: 'auto',
      messages: ask('Name two planets.'),
      max_tokens: 48,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
    })
    .withResponse();
  assert.equal(response.headers.get('x-tollgate-backend'), 'cpu-smollm2');
  let text = '';
  let usage = null;
  for await (const chunk of stream) {
    text += chunk.choices[0]?.delta?.content ?? '';
    if (chunk.usage) usage = chunk.usage;
  }
  assert.ok(hasWords(text), text);
  assert.ok(usage && usage.completion_tokens > 0, JSON.stringify(usage));
});

test('quality-first user, non-streaming: premium', async () => {
  const { data, response } = await quality.chat.completions
    .create({ model: 'auto', messages: ask('Explain caching.'), max_tokens: 64 })
    .withResponse();
  assert.equal(response.headers.get('x-tollgate-backend'), 'premium');
  assert.equal(response.headers.get('x-tollgate-reason'), 'quality-first');
  assert.ok(hasWords(data.choices[0].message.content));
});

test('quality-first user, streaming: premium', async () => {
  const { data: stream, response } = await quality.chat.completions
    .create({ model: 'auto', messages: ask('Explain queues.'), max_tokens: 64, stream: true })
    .withResponse();
  assert.equal(response.headers.get('x-tollgate-backend'), 'premium');
  let text = '';
  for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? '';
  assert.ok(hasWords(text), text);
});

test('a wrong key is an AuthenticationError (401, invalid_api_key)', async () => {
  await assert.rejects(
    client('sk-wrong').chat.completions.create({ model: 'auto', messages: ask('hi'), max_tokens: 4 }),
    (err) => err instanceof OpenAI.AuthenticationError && err.status === 401 && err.code === 'invalid_api_key',
  );
});
