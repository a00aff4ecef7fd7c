"""helm/tandem's API keys (values ``auth``): a Secret of the user's, mounted read-only into every
Ray pod, TANDEM_API_KEYS_FILE / TANDEM_ADMIN_API_KEYS_FILE pointing at its files; nothing when
``auth.existingSecret`` is empty. Rendered by a real helm (every values combination of
tests/helm_render.py, helm/tandem/ci/api-keys-values.yaml among them); the rendered paths load
as key files (router/auth.py)."""

from __future__ import annotations

import pytest
import yaml

from router.auth import AuthConfig
from tests.helm_render import CHART, VALUES, by_kind, env_of, helm, helm_fails, ray_containers, render, values_of


def pod_specs(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}
    return {name: g["template"]["spec"] for name, g in groups.items()}


def test_a_values_file_turns_keys_on():
    assert values_of("api-keys-values")["auth"]["existingSecret"]


@pytest.mark.parametrize("name", VALUES)
def test_every_ray_pod_mounts_the_key_secret_when_auth_is_on(name):
    auth = values_of(name)["auth"]
    docs = render(name)
    (rayservice,) = by_kind(docs, "RayService")
    specs, containers = pod_specs(rayservice), ray_containers(rayservice)
    for group, container in containers.items():
        env = env_of(container)
        volumes = {v["name"]: v for v in specs[group]["volumes"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        if not auth["existingSecret"]:
            assert "api-keys" not in volumes and "api-keys" not in mounts, group
            assert not {"TANDEM_API_KEYS_FILE", "TANDEM_ADMIN_API_KEYS_FILE", "TANDEM_API_KEYS"} & set(env), group
            continue
        secret = volumes["api-keys"]["secret"]
        assert secret["secretName"] == auth["existingSecret"]
        keys = [auth["apiKeysKey"]] + ([auth["adminKeysKey"]] if auth["adminKeysKey"] else [])
        assert [item["key"] for item in secret["items"]] == keys
        assert mounts["api-keys"] == {"name": "api-keys", "mountPath": auth["mountPath"], "readOnly": True}
        assert env["TANDEM_API_KEYS_FILE"] == {"name": "TANDEM_API_KEYS_FILE",
                                               "value": f"{auth['mountPath']}/{auth['apiKeysKey']}"}
        if auth["adminKeysKey"]:
            assert env["TANDEM_ADMIN_API_KEYS_FILE"]["value"] == f"{auth['mountPath']}/{auth['adminKeysKey']}"
        else:
            assert "TANDEM_ADMIN_API_KEYS_FILE" not in env
        assert "TANDEM_API_KEYS" not in env  # keys never as values in the pod spec
    # the Secret is the user's: the chart neither creates nor overwrites it
    assert all(s["metadata"]["name"] != auth["existingSecret"] for s in by_kind(docs, "Secret"))


def test_rendered_paths_load_as_the_routers_key_files(tmp_path):
    """Mount the Secret's files where the chart says (here: under tmp_path) and read them with
    the environment the chart renders, as the router's AuthConfig does."""
    mount = tmp_path / "auth"
    out = helm("template", "tandem", str(CHART), "--set", "auth.existingSecret=keys", "--set",
               "auth.adminKeysKey=admin", "--set", f"auth.mountPath={mount}")
    (rayservice,) = by_kind([d for d in yaml.safe_load_all(out) if d], "RayService")
    env = env_of(ray_containers(rayservice)["head"])
    mount.mkdir()
    (mount / "api-keys").write_text("# users\nkey-one-" + "1" * 20 + "\nkey-two-" + "2" * 20 + "\n")
    (mount / "admin").write_text("admin-" + "3" * 20 + "\n")
    config = AuthConfig.from_env({k: env[k]["value"] for k in ("TANDEM_API_KEYS_FILE", "TANDEM_ADMIN_API_KEYS_FILE")})
    assert len(config.api_keys) == 2 and len(config.admin_keys) == 1


@pytest.mark.parametrize("setting,complaint", [
    ("auth.mountPath=etc/keys", "/auth/mountPath"),  # an absolute path
    ("auth.existingSecret=Not_A_Name", "/auth/existingSecret"),  # a Kubernetes object name
    ("auth.apiKeysKey=", "/auth/apiKeysKey"),
    ("auth.apiKey=x", "apiKey"),  # a typo is an error
])
def test_values_schema_rejects_bad_auth_values(setting, complaint):
    assert complaint in helm_fails("template", "tandem", str(CHART), "--set", setting)
