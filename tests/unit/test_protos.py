"""The committed gRPC stubs are what `make protos` generates from protos/tandem/v1/*.proto."""

from pathlib import Path

import pytest

from protos import generate

pytest.importorskip("grpc_tools")


def test_committed_stubs_are_fresh(tmp_path):
    written = generate.generate(tmp_path)
    assert written
    for path in written:
        committed = generate.ROOT / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is missing: run `make protos` and commit the stubs"
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `make protos`"


def test_stubs_import_as_a_package():
    from protos.tandem.v1 import admin_pb2_grpc, generation_pb2, generation_pb2_grpc  # noqa: F401

    assert generation_pb2.DESCRIPTOR.name == "tandem/v1/generation.proto"
    fields = generation_pb2.GenerateRequest.DESCRIPTOR.fields_by_name
    assert generation_pb2.GenerateRequest(prompt_token_ids=[1, 2]).prompt_token_ids == [1, 2]
    assert "prompt" in fields
    assert Path(generation_pb2.__file__).parent == generate.ROOT / "tandem" / "v1"
