"""The official openai package against a real local cluster."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from clusterkit import local_cluster, reference_tokens, wait_serving
from modelfactory import make_model

from pomona.local import free_port_pair

pytestmark = pytest.mark.cluster

PROMPT = "The lab has four machines and"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("openai")
    model = make_model(root / "llama", "llama", num_layers=4, seed=3)
    http_port = free_port_pair(set())
    with local_cluster(root) as c:
        c.worker("w0")
        c.worker("w1")
        coord = c.coordinator(str(model), min_workers=2, http_port=http_port)
        wait_serving(coord)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused")
        yield client, model


def _text(model: Path, tokens: list[int]) -> str:
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(model).decode(tokens)


def test_completion_matches_single_process_and_reports_usage(api) -> None:
    client, model = api
    expected = reference_tokens(model, PROMPT, 12)
    reply = client.completions.create(model="llama", prompt=PROMPT, max_tokens=12, temperature=0)
    assert reply.choices[0].text == _text(model, expected)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    listed = [m.id for m in client.models.list().data]
    assert listed and listed[0].endswith("llama")


def test_streaming_and_whole_chat_agree(api) -> None:
    client, _ = api
    messages = [{"role": "user", "content": "How many machines are in the lab?"}]
    whole = client.chat.completions.create(
        model="llama", messages=messages, max_tokens=10, temperature=0
    )
    stream = client.chat.completions.create(
        model="llama",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason == "length"
    assert usage is not None and whole.usage is not None
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens == 10


def test_stop_sequence_cuts_the_text(api) -> None:
    client, model = api
    full = client.completions.create(model="llama", prompt=PROMPT, max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("the random model's text has no usable stop string")
    cut = client.completions.create(
        model="llama", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_errors_come_back_as_openai_errors(api) -> None:
    client, _ = api
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="llama", prompt=PROMPT, max_tokens=8, n=2)
    assert "n" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=8)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="llama", prompt="lab " * 400, max_tokens=8)
    assert "context" in str(info.value)
    # The cluster keeps serving.
    assert client.completions.create(model="llama", prompt=PROMPT, max_tokens=2).usage


def test_a_second_chat_turn_reuses_the_first_turns_kv(api) -> None:
    from mlx_lm.utils import load_tokenizer

    client, model = api
    # Longer than the shortest prefix the cache restores (32 tokens).
    question = "Tell me about the machines in the lab, the layers each holds and their cables."
    messages = [{"role": "user", "content": question}]
    first = client.chat.completions.create(
        model="llama", messages=messages, max_tokens=12, temperature=0
    )
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "And the cables?"},
    ]
    second = client.chat.completions.create(
        model="llama", messages=messages, max_tokens=4, temperature=0
    )
    tokenizer = load_tokenizer(model)
    with_prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True)
    without = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=False)
    trailing = len(with_prompt) - len(without)  # the template's generation prompt
    assert first.usage is not None and second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert first.usage.prompt_tokens - trailing <= details.cached_tokens
    assert details.cached_tokens < second.usage.prompt_tokens
