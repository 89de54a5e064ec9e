"""The OpenAI-compatible HTTP API, driven by the official ``openai`` package.

The app is served on a real loopback port; behind it, a fake cluster streams
canned tokens, honours max_tokens and stop strings, and fails on cue: a user
message or prompt containing ``#queue-full`` (and the like) picks the failure.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import queue
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import openai
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionMessageParam

from pomona.coordinator.openai_api import create_app
from pomona.v1 import common_pb2

MODEL = "mlx-community/Llama-3.2-1B-Instruct-4bit"
KEY = "sk-test-key"
PIECES = ["Hello", ",", " world", "!", " How", " are", " you", "?"]
FULL_TEXT = "".join(PIECES)


class FakeRpcError(Exception):
    """Quacks like grpc.aio.AioRpcError."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


FAILURES = {
    "#queue-full": (grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full (64 waiting)"),
    "#unavailable": (grpc.StatusCode.UNAVAILABLE, "the cluster is not serving: 1 of 2 workers"),
    "#deadline": (grpc.StatusCode.DEADLINE_EXCEEDED, "the head runner did not answer"),
    "#too-long": (grpc.StatusCode.INVALID_ARGUMENT, "the prompt exceeds the model's context"),
}


class FakeCluster:
    def __init__(self) -> None:
        self.model = MODEL
        self.requests: list[common_pb2.GenerateRequest] = []
        # Prompts of generations that saw cancellation, and of those that started.
        self.cancelled: queue.Queue[str] = queue.Queue()
        self.started: queue.Queue[str] = queue.Queue()

    async def generate(
        self, request: common_pb2.GenerateRequest
    ) -> AsyncIterator[common_pb2.GenerateChunk]:
        self.requests.append(request)
        prompt = request.messages[-1].content if request.messages else request.prompt
        for cue, (code, details) in FAILURES.items():
            if cue in prompt:
                raise FakeRpcError(code, details)
        if "#crash" in prompt:
            raise RuntimeError("a bug in the cluster")
        self.started.put(prompt)
        try:
            if "#hang" in prompt:
                await asyncio.Event().wait()
            sent, text, i = 0, "", 0
            while True:
                if "#endless" in prompt:
                    await asyncio.sleep(0.01)
                elif "#fail-midway" in prompt and i == 2:
                    raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "a worker was lost")
                elif i == len(PIECES):
                    yield self._last(request, "", [], common_pb2.FINISH_REASON_STOP, i)
                    return
                piece = PIECES[i % len(PIECES)]
                i += 1
                text += piece
                cut = min((text.find(s) for s in request.stop if s in text), default=-1)
                if cut >= 0:
                    yield self._last(request, text[sent:cut], [i], common_pb2.FINISH_REASON_STOP, i)
                    return
                if i >= request.max_tokens:
                    reason = common_pb2.FINISH_REASON_LENGTH
                    yield self._last(request, text[sent:], [i], reason, i)
                    return
                yield common_pb2.GenerateChunk(
                    request_id=request.request_id, tokens=[i], text=text[sent:]
                )
                sent = len(text)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.put(prompt)
            raise

    @staticmethod
    def _last(
        request: common_pb2.GenerateRequest, text: str, tokens: list[int], reason: int, n: int
    ) -> common_pb2.GenerateChunk:
        words = sum(len(m.content.split()) for m in request.messages)
        prompt_tokens = len(request.prompt_tokens) or len(request.prompt.split()) or words
        return common_pb2.GenerateChunk(
            request_id=request.request_id,
            tokens=tokens,
            text=text,
            finish_reason=reason,
            usage=common_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=n),
        )


class LiveServer:
    """The app on 127.0.0.1, its event loop in a thread of its own."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

    def __enter__(self) -> LiveServer:
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> int:
        app = create_app(
            generate=self.cluster.generate,
            model_name=lambda: self.cluster.model,
            api_key=KEY,
            max_tokens_cap=1000,
        )
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return int(self.runner.addresses[0][1])

    def __exit__(self, *exc: object) -> None:
        assert self.runner is not None
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(FakeCluster()) as live:
        yield live


@pytest.fixture
def cluster(server: LiveServer) -> FakeCluster:
    server.cluster.requests.clear()
    return server.cluster


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY, max_retries=0, timeout=10
    )


def post(
    server: LiveServer,
    path: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        all_headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        conn.request(method, path, body=body, headers={**all_headers, **(headers or {})})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    if response.getheader("Content-Type", "").startswith("application/json"):
        return response.status, json.loads(raw)
    return response.status, raw.decode()


def chat(content: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve("Llama-3.2-1B-Instruct-4bit").id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_completion_returns_the_text_with_usage_and_finish_reason(
    client: openai.OpenAI, cluster: FakeCluster
) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=chat("Hi there"),
        temperature=0,
        seed=7,
        user="ada",
    )
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-") and reply.created > 0 and reply.model == MODEL
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == FULL_TEXT
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (4, len(PIECES))
    assert reply.usage.total_tokens == 4 + len(PIECES)
    (sent,) = cluster.requests
    assert [(m.role, m.content) for m in sent.messages] == [
        ("system", "Be brief."),
        ("user", "Hi there"),
    ]
    assert sent.sampling.temperature == 0 and sent.sampling.seed == 7
    assert sent.request_id == reply.id


def test_sampling_parameters_reach_the_cluster(client: openai.OpenAI, cluster: FakeCluster) -> None:
    client.chat.completions.create(
        model=MODEL,
        messages=chat("Hi"),
        temperature=1.5,
        top_p=0.5,
        extra_body={"top_k": 40, "min_p": 0.05},
    )
    client.chat.completions.create(model=MODEL, messages=chat("Hi"), top_p=0)
    client.chat.completions.create(model=MODEL, messages=chat("Hi"))
    tuned, top_p_zero, plain = (r.sampling for r in cluster.requests)
    assert (tuned.temperature, tuned.top_p, tuned.top_k) == (1.5, 0.5, 40)
    assert tuned.min_p == pytest.approx(0.05) and not tuned.HasField("seed")
    assert top_p_zero.temperature == 0  # only the likeliest token: greedy
    assert (plain.temperature, plain.top_p) == (1.0, 1.0)  # OpenAI's defaults
    assert cluster.requests[2].max_tokens == 1000  # the default, capped by max_tokens_cap


def test_max_tokens_ends_the_reply_with_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=chat("Hi"),
        max_tokens=3,
    )
    assert reply.choices[0].message.content == "Hello, world"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    newer = client.chat.completions.create(
        model=MODEL,
        messages=chat("Hi"),
        max_completion_tokens=2,
    )
    assert newer.choices[0].message.content == "Hello,"


def test_stop_strings_reach_the_cluster_and_end_the_text(
    client: openai.OpenAI, cluster: FakeCluster
) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=chat("Hi"),
        stop=["!", "zzz"],
    )
    assert list(cluster.requests[0].stop) == ["!", "zzz"]
    assert reply.choices[0].message.content == "Hello, world"
    assert reply.choices[0].finish_reason == "stop"
    text = client.completions.create(model=MODEL, prompt="Say", stop=" are")
    assert text.choices[0].text == "Hello, world! How"


def test_chat_stream_sends_role_then_content_then_finish_then_usage(
    client: openai.OpenAI,
) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=chat("Hi"),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == FULL_TEXT
    *_, finish, usage = chunks
    assert finish.choices[0].finish_reason == "stop"
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == len(PIECES)
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])


def test_stream_is_server_sent_events_ending_in_done(server: LiveServer) -> None:
    body = {"model": MODEL, "messages": chat("Hi"), "stream": True, "max_tokens": 2}
    status, text = post(server, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    objects = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert objects[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [o["choices"][0]["delta"].get("content") for o in objects[1:-1]] == ["Hello", ","]
    assert objects[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert "usage" not in objects[-1]


def test_completion_takes_a_string_or_token_ids(
    client: openai.OpenAI, cluster: FakeCluster
) -> None:
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == "Hello, world!"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (4, 4)
    client.completions.create(model=MODEL, prompt=[5, 6, 7])
    client.completions.create(model=MODEL, prompt=[[8, 9]])
    client.completions.create(model=MODEL, prompt=["just one"])
    first, ids, nested, listed = cluster.requests
    assert first.prompt == "Once upon a time" and first.max_tokens == 4
    assert list(ids.prompt_tokens) == [5, 6, 7] and not ids.prompt
    assert list(nested.prompt_tokens) == [8, 9]
    assert listed.prompt == "just one" and listed.max_tokens == 16  # OpenAI's default


def test_completion_stream_and_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Go",
            stream=True,
            max_tokens=100,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == FULL_TEXT
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 1 + len(PIECES)


def test_the_model_may_be_named_by_the_last_component_of_its_path(
    client: openai.OpenAI,
) -> None:
    reply = client.chat.completions.create(
        model="Llama-3.2-1B-Instruct-4bit",
        messages=chat("Hi"),
    )
    assert reply.model == MODEL


@pytest.mark.parametrize(
    ("extra", "error", "words", "param"),
    [
        ({"n": 2}, openai.BadRequestError, "n must be 1", "n"),
        ({"temperature": 3}, openai.BadRequestError, "between 0 and 2", "temperature"),
        ({"top_p": "high"}, openai.BadRequestError, "expected a number", "top_p"),
        ({"max_tokens": 0}, openai.BadRequestError, ">= 1", "max_tokens"),
        ({"max_tokens": 5000}, openai.BadRequestError, "at most 1000", "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "at most 4", "stop"),
        ({"logprobs": True}, openai.BadRequestError, "not supported", "logprobs"),
        ({"model": "gpt-4o"}, openai.NotFoundError, "does not exist", "model"),
        ({"messages": []}, openai.BadRequestError, "must not be empty", "messages"),
        (
            {"messages": [{"role": "wizard", "content": "x"}]},
            openai.BadRequestError,
            "one of",
            "messages[0].role",
        ),
    ],
)
def test_bad_requests_get_openai_errors(
    client: openai.OpenAI,
    extra: dict[str, Any],
    error: type[openai.APIStatusError],
    words: str,
    param: str,
) -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": chat("Hi"), **extra}
    with pytest.raises(error) as raised:
        client.chat.completions.create(**body)
    assert words in raised.value.message
    assert isinstance(raised.value.body, dict) and raised.value.body["param"] == param
    if error is openai.NotFoundError:
        assert raised.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("cue", "error", "status", "words"),
    [
        ("#queue-full", openai.RateLimitError, 429, "the queue is full"),
        ("#unavailable", openai.InternalServerError, 503, "not serving"),
        ("#deadline", openai.InternalServerError, 504, "did not answer"),
        ("#too-long", openai.BadRequestError, 400, "exceeds the model's context"),
        ("#crash", openai.InternalServerError, 500, "Internal server error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_cluster_refusals_keep_their_http_status(
    client: openai.OpenAI,
    cue: str,
    error: type[openai.APIStatusError],
    status: int,
    words: str,
    stream: bool,
) -> None:
    with pytest.raises(error) as raised:
        client.chat.completions.create(
            model=MODEL,
            messages=chat(cue),
            stream=stream,
        )
    assert raised.value.status_code == status
    assert words in raised.value.message
    assert "Traceback" not in raised.value.response.text
    if status == 429:
        assert raised.value.response.headers["Retry-After"] == "1"


def test_a_failure_mid_stream_reaches_the_client_as_an_error(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=chat("#fail-midway"),
        stream=True,
    )
    received = []
    with pytest.raises(openai.APIError, match="a worker was lost"):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "Hello,"


def test_a_wrong_or_missing_key_is_refused(server: LiveServer) -> None:
    wrong = openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key="sk-nope", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.models.list()
    assert raised.value.code == "invalid_api_key"
    status, body = post(server, "/v1/models", b"", {"Authorization": ""}, method="GET")
    assert status == 401 and "didn't provide an API key" in body["error"]["message"]
    status, body = post(server, "/health", b"", {"Authorization": ""}, method="GET")
    assert (status, body) == (200, {"status": "ok"})


def test_health_follows_the_loaded_model(server: LiveServer, client: openai.OpenAI) -> None:
    server.cluster.model = ""
    try:
        status, body = post(server, "/health", b"", method="GET")
        assert status == 503
        assert client.models.list().data == []
    finally:
        server.cluster.model = MODEL


@pytest.mark.parametrize(
    ("path", "method", "body", "status", "words"),
    [
        ("/v1/chat/completions", "POST", b"{not json", 400, "could not parse the JSON"),
        ("/v1/chat/completions", "POST", b"\xff\xfe\x00", 400, "could not parse the JSON"),
        ("/v1/chat/completions", "POST", b"[1, 2]", 400, "must be a JSON object"),
        ("/v1/completions", "POST", b'{"model": "%s"}' % MODEL.encode(), 400, "prompt"),
        ("/v1/completions", "POST", b"[" * 100_000, 400, "could not parse the JSON"),
        ("/v1/chat/completions", "POST", b"x" * (9 << 20), 413, "over 8 MB"),
        ("/v1/chat/completions", "GET", b"", 405, "not allowed"),
        ("/v1/embeddings", "POST", b"{}", 404, "Invalid URL"),
    ],
)
def test_malformed_requests_get_4xx_json(
    server: LiveServer, path: str, method: str, body: bytes, status: int, words: str
) -> None:
    got, answer = post(server, path, body, method=method)
    assert got == status
    assert words in answer["error"]["message"]
    assert set(answer["error"]) == {"message", "type", "param", "code"}


def _open_stream(server: LiveServer, content: str, stream: bool = True) -> socket.socket:
    body = json.dumps({"model": MODEL, "messages": chat(content), "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def _wait_for(q: queue.Queue[str], item: str, timeout: float) -> float:
    start = time.monotonic()
    while True:
        if q.get(timeout=max(0.0, timeout - (time.monotonic() - start))) == item:
            return time.monotonic() - start


def test_a_client_leaving_mid_stream_cancels_its_generation(server: LiveServer) -> None:
    sock = _open_stream(server, "#endless mid-stream")
    received = b""
    while received.count(b"data: ") < 3:
        received += sock.recv(4096)
    assert received.startswith(b"HTTP/1.1 200")
    sock.close()
    assert _wait_for(server.cluster.cancelled, "#endless mid-stream", 5) < 1.0


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_leaving_before_the_first_token_cancels_its_generation(
    server: LiveServer, stream: bool
) -> None:
    marker = f"#hang stream={stream}"
    sock = _open_stream(server, marker, stream)
    _wait_for(server.cluster.started, marker, 5)
    sock.close()
    assert _wait_for(server.cluster.cancelled, marker, 5) < 1.0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "top_k", "min_p", "seed", "stop", "n", "stream", "stream_options", "user",
    "logprobs", "tools", "response_format", "presence_penalty", "echo", "best_of", "suffix",
]  # fmt: skip
valid_chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
    base=st.sampled_from([{}, valid_chat, {"model": MODEL, "prompt": "hi"}]),
    fields=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4),
    junk=st.dictionaries(st.text(max_size=8), json_values, max_size=2),
)
def test_random_json_bodies_never_get_a_5xx(
    server: LiveServer,
    path: str,
    base: dict[str, Any],
    fields: dict[str, Any],
    junk: dict[str, Any],
) -> None:
    body = json.dumps({**junk, **base, **fields}, allow_nan=True).encode()
    status, answer = post(server, path, body)
    assert status < 500, answer
    if status >= 400:
        assert set(answer["error"]) == {"message", "type", "param", "code"}
