"""helm/tandem: `helm lint` and `helm template` with a real helm binary, every object checked.

RayService against the KubeRay CRD's openAPIV3Schema (tests/data/ray.io_rayservices.yaml,
closed like a strict API server: an unknown field is an error), core objects against their
Kubernetes schemas (kubernetes-validate, strict), and the serveConfigV2 against
deploy/pd.yaml with the same values applied. `make test` installs helm into .tools/bin.
Redis and its Secret: test_helm_redis.py.
"""

from __future__ import annotations

import copy
import json
import re

import kubernetes_validate
import pytest
import yaml

from router.app import parse_args
from router.launcher import load_config
from tests.helm_render import (CHART, ROOT, VALUES, by_kind, custom_resources, env_of, helm, helm_fails,
                               ray_containers, rayservice_validator, render, values_from, values_of)

K8S_VERSION = "1.33.0"  # a version kubernetes-validate ships schemas for
CORE_KINDS = {"Service", "StatefulSet", "Deployment", "Secret", "ConfigMap"}


def expected_serve_config(values: dict, namespace: str = "serving", deploy_file: str = "pd.yaml") -> dict:
    """deploy/pd.yaml (or ``deploy_file``) with what the chart adds on Kubernetes: the router on
    0.0.0.0, Redis's URL in prefix_store, each deployment pinned to its Ray group by a custom resource."""
    redis = values["redis"]
    url = f"redis://tandem-redis.{namespace}.svc:{redis['port']}/0" if redis["enabled"] else redis["external"]["url"]
    groups = values["rayCluster"]["workerGroups"]
    placement = {"Router": "tandem_router", **{g["deployment"]: f"tandem_{name}" for name, g in groups.items()}}
    pd = yaml.safe_load((ROOT / "deploy" / deploy_file).read_text())
    deployments = {d["name"]: {"ray_actor_options": {**d.get("ray_actor_options", {}),
                                                     "resources": {placement[d["name"]]: 1}}}
                   for d in pd["applications"][0]["deployments"]}
    overrides = {"host": "0.0.0.0", "port": values["service"]["grpcPort"]}
    if url:
        overrides["prefix_store"] = {"url": url}
    config = load_config(ROOT / "deploy" / deploy_file, overrides=overrides, deployments=deployments)
    if not url:  # no Redis on the cluster: no Redis tier (a local URL in pd.yaml means nothing there)
        config["applications"][0]["args"].pop("prefix_store", None)
    config["http_options"] = {**config.get("http_options", {}), "host": "0.0.0.0"}
    return config


def by_name(config: dict) -> dict:
    """A Serve config with its applications and deployments keyed by name (order is not meaning)."""
    config = copy.deepcopy(config)
    apps = {}
    for app in config.pop("applications"):
        app["deployments"] = {d["name"]: d for d in app.get("deployments", [])}
        apps[app["name"]] = app
    return {**config, "applications": apps}


def test_helm_is_real():
    assert helm("version", "--short").startswith("v")


@pytest.mark.parametrize("name", VALUES)
def test_lint(name):
    values = VALUES[name]
    out = helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("name", VALUES)
def test_rendered_rayservice_satisfies_the_crd_schema(name):
    (rayservice,) = by_kind(render(name), "RayService")
    errors = sorted(rayservice_validator().iter_errors(rayservice), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:10])
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert rayservice["apiVersion"] == "ray.io/v1" and cluster["enableInTreeAutoscaling"] is True
    assert {g["groupName"] for g in cluster["workerGroupSpecs"]} == {"prefill", "decode"}


def test_crd_schema_rejects_a_typo():
    rayservice = copy.deepcopy(by_kind(render("default"), "RayService")[0])
    rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    messages = [e.message for e in rayservice_validator().iter_errors(rayservice)]
    assert any("enableInTreeAutoscalling" in m for m in messages) and any("'four'" in m for m in messages)


@pytest.mark.parametrize("name", VALUES)
def test_core_objects_satisfy_kubernetes_schemas(name):
    docs = render(name)
    core = [d for d in docs if d["kind"] in CORE_KINDS]
    assert core
    for doc in core:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = {d["kind"] for d in docs}
    assert kinds <= CORE_KINDS | {"RayService", "ServiceMonitor", "PodMonitor"}, kinds


def test_kubernetes_schemas_reject_a_bad_service():
    service = copy.deepcopy(by_kind(render("default"), "Service")[0])
    service["spec"]["ports"][0]["port"] = "fifty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", VALUES)
def test_serve_config_is_pd_yaml_with_the_same_values(name):
    values = values_of(name)
    (rayservice,) = by_kind(render(name), "RayService")
    rendered = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert by_name(rendered) == by_name(expected_serve_config(values))


def test_serve_config_follows_values():
    """Another value combination, applied to pd.yaml the same way, still matches."""
    out = helm("template", "tandem", str(CHART), "--namespace", "serving",
               "--set", "serve.deployments.DecodeWorker.autoscaling_config.max_replicas=7",
               "--set", "rayCluster.workerGroups.decode.maxReplicas=7",
               "--set", "serve.args.decode_engine.max_num_seqs=256", "--set", "service.grpcPort=50100",
               "--set", "redis.enabled=false")
    (rayservice,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "RayService"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    values["service"]["grpcPort"] = 50100
    values["redis"]["enabled"] = False
    expected = by_name(expected_serve_config(values))
    app = expected["applications"]["tandem"]
    app["deployments"]["DecodeWorker"]["autoscaling_config"]["max_replicas"] = 7
    app["args"]["decode_engine"]["max_num_seqs"] = 256
    assert by_name(yaml.safe_load(rayservice["spec"]["serveConfigV2"])) == expected


@pytest.mark.parametrize("name", VALUES)
def test_rendered_app_args_are_accepted_by_the_builder(name):
    (rayservice,) = by_kind(render(name), "RayService")
    args = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]
    config = parse_args(args)
    assert config.mode == "pd" and config.router.host == "0.0.0.0" and config.router.port == 50051
    store = config.workers["prefill"].prefix_store
    values = values_of(name)["redis"]
    assert (store is not None) == bool(values["enabled"] or values["external"]["url"])
    if store is not None:  # the password reaches the worker through the environment only
        assert store.password_env == "TANDEM_REDIS_PASSWORD"  # the env var the chart sets from the Secret


@pytest.mark.parametrize("name", VALUES)
def test_every_deployment_runs_on_its_group(name):
    values = values_of(name)
    (rayservice,) = by_kind(render(name), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    advertised = {"head": custom_resources(cluster["headGroupSpec"])}
    advertised.update({g["groupName"]: custom_resources(g) for g in cluster["workerGroupSpecs"]})
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    for deployment in serve["applications"][0]["deployments"]:
        wanted = deployment["ray_actor_options"]["resources"]
        hosts = [group for group, offered in advertised.items() if set(wanted) <= set(offered)]
        assert len(hosts) == 1, f"{deployment['name']} fits {hosts}"
        expected = "head" if deployment["name"] == "Router" else \
            next(g for g, spec in values["rayCluster"]["workerGroups"].items()
                 if spec["deployment"] == deployment["name"])
        assert hosts == [expected]
    for group in cluster["workerGroupSpecs"]:
        per_pod = values["rayCluster"]["workerGroups"][group["groupName"]]["replicasPerPod"]
        assert custom_resources(group) == {f"tandem_{group['groupName']}": per_pod}
        ports = [p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]]
        assert ports == list(range(9465, 9465 + per_pod))  # one /metrics port per replica








@pytest.mark.parametrize("name", VALUES)
def test_pods_get_metrics_tracing_and_redis_settings(name):
    values = values_of(name)
    docs = render(name)
    (rayservice,) = by_kind(docs, "RayService")
    secrets = {s["metadata"]["name"]: s for s in by_kind(docs, "Secret")}
    otel = values["otel"]
    endpoint = otel["endpoint"] or \
        ("http://tandem-otel-collector.serving.svc:4317" if otel["collector"]["enabled"] else "")
    for group, container in ray_containers(rayservice).items():
        env = env_of(container)
        assert env["TANDEM_METRICS_HOST"]["value"] == "0.0.0.0", group
        if endpoint:
            assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == endpoint
            assert float(env["OTEL_TRACES_SAMPLER_ARG"]["value"]) == otel["samplingRatio"]
            assert env["OTEL_TRACES_SAMPLER"]["value"] == otel["sampler"]
        else:
            assert not any(k.startswith("OTEL_EXPORTER") for k in env), group
        auth = values["redis"]["auth"]
        if values["redis"]["enabled"] or auth["existingSecret"]:
            ref = env["TANDEM_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
            assert ref["key"] == auth["existingSecretPasswordKey"]
            assert ref["name"] == (auth["existingSecret"] or "tandem-redis")
            assert (ref["name"] in secrets) == (not auth["existingSecret"])  # generated, or yours
        else:
            assert "TANDEM_REDIS_PASSWORD" not in env
        for variable in env.values():  # no literal secret in any pod spec
            assert "password" not in variable.get("value", "").lower(), variable


@pytest.mark.parametrize("name", VALUES)
def test_service_exposes_grpc_and_metrics_of_the_head(name):
    (rayservice,) = by_kind(render(name), "RayService")
    (service,) = [s for s in by_kind(render(name), "Service") if s["metadata"]["name"] == "tandem"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == 50051 and ports["metrics"]["port"] == 9464
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert service["spec"]["selector"].items() <= head["metadata"]["labels"].items()
    head_ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    assert head_ports["grpc"] == 50051 and head_ports["metrics"] == 9464


@pytest.mark.parametrize("name", VALUES)
def test_every_router_replica_has_its_metrics_port_on_the_head(name):
    """Routers share the gRPC port on the head; their /metrics: the first on service.metricsPort,
    the others on the worker range from its start (services/telemetry/metrics.py router_ports)."""
    values = values_of(name)
    routers = values["serve"]["deployments"]["Router"]["num_replicas"]
    assert routers == 2  # the default: one router's death loses only its streams
    (rayservice,) = by_kind(render(name), "RayService")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    metrics = {p["name"]: p["containerPort"] for p in head["ports"] if p["name"].startswith("metrics")}
    base = values["metrics"]["workerPortBase"]
    assert metrics == {"metrics": 9464, **{f"metrics-w{i}": base + i for i in range(routers - 1)}}


def test_monitors_are_off_by_default_and_point_at_real_ports():
    assert not [d for d in render("default") if d["kind"] in {"ServiceMonitor", "PodMonitor"}]
    docs = render("monitoring-values")
    (rayservice,) = by_kind(docs, "RayService")
    (service_monitor,) = by_kind(docs, "ServiceMonitor")
    (pod_monitor,) = by_kind(docs, "PodMonitor")
    for monitor in (service_monitor, pod_monitor):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["labels"]["release"]
    (service,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "tandem"]
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service_monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    pod_ports = {p["name"] for c in ray_containers(rayservice).values() for p in c["ports"]}
    endpoint_ports = {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]}
    assert {"metrics", "metrics-w0", "metrics-w1"} <= endpoint_ports <= pod_ports


def test_chart_collector_runs_deploy_otel_collector_config_and_receives_the_pods_spans():
    assert not by_kind(render("default"), "Deployment")
    docs = render("otel-collector-values")
    (deployment,) = by_kind(docs, "Deployment")
    (config,) = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"] == "tandem-otel-collector"]
    assert config["data"]["config.yaml"] == (ROOT / "deploy" / "otel-collector" / "config.yaml").read_text(), \
        "helm/tandem/files/otel-collector.yaml differs from deploy/otel-collector/config.yaml: run `make chart-files`"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert env_of(container)["TRACES_BACKEND_ENDPOINT"]["value"] == "tempo.monitoring:4317"
    needed = set(re.findall(r"\$\{env:(\w+)\}", config["data"]["config.yaml"]))
    assert needed and needed <= set(env_of(container)), f"the collector's config reads {needed}"
    (service,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "tandem-otel-collector"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert {"otlp-grpc": 4317}.items() <= {p["name"]: p["port"] for p in service["spec"]["ports"]}.items()
    (rayservice,) = by_kind(docs, "RayService")
    for container in ray_containers(rayservice).values():
        assert env_of(container)["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://tandem-otel-collector.serving.svc:4317"


@pytest.mark.parametrize("name", VALUES)
def test_dashboard_configmap_carries_deploy_grafana(name):
    (configmap,) = [c for c in by_kind(render(name), "ConfigMap") if c["metadata"]["name"] == "tandem-dashboards"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    sources = {p.name: p.read_text() for p in (ROOT / "deploy" / "grafana").glob("*.json")}
    assert configmap["data"] == sources, "the chart's dashboards/ differ from deploy/grafana: run `make chart-files`"
    for text in configmap["data"].values():
        json.loads(text)




@pytest.mark.parametrize("setting,complaint", [
    ("redis.external.url=redis://user:secret@redis:6379", "/redis/external/url"),  # no password in a URL
    ("otel.samplingRatio=1.5", "/otel/samplingRatio"),
    ("rayCluster.workerGroups.prefill.replicasPerPods=2", "replicasPerPods"),  # a typo is an error
    ("redis.maxmemoryPolicy=noeviction", "/redis/maxmemoryPolicy"),  # a cache must evict
])
def test_values_schema_rejects_bad_values(setting, complaint):
    assert complaint in helm_fails("template", "tandem", str(CHART), "--set", setting)


@pytest.mark.parametrize("settings,complaint", [
    (["serve.deployments.PrefillWorker.autoscaling_config.max_replicas=5"],
     "leaves room for 4 replicas, but PrefillWorker may scale to 5"),
    (["rayCluster.workerGroups.decode.replicasPerPod=2", "rayCluster.workerGroups.decode.maxReplicas=1",
      "serve.deployments.DecodeWorker.autoscaling_config.max_replicas=3"], "DecodeWorker may scale to 3"),
    (["rayCluster.workerGroups.decode.deployment=UnifiedWorker"], "UnifiedWorker has no entry in serve.deployments"),
    (["rayCluster.workerGroups.decode.minReplicas=5"], "minReplicas > maxReplicas"),
])
def test_values_that_could_not_reach_their_replicas_fail_to_render(settings, complaint):
    args = [arg for setting in settings for arg in ("--set", setting)]
    assert complaint in helm_fails("template", "tandem", str(CHART), *args)
    # Room enough: the same settings render once the group may grow.
    if "may scale to" in complaint:
        helm("template", "tandem", str(CHART), *args, "--set", "rayCluster.workerGroups.prefill.maxReplicas=8",
             "--set", "rayCluster.workerGroups.decode.maxReplicas=8")


@pytest.mark.parametrize("name", ["default", "no-redis-values"])
def test_install_notes_render(name):
    values = VALUES[name]
    out = helm("install", "tandem", str(CHART), "--dry-run=client", "--namespace", "serving",
               *(["-f", str(values)] if values else []))
    notes = out.split("NOTES:", 1)[1]
    assert "kubectl -n serving port-forward svc/tandem 50051:50051" in notes
    assert ("StatefulSet tandem-redis" in notes) == (name == "default")




@pytest.mark.parametrize("redis_enabled", [True, False])
def test_prefix_store_options_from_values_keep_the_clusters_url(redis_enabled):
    out = helm("template", "tandem", str(CHART), "--namespace", "serving", "--set", "serve.args.prefix_store.ttl_s=600",
               "--set", f"redis.enabled={str(redis_enabled).lower()}")
    (rayservice,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "RayService"]
    args = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]
    if redis_enabled:
        assert args["prefix_store"] == {"ttl_s": 600, "url": "redis://tandem-redis.serving.svc:6379/0"}
        assert parse_args(args).workers["prefill"].prefix_store.ttl_s == 600
    else:
        assert "prefix_store" not in args


def test_extra_volumes_mounts_and_env_reach_every_ray_pod():
    (rayservice,) = by_kind(render("model-volume-values"), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        assert {v["name"] for v in pod["spec"]["volumes"]} == {"dshm", "models"}
        container = pod["spec"]["containers"][0]
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
        assert env_of(container)["HF_HUB_OFFLINE"]["value"] == "1"


# ---- the optional DraftWorker role (values-spec.yaml: deploy/spec.yaml) ----------------------
SPEC_VALUES = CHART / "values-spec.yaml"


def render_spec() -> list[dict]:
    out = helm("template", "tandem", str(CHART), "--namespace", "serving", "-f", str(SPEC_VALUES))
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_spec_values_lint():
    assert "0 chart(s) failed" in helm("lint", "--strict", str(CHART), "-f", str(SPEC_VALUES))


def test_spec_values_render_spec_yaml_with_the_draft_worker_on_its_own_group(tmp_path):
    values = values_from(SPEC_VALUES)
    (rayservice,) = by_kind(render_spec(), "RayService")
    errors = [e.message for e in rayservice_validator().iter_errors(rayservice)]
    assert not errors, errors[:5]
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode", "draft"}
    assert custom_resources(groups["draft"]) == {"tandem_draft": 1}
    rendered = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert by_name(rendered) == by_name(expected_serve_config(values, deploy_file="spec.yaml"))
    deployments = by_name(rendered)["applications"]["tandem"]["deployments"]
    assert deployments["DraftWorker"]["ray_actor_options"]["resources"] == {"tandem_draft": 1}
    # the builder accepts the rendered args (target and draft: a small checkpoint here)
    from services.engine.make_model import make_model

    model = str(make_model("tiny-llama", tmp_path / "m"))
    args = rendered["applications"][0]["args"]
    args["model"] = model
    args["decode_engine"]["speculative"]["model"] = model
    config = parse_args(args)
    assert set(config.drafts) == {"DraftWorker"} and config.workers["prefill"].engine.speculative is None
    assert config.drafts["DraftWorker"].target == config.workers["decode"].engine


# ---- the optional ExpertWorker shards (values-moe.yaml: deploy/moe.yaml) ----------------------
MOE_VALUES = CHART / "values-moe.yaml"


def render_moe() -> list[dict]:
    out = helm("template", "tandem", str(CHART), "--namespace", "serving", "-f", str(MOE_VALUES))
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_moe_values_lint():
    assert "0 chart(s) failed" in helm("lint", "--strict", str(CHART), "-f", str(MOE_VALUES))


def test_moe_values_render_moe_yaml_with_each_expert_shard_on_its_own_group(tmp_path):
    values = values_from(MOE_VALUES)
    (rayservice,) = by_kind(render_moe(), "RayService")
    errors = [e.message for e in rayservice_validator().iter_errors(rayservice)]
    assert not errors, errors[:5]
    groups = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode", "experts0", "experts1"}
    assert custom_resources(groups["experts1"]) == {"tandem_experts1": 1}
    rendered = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    want = expected_serve_config(values, deploy_file="moe.yaml")
    want["applications"][0]["args"]["model"] = values["serve"]["args"]["model"]  # a mounted checkpoint
    assert by_name(rendered) == by_name(want)
    # the builder accepts the rendered args (a small MoE checkpoint here)
    from services.engine.make_model import make_model

    args = rendered["applications"][0]["args"]
    args["model"] = str(make_model("tiny-moe", tmp_path / "m"))
    config = parse_args(args)
    assert config.workers["decode"].engine.experts.name == "remote"


def test_a_worker_group_must_name_a_role_or_shard_deployment():
    err = helm_fails("template", "tandem", str(CHART), "-f", str(MOE_VALUES),
                     "--set", "rayCluster.workerGroups.experts0.deployment=Expert-Worker")
    assert "/rayCluster/workerGroups/experts0/deployment" in err
