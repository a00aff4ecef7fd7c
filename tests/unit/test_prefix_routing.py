"""The prefix-aware replica choice (router/prefix_routing.py): pure logic, no Ray."""

import pytest

from router.prefix_routing import (BalanceConfig, ReplicaView, block_key, choose_replica, least_loaded,
                                   matched_blocks, pack_keys, unpack_keys)
from services.engine.kv_cache import block_hash_chain, hash_seed

SEED = hash_seed("fp", "float32", 16)
PROMPT = list(range(100, 100 + 16 * 6 + 5))  # 6 full blocks + 5 tokens
KEYS = [block_key(h) for h in block_hash_chain(SEED, PROMPT, 16)]


def view(rid, load=0, blocks=0, inflight=None, keys=KEYS):
    return ReplicaView(rid, inflight=load if inflight is None else inflight, reported_load=load,
                       cached_keys=frozenset(keys[:blocks]))


def test_keys_round_trip_and_stop_at_first_miss():
    hashes = block_hash_chain(SEED, PROMPT, 16)
    assert len(hashes) == 6
    assert unpack_keys(pack_keys(hashes, limit=4)) == frozenset(KEYS[:4])
    assert matched_blocks(KEYS, frozenset(KEYS[:3])) == 3
    assert matched_blocks(KEYS, frozenset(KEYS[1:])) == 0  # a chain without its first block matches nothing
    other_model = [block_key(h) for h in block_hash_chain(hash_seed("other", "float32", 16), PROMPT, 16)]
    assert matched_blocks(other_model, frozenset(KEYS)) == 0


def test_longest_prefix_wins_when_loads_are_balanced():
    choice = choose_replica([view("a", 2, 1), view("b", 3, 5), view("c", 1, 0)], KEYS)
    assert (choice.replica_id, choice.matched_blocks, choice.reason) == ("b", 5, "prefix")


def test_prefix_blind_config_picks_by_load_only():
    choice = choose_replica([view("a", 2, 1), view("b", 3, 5), view("c", 1, 0)], KEYS, BalanceConfig(prefix_aware=False))
    assert (choice.replica_id, choice.matched_blocks, choice.reason) == ("c", 0, "load")


def test_equal_prefix_goes_to_the_lower_load():
    assert choose_replica([view("a", 4, 6), view("b", 1, 6)], KEYS).replica_id == "b"


def test_far_busier_replica_loses_to_a_cold_idle_one():
    cfg = BalanceConfig(abs_slack=8, rel_slack=1.5)
    choice = choose_replica([view("hot", 30, 6), view("cold", 0, 0)], KEYS, cfg)
    assert (choice.replica_id, choice.reason) == ("cold", "load")
    # within the slack the prefix still wins
    assert choose_replica([view("hot", 8, 6), view("cold", 0, 0)], KEYS, cfg).replica_id == "hot"
    # relative slack: 14 <= 10 * 1.5 although 14 > 10 + 2
    cfg2 = BalanceConfig(abs_slack=2, rel_slack=1.5)
    assert choose_replica([view("hot", 14, 6), view("cold", 10, 0)], KEYS, cfg2).replica_id == "hot"
    assert choose_replica([view("hot", 16, 6), view("cold", 10, 0)], KEYS, cfg2).replica_id == "cold"


def test_load_is_the_larger_of_own_inflight_and_reported():
    # the replica reported itself idle at its last interval, but this router just sent it 20 requests
    busy = ReplicaView("a", inflight=20, reported_load=0, cached_keys=frozenset(KEYS))
    assert busy.load == 20
    assert choose_replica([busy, view("b", 0, 0)], KEYS).replica_id == "b"
    # another router keeps it busy: its report counts although this router sent it nothing
    assert ReplicaView("a", inflight=0, reported_load=12).load == 12


def test_no_match_is_least_load_and_rotation_spreads_ties():
    views = [view("a", 0, 0), view("b", 0, 0), view("c", 0, 0)]
    picks = {choose_replica(views, KEYS, rotation=i).replica_id for i in range(3)}
    assert picks == {"a", "b", "c"}
    assert least_loaded([view("a", 3), view("b", 1), view("c", 2)]) == "b"


def test_no_replicas_is_an_error():
    with pytest.raises(ValueError):
        choose_replica([], KEYS)
