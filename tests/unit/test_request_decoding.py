"""router/request_decoding.py over a real grpc.aio server on a loopback socket (no Ray): bytes that
do not parse, or are too many, get INVALID_ARGUMENT on unary, server-streaming and bidi methods;
an exception a servicer lets escape becomes INTERNAL naming no internals; good requests pass."""

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from router.request_decoding import DecodingInterceptor, Undecodable, request_decoder

INVALID_UTF8_PROMPT = b"\x1a\x02\xff\xfe"  # field 3 (prompt), length 2, bytes that are not UTF-8
TRUNCATED = pb.GenerateRequest(prompt="hello there").SerializeToString()[:-3]


class Servicer(pb_grpc.GenerationServicer):
    async def Generate(self, request, context):
        for word in request.prompt.split():
            yield pb.GenerateResponse(text=word)

    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(model_id="m")

    async def Tokenize(self, request, context):
        raise RuntimeError("secret internals at 0xdeadbeef")


async def serve(max_request_bytes: int):
    server = grpc.aio.server(interceptors=[DecodingInterceptor(max_request_bytes)])
    pb_grpc.add_GenerationServicer_to_server(Servicer(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    reflection.enable_server_reflection(["tandem.v1.Generation", reflection.SERVICE_NAME], server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def raw_call(channel, method: str, payload: bytes, streaming: bool = False):
    """(status code, details, response bytes) of one call with bytes as they are on the wire."""
    try:
        if streaming:
            replies = [r async for r in channel.unary_stream(method)(payload, timeout=10)]
        else:
            replies = [await channel.unary_unary(method)(payload, timeout=10)]
        return grpc.StatusCode.OK, "", replies
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details(), []


def run(scenario, max_request_bytes: int = 1000):
    async def main():
        server, address = await serve(max_request_bytes)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                return await scenario(channel)
        finally:
            await server.stop(0)

    return asyncio.run(main())


def test_decoder_returns_undecodable_instead_of_raising():
    decode = request_decoder(pb.GenerateRequest.FromString, "tandem.v1.GenerateRequest", 10)
    assert decode(pb.GenerateRequest(prompt="hi").SerializeToString()).prompt == "hi"
    assert isinstance(decode(INVALID_UTF8_PROMPT), Undecodable)
    assert decode(b"x" * 11) == Undecodable("request: 11 bytes exceeds the limit of 10 bytes")


def test_bad_bytes_on_a_streaming_method_are_invalid_argument():
    async def scenario(channel):
        return [await raw_call(channel, "/tandem.v1.Generation/Generate", payload, streaming=True)
                for payload in (INVALID_UTF8_PROMPT, TRUNCATED, b"\xff" * 7,
                                pb.GenerateRequest(prompt="two words").SerializeToString())]

    *bad, good = run(scenario)
    for code, details, _ in bad:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert details == ("request: not a valid tandem.v1.GenerateRequest message "
                           "(malformed protobuf or invalid UTF-8)")
    code, _, replies = good
    assert code == grpc.StatusCode.OK
    assert [pb.GenerateResponse.FromString(r).text for r in replies] == ["two", "words"]


def test_a_request_over_the_size_limit_is_invalid_argument_naming_the_limit():
    big = pb.GenerateRequest(prompt="x " * 1000).SerializeToString()

    async def scenario(channel):
        return await raw_call(channel, "/tandem.v1.Generation/Generate", big, streaming=True)

    code, details, _ = run(scenario)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == f"request: {len(big)} bytes exceeds the limit of 1000 bytes"


def test_unary_methods_health_and_reflection_answer_bad_bytes_with_invalid_argument():
    async def scenario(channel):
        info_bad = await raw_call(channel, "/tandem.v1.Generation/GetModelInfo", b"\x0a")
        info_ok = await raw_call(channel, "/tandem.v1.Generation/GetModelInfo", b"")
        health_bad = await raw_call(channel, "/grpc.health.v1.Health/Check", b"\x0a\x02\xc3\x28")
        stream = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        try:
            [r async for r in stream(iter([b"\x1a\x03\xe2\x28\xa1"]), timeout=10)]  # file_by_filename, not UTF-8
            refl = grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as exc:
            refl = exc.code(), exc.details()
        return info_bad, info_ok, health_bad, refl

    info_bad, info_ok, health_bad, refl = run(scenario)
    assert info_bad[0] == grpc.StatusCode.INVALID_ARGUMENT and "tandem.v1.GetModelInfoRequest" in info_bad[1]
    assert info_ok[0] == grpc.StatusCode.OK and pb.ModelInfo.FromString(info_ok[2][0]).model_id == "m"
    assert health_bad[0] == grpc.StatusCode.INVALID_ARGUMENT and "grpc.health.v1.HealthCheckRequest" in health_bad[1]
    assert refl[0] == grpc.StatusCode.INVALID_ARGUMENT and refl[1].startswith("request: not a valid")


def test_an_escaped_exception_is_internal_without_its_text_or_class():
    async def scenario(channel):
        return await raw_call(channel, "/tandem.v1.Generation/Tokenize", pb.TokenizeRequest(text="a").SerializeToString())

    code, details, _ = run(scenario)
    assert code == grpc.StatusCode.INTERNAL
    assert "secret" not in details and "RuntimeError" not in details and "Unexpected" not in details
