"""Writes the Grafana dashboard deploy/grafana/tandem.json and the Helm chart's copy.

The queries are written here, once, as code: edit this file and run `make chart-files`
(or `python deploy/grafana/generate.py`). tests/unit/test_dashboards.py fails when the
committed JSON differs from what this file writes, or uses a metric name outside the
metric contract (services/telemetry).

Layout: rows for the fleet (latency SLOs, throughput, queueing, KV and prefix cache, KV
transfer, speculative decoding, MoE experts, errors), then one collapsed row per role (router, prefill, decode, unified).
Variables: datasource (any Prometheus), model, role, replica; every query filters on them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGETS = (ROOT / "deploy" / "grafana" / "tandem.json", ROOT / "helm" / "tandem" / "dashboards" / "tandem.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "[$__rate_interval]"
QUANTILES = (0.5, 0.9, 0.99)


# gRPC codes that say the client gave up or asked wrongly, not that the server failed.
CLIENT_CODES = "CANCELLED|INVALID_ARGUMENT|NOT_FOUND|OUT_OF_RANGE"


def sel(role: str | None = None, extra: str = "") -> str:
    """The label matchers of every query; ``role`` pins a role-row's queries to one role."""
    role_matcher = f'role="{role}"' if role else 'role=~"$role"'
    return f'{{model=~"$model", {role_matcher}, replica=~"$replica"{", " + extra if extra else ""}}}'


def rate(metric: str, role: str | None = None, by: str = "", extra: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{sel(role, extra)}{RATE}))"


def quantiles(histogram: str, role: str | None = None, by: str = "") -> list[tuple[str, str]]:
    """(expr, legend) per quantile of a histogram, optionally split by a label."""
    keys = f"le, {by}" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return [(f"histogram_quantile({q}, sum by ({keys}) (rate({histogram}_bucket{sel(role)}{RATE})))",
             f"{prefix}p{round(q * 100)}") for q in QUANTILES]


class Layout:
    """Places panels left to right, 24 columns wide, and numbers them."""

    def __init__(self):
        self.panels: list[dict] = []
        self.next_id = 1
        self.x = self.y = 0
        self.row: dict | None = None  # a collapsed row collects its panels

    def add_row(self, title: str, collapsed: bool = False) -> None:
        self._newline()
        row = {"type": "row", "title": title, "id": self._id(), "collapsed": collapsed, "panels": [],
               "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}}
        self.panels.append(row)
        self.row = row if collapsed else None
        self.y += 1

    def add(self, title: str, targets: list[tuple[str, str]], unit: str = "short", width: int = 8,
            kind: str = "timeseries", description: str = "", **options) -> None:
        if self.x + width > 24:
            self._newline()
        panel = {
            "type": kind, "title": title, "id": self._id(), "datasource": DATASOURCE, "description": description,
            "gridPos": {"h": 8, "w": width, "x": self.x, "y": self.y},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
                         "range": True} for i, (expr, legend) in enumerate(targets)],
            "fieldConfig": {"defaults": {"unit": unit, **options.pop("defaults", {})}, "overrides": []},
            "options": options or {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                                   "tooltip": {"mode": "multi", "sort": "desc"}},
        }
        (self.row["panels"] if self.row else self.panels).append(panel)
        self.x += width

    def _newline(self) -> None:
        if self.x:
            self.x, self.y = 0, self.y + 8

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def fleet_rows(d: Layout) -> None:
    d.add_row("Latency SLOs")
    d.add("Time to first token", quantiles("tandem_time_to_first_token_seconds"), "s", width=6,
          description="Router: request arrival to the first streamed token.")
    d.add("Inter-token latency", quantiles("tandem_inter_token_latency_seconds"), "s", width=6,
          description="Router: time between consecutive streamed tokens.")
    d.add("End-to-end latency", quantiles("tandem_e2e_request_latency_seconds"), "s", width=6,
          description="Router: request arrival to the last token.")
    delay = [(expr, f"delay {legend}") for expr, legend in quantiles("tandem_router_token_delay_seconds")]
    dwell = [(expr, f"dwell {legend}") for expr, legend in quantiles("tandem_router_dwell_seconds")]
    d.add("Router token delay and dwell", delay + dwell, "s", width=6,
          description="Per message with tokens. Delay: engine output to the response message handed to the "
                      "client's gRPC stream (worker event loop, Ray streaming transport, router demux and "
                      "encoding). Dwell: the router's own share, arrival at the router to the same hand-off "
                      "(demux, inbox wait, encoding; queueing on the router's event loop included).")

    d.add_row("Throughput")
    d.add("Tokens / s", [(rate("tandem_prompt_tokens_total"), "prompt"),
                         (rate("tandem_generation_tokens_total"), "generation")], "short")
    d.add("Requests / s by finish reason",
          [(rate("tandem_requests_finished_total", by="finish_reason"), "{{finish_reason}}")], "reqps")
    d.add("Requests in flight (router)", [(f"sum by (replica) (tandem_requests_inflight{sel()})", "{{replica}}")])

    d.add_row("Queueing")
    d.add("Queue time (arrival in engine to first scheduled)",
          quantiles("tandem_request_queue_time_seconds", by="role"), "s")
    d.add("Running requests", [(f"sum by (role) (tandem_requests_running{sel()})", "{{role}}")])
    d.add("Waiting requests", [(f"sum by (role) (tandem_requests_waiting{sel()})", "{{role}}")])

    d.add_row("KV and prefix cache")
    d.add("KV blocks used / total", [(f"sum by (role) (tandem_kv_blocks_used{sel()})", "{{role}} used"),
                                     (f"sum by (role) (tandem_kv_blocks_total{sel()})", "{{role}} total")])
    d.add("KV cache usage by replica",
          [(f"sum by (role, replica) (tandem_kv_blocks_used{sel()}) / sum by (role, replica) "
            f"(tandem_kv_blocks_total{sel()})", "{{role}} {{replica}}")], "percentunit", defaults={"max": 1, "min": 0})
    d.add("Prefix cache hit rate by tier",
          [(f"{rate('tandem_prefix_cache_hits_total', by='tier')} / {rate('tandem_prefix_cache_queries_total', by='tier')}",
            "{{tier}}")], "percentunit", defaults={"max": 1, "min": 0},
          description="Prompt tokens served / prompt tokens looked up, per tier (redis is asked for what local missed).")
    d.add("Prompt tokens served from cache / s", [(rate("tandem_prefix_cache_hits_total", by="tier"), "{{tier}}")])
    d.add("Corrupt blobs and Redis errors / s", [(rate("tandem_prefix_cache_corrupt_blobs_total"), "corrupt blobs"),
                                                 (rate("tandem_redis_errors_total", by="op"), "redis error: {{op}}")],
          "short", description="A corrupt blob is a miss and is deleted; Redis errors never fail a request.")
    d.add("Redis circuit breaker", [(f"max by (role, replica) (tandem_redis_breaker_open{sel()})", "{{role}} {{replica}}")],
          kind="state-timeline", description="Open (1): the replica has stopped asking Redis for a while.",
          defaults={"mappings": [{"type": "value", "options": {"0": {"text": "closed", "color": "green"},
                                                              "1": {"text": "open", "color": "red"}}}],
                    "color": {"mode": "thresholds"},
                    "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None},
                                                                 {"color": "red", "value": 1}]}},
          showValue="never", legend={"displayMode": "list", "placement": "bottom", "showLegend": True})

    d.add_row("KV transfer (prefill to decode)")
    d.add("KV transfer bytes / s", [(rate("tandem_kv_transfer_bytes_total", by="direction"), "{{direction}}")], "Bps")
    d.add("KV transfer time", quantiles("tandem_kv_transfer_seconds", by="direction"), "s")
    d.add("KV transfers / s", [(rate("tandem_kv_transfer_seconds_count", by="direction"), "{{direction}}")], "ops")

    spec_rows(d)
    expert_rows(d)

    d.add_row("Errors")
    d.add("Failed requests / s by status code", [(rate("tandem_requests_failed_total", by="code"), "{{code}}")],
          "reqps", width=12)
    ended = f"({rate('tandem_requests_failed_total')} + {rate('tandem_requests_finished_total')})"
    server_codes = f'code!~"{CLIENT_CODES}"'
    d.add("Failed fraction", [(f"{rate('tandem_requests_failed_total')} / {ended}", "failed (any code)"),
                              (f"{rate('tandem_requests_failed_total', extra=server_codes)} / {ended}",
                               "server errors")],
          "percentunit", width=12, defaults={"min": 0},
          description="Requests ended with a non-OK status / requests ended. Server errors leave out "
                      f"{CLIENT_CODES.replace('|', ', ')} (the client's doing).")
    d.add("Migrated streams / s by reason", [(rate("tandem_migrations_total", by="reason"), "{{reason}}")],
          "reqps", width=24, description="Streams the router moved to another worker replica after theirs died "
                                         "(replica_died) or their hand-off KV was lost (kv_lost); the client saw "
                                         "no error (router/migration.py).")


def spec_rows(d: Layout) -> None:
    drafts, tokens = rate("tandem_spec_decode_num_drafts_total"), rate("tandem_spec_decode_num_draft_tokens_total")
    accepted = rate("tandem_spec_decode_num_accepted_tokens_total")
    d.add_row("Speculative decoding")
    d.add("Draft acceptance rate", [(f"{accepted} / {tokens}", "accepted / proposed")], "percentunit", width=6,
          defaults={"max": 1, "min": 0}, description="Draft tokens accepted by the verifier / draft tokens verified.")
    d.add("Mean acceptance length", [(f"1 + {accepted} / {drafts}", "tokens per verification")], "short", width=6,
          description="Tokens a verified draft yields on average: the accepted drafts plus the target's own token.")
    d.add("Acceptance rate by draft position",
          [(f"{rate('tandem_spec_decode_num_accepted_tokens_per_pos_total', by='position')} / on () group_left "
            f"{drafts}", "position {{position}}")], "percentunit", width=6, defaults={"max": 1, "min": 0},
          description="Drafts whose token at this position was accepted / drafts verified.")
    d.add("Share of output from drafts", [(f"{accepted} / {rate('tandem_generation_tokens_total')}", "from drafts")],
          "percentunit", width=6, defaults={"max": 1, "min": 0},
          description="Accepted draft tokens / generated tokens (the rest cost one target step each).")
    calls = rate("tandem_spec_decode_draft_worker_calls_total")
    d.add("DraftWorker calls / s and failures by reason",
          [(calls, "calls"), (rate("tandem_spec_decode_draft_worker_failures_total", by="reason"), "failed: {{reason}}")],
          "reqps", width=8, description="Engine calls to the DraftWorker deployment (one per step that asked for "
          "drafts) and those that got none: timeout, unavailable (replica dead or unreachable), error.")
    d.add("DraftWorker round trip (mean)", [(f"{rate('tandem_spec_decode_draft_worker_call_seconds_total')} / {calls}",
                                             "answered calls")], "s", width=8,
          description="Call to answer of the answered DraftWorker calls, as the engine waits for them.")
    d.add("Steps without drafts because of the DraftWorker",
          [(f"{rate('tandem_spec_decode_draft_worker_steps_without_drafts_total')} / {calls}", "per call")],
          "percentunit", width=8, defaults={"min": 0},
          description="Steps that wanted drafts and ran without speculation (a failed call or the pause after one) "
          "/ DraftWorker calls.")


def expert_rows(d: Layout) -> None:
    hits, misses = rate("tandem_expert_cache_hits_total"), rate("tandem_expert_cache_misses_total")
    by_layer = "avg by (layer) ({m}{s})"
    d.add_row("MoE experts")
    d.add("Expert cache hit rate", [(f"{hits} / ({hits} + {misses})", "hit rate")], "percentunit", width=6,
          defaults={"max": 1, "min": 0}, description="Expert uses served from resident weights / all expert uses "
          "(offload backend; prefetched experts count as hits).")
    d.add("Hit rate vs oracle by layer",
          [(by_layer.format(m="tandem_expert_window_hit_rate", s=sel()), "layer {{layer}} realised"),
           (by_layer.format(m="tandem_expert_window_oracle_hit_rate", s=sel()), "layer {{layer}} Belady")],
          "percentunit", width=6, defaults={"max": 1, "min": 0},
          description="Over the last recorded routing trace: realised hit rate and Belady's MIN on the same trace "
          "with the same slots (averaged over the selected replicas).")
    d.add("Expert bytes loaded / s", [(rate("tandem_expert_loaded_bytes_total"), "loaded")], "Bps", width=6,
          description="Expert weights copied in from the slower tier (misses and prefetches).")
    prefetch = rate("tandem_expert_prefetch_hits_total")
    d.add("Prefetch", [(f"{prefetch} / {rate('tandem_expert_prefetch_loads_total')}", "useful prefetches"),
                       (f"sum(tandem_expert_resident_bytes{sel()}) / sum(tandem_expert_cache_capacity_bytes{sel()})",
                        "cache filled")], "percentunit", width=6, defaults={"max": 1, "min": 0},
          description="Prefetched experts used before eviction / prefetched; resident expert bytes / budget.")
    d.add("Remote expert call latency by shard",
          [(f"histogram_quantile({q}, sum by (le, shard) (rate(tandem_expert_remote_call_seconds_bucket{sel()}{RATE})))",
            f"shard {{{{shard}}}} p{round(q * 100)}") for q in (0.5, 0.99)], "s", width=12,
          description="One ExpertWorker shard call of a MoE layer's step, as the calling worker measured it "
          "(handle round trip: transport + the shard's compute; remote backend).")
    d.add("Remote expert call failures / s by shard",
          [(rate("tandem_expert_remote_call_failures_total", by="shard"), "shard {{shard}}")], "ops", width=12,
          description="Shard calls that failed or were not answered within call_timeout_s: each failed the "
          "requests of its step with UNAVAILABLE.")


def role_rows(d: Layout) -> None:
    d.add_row("Role: router", collapsed=True)
    d.add("In flight by replica", [(f"sum by (replica) (tandem_requests_inflight{sel('router')})", "{{replica}}")])
    d.add("Finished / s by replica",
          [(rate("tandem_requests_finished_total", "router", by="replica"), "{{replica}}")], "reqps")
    d.add("TTFT p99 by replica", [(f"histogram_quantile(0.99, sum by (le, replica) (rate("
                                   f"tandem_time_to_first_token_seconds_bucket{sel('router')}{RATE})))",
                                   "{{replica}}")], "s")
    for role in ("prefill", "decode", "unified"):
        d.add_row(f"Role: {role}", collapsed=True)
        d.add("Running / waiting by replica",
              [(f"sum by (replica) (tandem_requests_running{sel(role)})", "{{replica}} running"),
               (f"sum by (replica) (tandem_requests_waiting{sel(role)})", "{{replica}} waiting")])
        d.add("Queue time p99 by replica",
              [(f"histogram_quantile(0.99, sum by (le, replica) (rate("
                f"tandem_request_queue_time_seconds_bucket{sel(role)}{RATE})))", "{{replica}}")], "s")
        d.add("KV cache usage by replica",
              [(f"sum by (replica) (tandem_kv_blocks_used{sel(role)}) / sum by (replica) "
                f"(tandem_kv_blocks_total{sel(role)})", "{{replica}}")], "percentunit", defaults={"max": 1, "min": 0})
        if role in ("prefill", "unified"):
            d.add("Prefix cache hits / s by replica and tier",
                  [(rate("tandem_prefix_cache_hits_total", role, by="replica, tier"), "{{replica}} {{tier}}")])
        if role in ("prefill", "decode"):
            d.add("KV transfer bytes / s by replica",
                  [(rate("tandem_kv_transfer_bytes_total", role, by="replica, direction"),
                    "{{replica}} {{direction}}")], "Bps")


def variables() -> list[dict]:
    def query_var(name: str, query: str, regex: str = "") -> dict:
        return {"name": name, "label": name, "type": "query", "datasource": DATASOURCE, "query":
                {"query": query, "refId": f"{name}-var"}, "definition": query, "regex": regex, "refresh": 2,
                "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
                "sort": 1}

    roles = ["router", "prefill", "decode", "unified"]
    return [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "refresh": 1, "hide": 0},
        query_var("model", "label_values(tandem_requests_inflight, model)"),
        {"name": "role", "label": "role", "type": "custom", "query": ",".join(roles), "includeAll": True,
         "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
         "options": [{"text": r, "value": r, "selected": False} for r in roles]},
        query_var("replica", 'query_result(count by (replica) (tandem_requests_inflight{model=~"$model", role=~"$role"}) '
                  'or count by (replica) (tandem_kv_blocks_total{model=~"$model", role=~"$role"}))',
                  regex='/replica="([^"]+)"/'),
    ]


def dashboard() -> dict:
    d = Layout()
    fleet_rows(d)
    role_rows(d)
    return {
        "uid": "tandem-overview", "title": "Tandem: LLM serving", "tags": ["tandem", "llm", "ray-serve"],
        "description": "Tandem router and workers: latency SLOs, throughput, queueing, KV and prefix cache, "
                       "KV transfer, errors; one row per role.",
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"}, "timezone": "browser", "fiscalYearStartMonth": 0,
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": variables()},
        "links": [], "panels": d.panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    text = render()
    for path in TARGETS:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
