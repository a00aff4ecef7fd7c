"""The Redis tier against a real redis-server (started here, stopped by PID), engines in-process
(no Ray): lookups, write-back, TTL, corruption, eviction races, other models, outages."""

import asyncio
import time

import pytest
import redis
import torch

from services.engine import LLM, SamplingParams
from services.engine.make_model import make_model
from services.prefix_store import BlockLayout, PrefixStore, PrefixStoreConfig, block_key
from services.prefix_store.blob import encode_block
from services.prefix_store.server import LocalRedisServer
from services.prefix_store.tier import PrefixCacheTier
from services.serving_engine import ServingEngine

BS = 16
PROMPT = [(i * 37 + 11) % 500 + 4 for i in range(1024)]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def redis_server():
    server = LocalRedisServer(maxmemory="64mb")
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def rclient(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    a = make_model("tiny-llama", tmp_path_factory.mktemp("a"), seed=0)
    b = make_model("tiny-llama", tmp_path_factory.mktemp("b"), seed=1)
    return str(a), str(b)


def config(server, **kw):
    return PrefixStoreConfig(url=server.url, ttl_s=kw.pop("ttl_s", 600), breaker_retry_s=kw.pop("breaker_retry_s", 1.0),
                             **kw)


async def generate(tier, engine, prompt, rid, params=GREEDY):
    """What EngineWorker.generate does (unified role), in-process."""
    chunks = []
    async with tier.serving(rid, prompt):
        async for c in engine.add_request(prompt, params, request_id=rid):
            chunks.append(c)
    return [t for c in chunks for t in c.token_ids], chunks[-1]


def serve_once(model, store_config, prompt, rid="r"):
    """A fresh engine (empty local tier) serves one request; returns tokens, last chunk, store stats, computed."""
    se = ServingEngine.from_model(model, device="cpu", num_kv_blocks=160, block_size=BS)

    async def main():
        tier = PrefixCacheTier.for_engine(se, store_config)
        try:
            out = await generate(tier, se, prompt, rid)
            if tier.store is not None:
                await tier.store.flush()
            return out, tier.stats()
        finally:
            if tier.store is not None:
                await tier.store.close()

    try:
        (tokens, last), stats = asyncio.run(main())
        return tokens, last, stats, se.stats().num_prompt_tokens_computed
    finally:
        se.shutdown()


def cold(model, prompt):
    return LLM(model, device="cpu", num_kv_blocks=160, block_size=BS, enable_prefix_caching=False).generate(
        [prompt], GREEDY)[0].token_ids


def test_other_engine_loads_the_prefix_and_output_is_unchanged(redis_server, rclient, models):
    a, _ = models
    cfg = config(redis_server)
    tokens1, last1, stats1, _ = serve_once(a, cfg, PROMPT)
    assert last1.num_cached_tokens == 0 and stats1["blocks_written"] == 64
    keys = sorted(k.decode() for k in rclient.keys("tandem:*"))
    assert len(keys) == 64 and all(k.startswith("tandem:") and ":kv:" in k for k in keys)
    assert all(0 < rclient.ttl(k) <= 600 for k in keys)  # TTL on every key
    prompt2 = PROMPT + [7, 8, 9, 10, 11] * 8
    tokens2, last2, stats2, computed = serve_once(a, cfg, prompt2, "r2")
    assert last2.num_cached_tokens == 1024 and last2.num_imported_cached_tokens == 1024
    assert computed == len(prompt2) - 1024
    assert stats2["hits_tokens"]["redis"] == 1024 and stats2["hits_tokens"]["local"] == 0
    assert tokens2 == cold(a, prompt2) and tokens1 == cold(a, PROMPT)


def test_keys_follow_the_design(redis_server, rclient, models):
    a, _ = models
    se = ServingEngine.from_model(a, device="cpu", num_kv_blocks=160, block_size=BS)
    try:
        hashes = se.engine.prompt_block_hashes(PROMPT)
        serve_once(a, config(redis_server), PROMPT)
        assert rclient.exists(f"tandem:{se.engine.fingerprint}:kv:{hashes[0].hex()}")
        assert rclient.exists(block_key(se.engine.fingerprint, hashes[63]))
    finally:
        se.shutdown()


def test_other_model_gets_no_hits(redis_server, rclient, models):
    a, b = models
    cfg = config(redis_server)
    serve_once(a, cfg, PROMPT)
    tokens, last, stats, computed = serve_once(b, cfg, PROMPT + [5] * 20)
    assert last.num_cached_tokens == 0 and stats["hits_tokens"]["redis"] == 0 and computed == 1044
    assert stats["queries_tokens"]["redis"] == 1040  # it did ask
    assert tokens == cold(b, PROMPT + [5] * 20)


def test_corrupt_blob_is_deleted_recomputed_and_rewritten(redis_server, rclient, models):
    a, _ = models
    cfg = config(redis_server)
    serve_once(a, cfg, PROMPT)
    se = ServingEngine.from_model(a, device="cpu", num_kv_blocks=16, block_size=BS)
    key = block_key(se.engine.fingerprint, se.engine.prompt_block_hashes(PROMPT)[10])
    se.shutdown()
    blob = bytearray(rclient.get(key))
    blob[-100] ^= 0xFF
    rclient.set(key, bytes(blob))
    prompt2 = PROMPT + [9] * 30
    tokens, last, stats, computed = serve_once(a, cfg, prompt2)
    assert stats["corrupt_blobs"] == 1
    assert last.num_cached_tokens == 160 and last.num_imported_cached_tokens == 160  # blocks 0..9
    assert computed == len(prompt2) - 160
    assert tokens == cold(a, prompt2)
    again = bytes(rclient.get(key))  # deleted, then written back by the recomputing engine
    assert again != bytes(blob) and again[:4] == b"TDKV"


def test_blob_evicted_between_exists_and_get_is_a_clean_miss(redis_server, rclient, models):
    a, _ = models
    se = ServingEngine.from_model(a, device="cpu", num_kv_blocks=16, block_size=BS)
    dtype, shape = se.engine.kv_block_shape()
    fp = se.engine.fingerprint
    se.shutdown()
    layout = BlockLayout(dtype, shape)
    hashes = [bytes([i]) * 32 for i in range(6)]
    for h in hashes:
        rclient.set(block_key(fp, h), encode_block(torch.ones(shape, dtype=layout.torch_dtype)))

    class Racy(PrefixStore):
        async def _exists(self, keys):
            found = await super()._exists(keys)
            await self.client.delete(keys[3])  # evicted right after EXISTS said yes
            return found

    async def main():
        store = Racy(config(redis_server), fp, layout)
        try:
            return await store.lookup(hashes), store.stats()
        finally:
            await store.close()

    kv, stats = asyncio.run(main())
    assert kv.shape[2] == 3 and stats["corrupt_blobs"] == 0 and not stats["errors"]


def test_write_back_never_waits_queue_full_drops(redis_server, models):
    a, _ = models
    layout = BlockLayout("float32", (2, 2, BS, 2, 16))

    async def main():
        store = PrefixStore(config(redis_server, write_queue_size=1), "fp", layout)
        kv = torch.zeros((2, 2, 1, BS, 2, 16))
        t = time.perf_counter()
        results = [store.submit([bytes([i]) * 32], kv) for i in range(3)]
        elapsed = time.perf_counter() - t
        await store.flush()
        stats = store.stats()
        await store.close()
        return results, elapsed, stats

    results, elapsed, stats = asyncio.run(main())
    assert results == [True, False, False] and elapsed < 0.05
    assert stats["writes_dropped"] == 2 and stats["blocks_written"] == 1


def test_redis_down_is_a_fast_miss_then_breaker_reopens_by_itself(redis_server, models):
    a, _ = models
    se = ServingEngine.from_model(a, device="cpu", num_kv_blocks=16, block_size=BS)
    dtype, shape = se.engine.kv_block_shape()
    se.shutdown()
    layout = BlockLayout(dtype, shape)
    hashes = [bytes([i]) * 32 for i in range(4)]
    kv = torch.ones((shape[0], 2, 4) + shape[2:])

    async def main():
        store = PrefixStore(config(redis_server, breaker_failures=2, breaker_retry_s=1.0), "fp", layout)
        store.submit(hashes, kv)
        await store.flush()
        assert (await store.lookup(hashes)).shape[2] == 4
        redis_server.stop()
        t = time.perf_counter()
        for _ in range(5):
            assert (await store.lookup(hashes)).shape[2] == 0
        down_s = time.perf_counter() - t
        assert store.breaker.is_open and store.stats()["breaker_open"] == 1
        assert sum(store.stats()["errors"].values()) == 2  # the breaker skipped the rest
        redis_server.start()  # same port, empty (no persistence)
        store.submit(hashes, kv)  # dropped: breaker still open
        await store.flush()
        await asyncio.sleep(1.1)
        assert (await store.lookup(hashes)).shape[2] == 0  # the trial call succeeds (a miss): closed
        assert not store.breaker.is_open
        store.submit(hashes, kv)
        await store.flush()
        found = (await store.lookup(hashes)).shape[2]
        await store.close()
        return down_s, found

    down_s, found = asyncio.run(main())
    assert down_s < 2.0 and found == 4


def test_acl_user_with_password_from_the_environment(redis_server, rclient, monkeypatch):
    rclient.acl_setuser("tandem-test", enabled=True, passwords=["+s3cret-pw"], keys=["tandem:*"],
                        commands=["+exists", "+get", "+set", "+del", "+ping", "+hello", "+client"])
    layout = BlockLayout("float32", (2, 2, BS, 2, 16))
    kv = torch.ones((2, 2, 2, BS, 2, 16))
    hashes = [b"\x01" * 32, b"\x02" * 32]
    url = redis_server.url.replace("redis://", "redis://tandem-test@")

    async def roundtrip(password_env):
        store = PrefixStore(PrefixStoreConfig(url=url, password_env=password_env), "acl", layout)
        try:
            store.submit(hashes, kv)
            await store.flush()
            return (await store.lookup(hashes)).shape[2], store.stats()["errors"]
        finally:
            await store.close()

    monkeypatch.setenv("TANDEM_TEST_REDIS_PW", "s3cret-pw")
    assert asyncio.run(roundtrip("TANDEM_TEST_REDIS_PW")) == (2, {})
    monkeypatch.setenv("TANDEM_TEST_REDIS_PW", "wrong")
    found, errors = asyncio.run(roundtrip("TANDEM_TEST_REDIS_PW"))
    assert found == 0 and errors.get("set") == 1 and errors.get("exists") == 1  # refused: a miss, not a crash
    rclient.acl_deluser("tandem-test")


def test_large_lookups_are_fetched_in_bounded_pipelines(redis_server, rclient, monkeypatch):
    from services.prefix_store import store as store_module

    layout = BlockLayout("float32", (2, 2, BS, 2, 16))
    monkeypatch.setattr(store_module, "FETCH_BYTES", 3 * layout.num_bytes)  # 3 blocks per GET pipeline
    kv = torch.randn((2, 2, 7, BS, 2, 16))
    hashes = [bytes([i]) * 32 for i in range(7)]
    calls = []

    class Counting(PrefixStore):
        async def _get(self, keys):
            calls.append(len(keys))
            return await super()._get(keys)

    async def main():
        store = Counting(config(redis_server), "win", layout)
        store.submit(hashes, kv)
        await store.flush()
        try:
            return await store.lookup(hashes)
        finally:
            await store.close()

    got = asyncio.run(main())
    assert calls == [3, 3, 1] and torch.equal(got, kv)


def test_lookup_span_carries_the_hit_tokens_by_tier(redis_server, rclient, models):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # none set yet in this process: set one
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider = trace.get_tracer_provider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    a, _ = models
    cfg = config(redis_server)
    serve_once(a, cfg, PROMPT)
    serve_once(a, cfg, PROMPT + [3] * 20)
    spans = [s for s in exporter.get_finished_spans() if s.name == "tandem.prefix_cache.lookup"]
    assert len(spans) == 2
    first, second = (dict(s.attributes) for s in spans)
    assert first["tandem.prefix_cache.redis_hit_tokens"] == 0 and first["tandem.prefix_cache.lookup_tokens"] == 1008
    assert second["tandem.prefix_cache.redis_hit_tokens"] == 1024
    assert second["tandem.prefix_cache.local_hit_tokens"] == 0 and second["tandem.prefix_cache.lookup_tokens"] == 1040


def _tls_certs(d):
    """A CA and a server certificate for 127.0.0.1 (``cryptography``): ca.crt, server.crt, server.key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    def cert(subject, issuer, key, signer, **ext):
        now = datetime.datetime.now(datetime.timezone.utc)
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1)))
        for extension, critical in ext.values():
            b = b.add_extension(extension, critical=critical)
        return b.sign(signer, hashes.SHA256())

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tandem-test-ca")])
    ca = cert(ca_name, ca_name, ca_key, ca_key, bc=(x509.BasicConstraints(ca=True, path_length=None), True))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name, key, ca_key,
                  san=(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False))
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.crt").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (d / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))


def test_tls_rediss_url_with_a_ca_file(tmp_path):
    import socket
    import subprocess

    from services.prefix_store.server import find_redis_server

    _tls_certs(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(tmp_path / "server.crt"), "--tls-key-file",
                             str(tmp_path / "server.key"), "--tls-ca-cert-file", str(tmp_path / "ca.crt"),
                             "--tls-auth-clients", "no", "--save", "", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < end and proc.poll() is None, "TLS redis-server did not start"
                time.sleep(0.05)
        layout = BlockLayout("float32", (2, 2, BS, 2, 16))
        kv = torch.randn((2, 2, 3, BS, 2, 16))
        hashes = [bytes([i]) * 32 for i in range(3)]

        async def roundtrip(**tls):
            store = PrefixStore(PrefixStoreConfig(url=f"rediss://127.0.0.1:{port}/0", **tls), "tls", layout)
            try:
                store.submit(hashes, kv)
                await store.flush()
                return await store.lookup(hashes), store.stats()["errors"]
            finally:
                await store.close()

        got, errors = asyncio.run(roundtrip(tls_ca_file=str(tmp_path / "ca.crt")))
        assert torch.equal(got, kv) and errors == {}
        got, errors = asyncio.run(roundtrip())  # the system CAs do not trust our test CA: refused, a miss
        assert got.shape[2] == 0 and errors.get("set") == 1 and errors.get("exists") == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
