"""A seeded corpus of hostile requests for every method of the router's gRPC server, as raw bytes.

``cases(seed, n, model_id)`` is deterministic: the same seed gives the same bytes. Each case is
a message with random field values (huge, negative, NaN / inf, empty, out of vocabulary, the
served model id or another) serialized and then sent as it is, truncated, with bytes flipped,
with a string field of invalid UTF-8 appended (top level or nested), replaced by random bytes,
or (rarely) inflated beyond the router's 4 MiB request limit.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from google.protobuf.message import Message

from protos.tandem.v1 import admin_pb2
from protos.tandem.v1 import generation_pb2 as pb

# (method path, response is a stream, request type)
METHODS = [
    ("/tandem.v1.Generation/Generate", True, pb.GenerateRequest, 70),
    ("/tandem.v1.Generation/Tokenize", False, pb.TokenizeRequest, 12),
    ("/tandem.v1.Generation/Abort", False, pb.AbortRequest, 6),
    ("/tandem.v1.Generation/GetModelInfo", False, pb.GetModelInfoRequest, 4),
    ("/tandem.v1.Admin/GetWorkerStats", False, admin_pb2.GetWorkerStatsRequest, 4),
    ("/grpc.health.v1.Health/Check", False, None, 4),
]
BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
            b"\xf0\x28\x8c\x28", b"ok\xfe"]
FLOATS = [0.0, 1.0, 0.5, 0.9, -1.0, -0.0, 1e-45, 1e-30, 1e-6, 2.0, 3.4e38, math.inf, -math.inf, math.nan]
UINT32 = [0, 1, 2, 5, 8, 511, 512, 2048, 5000, 1 << 31, (1 << 32) - 1]
INT32 = [-(1 << 31), -2, -1, 0, 1, 40, 1000, (1 << 31) - 1]
INT64 = [-(1 << 63), -1, 0, 7, 123, (1 << 63) - 1]
MAX_TOKENS = [0, 1, 3, 8, 2048, 5000, (1 << 32) - 1]
HUGE_BYTES = 5 << 20  # over the router's default max_request_bytes (4 MiB), under grpc's 64 MiB


@dataclass(frozen=True)
class Case:
    """One request as bytes on the wire."""

    method: str  # gRPC method path
    streaming: bool  # the response is a stream
    payload: bytes  # the serialized (and maybe mangled) request
    label: str  # how it was made (for failure messages)


def _text(rng: random.Random, model_id: str) -> str:
    pick = rng.random()
    if pick < 0.15:
        return ""
    if pick < 0.55:
        return rng.choice(["hi", "The for statement", "import os", model_id, " ", "\x00", "a\nb\tc"])
    if pick < 0.85:  # random code points: ASCII, controls, CJK, emoji, combining marks
        ranges = [(0x20, 0x7e), (0x00, 0x1f), (0x4e00, 0x4fff), (0x1f600, 0x1f64f), (0x300, 0x36f)]
        out = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(ranges)
            out.append(chr(rng.randint(lo, hi)))
        return "".join(out)
    return rng.choice("xy\u00e9\u4e2d") * rng.choice([300, 5000, 16_001, 200_000])


def _ids(rng: random.Random) -> list[int]:
    pick = rng.random()
    if pick < 0.7:
        return [rng.randrange(512) for _ in range(rng.randint(1, 40))]
    if pick < 0.85:
        return [rng.choice(UINT32) for _ in range(rng.randint(1, 10))]
    return [rng.randrange(512)] * rng.choice([2047, 2048, 5000, 300_000])


def _sampling(rng: random.Random, model_id: str) -> pb.SamplingParams:
    s = pb.SamplingParams()
    if rng.random() < 0.8:
        s.max_tokens = rng.choice(MAX_TOKENS) if rng.random() < 0.4 else rng.randint(1, 8)
    if rng.random() < 0.5:
        s.temperature = rng.choice(FLOATS) if rng.random() < 0.6 else rng.uniform(0, 2)
    if rng.random() < 0.3:
        s.top_p = rng.choice(FLOATS)
    if rng.random() < 0.3:
        s.top_k = rng.choice(INT32)
    if rng.random() < 0.3:
        s.min_p = rng.choice(FLOATS)
    if rng.random() < 0.3:
        s.seed = rng.choice(INT64)
    if rng.random() < 0.2:
        s.logprobs = rng.choice([0, 1, 5, 20, 21, (1 << 32) - 1])
    if rng.random() < 0.3:
        s.ignore_eos = rng.random() < 0.5
    if rng.random() < 0.25:
        s.stop.extend(_text(rng, model_id)[:3000] for _ in range(rng.choice([1, 2, 5, 17, 40])))
    if rng.random() < 0.2:
        s.stop_token_ids.extend(rng.choice(UINT32) for _ in range(rng.choice([1, 3, 300])))
    return s


def _generate(rng: random.Random, model_id: str) -> pb.GenerateRequest:
    req = pb.GenerateRequest(sampling=_sampling(rng, model_id))
    which = rng.random()
    if which < 0.45:
        req.prompt = _text(rng, model_id)
    elif which < 0.85:
        req.prompt_token_ids.extend(_ids(rng))
    elif which < 0.92:
        req.messages.extend(pb.ChatMessage(role=_text(rng, model_id)[:20], content=_text(rng, model_id))
                            for _ in range(rng.randint(0, 3)))
    else:  # two prompt forms (or none, when the text is empty)
        req.prompt = _text(rng, model_id)
        req.prompt_token_ids.extend(_ids(rng)[:10])
    if rng.random() < 0.3:
        req.model = rng.choice([model_id, "other-model", "x" * 16_000, _text(rng, model_id)])
    if rng.random() < 0.2:
        req.request_id = rng.choice([_text(rng, model_id), "r" * 300])
    if rng.random() < 0.3:
        req.priority = rng.choice(INT32)
    return req


def _message(rng: random.Random, kind, model_id: str) -> bytes:
    if kind is pb.GenerateRequest:
        return _generate(rng, model_id).SerializeToString()
    if kind is pb.TokenizeRequest:
        req = pb.TokenizeRequest(text=_text(rng, model_id))
        if rng.random() < 0.3:
            req.model = rng.choice([model_id, "nope", "m" * 16_000])
        return req.SerializeToString()
    if kind is pb.AbortRequest:
        return pb.AbortRequest(request_id=_text(rng, model_id)).SerializeToString()
    if kind is None:  # grpc.health.v1.HealthCheckRequest {string service = 1}
        service = rng.choice(["", "tandem.v1.Generation", "no.such.Service"]).encode()
        return (b"\x0a" + _varint(len(service)) + service) if service else b""
    return kind().SerializeToString()  # empty request types: b""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _length_delimited(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _bad_utf8_field(rng: random.Random, kind) -> bytes:
    """A string field holding invalid UTF-8: top level, or inside sampling.stop / messages[]."""
    bad = rng.choice(BAD_UTF8)
    if kind is pb.GenerateRequest:
        where = rng.choice(["request_id", "model", "prompt", "stop", "role", "content"])
        top = {"request_id": 1, "model": 2, "prompt": 3}
        if where in top:
            return _length_delimited(top[where], bad)
        if where == "stop":
            return _length_delimited(5, _length_delimited(7, bad))
        return _length_delimited(7, _length_delimited(1 if where == "role" else 2, bad))
    return _length_delimited(rng.choice([1, 2]), bad)  # text/model, request_id, service


def _mangle(rng: random.Random, data: bytes, kind) -> tuple[bytes, str]:
    pick = rng.random()
    if pick < 0.35:
        return data, "message"
    if pick < 0.5 and data:
        return data[:rng.randrange(len(data))], "truncated"
    if pick < 0.65 and data:
        out = bytearray(data)
        for _ in range(rng.randint(1, 5)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out), "flipped"
    if pick < 0.85:
        field = _bad_utf8_field(rng, kind)
        return (field + data if rng.random() < 0.5 else data + field), "invalid-utf8"
    if pick < 0.99:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))), "random-bytes"
    return data + _length_delimited(3, b"x" * HUGE_BYTES), "huge"


def cases(seed: int, n: int, model_id: str) -> list[Case]:
    """``n`` cases from ``seed`` (deterministic)."""
    rng = random.Random(seed)
    weights = [w for *_, w in METHODS]
    out = []
    for i in range(n):
        method, streaming, kind, _ = rng.choices(METHODS, weights)[0]
        payload, how = _mangle(rng, _message(rng, kind, model_id), kind)
        out.append(Case(method, streaming, payload, f"#{i} {how} {method.rsplit('/', 1)[1]} ({len(payload)} bytes)"))
    return out
