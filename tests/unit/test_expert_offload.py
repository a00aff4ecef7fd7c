"""The offload expert backend's pure parts: Belady's MIN, the eviction policies, the hot-expert
cache's bookkeeping, positional reads from safetensors files, and its config section."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from safetensors.torch import save_file

from services.engine.checkpoint import CheckpointReader
from services.engine.config import EngineConfig
from services.engine.config_parse import ConfigError
from services.engine.model.expert_backends.offload import OffloadOptions, num_slots
from services.engine.model.expert_offload.cache import ExpertCache, replay
from services.engine.model.expert_offload.oracle import belady_hits, oracle_hit_rate
from services.engine.model.expert_offload.policies import LFU, LRU, POLICIES, DecayedFrequency
from services.engine.model.expert_offload.store import OpenFiles, read_tensor_into
from services.engine.model.experts import ExpertSpec

# the textbook reference string (Silberschatz, Operating System Concepts, ch. 9): with 3 frames
# OPT faults 9 times, LRU 12 times
REFERENCE = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]


def test_belady_on_the_textbook_string():
    assert belady_hits(REFERENCE, 3) == 20 - 9
    assert replay([[e] for e in REFERENCE], 3, LRU()) == (20 - 12) / 20
    assert belady_hits(REFERENCE, 1) == 0 and belady_hits([1, 1, 1], 1) == 2 and belady_hits([], 2) == 0
    with pytest.raises(ValueError):
        belady_hits([1], 0)


def _best_hits(uses: list[int], slots: int) -> int:
    """Exhaustive search over every eviction choice (small traces only)."""
    best = 0

    def go(i: int, resident: frozenset, hits: int) -> None:
        nonlocal best
        if i == len(uses):
            best = max(best, hits)
            return
        e = uses[i]
        if e in resident:
            go(i + 1, resident, hits + 1)
        elif len(resident) < slots:
            go(i + 1, resident | {e}, hits)
        else:
            for victim in resident:
                go(i + 1, (resident - {victim}) | {e}, hits)

    go(0, frozenset(), 0)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_belady_is_optimal_and_no_policy_beats_it(seed):
    rng = random.Random(seed)
    slots = rng.randint(1, 3)
    uses = [rng.randrange(5) for _ in range(rng.randint(1, 11))]
    assert belady_hits(uses, slots) == _best_hits(uses, slots)
    steps = [[e] for e in uses]
    for policy in POLICIES.values():
        assert replay(steps, slots, policy()) <= oracle_hit_rate(steps, slots) + 1e-12


def test_policies_pick_their_victims():
    lru, lfu, decay = LRU(), LFU(), DecayedFrequency(decay=0.5)
    for step, e in enumerate([1, 1, 1, 2, 3]):  # 1 often but long ago, then 2, then 3
        for p in (lru, lfu, decay):
            p.use(e, step)
    assert lru.victim([1, 2, 3], 5) == 1  # least recent
    assert lfu.victim([1, 2, 3], 5) == 2  # 2 and 3 used once; 2 less recently
    # decay 0.5: 1 scores (1 + 0.5 + 0.25) * 0.5^3 = 0.22 at step 5, 2 scores 0.25, 3 scores 0.5
    assert decay.victim([1, 2, 3], 5) == 1
    lfu.evicted(1)
    assert lfu.victim([1, 2, 3], 5) == 2  # LFU's counts outlive eviction


class Recorder:
    def __init__(self):
        self.fills: list[list[tuple[int, int]]] = []

    def __call__(self, pairs):
        self.fills.append(list(pairs))


def test_cache_runs_a_step_wider_than_its_slots_in_rounds():
    fill = Recorder()
    cache = ExpertCache(2, expert_bytes=100, policy=LRU(), fill=fill)
    got = list(cache.acquire([0, 1, 2, 3, 4]))
    assert [e for e, _ in got] == [0, 1, 2, 3, 4]
    assert [[e for e, _ in f] for f in fill.fills] == [[0, 1], [2, 3], [4]]  # one fill per round
    assert cache.misses == 5 and cache.hits == 0 and cache.bytes_loaded == 500
    assert sorted(cache.slot_of) == [3, 4] and cache.resident_bytes == 200
    got = list(cache.acquire([1, 4]))  # 4 resident: handed out first, then 1 loaded over 3
    assert got[0] == (4, cache.slot_of[4]) and got[1][0] == 1 and cache.hits == 1
    assert {cache.expert_in[s] for s in cache.expert_in} == {1, 4}
    assert all(cache.slot_of[cache.expert_in[s]] == s for s in cache.expert_in)


def test_an_expert_handed_out_stays_until_the_next_is_asked_for():
    cache = ExpertCache(1, 1, LRU(), fill=lambda pairs: None)
    it = cache.acquire([5, 6])
    assert next(it) == (5, 0) and cache.expert_in[0] == 5
    assert next(it) == (6, 0) and cache.expert_in[0] == 6


def test_prefetch_counts_loads_and_later_hits():
    fill = Recorder()
    cache = ExpertCache(2, 10, LRU(), fill=fill)
    assert cache.prefetch([3, 1, 2]) == 2  # the first two that fit
    assert fill.fills == [[(3, 0), (1, 1)]] and cache.prefetch_loads == 2 and cache.bytes_loaded == 20
    assert cache.prefetch([3]) == 0  # resident already: nothing moves
    list(cache.acquire([1, 2]))
    assert cache.hits == 1 and cache.prefetch_hits == 1 and cache.misses == 1
    list(cache.acquire([1]))
    assert cache.prefetch_hits == 1  # a second use of a prefetched expert is a plain hit
    uses, hits, oracle = cache.window()
    assert (uses, hits) == (3, 2) and oracle == belady_hits([1, 2, 1], 2)


def test_read_tensor_into_copies_the_bytes_of_one_tensor(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(4, 2).to(torch.bfloat16)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    files = OpenFiles()
    with CheckpointReader(tmp_path) as reader:
        a, b = reader.locate("a"), reader.locate("b")
    assert a.shape == (3, 5) and a.dtype == torch.float32 and a.nbytes == 60 and b.dtype == torch.bfloat16
    dst = torch.empty(2, 3, 5)
    read_tensor_into(files.fd(a.file), a, dst[1])  # straight into a slot's memory
    assert torch.equal(dst[1], tensors["a"])
    wide = torch.empty(4, 2)
    read_tensor_into(files.fd(b.file), b, wide)  # bf16 on disk, fp32 slot: converted
    assert torch.equal(wide, tensors["b"].float())
    files.close()


def test_budget_in_bytes_is_split_over_the_moe_layers():
    spec = ExpertSpec(0, num_experts=8, hidden_size=4, intermediate_size=8, dtype=torch.float32, num_moe_layers=3)
    one = 3 * 4 * 8 * 4  # bytes of one fp32 expert
    assert num_slots(OffloadOptions(cache_bytes=3 * one), spec) == 1
    assert num_slots(OffloadOptions(cache_bytes=7 * one), spec) == 2
    assert num_slots(OffloadOptions(cache_bytes=1 << 30), spec) == 8  # never more than the layer has
    assert num_slots(OffloadOptions(resident_fraction=0.25), spec) == 2
    assert num_slots(OffloadOptions(resident_fraction=0.01), spec) == 1
    with pytest.raises(ValueError, match=r"^experts\.cache_bytes: 100 bytes hold no expert per MoE layer"):
        num_slots(OffloadOptions(cache_bytes=100), spec)


P = "args.decode_engine"


@pytest.mark.parametrize("options,message", [
    ({"backend": "offload"}, f"{P}.experts.cache_bytes: set exactly one of cache_bytes or resident_fraction"),
    ({"backend": "offload", "cache_bytes": 1, "resident_fraction": 0.5},
     f"{P}.experts.cache_bytes: set exactly one of cache_bytes or resident_fraction"),
    ({"backend": "offload", "cache_bytes": 0}, f"{P}.experts.cache_bytes: must be >= 1, got 0"),
    ({"backend": "offload", "resident_fraction": 1.5}, f"{P}.experts.resident_fraction: must be in (0, 1], got 1.5"),
    ({"backend": "offload", "cache_bytes": 8, "policy": "mru"}, f"{P}.experts.policy: unknown policy 'mru'"),
    ({"backend": "offload", "cache_bytes": 8, "tier": "disk"}, f"{P}.experts.tier: must be one of"),
    ({"backend": "offload", "cache_bytes": "1G"}, f"{P}.experts.cache_bytes: must be int"),
    ({"backend": "offload", "cache_bytes": 8, "prefetch": "yes"}, f"{P}.experts.prefetch: must be bool"),
])
def test_offload_options_are_checked_with_their_path(options, message):
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_options("m", {"experts": options}, P)
    assert str(info.value).startswith(message), str(info.value)


def test_offload_section_parses_short_and_long_forms():
    short = EngineConfig.from_options("m", {"experts": {"backend": "offload", "resident_fraction": 0.5}})
    long = EngineConfig.from_options("m", {"experts": {"name": "offload", "options": {"resident_fraction": 0.5}}})
    assert short.experts == long.experts
    assert short.experts.options == OffloadOptions(resident_fraction=0.5)
    assert short.experts.options.policy == "decay" and short.experts.options.prefetch is True


def test_serve_args_reach_each_role_and_errors_carry_the_yaml_path(tmp_path):
    from router.app import parse_args
    from services.engine.make_model import make_model

    model = str(make_model("tiny-llama", tmp_path / "m"))
    config = parse_args({"model": model, "mode": "pd",
                         "decode_engine": {"experts": {"backend": "offload", "resident_fraction": 0.25}}})
    assert config.workers["prefill"].engine.experts.name == "local"
    assert config.workers["decode"].engine.experts.options == OffloadOptions(resident_fraction=0.25)
    with pytest.raises(ValueError, match=r"^args\.decode_engine\.experts\.resident_fraction: must be in \(0, 1\]"):
        parse_args({"model": model, "mode": "pd", "decode_engine": {"experts": {"backend": "offload",
                                                                                "resident_fraction": 2.0}}})


def test_expert_counters_are_exported_per_layer_and_backend():
    from prometheus_client import CollectorRegistry

    from services.engine.model.experts import ExpertLayerStats
    from services.telemetry.metrics import EngineCollector, Identity

    layers = [ExpertLayerStats(0, "offload", hits=6, misses=4, prefetch_loads=3, prefetch_hits=2, bytes_loaded=700,
                               resident_bytes=200, capacity_bytes=200, window_uses=10, window_hits=6,
                               window_oracle_hits=8),
              ExpertLayerStats(2, "offload", misses=1)]
    stats = type("Stats", (), {"experts": layers})()
    registry = CollectorRegistry()
    registry.register(EngineCollector(Identity("m", "decode", "d0"), lambda: stats))
    labels = {"model": "m", "role": "decode", "replica": "d0", "backend": "offload"}

    def value(name, layer):
        return registry.get_sample_value(name, dict(labels, layer=str(layer)))

    assert value("tandem_expert_cache_hits_total", 0) == 6 and value("tandem_expert_cache_misses_total", 2) == 1
    assert value("tandem_expert_prefetch_loads_total", 0) == 3 and value("tandem_expert_prefetch_hits_total", 0) == 2
    assert value("tandem_expert_loaded_bytes_total", 0) == 700 and value("tandem_expert_resident_bytes", 0) == 200
    assert value("tandem_expert_cache_capacity_bytes", 0) == 200
    assert value("tandem_expert_window_hit_rate", 0) == 0.6 and value("tandem_expert_window_oracle_hit_rate", 0) == 0.8
    assert value("tandem_expert_window_hit_rate", 2) == 0.0  # no trace yet: 0, not NaN
