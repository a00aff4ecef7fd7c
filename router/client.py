"""A small client of the tandem.v1 API: stream one completion to a terminal."""

from __future__ import annotations

import sys

import grpc

from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc


def stream_completion(address: str, prompt: str, sampling: pb.SamplingParams, out=sys.stdout,
                      timeout: float | None = None) -> pb.GenerateResponse:
    """Print the prompt and the streamed reply; return the last response (usage, finish reason)."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        print(prompt, end="", flush=True, file=out)
        last = None
        for last in stub.Generate(pb.GenerateRequest(prompt=prompt, sampling=sampling), timeout=timeout):
            print(last.text, end="", flush=True, file=out)
        u = last.usage
        print(f"\n[finish_reason={last.finish_reason} prompt_tokens={u.prompt_tokens} "
              f"completion_tokens={u.completion_tokens} cached_prompt_tokens={u.cached_prompt_tokens}]", file=out)
        return last
