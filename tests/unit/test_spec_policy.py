"""The speculation policy (services/engine/spec_decode/policy.py) on made-up step costs: a fake
clock adds up the durations a cost model gives, and the policy's tokens per second is compared
with speculation always off and always on, over batch sizes and acceptance rates."""

import random

import pytest

from services.engine.config import EngineConfig
from services.engine.config_parse import ConfigError
from services.engine.spec_decode.policy import (Ask, DraftOutcome, PolicyConfig, SpeculationPolicy, StepCost,
                                                bucket_of)

K = 3
MS = 1e-3


def roofline(weights_s: float, row_s: float):
    """Step time of R decode rows on a CPU: reading the weights (memory-bound) or computing the
    rows (compute-bound), whichever is longer, plus a little per row."""
    return lambda rows: max(weights_s, row_s * rows) + 0.02 * MS * rows


class FakeEngine:
    """Runs ``num_decodes`` requests of per-token acceptance ``alphas`` for ``steps`` steps under a
    cost model, with drafts decided by ``mode``: "policy", "off" or "always"."""

    def __init__(self, num_decodes, alphas, step_time, propose_per_pos=0.0, seed=0):
        self.ids = [f"r{i}" for i in range(num_decodes)]
        self.alphas = alphas if isinstance(alphas, list) else [alphas] * num_decodes
        self.step_time, self.propose_per_pos = step_time, propose_per_pos
        self.rng = random.Random(seed)

    def step(self, policy, mode, fixed=()):
        asks = [Ask(rid, K, fixed=rid in fixed) for rid in self.ids]
        ks = policy.plan(asks, len(asks)) if mode == "policy" else [0 if mode == "off" else K] * len(asks)
        tokens, outcomes = 0, []
        for rid, k, alpha in zip(self.ids, ks, self.alphas):
            accepted = 0
            while accepted < k and self.rng.random() < alpha:
                accepted += 1
            tokens += accepted + 1
            if k:
                outcomes.append(DraftOutcome(rid, k, k, accepted))
        drafted = sum(ks)
        step_s, propose_s = self.step_time(len(asks) + drafted), self.propose_per_pos * drafted
        if mode == "policy":
            policy.observe(StepCost(len(asks), drafted, 0, step_s, propose_s, drafted, tuple(outcomes)))
        return tokens, step_s + propose_s, ks

    def rate(self, policy, mode, steps):
        tokens = seconds = 0.0
        for _ in range(steps):
            t, s, _ = self.step(policy, mode)
            tokens, seconds = tokens + t, seconds + s
        return tokens / seconds


def rates(num_decodes, alpha, step_time, steps=1000, **kw):
    return {mode: FakeEngine(num_decodes, alpha, step_time, **kw).rate(SpeculationPolicy(), mode, steps)
            for mode in ("off", "always", "policy")}


CPU = roofline(weights_s=15 * MS, row_s=1.2 * MS)  # memory-bound up to ~12 rows


@pytest.mark.parametrize("num_decodes", [1, 4, 8, 16, 32])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.6, 0.9])
def test_the_policy_is_never_slower_than_either_fixed_choice(num_decodes, alpha):
    r = rates(num_decodes, alpha, CPU)
    assert r["policy"] >= 0.95 * max(r["off"], r["always"]), r


def test_no_collapse_at_a_batch_size_the_gain_fades_smoothly():
    """The vLLM #49548 shape: speculation that doubles batch-1 throughput but loses at batch 32.
    The policy keeps the gain where there is one and never falls below speculation off."""
    ratios = []
    for b in (1, 2, 4, 8, 12, 16, 24, 32, 48):
        r = rates(b, 0.7, CPU)
        assert r["policy"] >= 0.96 * r["off"], (b, r)
        ratios.append(r["policy"] / r["off"])
    assert ratios[0] > 1.6 and ratios[-1] < 1.1
    assert rates(32, 0.7, CPU)["always"] < 0.8 * rates(32, 0.7, CPU)["off"]  # the collapse it avoids


def test_requests_that_accept_keep_speculating_in_a_batch_of_those_that_do_not():
    alphas = [0.95] * 8 + [0.05] * 24
    wide = roofline(weights_s=15 * MS, row_s=0.4 * MS)  # memory-bound up to ~37 rows
    fake = FakeEngine(32, alphas, wide)
    policy = SpeculationPolicy()
    for _ in range(300):
        fake.step(policy, "policy")
    ks = fake.step(policy, "policy")[2]
    assert sum(ks[:8]) > 0 and sum(ks[8:]) == 0, ks
    off, always, chosen = (FakeEngine(32, alphas, wide).rate(SpeculationPolicy(), m, 600)
                           for m in ("off", "always", "policy"))
    assert chosen > 1.05 * max(off, always), (off, always, chosen)


def test_an_expensive_proposer_is_measured_and_turned_off():
    # a draft model costing 20 ms per position at batch 1 (more than the step itself)
    r = rates(1, 0.8, CPU, propose_per_pos=20 * MS)
    assert r["always"] < r["off"] and r["policy"] >= 0.95 * r["off"], r


def test_warm_up_alternates_then_exploration_keeps_estimates_current():
    policy = SpeculationPolicy(PolicyConfig(min_samples=2, explore_min=4, explore_max=16))
    expensive = FakeEngine(32, 0.2, CPU)
    kinds = [bool(sum(expensive.step(policy, "policy")[2])) for _ in range(4)]
    assert kinds == [True, False, True, False]  # warm-up: one draft token each, none, one each, none
    choices = [sum(expensive.step(policy, "policy")[2]) for _ in range(80)]
    explored = [k for k in choices if k]
    assert 0 < len(explored) <= 12 and all(k == 32 for k in explored)  # exploring costs 1 token per request
    # the load changes: rows become cheap and acceptance high; the policy finds out by exploring
    cheap = FakeEngine(32, 0.9, roofline(weights_s=15 * MS, row_s=0.05 * MS))
    choices = [sum(cheap.step(policy, "policy")[2]) for _ in range(60)]
    assert sum(k >= 30 * K for k in choices[-15:]) >= 12  # nearly every request gets k; some steps explore


def test_fixed_requests_always_get_their_limit_and_adaptive_false_asks_everything():
    policy = SpeculationPolicy()
    fake = FakeEngine(32, 0.0, CPU)
    for _ in range(200):
        _, _, ks = fake.step(policy, "policy", fixed={"r3"})
        assert ks[3] == K
    assert sum(ks) == K  # alpha 0 at batch 32: nothing else pays
    always = SpeculationPolicy(PolicyConfig(adaptive=False))
    assert all(fake.step(always, "policy")[2] == [K] * 32 for _ in range(20))


def test_a_request_forgotten_after_release_starts_from_the_global_estimate():
    policy = SpeculationPolicy()
    policy.observe(StepCost(1, 3, 0, 0.01, 0.0, 3, (DraftOutcome("a", 3, 3, 0),)))
    assert policy.acceptance("a")[0] < policy.acceptance()[0]
    policy.release("a")
    assert policy.acceptance("a") == policy.acceptance()
    assert "a" not in policy.requests


def test_a_proposer_that_finds_nothing_lowers_the_fill_rate_not_the_acceptance():
    policy = SpeculationPolicy()
    alpha, phi = policy.acceptance()
    for _ in range(10):
        policy.observe(StepCost(1, 0, 0, 0.01, 0.0, 3, (DraftOutcome("a", 3, 0, 0),)))
    assert policy.acceptance("a")[0] == pytest.approx(alpha) and policy.acceptance("a")[1] < 0.2
    assert policy.acceptance()[1] < phi


def test_catch_up_time_of_a_proposer_after_a_pause_is_not_learned():
    """A draft model asked after a pause runs every token it missed: that time says nothing of
    the cost per position while it keeps up."""
    policy = SpeculationPolicy()
    ask = [Ask("a", K)]
    spec = StepCost(1, K, 0, 0.016, 1.0, K, (DraftOutcome("a", K, K, K),))
    for expect in ([1], [0], [1], [0]):  # warm-up; each drafting step follows one without: not in sync
        assert policy.plan(ask, 1) == expect
        policy.observe(spec if expect[0] else StepCost(1, 0, 0, 0.015, 0.0, 0, ()))
    assert policy.bucket(1).propose_s.n == 0
    assert policy.plan(ask, 1) == [K]  # estimates ready: alpha ~1, rows cheap, proposer cost unknown (0)
    policy.observe(spec)  # after a plain step: the 1 s catch-up is not learned
    assert policy.bucket(1).propose_s.n == 0 and policy.plan(ask, 1) == [K]
    policy.observe(StepCost(1, K, 0, 0.016, 0.003, K, (DraftOutcome("a", K, K, K),)))  # in sync
    assert policy.bucket(1).propose_s.value == pytest.approx(0.001)


def test_prefill_steps_teach_acceptance_but_not_step_times():
    policy = SpeculationPolicy()
    policy.plan([Ask("a", K)], 1)
    policy.observe(StepCost(1, K, 100, 0.5, 0.0, K, (DraftOutcome("a", K, K, 2),)))
    assert policy.bucket(1).spec_s.n == 0 and policy.acceptance("a")[0] > policy.acceptance()[0] * 0.99


def test_buckets_are_about_a_factor_1_4_wide():
    assert [bucket_of(n) for n in (1, 2, 3, 4, 5, 6, 7, 9, 10, 13, 14, 19, 20, 26, 27, 38)] == \
        [0, 2, 3, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10]


def test_adaptive_is_an_option_of_every_method():
    for spec in ({"method": "ngram"}, {"method": "draft_model", "model": "m"}):
        cfg = EngineConfig.from_options("m", {"speculative_config": spec})
        assert cfg.speculative.options.adaptive is True
        off = EngineConfig.from_options("m", {"speculative_config": {**spec, "adaptive": False}})
        assert off.speculative.options.adaptive is False
    with pytest.raises(ConfigError, match=r"speculative_config\.adaptive: must be bool"):
        EngineConfig.from_options("m", {"speculative_config": {"method": "ngram", "adaptive": "yes"}})
