"""deploy/pd.yaml (prefill + decode deployments, KV through the Ray object store)."""

import pytest

from tests.integration.contract import ClusterContract
from tests.integration.helpers import TINY_ENGINE, request, run_concurrently, tokens, wait_all_free, worker_stats


@pytest.fixture(scope="module")
def address(tiny_model):
    with serve_app_pd(tiny_model) as addr:
        yield addr


def serve_app_pd(model):
    from tests.integration.helpers import serve_app

    return serve_app("pd.yaml", model, {"engine": TINY_ENGINE})


class TestPrefillDecode(ClusterContract):
    def test_kv_goes_from_prefill_to_decode(self, address):
        before = {s.role: s for s in worker_stats(address)}
        got = run_concurrently(address, [request(ids=list(range(30, 70)), max_tokens=6, temperature=0)])[0]
        assert len(tokens(got)) == 6
        after = {s.role: s for s in wait_all_free(address)}
        assert set(after) == {"prefill", "decode"}
        assert after["prefill"].num_kv_sent == before["prefill"].num_kv_sent + 1
        assert after["decode"].num_kv_adopted == before["decode"].num_kv_adopted + 1

    def test_one_token_requests_skip_decode(self, address):
        before = {s.role: s for s in worker_stats(address)}
        got = run_concurrently(address, [request(ids=[9, 10, 11], max_tokens=1, temperature=0)])[0]
        assert len(got) == 1 and got[0].finish_reason == "length" and got[0].usage.completion_tokens == 1
        after = {s.role: s for s in worker_stats(address)}
        assert after["prefill"].num_kv_sent == before["prefill"].num_kv_sent
