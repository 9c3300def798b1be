"""The cloud side of a benchmark session: one client, one event loop, the measured RTT and the served model."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config import AgentConfig
from ..errors import UsageError

if TYPE_CHECKING:  # the cloud client (and aiohttp) load when a strategy opens a context, not with the agent
    from ..engines.cloud import CloudClient, LoopRunner


class CollabContext:
    def __init__(
        self, config: AgentConfig, client: CloudClient, runner: LoopRunner, rtt_ms: float | None, model: str
    ) -> None:
        self.config = config
        self.client = client
        self.runner = runner
        self.rtt_ms = rtt_ms
        self.model = model
        self._protocol: tuple[str, str] | None = None
        self.vocabulary_check: str | None = None  # token protocol: what the last draft model's check compared

    def verify_protocol(self) -> tuple[str, str]:
        """The speculative verification protocol to use and why: ``collab.verify`` resolved against the endpoint.

        ``auto`` probes llama-server's token-id API once (outside any timed request): ``tokens`` when it answers,
        else ``generate`` (text, with re-tokenization checked and lossy requests marked). ``tokens`` against an
        endpoint without that API is a :class:`UsageError` naming the endpoint and what is missing."""
        if self._protocol is None:
            verify = self.config.values["collab"]["verify"]
            if verify in ("auto", "tokens"):
                supported, why = self.runner.run(self.client.probe_token_api())
                if verify == "tokens" and not supported:
                    raise UsageError(f"collab.verify = tokens needs llama-server's token-id API: {why}")
                if supported:
                    self._protocol = ("tokens", f"{verify}: {why}")
                else:
                    works, text_why = self.runner.run(self.client.probe_text_protocol("generate"))
                    if not works:
                        raise UsageError(
                            f"collab.verify = auto: {self.client.settings.url} answers no verification protocol: "
                            f"tokens: {why}; generate: {text_why}"
                        )
                    self._protocol = ("generate", f"auto: no token-id API, text protocol generate: {why}")
            else:
                works, why = self.runner.run(self.client.probe_text_protocol(verify))
                if not works:
                    hint = " (use collab.verify = tokens or auto for llama-server)" if "echo" in why else ""
                    raise UsageError(f"collab.verify = {verify}: {why}{hint}")
                self._protocol = (verify, f"collab.verify = {verify} ({self.config.source('collab', 'verify')})")
        return self._protocol

    @classmethod
    def open(cls, config: AgentConfig, status: Callable[[str], None]) -> CollabContext:
        from ..engines.cloud import CloudClient, LoopRunner, cloud_settings

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
            **(
                {"protocol": self._protocol[0], "protocol_reason": self._protocol[1]}
                if self._protocol is not None
                else {}
            ),
            **({"vocabulary_check": self.vocabulary_check} if self.vocabulary_check else {}),
            "draft_tokens": c["draft_tokens"],
        }

    def close(self) -> None:
        self.runner.run(self.client.close())
        self.runner.close()
