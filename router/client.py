"""A small client of the tandem.v1 API: stream one completion, or a chat, to a terminal.

Every call carries ``authorization: Bearer $TANDEM_API_KEY`` when that variable is set (a
router with API keys on refuses calls without one: router/auth.py)."""

from __future__ import annotations

import sys
from typing import TextIO

import grpc

from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from services.engine import env


def call_metadata() -> tuple[tuple[str, str], ...]:
    """The metadata of every call: the API key from TANDEM_API_KEY, if set."""
    key = env.client_api_key()
    return (("authorization", f"Bearer {key}"),) if key else ()


def _usage_line(last: pb.GenerateResponse) -> str:
    u = last.usage
    return (f"[finish_reason={last.finish_reason} prompt_tokens={u.prompt_tokens} "
            f"completion_tokens={u.completion_tokens} cached_prompt_tokens={u.cached_prompt_tokens}]")


def stream_completion(address: str, prompt: str, sampling: pb.SamplingParams, out=sys.stdout,
                      timeout: float | None = None) -> pb.GenerateResponse:
    """Print the prompt and the streamed reply; return the last response (usage, finish reason)."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        print(prompt, end="", flush=True, file=out)
        last = None
        for last in stub.Generate(pb.GenerateRequest(prompt=prompt, sampling=sampling), timeout=timeout,
                                  metadata=call_metadata()):
            print(last.text, end="", flush=True, file=out)
        print("\n" + _usage_line(last), file=out)
        return last


def stream_reply(stub: pb_grpc.GenerationStub, messages: list[pb.ChatMessage], sampling: pb.SamplingParams,
                 out: TextIO, timeout: float | None = None) -> tuple[str, pb.GenerateResponse]:
    """Send a conversation (``GenerateRequest.messages``), print the assistant's reply as it
    streams; return (the reply's text, the last response)."""
    parts, last = [], None
    for last in stub.Generate(pb.GenerateRequest(messages=messages, sampling=sampling), timeout=timeout,
                                  metadata=call_metadata()):
        parts.append(last.text)
        print(last.text, end="", flush=True, file=out)
    print(file=out)
    return "".join(parts), last


def chat_once(address: str, text: str, sampling: pb.SamplingParams, out=sys.stdout, system: str = "",
              timeout: float | None = None) -> pb.GenerateResponse:
    """One user turn (``tandem generate --chat``): print the streamed answer and its usage line."""
    messages = ([pb.ChatMessage(role="system", content=system)] if system else []) + \
        [pb.ChatMessage(role="user", content=text)]
    with grpc.insecure_channel(address) as channel:
        _, last = stream_reply(pb_grpc.GenerationStub(channel), messages, sampling, out, timeout)
    print(_usage_line(last), file=out)
    return last


def chat_session(address: str, sampling: pb.SamplingParams, inp: TextIO = sys.stdin, out: TextIO = sys.stdout,
                 system: str = "", timeout: float | None = None, show_usage: bool = False) -> int:
    """An interactive chat (``tandem chat``): one user turn per input line, the reply streamed,
    the whole history sent each turn. EOF or Ctrl-C ends it (status 0). A refused turn
    (INVALID_ARGUMENT, e.g. the history outgrew the context) is printed and dropped from the
    history, and the chat goes on; any other error ends it (status 1)."""
    history = [pb.ChatMessage(role="system", content=system)] if system else []
    interactive = inp.isatty()
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        try:
            while True:
                if interactive:
                    print("> ", end="", flush=True, file=out)
                line = inp.readline()
                if not line:  # EOF
                    break
                text = line.rstrip("\n")
                if not text.strip():
                    continue
                turn = history + [pb.ChatMessage(role="user", content=text)]
                try:
                    reply, last = stream_reply(stub, turn, sampling, out, timeout)
                except grpc.RpcError as exc:
                    print(f"\n[error {exc.code().name}: {exc.details()}]", file=out, flush=True)
                    if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                        return 1
                    continue
                history = turn + [pb.ChatMessage(role="assistant", content=reply)]
                if show_usage:
                    print(_usage_line(last), file=out, flush=True)
        except KeyboardInterrupt:
            pass
    if interactive:
        print(file=out)
    return 0
