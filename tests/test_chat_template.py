"""Chat on models without a chat template, and --chat-template, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner
from clusterkit import local_cluster, reference_tokens, wait_serving
from modelfactory import make_model

from pomona.cli import main
from pomona.local import free_port_pair
from pomona.v1 import common_pb2
from pomona.worker.runner_service import encode_prompt, plain_chat_prompt

CONVERSATIONS = [
    [{"role": "user", "content": "How many machines are in the lab?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Count the machines  "},
    ],
    [{"role": "tool", "content": "42"}, {"role": "user", "content": ""}],
]
TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)


def base_model(folder: Path) -> Path:
    """A tiny model whose tokenizer has no chat template, like a base model's."""
    make_model(folder, "llama", num_layers=4, seed=5)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return base_model(tmp_path_factory.mktemp("base") / "base")


@pytest.mark.parametrize("chat", CONVERSATIONS)
def test_the_plain_format_is_mlx_lm_servers(chat: list[dict[str, str]]) -> None:
    from mlx_lm.server import convert_chat

    assert plain_chat_prompt(chat) == convert_chat(chat)


def test_a_model_without_a_template_encodes_chats_in_the_plain_format(model: Path) -> None:
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model)
    assert not tokenizer.chat_template
    request = common_pb2.GenerateRequest(
        messages=[
            common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in CONVERSATIONS[1]
        ]
    )
    expected = tokenizer.encode(
        "ASSISTANT's RULE: Answer briefly.\nUSER: Hello\nASSISTANT: Hi.\n"
        "USER: Count the machines  \nASSISTANT:"
    )
    assert encode_prompt(tokenizer, request, 256) == list(expected)


@pytest.mark.parametrize(("content", "words"), [("", "is empty"), (None, "cannot read")])
def test_a_bad_chat_template_file_is_a_one_line_error(
    tmp_path: Path, content: str | None, words: str
) -> None:
    path = tmp_path / "template.jinja"
    if content is not None:
        path.write_text(content)
    for command in (["coordinator"], ["up", "--local", "1"]):
        result = CliRunner().invoke(main, [*command, "--chat-template", str(path)])
        assert result.exit_code == 1, result.output
        assert words in result.output and len(result.output.strip().splitlines()) == 1


def _client(http_port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused")


@pytest.mark.cluster
def test_chat_on_a_model_without_a_template_answers_through_the_openai_client(
    tmp_path: Path,
) -> None:
    from mlx_lm.utils import load_tokenizer

    model = base_model(tmp_path / "base")  # workers serve models under the cluster's root
    messages = CONVERSATIONS[1]
    prompt = plain_chat_prompt(messages)
    tokenizer = load_tokenizer(model)
    expected = tokenizer.decode(reference_tokens(model, prompt, 8))
    http_port = free_port_pair(set())
    with local_cluster(tmp_path) as c:
        c.worker("w0")
        c.worker("w1")
        wait_serving(c.coordinator(str(model), min_workers=2, http_port=http_port))
        reply = _client(http_port).chat.completions.create(
            model="base", messages=messages, max_tokens=8, temperature=0
        )
    assert reply.choices[0].message.content == expected
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt))


@pytest.mark.cluster
def test_the_coordinators_chat_template_file_replaces_the_models(tmp_path: Path) -> None:
    from mlx_lm.utils import load_tokenizer

    model = base_model(tmp_path / "base")
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    messages = CONVERSATIONS[0]
    templated = load_tokenizer(model, tokenizer_config_extra={"chat_template": TEMPLATE})
    expected = templated.apply_chat_template(messages, add_generation_prompt=True)
    plain = load_tokenizer(model).encode(plain_chat_prompt(messages))
    assert len(expected) != len(plain)  # so the count below tells which one was used
    http_port = free_port_pair(set())
    with local_cluster(tmp_path) as c:
        c.worker("w0")
        coord = c.coordinator(
            str(model), http_port=http_port, extra=("--chat-template", str(template))
        )
        wait_serving(coord)
        reply = _client(http_port).chat.completions.create(
            model="base", messages=messages, max_tokens=4, temperature=0
        )
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(expected)
    assert reply.choices[0].finish_reason == "length"
