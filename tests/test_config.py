from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config
from lens_core.config import parse_duration, parse_size
from lens_core.errors import ConfigError

NO_DEFAULT = Path("/nonexistent/agent.toml")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("60s", 60.0), ("5m", 300.0), ("2h", 7200.0), ("90", 90.0), (30, 30.0), ("1.5s", 1.5)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("512KiB", 512 * 1024), ("4MiB", 4 * 1024**2), ("1GiB", 1024**3), ("100", 100), (2048, 2048), ("7B", 7)],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "5 parsecs", "-1s", "0s", True, [1]])
def test_bad_durations_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="duration such as"):
        parse_duration(bad)


@pytest.mark.parametrize("bad", ["4MB", "1.5GiB", "0", "lots", False])
def test_bad_sizes_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="size such as"):
        parse_size(bad)


def test_defaults_without_any_file() -> None:
    config = load_config(None, environ={}, default_path=NO_DEFAULT)
    assert config.path is None
    assert config.get("model", "n_ctx") == 2048
    assert config.get("model", "flash_attn") is True
    assert config.get("sync", "interval") == 60.0
    assert config.get("sync", "max_outbox_bytes") == 256 * 1024**2
    assert config.source("model", "n_ctx") == "default"
    assert config.get("agent", "device_id")  # the host name


def test_precedence_file_then_environment_then_flags(config_file) -> None:
    path = config_file('[model]\nn_ctx = 1024\nn_batch = 128\nn_threads = 3\n[sync]\ninterval = "5m"\n')
    config = load_config(
        path,
        environ={"LENS_MODEL_N_BATCH": "64", "LENS_MODEL_N_THREADS": "2"},
        overrides={("model", "n_threads"): ("--n-threads", 1), ("model", "n_gpu_layers"): ("--n-gpu-layers", None)},
    )
    assert config.get("model", "n_ctx") == 1024 and config.source("model", "n_ctx") == str(path)
    assert config.get("model", "n_batch") == 64
    assert config.source("model", "n_batch") == "environment variable LENS_MODEL_N_BATCH"
    assert config.get("model", "n_threads") == 1 and config.source("model", "n_threads") == "--n-threads"
    assert config.get("model", "n_gpu_layers") == 0  # a None flag is "not given"
    assert config.get("sync", "interval") == 300.0


def test_default_path_is_read_when_present(config_file) -> None:
    path = config_file("[bench]\nruns = 3\n")
    assert load_config(None, environ={}, default_path=path).get("bench", "runs") == 3


def test_bad_value_names_file_key_and_allowed(config_file) -> None:
    path = config_file("[model]\nn_ctx = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert str(path) in message and "model.n_ctx" in message and "integer between 16" in message


def test_unknown_key_lists_the_known_ones(config_file) -> None:
    path = config_file("[model]\nn_ctxx = 512\n")
    with pytest.raises(ConfigError, match=r"model\.n_ctxx.*n_ctx, n_batch|model\.n_ctxx.*known key"):
        load_config(path, environ={})


def test_unknown_section(config_file) -> None:
    with pytest.raises(ConfigError, match="one of the sections"):
        load_config(config_file("[modle]\nx = 1\n"), environ={})


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"environment variable LENS_SYNC_CODEC.*'cbor', 'msgpack'"):
        load_config(None, environ={"LENS_SYNC_CODEC": "json"}, default_path=NO_DEFAULT)


def test_bad_flag_value_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"--max-tokens: bench\.max_tokens = 0"):
        load_config(None, environ={}, overrides={("bench", "max_tokens"): ("--max-tokens", 0)}, default_path=NO_DEFAULT)


def test_missing_and_malformed_files(tmp_path: Path, config_file) -> None:
    with pytest.raises(ConfigError, match="an existing TOML file"):
        load_config(tmp_path / "absent.toml", environ={})
    with pytest.raises(ConfigError, match="valid TOML"):
        load_config(config_file("[model\n"), environ={})


def test_booleans_from_environment() -> None:
    config = load_config(None, environ={"LENS_MODEL_FLASH_ATTN": "off"}, default_path=NO_DEFAULT)
    assert config.get("model", "flash_attn") is False
    with pytest.raises(ConfigError, match="true or false"):
        load_config(None, environ={"LENS_MODEL_FLASH_ATTN": "maybe"}, default_path=NO_DEFAULT)


def test_example_config_is_valid() -> None:
    example = Path(__file__).parents[1] / "configs" / "agent.toml"
    config = load_config(example, environ={})
    assert config.get("sync", "codec") in ("cbor", "msgpack")
    assert [w["name"] for w in config.workloads] == ["chat-short", "long-context"]
    assert config.workloads[0]["every"] == 900.0 and config.workloads[1]["cron"] == "0 */6 * * *"


def test_example_aggregator_config_is_valid() -> None:
    from aggregator.config import load_aggregator_config

    example = Path(__file__).parents[1] / "configs" / "aggregator.toml"
    config = load_aggregator_config(example, environ={})
    assert config.get("server", "max_body_bytes") == 16 * 1024**2
    assert config.get("auth", "rotate_grace") == 86400.0


def test_example_prompt_sets_load() -> None:
    from agent.prompts import load_prompts

    for path in (Path(__file__).parents[1] / "configs" / "prompts").iterdir():
        assert load_prompts(path), path
