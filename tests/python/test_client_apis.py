"""The official OpenAI (Responses API) and Anthropic (Messages API) Python SDKs, unmodified,
against a real Tollgate process, over two upstreams this file runs: an OpenAI-shaped one and an
Anthropic-shaped one. Both are mocks written from the published API references (named as such:
no hosted API is reachable here); the real llama.cpp backend is driven by tests/e2e/drive.py.

Run by scripts/test.sh: TOLLGATE_BIN names the built binary.
"""

import http.server
import json
import re
import threading
import unittest
import urllib.error
import urllib.request

import anthropic
import openai
from openai import OpenAI

from gateway import Gateway

KEY = "tg-demo-quality-key"
KEY_SHA256 = "8eae327d4f0ad3b2bfc5dd5cd7e0d38b56a58aace19807a59dd57bee89445cf8"
ANTHROPIC_BACKEND_KEY = "sk-ant-mock-backend-key"
ADMIN_KEY = "tg-admin-mock-key"
WEATHER_TOOL_OPENAI = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
WEATHER_TOOL_ANTHROPIC = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}

# What each mock reports, and what the gateway must charge for it.
OPENAI_USAGE = {"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37, "prompt_tokens_details": {"cached_tokens": 10}}
ANTHROPIC_USAGE = {"input_tokens": 20, "output_tokens": 7, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 50}
# gpt-mock: 20 fresh at 1.00 + 10 cached at 0.50 + 7 out at 2.00, per million tokens
OPENAI_COST = (20 * 1.00 + 10 * 0.50 + 7 * 2.00) / 1e6
# claude-mock: 20 fresh at 3.00 + 100 read at 0.30 + 50 written at 3.75 + 7 out at 15.00
ANTHROPIC_COST = (20 * 3.00 + 100 * 0.30 + 50 * 3.75 + 7 * 15.00) / 1e6

SUNNY = "It is sunny in Paris today."
HELLO = "Hello from the mock upstream, word by word."


class MockUpstreams(http.server.BaseHTTPRequestHandler):
    """POST /openai/v1/chat/completions and POST /anthropic/v1/messages. With tools and no tool
    result yet, both call the first tool with {"city": "Paris"}; after a tool result they say
    SUNNY; otherwise HELLO. Streams come in several pieces, as real servers send them."""

    received = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        MockUpstreams.received.append((self.path, dict(self.headers), body))
        if self.path == "/openai/v1/chat/completions":
            self.openai(body)
        elif self.path == "/openai/v1/responses":
            self.openai_responses(body)
        elif self.path == "/openai/v1/messages":
            # An OpenAI-compatible server with a Messages endpoint of its own (llama.cpp's
            # has one): its errors keep the OpenAI shape.
            if body.get("max_tokens") == 1:
                return self.send_json(400, {"error": {"message": "max_tokens: too small for this mock", "type": "invalid_request_error"}})
            self.anthropic(body)
        elif self.path == "/anthropic/v1/messages":
            if self.headers.get("x-api-key") != ANTHROPIC_BACKEND_KEY or not self.headers.get("anthropic-version"):
                return self.send_json(401, {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}})
            if body.get("max_tokens") == 1:
                return self.send_json(400, {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: too small for this mock"}})
            self.anthropic(body)
        else:
            self.send_json(404, {"error": {"message": "no such path"}})

    def send_json(self, status, value):
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()

    def sse(self, data, event=None):
        text = (f"event: {event}\n" if event else "") + f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
        self.wfile.write(text.encode())
        self.wfile.flush()

    def openai(self, body):
        last = body["messages"][-1]
        call = bool(body.get("tools")) and last["role"] != "tool"
        text = SUNNY if last["role"] == "tool" else HELLO
        name = body["tools"][0]["function"]["name"] if call else None
        head = {"id": "chatcmpl-mock", "created": 1700000000, "model": body["model"]}
        if not body.get("stream"):
            message = {"role": "assistant", "content": text}
            if call:
                message = {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_mock1", "type": "function", "function": {"name": name, "arguments": '{"city": "Paris"}'}}]}
            return self.send_json(200, {**head, "object": "chat.completion", "choices": [
                {"index": 0, "message": message, "finish_reason": "tool_calls" if call else "stop"}], "usage": OPENAI_USAGE})
        self.start_stream()
        chunk = lambda delta, finish=None: {**head, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish}]}
        self.sse(chunk({"role": "assistant", "content": ""}))
        if call:
            self.sse(chunk({"tool_calls": [{"index": 0, "id": "call_mock1", "type": "function",
                                            "function": {"name": name, "arguments": ""}}]}))
            for piece in ['{"city"', ': "Par', 'is"}']:
                self.sse(chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
        else:
            for word in re.findall(r"\S+\s*", text):
                self.sse(chunk({"content": word}))
        self.sse(chunk({}, "tool_calls" if call else "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            self.sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": OPENAI_USAGE})
        self.sse("[DONE]")

    def openai_responses(self, body):
        """The Responses API's own answer and typed events, as a server that serves it does."""
        usage = {"input_tokens": 40, "input_tokens_details": {"cached_tokens": 16}, "output_tokens": 9,
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 49}
        item = {"type": "message", "id": "msg_native", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": HELLO, "annotations": []}]}
        response = {"id": "resp_native", "object": "response", "created_at": 1700000000, "status": "completed",
                    "model": body["model"], "output": [item], "usage": usage, "error": None,
                    "incomplete_details": None, "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}
        if not body.get("stream"):
            return self.send_json(200, response)
        self.start_stream()
        seq = iter(range(100))
        pending = {**response, "status": "in_progress", "output": [], "usage": None}
        self.sse({"type": "response.created", "sequence_number": next(seq), "response": pending}, "response.created")
        self.sse({"type": "response.output_item.added", "sequence_number": next(seq), "output_index": 0,
                  "item": {**item, "status": "in_progress", "content": []}}, "response.output_item.added")
        self.sse({"type": "response.content_part.added", "sequence_number": next(seq), "item_id": "msg_native",
                  "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}},
                 "response.content_part.added")
        for word in re.findall(r"\S+\s*", HELLO):
            self.sse({"type": "response.output_text.delta", "sequence_number": next(seq), "item_id": "msg_native",
                      "output_index": 0, "content_index": 0, "delta": word, "logprobs": []}, "response.output_text.delta")
        self.sse({"type": "response.output_text.done", "sequence_number": next(seq), "item_id": "msg_native",
                  "output_index": 0, "content_index": 0, "text": HELLO, "logprobs": []}, "response.output_text.done")
        self.sse({"type": "response.output_item.done", "sequence_number": next(seq), "output_index": 0, "item": item},
                 "response.output_item.done")
        self.sse({"type": "response.completed", "sequence_number": next(seq), "response": response}, "response.completed")

    def anthropic(self, body):
        last = body["messages"][-1]
        answered = isinstance(last["content"], list) and any(b.get("type") == "tool_result" for b in last["content"])
        call = bool(body.get("tools")) and not answered
        text = SUNNY if answered else HELLO
        message = {"id": "msg_mock", "type": "message", "role": "assistant", "model": body["model"],
                   "stop_sequence": None}
        if call:
            content = [{"type": "tool_use", "id": "toolu_mock1", "name": body["tools"][0]["name"], "input": {"city": "Paris"}}]
        else:
            content = [{"type": "text", "text": text}]
        stop = "tool_use" if call else "end_turn"
        if not body.get("stream"):
            return self.send_json(200, {**message, "content": content, "stop_reason": stop, "usage": ANTHROPIC_USAGE})
        self.start_stream()
        start_usage = {**ANTHROPIC_USAGE, "output_tokens": 1}
        self.sse({"type": "message_start", "message": {**message, "content": [], "stop_reason": None, "usage": start_usage}}, "message_start")
        self.sse({"type": "ping"}, "ping")
        if call:
            block = {**content[0], "input": {}}
            self.sse({"type": "content_block_start", "index": 0, "content_block": block}, "content_block_start")
            for piece in ['{"city"', ': "Par', 'is"}']:
                self.sse({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": piece}}, "content_block_delta")
        else:
            self.sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}, "content_block_start")
            for word in re.findall(r"\S+\s*", text):
                self.sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}, "content_block_delta")
        self.sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        self.sse({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                  "usage": {"output_tokens": ANTHROPIC_USAGE["output_tokens"]}}, "message_delta")
        self.sse({"type": "message_stop"}, "message_stop")


CONFIG = """
[server]
listen = "127.0.0.1:0"
admin_key_env = "MOCK_ADMIN_KEY"

[[backends]]
name = "gpt-mock"
base_url = "http://127.0.0.1:{port}/openai/v1"
model = "gpt-mock-1"
quality = 0.8
pricing = {{ input_per_mtok = 1.00, output_per_mtok = 2.00, cached_input_per_mtok = 0.50 }}

[[backends]]
name = "claude-mock"
api = "anthropic"
base_url = "http://127.0.0.1:{port}/anthropic/v1"
api_key_env = "MOCK_ANTHROPIC_KEY"
model = "claude-mock-1"
quality = 0.95
pricing = {{ input_per_mtok = 3.00, output_per_mtok = 15.00, cached_input_per_mtok = 0.30, cache_write_per_mtok = 3.75 }}

[[backends]]
name = "native-mock"
base_url = "http://127.0.0.1:{port}/openai/v1"
native_apis = ["responses", "messages"]
model = "native-mock-1"
quality = 0.8
pricing = {{ input_per_mtok = 1.00, output_per_mtok = 2.00, cached_input_per_mtok = 0.50 }}

[[routes]]
model = "gpt"
backends = ["gpt-mock"]

[[routes]]
model = "native"
backends = ["native-mock"]

[[routes]]
model = "claude"
backends = ["claude-mock"]

[[users]]
name = "demo"
key_sha256 = "{key_sha256}"
policy = "quality-first"

[cache]
cacheable = "deterministic"
"""


class ClientApisAgainstTollgate(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MockUpstreams)
        threading.Thread(target=cls.upstream.serve_forever, daemon=True).start()
        env = {"MOCK_ANTHROPIC_KEY": ANTHROPIC_BACKEND_KEY, "MOCK_ADMIN_KEY": ADMIN_KEY}
        config = CONFIG.format(port=cls.upstream.server_address[1], key_sha256=KEY_SHA256)
        try:
            cls.gateway = Gateway(config, env)
        except RuntimeError:
            cls.upstream.shutdown()
            raise
        cls.origin = cls.gateway.origin

    @classmethod
    def tearDownClass(cls):
        log = cls.gateway.stop()
        cls.upstream.shutdown()
        assert ANTHROPIC_BACKEND_KEY not in log, "the backend key reached the log"

    def openai(self):
        return OpenAI(base_url=self.origin + "/v1", api_key=KEY, max_retries=0, timeout=10)

    def anthropic(self, key=KEY):
        return anthropic.Anthropic(base_url=self.origin, api_key=key, max_retries=0, timeout=10)

    def last_received(self, path):
        return [body for p, _, body in MockUpstreams.received if p == path][-1]

    def last_record(self):
        request = urllib.request.Request(self.origin + "/admin/requests?limit=1", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())["data"][0]

    def assertCost(self, headers, expected):
        self.assertAlmostEqual(float(headers["x-tollgate-cost-usd"]), expected, delta=1e-12)

    # ---- OpenAI Responses API -----------------------------------------------------------------

    def test_responses_create_answers_with_output_text_usage_and_the_exact_cost(self):
        raw = self.openai().responses.with_raw_response.create(
            model="gpt", instructions="Be brief.", input="Say hello", max_output_tokens=50
        )
        self.assertEqual(raw.headers["x-tollgate-backend"], "gpt-mock")
        self.assertCost(raw.headers, OPENAI_COST)
        response = raw.parse()
        self.assertEqual(response.object, "response")
        self.assertEqual(response.status, "completed")
        self.assertEqual(response.output_text, HELLO)
        self.assertEqual(response.usage.input_tokens, 30, "input tokens include the cached ones")
        self.assertEqual(response.usage.input_tokens_details.cached_tokens, 10)
        self.assertEqual(response.usage.output_tokens, 7)
        sent = self.last_received("/openai/v1/chat/completions")
        self.assertEqual(sent["messages"][0], {"role": "system", "content": "Be brief."})
        self.assertEqual(sent["messages"][1]["role"], "user")
        self.assertEqual(sent["max_completion_tokens"], 50)

    def test_responses_stream_sends_typed_events_and_usage_only_at_completion(self):
        stream = self.openai().responses.create(model="gpt", input="Say hello", stream=True)
        types, text, completed = [], "", None
        for event in stream:
            types.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
            if event.type == "response.completed":
                completed = event.response
        self.assertEqual(types[0], "response.created")
        self.assertEqual(types[-1], "response.completed")
        self.assertIn("response.output_text.done", types)
        self.assertEqual(text, HELLO)
        self.assertEqual(completed.output_text, HELLO)
        self.assertEqual((completed.usage.input_tokens, completed.usage.output_tokens), (30, 7))

    def test_responses_tool_call_round_trip_streamed_and_not(self):
        client = self.openai()
        first = client.responses.create(model="gpt", input="Weather in Paris?", tools=[WEATHER_TOOL_OPENAI])
        calls = [item for item in first.output if item.type == "function_call"]
        self.assertEqual(len(calls), 1)
        self.assertEqual((calls[0].name, json.loads(calls[0].arguments)), ("get_weather", {"city": "Paris"}))
        history = [
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name, "arguments": calls[0].arguments},
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"},
        ]
        second = client.responses.create(model="gpt", input=history, tools=[WEATHER_TOOL_OPENAI])
        self.assertEqual(second.output_text, SUNNY)
        sent = self.last_received("/openai/v1/chat/completions")
        self.assertEqual(sent["messages"][-1], {"role": "tool", "tool_call_id": calls[0].call_id, "content": "sunny"})
        self.assertEqual(sent["messages"][-2]["tool_calls"][0]["id"], calls[0].call_id)

        arguments, done = "", None
        with client.responses.stream(model="gpt", input="Weather in Paris?", tools=[WEATHER_TOOL_OPENAI]) as stream:
            for event in stream:
                if event.type == "response.function_call_arguments.delta":
                    arguments += event.delta
            done = stream.get_final_response()
        self.assertEqual(json.loads(arguments), {"city": "Paris"})
        self.assertEqual([i.type for i in done.output], ["function_call"])
        self.assertEqual(json.loads(done.output[0].arguments), {"city": "Paris"})

    def test_responses_through_an_anthropic_backend(self):
        raw = self.openai().responses.with_raw_response.create(model="claude", input="Say hello")
        self.assertEqual(raw.headers["x-tollgate-backend"], "claude-mock")
        self.assertCost(raw.headers, ANTHROPIC_COST)
        response = raw.parse()
        self.assertEqual(response.output_text, HELLO)
        # Anthropic's input excludes cache reads and writes; the Responses API's includes them.
        self.assertEqual(response.usage.input_tokens, 170)
        self.assertEqual(response.usage.input_tokens_details.cached_tokens, 100)

    def test_responses_that_need_stored_state_are_refused_naming_the_field(self):
        with self.assertRaises(openai.BadRequestError) as refused:
            self.openai().responses.create(model="gpt", input="again", previous_response_id="resp_123")
        self.assertEqual(refused.exception.body.get("param"), "previous_response_id")
        with self.assertRaises(openai.BadRequestError) as refused:
            self.openai().responses.create(model="gpt", input="hi", tools=[{"type": "web_search"}])
        self.assertIn("tools[0]", refused.exception.body.get("param") or "")

    # ---- Anthropic Messages API ---------------------------------------------------------------

    def test_messages_create_with_x_api_key_through_an_openai_backend(self):
        raw = self.anthropic().messages.with_raw_response.create(
            model="gpt", max_tokens=64, system="Be brief.", messages=[{"role": "user", "content": "Say hello"}]
        )
        self.assertEqual(raw.headers["x-tollgate-backend"], "gpt-mock")
        self.assertCost(raw.headers, OPENAI_COST)
        message = raw.parse()
        self.assertEqual(message.type, "message")
        self.assertEqual(message.content[0].text, HELLO)
        self.assertEqual(message.stop_reason, "end_turn")
        # OpenAI's 30 prompt tokens hold 10 cached: Anthropic's input_tokens excludes them.
        self.assertEqual((message.usage.input_tokens, message.usage.cache_read_input_tokens), (20, 10))
        self.assertEqual(message.usage.output_tokens, 7)
        sent = self.last_received("/openai/v1/chat/completions")
        self.assertEqual(sent["messages"][0], {"role": "system", "content": "Be brief."})
        self.assertEqual(sent["max_tokens"], 64)

    def test_messages_stream_with_a_tool_call_through_an_openai_backend(self):
        with self.anthropic().messages.stream(
            model="gpt", max_tokens=64, tools=[WEATHER_TOOL_ANTHROPIC],
            messages=[{"role": "user", "content": "Weather in Paris?"}],
        ) as stream:
            partial = "".join(e.partial_json for e in stream if e.type == "input_json")
            final = stream.get_final_message()
        self.assertEqual(json.loads(partial), {"city": "Paris"})
        self.assertEqual(final.stop_reason, "tool_use")
        tool_use = final.content[-1]
        self.assertEqual((tool_use.type, tool_use.name, tool_use.input), ("tool_use", "get_weather", {"city": "Paris"}))
        self.assertEqual((final.usage.input_tokens, final.usage.output_tokens), (20, 7))

        answer = self.anthropic().messages.create(
            model="gpt", max_tokens=64, tools=[WEATHER_TOOL_ANTHROPIC],
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": tool_use.id, "name": tool_use.name, "input": tool_use.input}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny"}]},
            ],
        )
        self.assertEqual(answer.content[0].text, SUNNY)
        sent = self.last_received("/openai/v1/chat/completions")
        self.assertEqual(sent["messages"][-1], {"role": "tool", "tool_call_id": tool_use.id, "content": "sunny"})

    def test_messages_through_an_anthropic_backend_keep_cache_usage_streamed_and_not(self):
        raw = self.anthropic().messages.with_raw_response.create(
            model="claude", max_tokens=64, messages=[{"role": "user", "content": "Say hello"}]
        )
        self.assertCost(raw.headers, ANTHROPIC_COST)
        usage = raw.parse().usage
        self.assertEqual(
            (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens, usage.output_tokens),
            (20, 100, 50, 7),
        )
        with self.anthropic().messages.stream(
            model="claude", max_tokens=64, messages=[{"role": "user", "content": "Say hello"}]
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        self.assertEqual(text, HELLO)
        usage = final.usage
        self.assertEqual(
            (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens, usage.output_tokens),
            (20, 100, 50, 7),
        )

    def test_count_tokens_estimates_the_prompt_without_calling_a_backend(self):
        calls = len(MockUpstreams.received)
        short = self.anthropic().messages.count_tokens(model="claude", messages=[{"role": "user", "content": "Hi"}])
        long = self.anthropic().messages.count_tokens(
            model="claude", system="Be brief.", messages=[{"role": "user", "content": "Tell me more. " * 100}]
        )
        self.assertGreater(short.input_tokens, 0)
        self.assertGreater(long.input_tokens, short.input_tokens + 300, "about a token per 4 characters")
        self.assertEqual(len(MockUpstreams.received), calls)
        with self.assertRaises(anthropic.AuthenticationError):
            self.anthropic(key="tg-wrong").messages.count_tokens(model="claude", messages=[{"role": "user", "content": "Hi"}])

    def test_messages_errors_come_in_anthropics_shape(self):
        with self.assertRaises(anthropic.AuthenticationError) as refused:
            self.anthropic(key="tg-wrong").messages.create(
                model="gpt", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            )
        self.assertEqual(refused.exception.body["type"], "error")
        self.assertEqual(refused.exception.body["error"]["type"], "authentication_error")
        with self.assertRaises(anthropic.NotFoundError):
            self.anthropic().messages.create(model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        # A backend's own error, translated back: Anthropic → chat → Anthropic.
        with self.assertRaises(anthropic.BadRequestError) as refused:
            self.anthropic().messages.create(model="claude", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
        self.assertIn("too small for this mock", refused.exception.body["error"]["message"])
        for body in (b"{not json", json.dumps({"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}).encode()):
            request = urllib.request.Request(
                self.origin + "/v1/messages", data=body, method="POST",
                headers={"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"},
            )
            with self.assertRaises(urllib.error.HTTPError) as failed:
                urllib.request.urlopen(request, timeout=10)
            self.assertEqual(failed.exception.code, 400)
            error = json.loads(failed.exception.read())
            self.assertEqual(error["type"], "error")
            self.assertEqual(error["error"]["type"], "invalid_request_error")
        self.assertIn("max_tokens", error["error"]["message"], "a missing max_tokens is named")

    def test_translated_requests_share_the_response_cache_streamed_or_not(self):
        question = [{"role": "user", "content": "Say hello, deterministically"}]
        first = self.anthropic().messages.with_raw_response.create(model="gpt", max_tokens=64, extra_body={"temperature": 0}, messages=question)
        calls = len(MockUpstreams.received)
        again = self.anthropic().messages.with_raw_response.create(model="gpt", max_tokens=64, extra_body={"temperature": 0}, messages=question)
        self.assertEqual((first.headers["x-tollgate-cache"], again.headers["x-tollgate-cache"]), ("miss", "hit"))
        self.assertEqual(float(again.headers["x-tollgate-cost-usd"]), 0.0)
        self.assertEqual(again.parse().content[0].text, first.parse().content[0].text)
        with self.anthropic().messages.stream(model="gpt", max_tokens=64, extra_body={"temperature": 0}, messages=question) as stream:
            self.assertEqual("".join(stream.text_stream), HELLO, "a hit replays as a Messages stream")
        # The same question through the Responses API is the same chat request: a hit too.
        raw = self.openai().responses.with_raw_response.create(
            model="gpt", input=question, max_output_tokens=64, temperature=0
        )
        self.assertEqual(len(MockUpstreams.received), calls, "no upstream call after the first")
        self.assertEqual(raw.parse().output_text, HELLO)

    def test_malformed_responses_requests_get_the_openai_error_shape(self):
        for body, param in ((b"[1, 2]", None), (json.dumps({"model": "gpt"}).encode(), "input")):
            request = urllib.request.Request(
                self.origin + "/v1/responses", data=body, method="POST",
                headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"},
            )
            with self.assertRaises(urllib.error.HTTPError) as failed:
                urllib.request.urlopen(request, timeout=10)
            self.assertEqual(failed.exception.code, 400)
            error = json.loads(failed.exception.read())["error"]
            self.assertEqual((error["type"], error["param"]), ("invalid_request_error", param))

    # ---- Passed through to a backend serving the client's API itself -------------------------

    def test_responses_pass_through_to_a_backend_serving_them_fields_and_all(self):
        # `truncation: "auto"` has no chat form: only a backend serving Responses can take it.
        raw = self.openai().responses.with_raw_response.create(model="native", input="Say hello", truncation="auto")
        self.assertEqual(raw.headers["x-tollgate-backend"], "native-mock")
        # 24 fresh at 1.00 + 16 cached at 0.50 + 9 out at 2.00, per million tokens
        self.assertCost(raw.headers, (24 * 1.00 + 16 * 0.50 + 9 * 2.00) / 1e6)
        response = raw.parse()
        self.assertEqual((response.id, response.output_text), ("resp_native", HELLO))
        sent = self.last_received("/openai/v1/responses")
        self.assertEqual((sent["model"], sent["input"], sent["truncation"]), ("native-mock-1", "Say hello", "auto"))

        events = list(self.openai().responses.create(model="native", input="Say hello", stream=True))
        self.assertEqual(events[-1].type, "response.completed")
        self.assertEqual("".join(e.delta for e in events if e.type == "response.output_text.delta"), HELLO)
        record = self.last_record()
        self.assertEqual((record["backend"], record["prompt_tokens"], record["completion_tokens"]), ("native-mock", 40, 9))
        self.assertAlmostEqual(record["cost_usd"], (24 * 1.00 + 16 * 0.50 + 9 * 2.00) / 1e6, delta=1e-12)
        # Without a backend serving Responses, the same request is refused, naming the field.
        with self.assertRaises(openai.BadRequestError) as refused:
            self.openai().responses.create(model="gpt", input="Say hello", truncation="auto")
        self.assertEqual(refused.exception.body.get("param"), "truncation")

    def test_messages_pass_through_to_an_anthropic_backend_with_what_chat_cannot_say(self):
        system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
        with self.anthropic().messages.stream(
            model="claude", max_tokens=64, extra_body={"top_k": 5}, system=system, messages=[{"role": "user", "content": "Say hello"}]
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        self.assertEqual((text, final.id), (HELLO, "msg_mock"))
        sent = self.last_received("/anthropic/v1/messages")
        self.assertEqual((sent["model"], sent["top_k"], sent["system"]), ("claude-mock-1", 5, system))
        record = self.last_record()
        self.assertEqual((record["backend"], record["prompt_tokens"], record["completion_tokens"]), ("claude-mock", 170, 7))
        self.assertAlmostEqual(record["cost_usd"], ANTHROPIC_COST, delta=1e-12)
        # A backend's OpenAI-shaped error on its Messages endpoint reaches an Anthropic client in
        # Anthropic's shape.
        with self.assertRaises(anthropic.BadRequestError) as refused:
            self.anthropic().messages.create(model="native", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(refused.exception.body["error"]["type"], "invalid_request_error")
        self.assertIn("too small for this mock", refused.exception.body["error"]["message"])

    # ---- Chat Completions to an Anthropic backend ----------------------------------------------

    def test_chat_to_an_anthropic_backend_translates_request_answer_and_usage(self):
        raw = self.openai().chat.completions.with_raw_response.create(
            model="claude", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}],
            max_tokens=32, stop=["\n\n"],
        )
        self.assertCost(raw.headers, ANTHROPIC_COST)
        completion = raw.parse()
        self.assertEqual(completion.choices[0].message.content, HELLO)
        self.assertEqual(completion.usage.prompt_tokens, 170, "prompt tokens include cache reads and writes")
        self.assertEqual(completion.usage.prompt_tokens_details.cached_tokens, 100)
        path, headers, sent = [r for r in MockUpstreams.received if r[0] == "/anthropic/v1/messages"][-1]
        self.assertEqual(sent["system"], "Be brief.")
        self.assertEqual([m["role"] for m in sent["messages"]], ["user"])
        self.assertEqual(sent["messages"][0]["content"], [{"type": "text", "text": "Say hello"}])
        self.assertEqual((sent["model"], sent["max_tokens"], sent["stop_sequences"]), ("claude-mock-1", 32, ["\n\n"]))
        self.assertNotIn(KEY, json.dumps(headers), "the client's key never goes upstream")

        stream = self.openai().chat.completions.create(
            model="claude", messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_TOOL_OPENAI["parameters"]}}],
            stream=True, stream_options={"include_usage": True},
        )
        arguments, finish, usage = "", None, None
        for chunk in stream:
            for choice in chunk.choices:
                for call in choice.delta.tool_calls or []:
                    arguments += call.function.arguments or ""
                finish = choice.finish_reason or finish
            usage = chunk.usage or usage
        self.assertEqual((json.loads(arguments), finish), ({"city": "Paris"}, "tool_calls"))
        self.assertEqual((usage.prompt_tokens, usage.completion_tokens), (170, 7))


if __name__ == "__main__":
    unittest.main()
