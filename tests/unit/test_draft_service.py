"""The DraftWorker's protocol without Ray or a model: context deltas applied idempotently,
resyncs, releases, the TTL and deadlines (services/draft_service.py), and the engine side's
deltas, acceptance counts, fail-closed calls and batched releases (services/draft_client.py),
with a scripted proposer and an in-process stand-in for the Serve handle."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from services.draft_client import ClientLoop, RemoteDraftProposer
from services.draft_service import DraftService
from services.engine.request import Request
from services.engine.sampling_params import SamplingParams
from services.engine.spec_decode.base import Draft, Proposer
from services.engine.spec_decode.draft_model import DraftModelOptions
from services.types import DraftCall, DraftProposal, DraftReply, DraftSequence
from tests.draft_handles import InProcessHandle

GREEDY = SamplingParams(temperature=0, max_tokens=50)
VOCAB = 100


class NextTokens(Proposer):
    """Proposes (last token + 1, + 2, ...) mod VOCAB; records what it saw and released."""

    num_speculative_tokens = 3

    def __init__(self, probs: bool = False):
        self.seen: list[list[tuple[str, list[int]]]] = []
        self.released: list[str] = []
        self.probs = probs

    def propose(self, requests, max_tokens):
        self.seen.append([(r.request_id, r.token_at(0, r.num_tokens)) for r in requests])
        out = []
        for r, k in zip(requests, max_tokens):
            last = r.token_at(r.num_tokens - 1, r.num_tokens)[0]
            tokens = [(last + j) % VOCAB for j in range(1, k + 1)]
            out.append(Draft(tokens, torch.full((k, VOCAB), 1.0 / VOCAB) if self.probs else None))
        return out

    def release(self, request_id):
        self.released.append(request_id)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def seq(sid="a", start=0, tokens=(1, 2, 3), prompt=2, k=3, params=GREEDY, accepted=0):
    return DraftSequence(sid, start, list(tokens), prompt, accepted, k, params if start == 0 else None)


def service(**kw):
    proposer = NextTokens(**kw)
    clock = Clock()
    return DraftService(proposer, VOCAB, session_ttl_s=10.0, replica_id="r1", clock=clock), proposer, clock


def test_a_new_sequence_gets_a_draft_and_its_context_is_kept():
    svc, proposer, _ = service()
    (reply,) = svc.propose([DraftCall("c", [seq()])])
    assert reply.replica_id == "r1" and reply.proposals == [DraftProposal("a", 3, [4, 5, 6], None)]
    mirror = svc.sessions["c/a"].mirror
    assert mirror.prompt_token_ids == [1, 2] and mirror.output_token_ids == [3]
    # the next delta: the target's tokens since 3 (it accepted 4, then emitted 9)
    (reply,) = svc.propose([DraftCall("c", [seq(start=3, tokens=[4, 9], accepted=1)])])
    assert reply.proposals[0].num_known == 5 and reply.proposals[0].token_ids == [10, 11, 12]
    assert proposer.seen[-1] == [("c/a", [1, 2, 3, 4, 9])] and svc.stats.num_accepted_tokens == 1


def test_a_repeated_delta_changes_nothing_twice():
    svc, proposer, _ = service()
    svc.propose([DraftCall("c", [seq()])])
    delta = seq(start=3, tokens=[4, 9])
    svc.propose([DraftCall("c", [delta])])
    (reply,) = svc.propose([DraftCall("c", [delta])])  # the reply to the first was lost: sent again
    assert reply.proposals[0].num_known == 5 and svc.sessions["c/a"].mirror.token_at(0, 5) == [1, 2, 3, 4, 9]
    # an older start whose overlap matches also applies only what is new
    (reply,) = svc.propose([DraftCall("c", [seq(start=3, tokens=[4, 9, 7])])])
    assert reply.proposals[0].num_known == 6


@pytest.mark.parametrize("delta", [seq(start=5, tokens=[7]),  # a gap: tokens 3..4 were never received
                                   seq(start=2, tokens=[8, 9])])  # the overlap differs from what is held
def test_a_delta_that_does_not_fit_is_a_resync(delta):
    svc, proposer, _ = service()
    svc.propose([DraftCall("c", [seq()])])
    (reply,) = svc.propose([DraftCall("c", [delta])])
    assert reply.proposals == [DraftProposal("a", 0)] and "c/a" not in svc.sessions
    assert proposer.released == ["c/a"] and svc.stats.num_resyncs == 1
    # unknown sequences (a new replica) are a resync too; the whole context then starts over
    (reply,) = svc.propose([DraftCall("c", [seq(start=3, tokens=[4])])])
    assert reply.proposals[0].num_known == 0
    (reply,) = svc.propose([DraftCall("c", [seq(tokens=[1, 2, 3, 4])])])
    assert reply.proposals[0].num_known == 4 and reply.proposals[0].token_ids == [5, 6, 7]


def test_sequences_are_scoped_by_client_and_batched_across_calls():
    svc, proposer, _ = service()
    replies = svc.propose([DraftCall("c1", [seq("a"), seq("b", tokens=[5, 6], prompt=1)]),
                           DraftCall("c2", [seq("a", tokens=[7, 8, 9], k=1)])])
    assert [p.token_ids for p in replies[0].proposals] == [[4, 5, 6], [7, 8, 9]]
    assert [p.token_ids for p in replies[1].proposals] == [[10]]
    assert len(proposer.seen) == 1 and {rid for rid, _ in proposer.seen[0]} == {"c1/a", "c1/b", "c2/a"}


def test_releases_free_and_the_ttl_drops_sequences_nobody_mentions():
    svc, proposer, clock = service()
    svc.propose([DraftCall("c", [seq("a"), seq("b"), seq("x", k=0)])])
    svc.propose([DraftCall("c", [], released=["a", "unknown"])])
    assert set(svc.sessions) == {"c/b", "c/x"} and proposer.released == ["c/a"]
    clock.now = 5.0
    svc.propose([DraftCall("c", [seq("b", start=3, tokens=[4])])])  # b is mentioned, x is not
    clock.now = 12.0
    svc.propose([])
    assert set(svc.sessions) == {"c/b"} and svc.stats.num_expired == 1
    svc.release("c", ["b"])
    assert not svc.sessions and svc.snapshot().num_sequences == 0


def test_a_late_call_keeps_its_context_but_gets_no_tokens():
    svc, proposer, _ = service()
    (reply,) = svc.propose([DraftCall("c", [seq()], deadline=100.0)], now=101.0)
    assert reply.proposals == [DraftProposal("a", 3, [], None)] and not proposer.seen
    assert svc.stats.num_late_calls == 1 and svc.sessions["c/a"].mirror.num_tokens == 3


def test_probabilities_cross_as_float32_arrays():
    svc, _, _ = service(probs=True)
    (reply,) = svc.propose([DraftCall("c", [seq(params=SamplingParams(temperature=0.8, seed=5))])])
    q = reply.proposals[0].probs
    assert isinstance(q, np.ndarray) and q.dtype == np.float32 and q.shape == (3, VOCAB)
    assert svc.sessions["c/a"].mirror.generator is not None  # seeded: draft draws of its own


@pytest.mark.parametrize("bad,field", [(seq(params=None), "params"), (seq(tokens=[1, 500]), "sequences[0].token_ids"),
                                       (seq(prompt=9), "sequences[0].num_prompt_tokens"),
                                       (seq(sid=""), "sequences[0].seq_id")])
def test_bad_deltas_are_refused_naming_the_field(bad, field):
    svc, _, _ = service()
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        svc.propose([DraftCall("c", [bad])])


# ---- the engine's side -------------------------------------------------------------------
class Target:
    class model_config:
        vocab_size = VOCAB


@pytest.fixture(scope="module")
def loop():
    return ClientLoop()


def client(loop, svc, timeout_s=1.0, retry_s=0.5):
    handle = InProcessHandle(svc)
    options = DraftModelOptions(model="x", deployment="D", deployment_timeout_s=timeout_s, deployment_retry_s=retry_s)
    return RemoteDraftProposer(handle, options, Target, "c", loop=loop), handle


def request(rid="a", prompt=(1, 2), out=(3,)):
    req = Request(rid, list(prompt), GREEDY)
    req.output_token_ids = list(out)
    return req


def test_the_client_sends_deltas_and_counts_what_the_target_accepted(loop):
    svc, proposer, _ = service()
    remote, handle = client(loop, svc)
    req = request()
    (draft,) = remote.propose([req], [3])
    assert draft.token_ids == [4, 5, 6] and handle.propose.calls[-1][1]["route"].replica_id == ""
    req.output_token_ids += [4, 5, 9]  # two accepted, then the target's own token
    (draft,) = remote.propose([req], [2])
    call = handle.propose.calls[-1][0][0]
    assert call.sequences == [DraftSequence("a", 3, [4, 5, 9], 2, 2, 2, None)]
    assert handle.propose.calls[-1][1]["route"].replica_id == "r1"  # its sequences are there now
    assert draft.token_ids == [10, 11] and svc.stats.num_accepted_tokens == 2


def test_a_slow_draft_worker_means_steps_without_drafts_then_a_pause(loop):
    svc, _, _ = service()
    remote, handle = client(loop, svc, timeout_s=0.05, retry_s=1.0)
    req = request()
    handle.delay_s = 3.0
    t0 = time.monotonic()
    assert remote.propose([req], [3]) == [Draft([])]
    assert time.monotonic() - t0 < 1.5 and remote.stats.num_timeouts == 1  # it did not wait for the answer
    handle.delay_s = 0.0
    assert remote.propose([req], [3]) == [Draft([])] and remote.stats.num_skipped_steps == 1  # pausing
    time.sleep(1.05)
    assert remote.propose([req], [3])[0].token_ids == [4, 5, 6]  # the whole context (the cancelled call never ran)


def test_a_dead_draft_worker_fails_closed_and_a_new_one_gets_whole_contexts(loop):
    svc, _, _ = service()
    remote, handle = client(loop, svc, retry_s=0.05)
    req = request()
    remote.propose([req], [3])
    handle.error = RuntimeError("The actor died unexpectedly")
    assert remote.propose([req], [3]) == [Draft([])] and remote.stats.num_errors == 1
    assert remote.replica_id == ""  # Serve may choose any live replica next
    handle.error, handle.svc = None, service()[0]  # the replacement replica holds nothing
    time.sleep(0.06)
    req.output_token_ids.append(7)
    assert remote.propose([req], [3]) == [Draft([])]  # it answers num_known=0 ...
    (draft,) = remote.propose([req], [3])  # ... and the next call sends the whole context
    assert handle.propose.calls[-1][0][0].sequences[0].start == 0 and draft.token_ids == [8, 9, 10]


@pytest.mark.parametrize("proposal", [DraftProposal("a", 3, [4, 5, 6, 7]), DraftProposal("a", 3, [4, 500]),
                                      DraftProposal("a", 3, [4], np.ones((2, VOCAB), np.float32)),
                                      DraftProposal("a", 3, [4], np.full((1, VOCAB), np.nan, np.float32))])
def test_malformed_proposals_are_no_drafts(loop, proposal):
    remote, _ = client(loop, service()[0])
    assert remote._drafts([request()], [3], DraftReply("r", [proposal])) == [Draft([])]
    with pytest.raises(ValueError):
        remote._drafts([request()], [3], DraftReply("r", [DraftProposal("b", 3, [4])]))


def test_releases_are_batched_and_carried_by_the_next_call(loop):
    svc, proposer, _ = service()
    remote, handle = client(loop, svc)
    reqs = [request(rid) for rid in "abc"]
    remote.propose(reqs, [3, 3, 3])
    remote.release("a")
    remote.release("b")
    remote.release("never-sent")
    remote.propose([reqs[2]], [3])  # carries a and b
    assert handle.propose.calls[-1][0][0].released == ["a", "b"] and set(svc.sessions) == {"c/c"}
    remote.release("c")  # no call follows: released on its own, shortly
    end = time.monotonic() + 2
    while svc.sessions and time.monotonic() < end:
        time.sleep(0.01)
    assert not svc.sessions and len(handle.release.calls) == 1
