import pytest

from services.engine.make_model import make_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """make_model(name) once per test session -> checkpoint path (str)."""
    cache = {}

    def get(name: str) -> str:
        if name not in cache:
            cache[name] = str(make_model(name, tmp_path_factory.mktemp(name)))
        return cache[name]

    return get
