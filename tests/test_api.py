"""The library API on an application's own llama_cpp.Llama."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest

from agent.api import measure, measured_completion


@pytest.fixture
def app_llm(tiny_model: Path):
    llm = llama_cpp.Llama(str(tiny_model), n_ctx=128, n_threads=1, verbose=False)
    yield llm
    llm.close()


def test_measure_on_an_applications_llama(app_llm) -> None:
    m = measure(app_llm, "the cat", max_tokens=8, device_id="app")
    assert m.ok and m.output_tokens == 8 and len(m.itl_ms) == 7
    assert m.tpot_ms is not None and m.ttft_ms is not None and m.ttft_ms > 0
    assert m.engine_decode_tokens == 7
    second = measure(app_llm, "the cat", max_tokens=8)
    assert second.output_tokens == 8 and not second.first_after_load


@pytest.mark.parametrize("stream", [False, True])
def test_measured_completion_times_each_token(app_llm, stream: bool) -> None:
    result, m = measured_completion(app_llm, "the cat", max_tokens=10, temperature=0.0, stream=stream)
    assert m.ok and m.output_tokens == 10
    assert len(m.itl_ms) == 9 and all(gap > 0 for gap in m.itl_ms)
    assert m.e2e_ms is not None and m.ttft_ms is not None and m.e2e_ms >= m.ttft_ms
    assert m.tpot_ms == pytest.approx((m.e2e_ms - m.ttft_ms) / 9)
    if stream:
        assert isinstance(result, list) and "".join(c["choices"][0]["text"] for c in result)
    else:
        assert result["usage"]["completion_tokens"] == 10
        assert m.ext["token_count_source"] == "usage"


def test_measured_completion_records_failures(app_llm) -> None:
    result, m = measured_completion(app_llm, "word " * 400, max_tokens=4)
    assert result is None and not m.ok and m.error_type == "ValueError"
