"""The llama.cpp engine on tiny generated models: real llama.cpp, milliseconds per test."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest

from agent.engines.llama import EngineSettings, LlamaEngine
from agent.engines.modelfile import coarse_quantization, file_type_name, resolve_model_path
from agent.errors import ModelFileError, RequestError


def test_load_records_identity_and_load_time(tiny_engine: LlamaEngine, tiny_model: Path) -> None:
    info, load = tiny_engine.info, tiny_engine.load_info
    assert info is not None and load is not None
    assert info.name == "tiny-llama"
    assert info.architecture == "llama"
    assert info.quantization == "F32" and info.quantization_coarse == "none"
    assert info.file_bytes == tiny_model.stat().st_size
    assert len(info.sha256) == 64
    assert load.load_ms > 0 and load.engine_load_ms is not None and load.engine_load_ms > 0
    assert load.rss_after_bytes is not None and load.rss_before_bytes is not None
    assert "CPU" in tiny_engine.system_info() or "AVX" in tiny_engine.system_info()


def test_generation_counts_and_stamps(tiny_engine: LlamaEngine) -> None:
    gen = tiny_engine.generate("the cat sat", max_tokens=16)
    assert gen.stop_reason == "max_tokens"
    assert len(gen.tokens) == 16 == len(gen.token_ns)
    assert gen.token_ns == sorted(gen.token_ns) and gen.token_ns[0] > gen.start_ns
    # llama.cpp's counters: the prompt in one batch, then one decode per token after the first.
    assert gen.perf["n_p_eval"] == gen.input_tokens
    assert gen.perf["n_eval"] == 15
    assert gen.perf["t_eval_ms"] > 0
    assert gen.prefill_ns > 0


def test_greedy_output_matches_llama_cpp_python(tiny_engine: LlamaEngine) -> None:
    """The lens's own loop generates exactly what llama-cpp-python's greedy completion does."""
    gen = tiny_engine.generate("the cat sat", max_tokens=12)
    reference = tiny_engine.llm.create_completion("the cat sat", max_tokens=12, temperature=0.0)
    assert gen.text == reference["choices"][0]["text"]
    assert reference["usage"]["completion_tokens"] == len(gen.tokens)


def test_every_request_starts_from_an_empty_cache(tiny_engine: LlamaEngine) -> None:
    first = tiny_engine.generate("the cat sat on the mat", max_tokens=8)
    second = tiny_engine.generate("the cat sat on the mat", max_tokens=8)
    assert first.tokens == second.tokens
    assert second.perf["n_p_eval"] == second.input_tokens  # the whole prompt was evaluated again


def test_reuse_cache_keeps_the_common_prefix(tiny_engine: LlamaEngine) -> None:
    cold = tiny_engine.generate("the cat sat on the mat", max_tokens=8)
    warm = tiny_engine.generate("the cat sat on the mat", max_tokens=8, reuse_cache=True)
    assert warm.tokens == cold.tokens
    assert warm.perf["n_p_eval"] < warm.input_tokens


def test_ignore_eos_never_stops_early(tiny_model: Path, tiny_settings: EngineSettings) -> None:
    with LlamaEngine.load(tiny_model, tiny_settings) as engine:
        eos = engine.llm.token_eos()
        gen = engine.generate("hello", max_tokens=40, ignore_eos=True)
        assert eos not in gen.tokens and len(gen.tokens) == 40


def test_prompt_longer_than_context_is_a_request_error(tiny_engine: LlamaEngine) -> None:
    with pytest.raises(RequestError) as info:
        tiny_engine.generate("word " * 400, max_tokens=4)
    assert info.value.error_type == "context_overflow"
    # the engine is still usable afterwards
    assert len(tiny_engine.generate("ok", max_tokens=3).tokens) == 3


def test_context_full_stops_generation(tiny_engine: LlamaEngine) -> None:
    gen = tiny_engine.generate("a b c", max_tokens=10_000, ignore_eos=True)
    assert gen.stop_reason == "context_full"
    # every cell of the context holds a token; the last sampled token was never evaluated
    assert gen.input_tokens + len(gen.tokens) - 1 == tiny_engine.n_ctx


def test_wraps_an_applications_own_llama(tiny_model: Path) -> None:
    llm = llama_cpp.Llama(str(tiny_model), n_ctx=128, verbose=False)
    engine = LlamaEngine.from_llama(llm)
    gen = engine.generate("the cat", max_tokens=5)
    assert len(gen.tokens) == 5
    # The application's own calls still work after the lens used its context.
    out = llm.create_completion("the cat", max_tokens=5, temperature=0.0)
    assert out["choices"][0]["text"] == gen.text
    llm.close()


def test_model_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no such file"):
        resolve_model_path(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelFileError, match="is not a GGUF file"):
        resolve_model_path(not_gguf)
    with pytest.raises(ModelFileError, match="is a directory"):
        resolve_model_path(tmp_path)


def test_quantization_mapping() -> None:
    assert [file_type_name(t) for t in (0, 1, 3, 7, 15, 32)] == ["F32", "F16", "Q4_1", "Q8_0", "Q4_K_M", "BF16"]
    assert coarse_quantization("Q4_K_M") == "int4"
    assert coarse_quantization("IQ4_XS") == "int4"
    assert coarse_quantization("Q8_0") == "int8"
    assert coarse_quantization("F16") == "fp16"
    assert coarse_quantization("BF16") == "bf16"
    assert coarse_quantization("F32") == "none"
    assert coarse_quantization("Q6_K") is None  # no honest value in the schema's enum
