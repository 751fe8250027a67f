"""The official OpenAI Python SDK (and Anthropic's, on /v1/messages) against a real Tollgate
process (simulated backends).

Run by scripts/test.sh: TOLLGATE_BIN names the built binary.
"""

import unittest

import anthropic
import openai
from openai import OpenAI

from gateway import Gateway

QUALITY_KEY = "tg-demo-quality-key"
COST_KEY = "tg-demo-cost-key"
CONFIG = """
[server]
listen = "127.0.0.1:0"

[[backends]]
name = "sim-premium"
tier = "quality"
simulate = { ttft_ms = 5, tokens_per_s = 2000, quality_text = "Premium answer from the big model." }
model = "sim-premium-70b"
quality = 0.9
pricing = { input_per_mtok = 0.60, output_per_mtok = 2.40 }

[[backends]]
name = "sim-cpu"
tier = "economy"
simulate = { ttft_ms = 5, tokens_per_s = 2000, quality_text = "Cheap answer from the small model." }
model = "sim-cpu-135m"
quality = 0.35
pricing = { hourly_usd = 0.12 }

[[routes]]
model = "auto"
backends = ["sim-premium", "sim-cpu"]

[[users]]
name = "demo-quality"
key_sha256 = "8eae327d4f0ad3b2bfc5dd5cd7e0d38b56a58aace19807a59dd57bee89445cf8"
policy = "quality-first"

[[users]]
name = "demo-cost"
key_sha256 = "be26e6eddb2b6125f7c09ac8d16d701ec340429350d996fa325bbafa50562fc3"
policy = "cost-first"

[cache]
scope = "user"
"""


class OpenAISdkAgainstTollgate(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.gateway = Gateway(CONFIG)
        cls.base_url = cls.gateway.origin + "/v1"

    @classmethod
    def tearDownClass(cls):
        cls.gateway.stop()

    def client(self, key):
        return OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=10)

    def test_non_streaming_chat_goes_to_the_premium_backend_for_a_quality_first_user(self):
        raw = self.client(QUALITY_KEY).chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "Hello"}], max_tokens=50
        )
        self.assertEqual(raw.headers["x-tollgate-backend"], "sim-premium")
        completion = raw.parse()
        self.assertTrue(completion.choices[0].message.content.startswith("Premium answer"))
        self.assertGreater(completion.usage.completion_tokens, 0)
        self.assertGreater(completion.usage.prompt_tokens, 0)

    def test_streaming_chat_with_usage_goes_to_the_cheap_backend_for_a_cost_first_user(self):
        stream = self.client(COST_KEY).chat.completions.create(
            model="auto",
            messages=[{"role": "user", "content": "Hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        self.assertTrue(text.startswith("Cheap answer"), text)
        self.assertIsNotNone(usage, "the usage chunk the client asked for")
        self.assertEqual(usage.completion_tokens, len(text.split()))

    def test_streaming_without_include_usage_sees_no_usage_chunk(self):
        stream = self.client(COST_KEY).chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "Hello"}], stream=True
        )
        chunks = list(stream)
        self.assertTrue(chunks)
        self.assertTrue(all(c.usage is None for c in chunks))
        self.assertTrue(all(c.choices for c in chunks), "no choices-less usage chunk")

    def test_a_cached_answer_replays_as_a_stream_the_sdk_reads_like_a_live_one(self):
        client = self.client(QUALITY_KEY)
        question = dict(model="auto", messages=[{"role": "user", "content": "Cache me"}], temperature=0)

        def streamed():
            raw = client.chat.completions.with_raw_response.create(
                **question, stream=True, stream_options={"include_usage": True}
            )
            text, usage, finish = "", None, None
            for chunk in raw.parse():
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage is not None:
                    usage = chunk.usage
            return raw.headers["x-tollgate-cache"], text, usage, finish

        live = streamed()
        self.assertEqual(live[0], "miss")
        self.assertTrue(live[1].startswith("Premium answer"), live[1])
        replayed = streamed()
        self.assertEqual(replayed[0], "hit")
        self.assertEqual(replayed[1:], live[1:], "text, usage and finish reason as the live stream had them")
        whole = client.chat.completions.with_raw_response.create(**question)
        self.assertEqual(whole.headers["x-tollgate-cache"], "hit")
        self.assertEqual(float(whole.headers["x-tollgate-cost-usd"]), 0.0)
        completion = whole.parse()
        self.assertEqual(completion.choices[0].message.content, live[1])
        self.assertEqual(completion.usage.completion_tokens, live[2].completion_tokens)

    def test_a_wrong_key_raises_authentication_error(self):
        with self.assertRaises(openai.AuthenticationError) as caught:
            self.client("sk-not-a-tollgate-key").chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "Hello"}]
            )
        self.assertEqual(caught.exception.status_code, 401)
        self.assertEqual(caught.exception.code, "invalid_api_key")

    def test_an_unknown_model_raises_not_found_error(self):
        with self.assertRaises(openai.NotFoundError) as caught:
            self.client(QUALITY_KEY).chat.completions.create(
                model="gpt-does-not-exist", messages=[{"role": "user", "content": "Hello"}]
            )
        self.assertEqual(caught.exception.status_code, 404)
        self.assertEqual(caught.exception.code, "model_not_found")

    def test_the_responses_and_messages_apis_are_routed_like_chat(self):
        raw = self.client(QUALITY_KEY).responses.with_raw_response.create(model="auto", input="Hello", max_output_tokens=40)
        self.assertEqual(raw.headers["x-tollgate-backend"], "sim-premium")
        self.assertTrue(raw.parse().output_text.startswith("Premium answer"))
        claude = anthropic.Anthropic(base_url=self.gateway.origin, api_key=COST_KEY, max_retries=0, timeout=10)
        raw = claude.messages.with_raw_response.create(
            model="auto", max_tokens=40, messages=[{"role": "user", "content": "Hello"}]
        )
        self.assertEqual(raw.headers["x-tollgate-backend"], "sim-cpu")
        message = raw.parse()
        self.assertTrue(message.content[0].text.startswith("Cheap answer"), message.content)
        self.assertEqual(message.usage.output_tokens, len(message.content[0].text.split()))

    def test_models_and_embeddings(self):
        client = self.client(QUALITY_KEY)
        ids = [m.id for m in client.models.list()]
        self.assertIn("auto", ids)
        self.assertIn("sim-cpu", ids)
        embedding = client.embeddings.create(model="sim-cpu", input=["one", "two"])
        self.assertEqual(len(embedding.data), 2)
        self.assertGreater(len(embedding.data[0].embedding), 0)


if __name__ == "__main__":
    unittest.main()
