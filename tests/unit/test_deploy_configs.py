"""deploy/*.yaml are valid Serve configs whose app args our builder accepts (no Ray started)."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from router.app import parse_args
from router.launcher import load_config
from services.engine.make_model import make_model

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(make_model("tiny-llama", tmp_path_factory.mktemp("m")))


@pytest.mark.parametrize("name,mode,roles", [("local.yaml", "unified", {"unified"}),
                                             ("pd.yaml", "pd", {"prefill", "decode"})])
def test_deploy_yaml_is_a_serve_config_our_builder_accepts(name, mode, roles, model):
    raw = yaml.safe_load((DEPLOY / name).read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "router.app:build_app" and schema.proxy_location.value == "Disabled"
    config = parse_args(load_config(DEPLOY / name, model=model, port=50099)["applications"][0]["args"])
    assert config.mode == mode and set(config.workers) == roles
    assert config.router.host == "127.0.0.1" and config.router.port == 50099
    if mode == "pd":
        names = {d.name: d for d in app.deployments}
        assert names["PrefillWorker"].autoscaling_config and names["DecodeWorker"].autoscaling_config


def test_bad_args_are_named(model):
    with pytest.raises(ValueError, match="args.mode"):
        parse_args({"model": model, "mode": "x"})
    with pytest.raises(ValueError, match="args.engine"):
        parse_args({"model": model, "engine": {"nope": 1}})
    with pytest.raises(ValueError, match="args.model"):
        parse_args({"model": "/nonexistent"})
    with pytest.raises(ValueError, match="unknown key"):
        parse_args({"model": model, "typo": 1})


def test_deployment_overrides_merge(model):
    config = load_config(DEPLOY / "pd.yaml", model=model, overrides={"engine": {"num_kv_blocks": 8}},
                         deployments={"DecodeWorker": {"autoscaling_config": {"max_replicas": 3}},
                                      "Extra": {"num_replicas": 1}})
    app = config["applications"][0]
    assert app["args"]["engine"]["num_kv_blocks"] == 8 and app["args"]["engine"]["kv_cache_memory_gb"] == 1.0
    decode = next(d for d in app["deployments"] if d["name"] == "DecodeWorker")
    assert decode["autoscaling_config"]["max_replicas"] == 3 and decode["autoscaling_config"]["min_replicas"] == 1


def test_torch_threads_per_role(model):
    both = parse_args({"model": model, "mode": "pd", "torch_threads": 2})
    assert both.workers["prefill"].torch_threads == 2 and both.workers["decode"].torch_threads == 2
    split = parse_args({"model": model, "mode": "pd", "torch_threads": {"prefill": 1}})
    assert split.workers["prefill"].torch_threads == 1 and split.workers["decode"].torch_threads is None
    assert parse_args({"model": model}).workers["unified"].torch_threads is None
    with pytest.raises(ValueError, match="args.torch_threads: unknown role"):
        parse_args({"model": model, "mode": "unified", "torch_threads": {"decode": 1}})
    with pytest.raises(ValueError, match="args.torch_threads: must be a positive integer"):
        parse_args({"model": model, "mode": "pd", "torch_threads": {"decode": 0}})


def spec_args(target, **speculative):
    section = {"method": "draft_model", "model": target, "deployment": "DraftWorker", **speculative}
    return load_config(DEPLOY / "spec.yaml", model=target, port=50099,
                       overrides={"decode_engine": {"speculative": section}})["applications"][0]["args"]


def test_spec_yaml_deploys_a_draft_worker_for_the_decode_engine(model):
    raw = yaml.safe_load((DEPLOY / "spec.yaml").read_text())
    (app,) = ServeDeploySchema.model_validate(raw).applications
    assert {d.name for d in app.deployments} == {"Router", "PrefillWorker", "DecodeWorker", "DraftWorker"}
    assert raw["applications"][0]["args"]["decode_engine"]["speculative"]["deployment"] == "DraftWorker"
    config = parse_args(spec_args(model, deployment_timeout_s=0.25))
    draft = config.drafts["DraftWorker"]
    assert draft.target == config.workers["decode"].engine and draft.draft.deployment_timeout_s == 0.25
    assert draft.session_ttl_s == 60 and config.workers["prefill"].engine.speculative is None


def test_a_local_draft_in_engine_reaches_the_decoding_roles_only(model):
    spec = {"method": "draft_model", "model": model}
    pd = parse_args({"model": model, "mode": "pd", "engine": {"speculative": spec}})
    assert pd.workers["decode"].engine.speculative.options.model == model and not pd.drafts
    assert pd.workers["prefill"].engine.speculative is None
    unified = parse_args({"model": model, "engine": {"speculative": spec}})
    assert unified.workers["unified"].engine.speculative is not None


@pytest.mark.parametrize("change,field", [
    ({"speculative": {"deployment": "DecodeWorker"}}, "speculative.deployment"),
    ({"speculative": {"model": "/no/such/draft"}}, "speculative.model"),
    ({"speculative": {"deployment": "bad name"}}, "deployment"),
    ({"speculative": {"deployment_timeout_s": 0}}, "deployment_timeout_s"),
    ({"draft_worker": {"session_ttl_s": -1}}, "args.draft_worker.session_ttl_s"),
    ({"draft_worker": {"typo": 1}}, "args.draft_worker"),
])
def test_bad_draft_worker_settings_are_named(model, change, field):
    args = spec_args(model, **change.get("speculative", {}))
    if "draft_worker" in change:
        args["draft_worker"] = change["draft_worker"]
    with pytest.raises(ValueError, match=field):
        parse_args(args)


# ---- moe.yaml: remote experts in ExpertWorker shards ------------------------------------------
@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    return str(make_model("tiny-mixtral", tmp_path_factory.mktemp("moe")))


def test_moe_yaml_deploys_two_expert_worker_shards_for_both_roles(moe_model):
    raw = yaml.safe_load((DEPLOY / "moe.yaml").read_text())
    (app,) = ServeDeploySchema.model_validate(raw).applications
    assert {d.name for d in app.deployments} == {"Router", "PrefillWorker", "DecodeWorker", "ExpertWorker0",
                                                 "ExpertWorker1"}
    config = parse_args(load_config(DEPLOY / "moe.yaml", model=moe_model)["applications"][0]["args"])
    assert set(config.experts) == {"ExpertWorker0", "ExpertWorker1"}
    assert [config.experts[n].shard for n in ("ExpertWorker0", "ExpertWorker1")] == [0, 1]
    for role in ("prefill", "decode"):
        experts = config.workers[role].engine.experts
        assert experts.name == "remote" and experts.options.num_shards == 2 and experts.options.call_timeout_s == 10
    assert config.experts["ExpertWorker0"].target.model == moe_model


@pytest.mark.parametrize("change,field", [
    ({"engine": {"experts": {"backend": "remote", "num_shards": 0}}}, "experts.num_shards"),
    ({"engine": {"experts": {"backend": "remote", "call_timeout_s": 0}}}, "experts.call_timeout_s"),
    ({"engine": {"experts": {"backend": "remote", "deployment": "bad name"}}}, "experts.deployment"),
    ({"engine": {"experts": {"backend": "remote", "num_shards": 5}}}, "experts.num_shards"),  # 4 experts
    ({"expert_worker": {"typo": 1}}, "args.expert_worker"),
    ({"expert_worker": {"torch_threads": 0}}, "args.expert_worker.torch_threads"),
    ({"decode_engine": {"dtype": "bfloat16"}}, "args.decode_engine.experts"),
])
def test_bad_expert_worker_settings_are_named(moe_model, change, field):
    args = load_config(DEPLOY / "moe.yaml", model=moe_model)["applications"][0]["args"]
    for key, value in change.items():
        args[key] = {**args.get(key, {}), **value} if key != "engine" else {**args["engine"], **value}
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        parse_args(args)
