"""Offloading: a policy (:mod:`agent.collab.offload`) sends each request to the local model or the cloud."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from ..collab.offload import OffloadPolicy, Rates, decide
from ..measurement import Measurement
from ..probes.power import on_battery
from ..probes.sysfs import Root
from .base import Strategy, Window
from .cloud import CloudStrategy
from .local import LocalStrategy


@dataclass
class OffloadStrategy:
    """A policy sends each request to the local model or the cloud; a shadow sample runs both to check it."""

    local: LocalStrategy
    cloud: CloudStrategy
    policy: OffloadPolicy
    root: Root
    rates: Rates
    rng: random.Random
    name: str = "offload"

    def measure(self, record: Measurement, text: str, max_tokens: int) -> Window:
        prompt_tokens = len(self.local.engine.tokenize(text))
        discharging, capacity = on_battery(self.root)
        decision = decide(self.policy, prompt_tokens, max_tokens, self.rates, discharging, capacity)
        chosen: Strategy
        other: Strategy
        chosen, other = (self.cloud, self.local) if decision.target == "cloud" else (self.local, self.cloud)
        window = chosen.measure(record, text, max_tokens)
        record.strategy = "offload"
        self.rates.observe(record, decision.target)
        info: dict[str, Any] = {
            "decision": decision.target,
            "reason": decision.reason,
            "predicted_local_ms": decision.predicted_local_ms,
            "predicted_cloud_ms": decision.predicted_cloud_ms,
        }
        if self.policy.shadow_fraction and self.rng.random() < self.policy.shadow_fraction:
            shadow = Measurement(
                run_id=record.run_id,
                device_id=record.device_id,
                model_name=record.model_name,
                model_sha256=record.model_sha256,
            )
            other.measure(shadow, text, max_tokens)
            self.rates.observe(shadow, "local" if decision.target == "cloud" else "cloud")
            right = None
            if record.ok and shadow.ok and record.e2e_ms is not None and shadow.e2e_ms is not None:
                right = record.e2e_ms <= shadow.e2e_ms
            info["shadow"] = {
                "other": "local" if decision.target == "cloud" else "cloud",
                "other_ok": shadow.ok,
                "other_e2e_ms": shadow.e2e_ms,
                "chosen_e2e_ms": record.e2e_ms,
                "policy_right": right,
            }
        record.ext["offload"] = info
        if self.policy.prompt_tokens_above is not None and isinstance(record.ext.get("settings"), dict):
            record.ext["settings"]["offload_prompt_tokens_above"] = self.policy.prompt_tokens_above
        return window
