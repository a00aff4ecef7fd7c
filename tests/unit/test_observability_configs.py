"""deploy/prometheus and deploy/otel-collector: example configs that agree with the code and the chart."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
COLLECTOR = ROOT / "deploy" / "otel-collector" / "config.yaml"
ROUTER_PORT, FIRST_WORKER_PORT, LAST_WORKER_PORT = 9464, 9465, 9496  # the metric contract's ports


def test_prometheus_scrapes_the_contract_ports():
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    local = jobs["tandem-local"]
    ports = [int(t.rsplit(":", 1)[1]) for group in local["static_configs"] for t in group["targets"]]
    assert ports[0] == ROUTER_PORT and all(FIRST_WORKER_PORT <= p <= LAST_WORKER_PORT for p in ports[1:])
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in jobs.values())


def test_prometheus_kubernetes_job_keeps_the_chart_ports():
    import re

    job = {j["job_name"]: j for j in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}["tandem-kubernetes"]
    keep = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    port_regex = keep[("__meta_kubernetes_pod_container_port_name",)]
    # Port names of the chart's Ray pods (helm/tandem/templates/rayservice.yaml).
    for name in ("metrics", "metrics-w0", "metrics-w7"):
        assert re.fullmatch(port_regex, name)
    for name in ("grpc", "gcs-server", "dashboard", "client"):
        assert not re.fullmatch(port_regex, name)
    assert re.fullmatch(keep[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)], "tandem")


def test_collector_receives_otlp_grpc_and_every_pipeline_part_is_defined():
    config = yaml.safe_load(COLLECTOR.read_text())
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    traces = config["service"]["pipelines"]["traces"]
    for section in ("receivers", "processors", "exporters"):
        assert traces[section] and set(traces[section]) <= set(config[section]), section
    assert traces["processors"][0] == "memory_limiter" and traces["processors"][-1] == "batch"
    assert set(config["service"]["extensions"]) <= set(config["extensions"])
