"""router/auth.py: API keys of the router's gRPC server, and the abort ownership they give.

The rules are tested on the Authenticator directly; the interceptor and the servicer over a
real grpc.aio server on loopback, with the lifecycle's fake pipeline standing in for the workers.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos.tandem.v1 import admin_pb2, admin_pb2_grpc
from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from router import auth
from router.auth import AuthConfig, AuthInterceptor, Authenticator, bearer_token, fingerprint, match
from router.servicer import AdminServicer, GenerationServicer
from router.validation import GenerateInput
from tests.unit.test_lifecycle import FakePipeline, lifecycle, run

KEY_A, KEY_B, ADMIN = "a" * 20 + "-alice", "b" * 20 + "-bob", "c" * 20 + "-admin"
GENERATE, ADMIN_STATS = "/tandem.v1.Generation/Generate", "/tandem.v1.Admin/GetWorkerStats"


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


# ---- keys from the environment and files ----------------------------------------------------
def test_keys_come_from_the_variables_and_files(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# the team's keys\n{KEY_B}\n\n{KEY_A}\n")
    config = AuthConfig.from_env({"TANDEM_API_KEYS": f" {KEY_A} ,", "TANDEM_API_KEYS_FILE": str(keys_file),
                                  "TANDEM_ADMIN_API_KEYS": ADMIN})
    assert config.api_keys == (KEY_A, KEY_B) and config.admin_keys == (ADMIN,) and config.enabled
    assert AuthConfig.from_env({}) == AuthConfig() and not AuthConfig().enabled


@pytest.mark.parametrize("environ, message", [
    ({"TANDEM_API_KEYS": "short"}, "TANDEM_API_KEYS: key #1 must be at least 16"),
    ({"TANDEM_ADMIN_API_KEYS": f"{ADMIN},x y z 0123456789abcdef"}, "TANDEM_ADMIN_API_KEYS: key #2"),
    ({"TANDEM_API_KEYS_FILE": "/nonexistent/keys"}, "TANDEM_API_KEYS_FILE: cannot read '/nonexistent/keys'"),
])
def test_a_bad_key_or_file_names_its_variable(environ, message):
    with pytest.raises(ValueError, match=message) as info:
        AuthConfig.from_env(environ)
    assert "short" not in str(info.value)  # a key is never echoed


def test_an_empty_key_file_is_an_error(tmp_path):
    empty = tmp_path / "keys"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="TANDEM_ADMIN_API_KEYS_FILE: .* holds no key"):
        AuthConfig.from_env({"TANDEM_ADMIN_API_KEYS_FILE": str(empty)})


# ---- matching ----------------------------------------------------------------------------------
def test_every_key_is_compared_in_constant_time(monkeypatch):
    compared = []

    def spy(a, b):
        compared.append((a, b))
        return a == b

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert match(KEY_A, (KEY_A, KEY_B)) == fingerprint(KEY_A)
    assert compared == [(KEY_A.encode(), KEY_A.encode()), (KEY_A.encode(), KEY_B.encode())]  # no early exit
    compared.clear()
    assert match(KEY_A[:-1], (KEY_A, KEY_B)) is None and len(compared) == 2
    assert match(None, (KEY_A,)) is None


def test_bearer_token_and_fingerprint():
    assert bearer_token((("x-other", "1"), ("Authorization", f"bearer  {KEY_A} "))) == KEY_A
    assert bearer_token((("authorization", f"Basic {KEY_A}"),)) is None
    assert bearer_token((("authorization", "Bearer "),)) is None and bearer_token(None) is None
    assert fingerprint(KEY_A).startswith("key-") and len(fingerprint(KEY_A)) == 16
    assert KEY_A not in fingerprint(KEY_A) and fingerprint(KEY_A) != fingerprint(KEY_B)


# ---- the rules -------------------------------------------------------------------------------
def test_generation_needs_a_valid_api_key_and_health_and_reflection_stay_open():
    a = Authenticator(AuthConfig(api_keys=(KEY_A, KEY_B), admin_keys=(ADMIN,)))
    assert a.refusal(GENERATE, ()) == "missing API key: send metadata `authorization: Bearer <key>`"
    assert a.refusal(GENERATE, bearer(KEY_A + "x")) == "invalid API key"
    assert a.refusal(GENERATE, bearer(ADMIN)) == "invalid API key"  # the admin key is not an API key
    assert a.refusal(GENERATE, bearer(KEY_B)) is None
    for method in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                   "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"):
        assert a.refusal(method, ()) is None
    assert a.identity(bearer(KEY_B)) == fingerprint(KEY_B) and a.identity(()) == ""


def test_admin_has_its_own_keys_and_is_closed_when_only_api_keys_are_set():
    both = Authenticator(AuthConfig(api_keys=(KEY_A,), admin_keys=(ADMIN,)))
    assert both.refusal(ADMIN_STATS, bearer(KEY_A)) == "invalid API key"
    assert both.refusal(ADMIN_STATS, bearer(ADMIN)) is None
    only_api = Authenticator(AuthConfig(api_keys=(KEY_A,)))
    assert only_api.refusal(ADMIN_STATS, bearer(KEY_A)) == "Admin is closed: API keys are on and no admin key is set"
    only_admin = Authenticator(AuthConfig(admin_keys=(ADMIN,)))
    assert only_admin.refusal(GENERATE, ()) is None and only_admin.refusal(ADMIN_STATS, ()) is not None
    assert only_admin.identity(()) == ""


# ---- abort ownership in the lifecycle -------------------------------------------------------
def test_request_ids_and_abort_are_scoped_by_owner():
    async def main():
        lc = lifecycle(FakePipeline(hang=True))
        alice = lc.start(GenerateInput(prompt_token_ids=[5], request_id="job-1"), owner="key-a")
        bob = lc.start(GenerateInput(prompt_token_ids=[5], request_id="job-1"), owner="key-b")
        tasks = [asyncio.create_task(_drain(live)) for live in (alice, bob)]
        while len(lc.pipeline.calls) < 2:  # both admitted: the same id, two owners, no "already in use"
            await asyncio.sleep(0.01)
        dup = lc.start(GenerateInput(prompt_token_ids=[5], request_id="job-1"), owner="key-a")
        with pytest.raises(Exception, match="already in use"):
            await _drain(dup)
        assert lc.abort("job-1", owner="key-c") is False and lc.abort("job-1") is False
        assert lc.abort("job-1", owner="key-b") is True
        bob_chunks = await tasks[1]
        assert not tasks[0].done()
        assert lc.abort("job-1", owner="key-a") is True
        return lc, await tasks[0], bob_chunks

    lc, alice_chunks, bob_chunks = run(main())
    assert alice_chunks[-1].finish_reason == bob_chunks[-1].finish_reason == "abort"
    assert sorted(c.request_id for c in lc.pipeline.calls) == ["key-a/job-1", "key-b/job-1"]  # unique on workers
    assert lc.num_inflight == 0


async def _drain(live):
    return [c async for c in live.stream()]


# ---- over a real grpc.aio server on loopback ----------------------------------------------
async def _server(config: AuthConfig):
    lc = lifecycle(FakePipeline(hang=True))
    authenticator = Authenticator(config)
    server = grpc.aio.server(interceptors=[AuthInterceptor(authenticator)])
    pb_grpc.add_GenerationServicer_to_server(GenerationServicer(lc, authenticator), server)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(None, lc), server)
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, lc, f"127.0.0.1:{port}"


def test_over_grpc_a_call_without_a_valid_key_is_unauthenticated_and_abort_is_the_owners():
    async def main():
        server, lc, address = await _server(AuthConfig(api_keys=(KEY_A, KEY_B), admin_keys=(ADMIN,)))
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                gen, adm = pb_grpc.GenerationStub(channel), admin_pb2_grpc.AdminStub(channel)
                codes = {}
                for name, md in (("none", ()), ("wrong", bearer(KEY_A[::-1])), ("admin", bearer(ADMIN))):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await gen.Tokenize(pb.TokenizeRequest(text="hi"), metadata=md)
                    codes[name] = (info.value.code(), info.value.details())
                with pytest.raises(grpc.aio.AioRpcError) as info:  # streaming: refused before it starts
                    async for _ in gen.Generate(pb.GenerateRequest(prompt_token_ids=[5]), metadata=()):
                        pass
                codes["stream"] = (info.value.code(), info.value.details())
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await adm.GetWorkerStats(admin_pb2.GetWorkerStatsRequest(), metadata=bearer(KEY_A))
                codes["admin-with-api-key"] = (info.value.code(), info.value.details())
                health_reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                info_reply = await gen.Tokenize(pb.TokenizeRequest(text="hi"), metadata=bearer(KEY_A))

                stream = gen.Generate(pb.GenerateRequest(prompt_token_ids=[5], request_id="job-1"),
                                      metadata=bearer(KEY_A))
                reader = asyncio.create_task(_responses(stream))
                while not lc.pipeline.calls:
                    await asyncio.sleep(0.01)
                other = await gen.Abort(pb.AbortRequest(request_id="job-1"), metadata=bearer(KEY_B))
                owner = await gen.Abort(pb.AbortRequest(request_id="job-1"), metadata=bearer(KEY_A))
                return codes, health_reply, info_reply, other, owner, await reader
        finally:
            await server.stop(None)

    codes, health_reply, info_reply, other, owner, responses = run(main())
    unauth = grpc.StatusCode.UNAUTHENTICATED
    assert codes["none"] == (unauth, "missing API key: send metadata `authorization: Bearer <key>`")
    assert codes["wrong"] == codes["admin"] == (unauth, "invalid API key")
    assert codes["stream"][0] == unauth and codes["admin-with-api-key"] == (unauth, "invalid API key")
    assert health_reply.status == health_pb2.HealthCheckResponse.SERVING  # open without a key
    assert list(info_reply.token_ids) == [ord("h") + 2, ord("i") + 2]  # the right key gets through
    assert other.found is False and owner.found is True  # bob cannot abort (or see) alice's request
    assert responses[-1].finish_reason == "abort" and responses[-1].request_id == "job-1"


async def _responses(stream):
    return [r async for r in stream]
