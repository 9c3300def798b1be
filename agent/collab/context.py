"""The cloud side of a benchmark session: one client, one event loop, the measured RTT, and the strategy objects."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

from ..config import AgentConfig
from ..engines.cloud import CloudClient, LoopRunner, cloud_settings
from ..engines.llama import LlamaEngine
from ..errors import UsageError
from ..probes.sysfs import Root
from .offload import OffloadPolicy, Rates
from .strategies import CloudStrategy, OffloadStrategy, SpeculativeStrategy


class CollabContext:
    def __init__(
        self, config: AgentConfig, client: CloudClient, runner: LoopRunner, rtt_ms: float | None, model: str
    ) -> None:
        self.config = config
        self.client = client
        self.runner = runner
        self.rtt_ms = rtt_ms
        self.model = model

    @classmethod
    def open(cls, config: AgentConfig, status: Callable[[str], None]) -> CollabContext:
        settings = cloud_settings(config)
        runner = LoopRunner()
        client = CloudClient(settings)
        try:
            status(f"measuring the round trip to {settings.url} …")
            rtt = runner.run(client.rtt_ms())
            if rtt is None:
                raise UsageError(f"cloud.url = {settings.url!r}: cannot connect (is the endpoint up?)")
            model = runner.run(client.model_name())
            if settings.api == "auto":
                chat, reason = runner.run(client.choose_api(model))
                client.settings = dataclasses.replace(settings, chat=chat, api_reason=reason)
        except UsageError:
            runner.run(client.close())
            runner.close()
            raise
        except Exception as exc:  # the endpoint answered, but not like an OpenAI-compatible one
            runner.run(client.close())
            runner.close()
            raise UsageError(
                f"cloud.url = {settings.url!r}: GET /models failed ({exc}); is it OpenAI-compatible?"
            ) from None
        return cls(config, client, runner, rtt, model)

    def describe(self) -> dict[str, Any]:
        c = self.config.values["collab"]
        return {
            "url": self.client.settings.url,
            "model": self.model,
            "rtt_ms": self.rtt_ms,
            "rtt_source": "median TCP connect time (3 samples)",
            "api": "chat" if self.client.settings.chat else "completions",
            "api_reason": self.client.settings.api_reason,
            "verify": c["verify"],
            "draft_tokens": c["draft_tokens"],
        }

    def cloud_strategy(self) -> CloudStrategy:
        return CloudStrategy(self.client, self.runner, self.rtt_ms)

    def baselines(
        self, run: Any, engine: LlamaEngine, prompts: list[Any], options: Any, status: Callable[[str], None]
    ) -> dict[str, Any]:
        """Cloud-only and edge-only runs of the same prompts, now: speedups of the collaborative run over each."""
        from ..bench.runner import LocalStrategy, run_bench

        def tps(r: Any) -> float | None:
            ok = [m for m in r.measured if m.ok]
            return sum(m.output_tokens for m in ok) / r.measured_wall_s if ok and r.measured_wall_s else None

        status("baseline: the same prompts cloud-only …")
        cloud = run_bench(
            engine, prompts, options, run_id="baseline", device_id="baseline", strategy=self.cloud_strategy()
        )
        status("baseline: the same prompts on the edge model alone …")
        local = run_bench(
            engine, prompts, options, run_id="baseline", device_id="baseline", strategy=LocalStrategy(engine, options)
        )
        ours, cloud_tps, local_tps = tps(run), tps(cloud), tps(local)
        return {
            "vs_cloud_only": ours / cloud_tps if ours and cloud_tps else None,
            "vs_edge_only": ours / local_tps if ours and local_tps else None,
            "tokens_per_second": {"this_run": ours, "cloud_only": cloud_tps, "edge_only": local_tps},
            "method": "output tokens ÷ measured wall time of each run, the same prompts, measured in the same session",
        }

    def close(self) -> None:
        self.runner.run(self.client.close())
        self.runner.close()


def build_strategy(
    name: str, engine: LlamaEngine | None, options: Any, collab: CollabContext | None, config: AgentConfig
) -> Any:
    from ..bench.runner import LocalStrategy

    if name == "local":
        assert engine is not None
        return LocalStrategy(engine, options)
    assert collab is not None
    if name == "cloud":
        return collab.cloud_strategy()
    assert engine is not None
    c = config.values["collab"]
    if name == "speculative":
        return SpeculativeStrategy(
            engine,
            collab.client,
            collab.runner,
            k=c["draft_tokens"],
            protocol=c["verify"],
            adaptive=c["adaptive_draft"],
            rtt_ms=collab.rtt_ms,
        )
    return OffloadStrategy(
        local=LocalStrategy(engine, options),
        cloud=collab.cloud_strategy(),
        policy=OffloadPolicy.from_config(config),
        root=Root(config.get("probes", "sysfs_root")),
        rates=Rates(rtt_ms=collab.rtt_ms),
        rng=random.Random(0),
    )
