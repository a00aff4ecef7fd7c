"""Model names of the catalog (``smollm2``) in the benchmarks (``--model smollm2``, .gguf files
too) and the offline API (``LLM("smollm2")``)."""

import pytest

from bench.workload import resolve_model
from services.engine.model_catalog import embedded_model_path, smollm2_path


def test_names_and_gguf_files_resolve(tmp_path):
    assert resolve_model("smollm2") == smollm2_path() and resolve_model("embedded") == embedded_model_path()
    assert resolve_model(str(smollm2_path())) == smollm2_path()
    with pytest.raises(ValueError, match="smollm2"):
        resolve_model("no-such-model", cache=tmp_path)


def test_the_offline_api_takes_a_model_name():
    from services.engine.llm import build_engine_config

    assert build_engine_config("smollm2").model == str(smollm2_path())
