"""Blob format of the Redis prefix cache, and the circuit breaker (no Redis, no Ray)."""

import struct
import zlib

import pytest
import torch

from services.prefix_store.blob import HEADER, BlobError, BlockLayout, decode_into, decode_prefix, encode_block
from services.prefix_store.breaker import CircuitBreaker
from services.prefix_store.config import PrefixStoreConfig

LAYOUT = BlockLayout("float32", (3, 2, 4, 2, 8))  # [L, 2, bs, Hkv, D]


def blocks(n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((3, 2, n, 4, 2, 8), generator=g).to(dtype)  # [L, 2, n, bs, Hkv, D]


def test_round_trip_is_bit_exact():
    kv = blocks(5)
    out, bad = decode_prefix([encode_block(kv[:, :, i]) for i in range(5)], LAYOUT)
    assert bad is None and out.shape == kv.shape and torch.equal(out, kv)


def test_bfloat16_round_trip():
    kv = blocks(2, torch.bfloat16)
    out, bad = decode_prefix([encode_block(kv[:, :, i]) for i in range(2)], BlockLayout("bfloat16", LAYOUT.shape))
    assert bad is None and out.dtype == torch.bfloat16 and torch.equal(out, kv)


def test_header_fields():
    blob = encode_block(blocks(1)[:, :, 0])
    magic, version, dtype, ndim, _, *rest = HEADER.unpack_from(blob)
    assert (magic, version, dtype.rstrip(b"\0"), ndim) == (b"TDKV", 1, b"float32", 5)
    assert tuple(rest[:5]) == LAYOUT.shape and rest[6] == 4  # num_tokens = block_size
    assert rest[7] == zlib.crc32(blob[HEADER.size:]) and rest[8] == LAYOUT.num_bytes == len(blob) - HEADER.size


def _flip_payload_byte(blob):
    b = bytearray(blob)
    b[HEADER.size + 17] ^= 0x40
    return bytes(b)


def _patch_header(blob, **fields):
    names = ["magic", "version", "dtype", "ndim", "pad", "s0", "s1", "s2", "s3", "s4", "s5", "num_tokens",
             "checksum", "length"]
    values = dict(zip(names, HEADER.unpack_from(blob)))
    values.update(fields)
    return HEADER.pack(*values.values()) + blob[HEADER.size:]


@pytest.mark.parametrize("corrupt, field", [
    (_flip_payload_byte, "checksum"),
    (lambda b: b[:-4], "length"),
    (lambda b: b[:10], "length"),
    (lambda b: _patch_header(b, magic=b"XXXX"), "magic"),
    (lambda b: _patch_header(b, version=2), "version"),
    (lambda b: _patch_header(b, dtype=b"float16"), "dtype"),
    (lambda b: _patch_header(b, s2=8), "shape"),
    (lambda b: _patch_header(b, num_tokens=3), "shape"),
], ids=["bit-flip", "truncated", "header-only", "magic", "version", "dtype", "shape", "tokens"])
def test_corrupt_blob_is_rejected_naming_the_field(corrupt, field):
    kv = blocks(3)
    good = [encode_block(kv[:, :, i]) for i in range(3)]
    with pytest.raises(BlobError, match=f"^{field}"):
        decode_into(corrupt(good[0]), LAYOUT, memoryview(bytearray(LAYOUT.num_bytes)))
    out, bad = decode_prefix([good[0], corrupt(good[1]), good[2]], LAYOUT)
    assert bad == 1 and out.shape[2] == 1 and torch.equal(out, kv[:, :, :1])  # stops at the bad blob


def test_blob_of_another_layout_is_rejected():
    other = BlockLayout("float32", (3, 2, 4, 2, 16))
    with pytest.raises(BlobError, match="^shape"):
        decode_into(encode_block(blocks(1)[:, :, 0]), other, memoryview(bytearray(other.num_bytes)))


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_breaker_opens_after_threshold_and_half_opens_after_interval():
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=3, retry_after_s=5.0, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure("boom")
    assert not b.is_open and b.allow()
    b.record_failure("boom")
    assert b.is_open and b.times_opened == 1
    assert not b.allow()
    clock.t += 4.9
    assert not b.allow()
    clock.t += 0.2
    assert b.allow()  # the half-open trial
    assert not b.allow()  # only one trial per interval
    b.record_failure("still down")
    assert b.is_open and not b.allow()
    clock.t += 5.0
    assert b.allow()
    b.record_success()
    assert not b.is_open and b.allow() and b.failures == 0 and b.times_opened == 1


def test_breaker_success_resets_the_failure_count():
    b = CircuitBreaker(failure_threshold=2, retry_after_s=1.0, clock=FakeClock())
    b.record_failure()
    b.record_success()
    b.record_failure()
    assert not b.is_open


def test_breaker_logs_open_and_close(caplog):
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=1, retry_after_s=1.0, clock=clock)
    with caplog.at_level("WARNING", logger="tandem.prefix_store"):
        b.record_failure("ConnectionError")
        clock.t += 1
        assert b.allow()
        b.record_success()
    messages = [r.getMessage() for r in caplog.records]
    assert any("breaker open" in m and "ConnectionError" in m for m in messages)
    assert any("breaker closed" in m for m in messages)


@pytest.mark.parametrize("values, field", [
    ({"url": "http://127.0.0.1:6379"}, "url"),
    ({"url": "redis://user:secret@127.0.0.1:6379"}, "url"),
    ({"url": "redis://127.0.0.1:6379", "ttl_s": 0}, "ttl_s"),
    ({"url": "redis://127.0.0.1:6379", "timeout_s": -1}, "timeout_s"),
    ({"url": "redis://127.0.0.1:6379", "breaker_failures": 0}, "breaker_failures"),
    ({"url": "redis://127.0.0.1:6379", "nope": 1}, "unknown"),
    ({}, "url"),
])
def test_config_errors_name_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        PrefixStoreConfig.from_dict(values)


def test_password_comes_from_file_or_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_REDIS_PASSWORD", "from-env")
    c = PrefixStoreConfig.from_dict({"url": "rediss://tandem@redis.example:6380/0"})
    assert c.password() == "from-env"
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    assert PrefixStoreConfig.from_dict({"url": "redis://127.0.0.1:1", "password_file": str(f)}).password() == "from-file"
    monkeypatch.delenv("TANDEM_REDIS_PASSWORD")
    assert c.password() is None
    client = c.client()  # TLS + ACL user from the URL; connects lazily
    kw = client.connection_pool.connection_kwargs
    assert kw["username"] == "tandem" and kw["port"] == 6380 and client.connection_pool.connection_class.__name__ == \
        "SSLConnection"


def test_app_args_give_the_store_to_prefill_and_unified_only():
    from router.app import parse_args

    pd = parse_args({"mode": "pd", "prefix_store": {"url": "redis://127.0.0.1:6379", "ttl_s": 60}})
    assert pd.workers["prefill"].prefix_store.ttl_s == 60 and pd.workers["decode"].prefix_store is None
    assert parse_args({"prefix_store": {"url": "rediss://u@h:1"}}).workers["unified"].prefix_store.url == "rediss://u@h:1"
    assert parse_args({"prefix_store": None}).workers["unified"].prefix_store is None
    with pytest.raises(ValueError, match="args.prefix_store.url"):
        parse_args({"prefix_store": {"ttl_s": 5}})


def test_tandem_serve_redis_choice(monkeypatch):
    from services.prefix_store import server as srv

    assert srv.redis_for_serve(None, True, "64mb")[:2] == (None, None)
    assert srv.redis_for_serve("rediss://u@h:6380", False, "64mb")[:2] == (None, {"url": "rediss://u@h:6380"})
    started, args, line = srv.redis_for_serve(None, False, "64mb")
    try:
        assert args == {"url": started.url} and started._ping() and f"pid {started.pid}" in line
    finally:
        started.stop()
    assert not started._ping()
    monkeypatch.setattr(srv, "find_redis_server", lambda: None)
    server, args, line = srv.redis_for_serve(None, False, "64mb")
    assert server is None and args is None and "local tier only" in line
