"""``pomona chat``: an interactive chat with the cluster's model over gRPC.

The conversation lives here and is sent whole with every turn; the head
runner applies the model's chat template. On a terminal: a prompt, Ctrl-C
stops the reply being written (and cancels it in the cluster), Ctrl-D quits.
With piped input: one user message per line, each reply on its own line, and
the first failure ends the command with a non-zero exit.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
import grpc

from pomona import rpc
from pomona.client import coordinator_channel, coordinator_error, coordinator_options
from pomona.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)

HELP = "/reset starts over, /exit quits (or Ctrl-D); Ctrl-C stops a reply."
PROMPT = ">>> "
# Most tokens in one reply when --max-tokens is not given; the cluster lowers it to
# what the model's context leaves after the conversation.
DEFAULT_MAX_TOKENS = 1024


@dataclass
class Conversation:
    """The messages so far: an optional system message, then user and assistant turns."""

    system: str | None = None
    turns: list[common_pb2.ChatMessage] = field(default_factory=list)

    def ask(self, text: str) -> list[common_pb2.ChatMessage]:
        """The messages to send for a new user turn (not kept until answered)."""
        head = [common_pb2.ChatMessage(role="system", content=self.system)] if self.system else []
        return [*head, *self.turns, common_pb2.ChatMessage(role="user", content=text)]

    def answered(self, question: str, answer: str) -> None:
        self.turns.append(common_pb2.ChatMessage(role="user", content=question))
        self.turns.append(common_pb2.ChatMessage(role="assistant", content=answer))

    def reset(self) -> None:
        self.turns.clear()


class TurnFailed(Exception):
    """A reply that could not be had, with one line for the user."""


class Chat:
    def __init__(
        self,
        stub: coordinator_pb2_grpc.CoordinatorStub,
        address: str,
        conversation: Conversation,
        max_tokens: int | None,
        temperature: float,
        config_path: Path | None = None,
    ) -> None:
        self.stub = stub
        self.address = address
        self.conversation = conversation
        # None: DEFAULT_MAX_TOKENS, lowered to fit the context.
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.config_path = config_path

    def reply(self, text: str) -> str | None:
        """Stream the reply to ``text`` to stdout; None when the user stopped it."""
        max_tokens = self.max_tokens or DEFAULT_MAX_TOKENS
        request = common_pb2.GenerateRequest(
            messages=self.conversation.ask(text),
            max_tokens=max_tokens,
            fit_max_tokens=self.max_tokens is None,
            sampling=common_pb2.SamplingParams(temperature=self.temperature),
        )
        call = None
        parts: list[str] = []
        finish: int = common_pb2.FINISH_REASON_UNSPECIFIED
        produced = 0
        try:
            call = self.stub.Generate(request, timeout=rpc.GENERATE_TIMEOUT)
            for chunk in call:
                if chunk.text:
                    parts.append(chunk.text)
                    click.echo(chunk.text, nl=False)
                    sys.stdout.flush()
                finish = chunk.finish_reason or finish
                produced = chunk.usage.completion_tokens or produced
        except KeyboardInterrupt:
            if call is not None:
                call.cancel()
            _end_line(parts)
            click.echo("(stopped)", err=True)
            return None
        except grpc.RpcError as e:
            _end_line(parts)
            raise TurnFailed(coordinator_error(e, self.address, self.config_path)) from None
        click.echo()
        if finish == common_pb2.FINISH_REASON_LENGTH:
            if produced < max_tokens:
                click.echo("(cut where the model's context ends: /reset starts over)", err=True)
            else:
                click.echo(f"(cut at {max_tokens} tokens: --max-tokens)", err=True)
        return "".join(parts)

    def run(self, interactive: bool) -> None:
        while (line := _read_line(interactive)) is not None:
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if text in ("/exit", "/quit", "/bye"):
                    return
                if text == "/reset":
                    self.conversation.reset()
                    if interactive:
                        click.echo("(conversation cleared)", err=True)
                else:
                    click.echo(HELP, err=True)
                continue
            try:
                answer = self.reply(text)
            except TurnFailed as e:
                if not interactive:
                    raise click.ClickException(str(e)) from None
                click.echo(f"Error: {e}", err=True)
                continue
            if answer is not None:
                self.conversation.answered(text, answer)


def _read_line(interactive: bool) -> str | None:
    """The next line of input; None at the end (Ctrl-D, closed pipe)."""
    if not interactive:
        line = sys.stdin.readline()
        return line.rstrip("\r\n") if line else None
    while True:
        try:
            return input(PROMPT)
        except EOFError:
            click.echo(err=True)
            return None
        except KeyboardInterrupt:
            click.echo(f"\n{HELP}", err=True)


def _end_line(parts: list[str]) -> None:
    if parts:
        click.echo()


def _greet(
    stub: coordinator_pb2_grpc.CoordinatorStub, address: str, config_path: Path | None
) -> str:
    """Check the coordinator answers; the model it serves, and a warning if it does not yet."""
    try:
        reply = stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=rpc.DESCRIBE_TIMEOUT)
    except grpc.RpcError as e:
        raise click.ClickException(coordinator_error(e, address, config_path)) from None
    if not reply.serving:
        problem = f": {reply.problem}" if reply.problem else ""
        click.echo(f"Warning: the cluster is not serving {reply.model} yet{problem}", err=True)
    return reply.model or "the cluster's model"


@click.command("chat")
@coordinator_options
@click.option("--system", default=None, help="A system message that opens the conversation.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help=f"Most tokens in one reply [default: {DEFAULT_MAX_TOKENS}, or what the "
              "model's context leaves].")  # fmt: skip
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.7, show_default=True,
              help="0 for greedy replies.")  # fmt: skip
def chat_command(
    coordinator: str,
    config_path: Path | None,
    system: str | None,
    max_tokens: int | None,
    temperature: float,
) -> None:
    """Chat with the cluster's model; the conversation is kept until /reset."""
    interactive = sys.stdin.isatty()
    channel = coordinator_channel(coordinator, config_path)
    try:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        model = _greet(stub, coordinator, config_path)
        if interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401 - line editing and history for input()
            click.echo(f"Chatting with {model} at {coordinator}. {HELP}", err=True)
        chat = Chat(stub, coordinator, Conversation(system), max_tokens, temperature, config_path)
        chat.run(interactive)
    except KeyboardInterrupt:
        raise click.Abort() from None
    finally:
        channel.close()


if __name__ == "__main__":
    chat_command(prog_name="pomona chat")
