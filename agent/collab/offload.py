"""Offloading policies: pure functions of the request, measured rates and the power state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OffloadPolicy:
    prompt_tokens_above: int | None = None
    predict_latency: bool = True
    battery_below: int | None = None
    on_battery: bool = False
    shadow_fraction: float = 0.0

    @classmethod
    def from_config(cls, config: Any) -> OffloadPolicy:
        o = config.values["offload"]
        return cls(
            o["prompt_tokens_above"], o["predict_latency"], o["battery_below"], o["on_battery"], o["shadow_fraction"]
        )


@dataclass
class Rates:
    """Running estimates (exponentially weighted) of each path's speed, from the requests measured so far."""

    local_prefill_ms_per_token: float | None = None
    local_decode_ms_per_token: float | None = None
    cloud_ttft_ms: float | None = None  # includes the round trip and the server's prefill
    cloud_ttft_ms_per_prompt_token: float | None = None
    cloud_decode_ms_per_token: float | None = None
    rtt_ms: float | None = None
    weight: float = 0.3

    def _mix(self, old: float | None, new: float | None) -> float | None:
        if new is None:
            return old
        return new if old is None else (1 - self.weight) * old + self.weight * new

    def observe(self, record: Any, path: str) -> None:
        if not record.ok or record.ttft_ms is None:
            return
        if path == "local":
            if record.input_tokens:
                self.local_prefill_ms_per_token = self._mix(
                    self.local_prefill_ms_per_token, record.ttft_ms / record.input_tokens
                )
            self.local_decode_ms_per_token = self._mix(self.local_decode_ms_per_token, record.tpot_ms)
        else:
            base = record.ttft_ms - (self.rtt_ms or 0.0)
            if record.input_tokens:
                self.cloud_ttft_ms_per_prompt_token = self._mix(
                    self.cloud_ttft_ms_per_prompt_token, max(base, 0.0) / record.input_tokens
                )
            self.cloud_ttft_ms = self._mix(self.cloud_ttft_ms, record.ttft_ms)
            self.cloud_decode_ms_per_token = self._mix(self.cloud_decode_ms_per_token, record.tpot_ms)


@dataclass(frozen=True)
class Decision:
    target: str  # "local" or "cloud"
    reason: str
    predicted_local_ms: float | None = None
    predicted_cloud_ms: float | None = None


def predict(rates: Rates, prompt_tokens: int, max_tokens: int) -> tuple[float | None, float | None]:
    """Predicted end-to-end ms locally and in the cloud, or None where a rate has not been measured yet."""
    local = None
    if rates.local_prefill_ms_per_token is not None and rates.local_decode_ms_per_token is not None:
        local = prompt_tokens * rates.local_prefill_ms_per_token + (max_tokens - 1) * rates.local_decode_ms_per_token
    cloud = None
    if rates.cloud_decode_ms_per_token is not None and (
        rates.cloud_ttft_ms_per_prompt_token is not None or rates.cloud_ttft_ms is not None
    ):
        if rates.cloud_ttft_ms_per_prompt_token is not None:
            ttft = (rates.rtt_ms or 0.0) + prompt_tokens * rates.cloud_ttft_ms_per_prompt_token
        else:
            ttft = rates.cloud_ttft_ms or 0.0
        cloud = ttft + (max_tokens - 1) * rates.cloud_decode_ms_per_token
    return local, cloud


def decide(
    policy: OffloadPolicy,
    prompt_tokens: int,
    max_tokens: int,
    rates: Rates,
    discharging: bool | None,
    battery_percent: int | None,
) -> Decision:
    """Where this request runs, and why. Rules in order: power, prompt length, predicted latency, default local."""
    local, cloud = predict(rates, prompt_tokens, max_tokens)
    if policy.on_battery and discharging:
        return Decision("cloud", "the device is on battery (offload.on_battery)", local, cloud)
    if (
        policy.battery_below is not None
        and discharging
        and battery_percent is not None
        and battery_percent < policy.battery_below
    ):
        return Decision("cloud", f"battery at {battery_percent} % < {policy.battery_below} %", local, cloud)
    if policy.prompt_tokens_above is not None and prompt_tokens > policy.prompt_tokens_above:
        return Decision("cloud", f"prompt of {prompt_tokens} tokens > {policy.prompt_tokens_above}", local, cloud)
    if policy.predict_latency:
        if local is None or cloud is None:
            missing = "local" if local is None else "cloud"
            return Decision(
                "local" if local is None else "cloud", f"no {missing} rate measured yet: measuring it", local, cloud
            )
        if local > cloud:
            return Decision("cloud", f"predicted local {local:.0f} ms > cloud {cloud:.0f} ms", local, cloud)
        return Decision("local", f"predicted local {local:.0f} ms ≤ cloud {cloud:.0f} ms", local, cloud)
    return Decision("local", "no rule sends it to the cloud", local, cloud)
