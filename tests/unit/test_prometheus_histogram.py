"""bench/prometheus_histogram.py: quantiles from bucket deltas, as PromQL's histogram_quantile."""

import math

import pytest
from prometheus_client import generate_latest

from bench.prometheus_histogram import (HistogramSnapshot, delay_summary, histogram_quantile, parse_histogram)
from bench.serve import parse_args
from services.telemetry.metrics import Identity, RouterMetrics

NAME = "tandem_router_token_delay_seconds"
BUCKETS = {0.001: 2.0, 0.002: 6.0, 0.005: 8.0, math.inf: 10.0}  # 2 in (0, 1ms], 4 in (1, 2], 2 in (2, 5], 2 above


@pytest.mark.parametrize("q,expected", [
    (0.1, 0.0005),  # rank 1 of the 2 in the first bucket, which starts at 0
    (0.5, 0.00175),  # rank 5: 3 of the 4 in (1 ms, 2 ms]
    (0.8, 0.005),  # rank 8: the top of (2 ms, 5 ms]
    (0.9, 0.005),  # rank 9 is in +Inf: the highest finite bound
])
def test_quantile_interpolates_inside_the_bucket(q, expected):
    assert histogram_quantile(q, BUCKETS) == pytest.approx(expected)


def test_quantile_of_nothing_is_none():
    assert histogram_quantile(0.5, {}) is None
    assert histogram_quantile(0.5, {0.001: 0.0, math.inf: 0.0}) is None


def test_window_is_the_difference_of_two_scrapes():
    before = HistogramSnapshot({0.001: 5.0, 0.002: 5.0, math.inf: 5.0}, 0.002, 5.0)  # warm-up: 5 fast messages
    after = HistogramSnapshot({0.001: 5.0, 0.002: 9.0, math.inf: 9.0}, 0.008, 9.0)
    window = after.minus(before)
    assert window.buckets == {0.001: 0.0, 0.002: 4.0, math.inf: 4.0} and window.count == 4
    assert histogram_quantile(0.5, window.buckets) == pytest.approx(0.0015)  # not pulled down by the warm-up
    assert histogram_quantile(0.5, after.buckets) == pytest.approx(0.001 * 4.5 / 5)


def test_parses_the_router_metric_and_sums_its_series():
    text = ""
    for replica in ("r0", "r1"):  # two router replicas: their series add up
        m = RouterMetrics(Identity("m", "router", replica))
        for v in (0.0002, 0.0007, 0.0015, 0.03):
            m.token_delay.observe(v)
        text += generate_latest(m.registry).decode()
    h = parse_histogram(text, NAME)
    assert h.count == 8 and h.sum == pytest.approx(2 * 0.0324)
    assert (h.buckets[0.00025], h.buckets[0.001], h.buckets[0.002], h.buckets[math.inf]) == (2, 4, 6, 8)
    s = delay_summary(h)
    assert s["count"] == 8 and s["mean"] == pytest.approx(0.0324 / 4 * 1000)
    assert s["p50"] == pytest.approx(1.0)  # rank 4 = the top of (0.5 ms, 1 ms]
    assert s["p90"] == pytest.approx(20 + 10 * (7.2 - 6) / 2)  # rank 7.2 in (20 ms, 30 ms]
    assert s["buckets_le_s"]["0.001"] == 4 and s["buckets_le_s"]["+Inf"] == 8
    assert parse_histogram(text, "tandem_no_such_histogram").count == 0
    assert delay_summary(parse_histogram(text, "tandem_no_such_histogram")) is None


def test_delay_and_dwell_are_read_from_one_page():
    m = RouterMetrics(Identity("m", "router", "r0"))
    for delay, dwell in ((0.004, 0.0003), (0.012, 0.0008)):
        m.token_delay.observe(delay)
        m.dwell.observe(dwell)
    text = generate_latest(m.registry).decode()
    delay, dwell = parse_histogram(text, NAME), parse_histogram(text, "tandem_router_dwell_seconds")
    assert delay.count == dwell.count == 2 and dwell.sum == pytest.approx(0.0011) and delay.sum == pytest.approx(0.016)
    assert delay_summary(dwell)["buckets_le_s"]["0.001"] == 2 and delay_summary(delay)["buckets_le_s"]["0.001"] == 0


def test_router_metrics_needs_a_router():
    with pytest.raises(SystemExit):
        parse_args(["--inprocess", "tiny", "--router-metrics", "http://127.0.0.1:9464/metrics"])
    assert parse_args(["--address", "a:1", "--router-metrics", "http://h:9464/metrics"]).router_metrics
