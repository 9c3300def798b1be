"""How one request runs: locally, in the cloud, speculatively across both, or where a policy sends it.

Every strategy has the same interface (:class:`Strategy`): ``measure(record, text, max_tokens)`` fills in the
measurement and returns the request's time window. :func:`build_strategy` chooses one by name.
"""

from __future__ import annotations

import importlib
import random
from typing import TYPE_CHECKING, Any

from ..config import AgentConfig
from ..engines.llama import LlamaEngine
from ..errors import UsageError
from .base import Strategy, Window, fill_timings
from .local import LocalOptions, LocalStrategy

if TYPE_CHECKING:
    from ..collab.context import CollabContext
    from .cloud import CloudStrategy, cloud_record
    from .offload import OffloadStrategy
    from .speculative import SpeculativeStrategy, check_vocabulary

# The strategies that talk to a cloud endpoint load their client (and aiohttp) when one is built or named, not with
# the agent: a device that only times local inference never holds them (docs/PERFORMANCE.md, the agent's footprint).
_LAZY = {
    "CloudStrategy": ".cloud",
    "cloud_record": ".cloud",
    "OffloadStrategy": ".offload",
    "SpeculativeStrategy": ".speculative",
    "check_vocabulary": ".speculative",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CloudStrategy",
    "LocalOptions",
    "LocalStrategy",
    "OffloadStrategy",
    "SpeculativeStrategy",
    "Strategy",
    "Window",
    "build_strategy",
    "check_vocabulary",
    "cloud_record",
    "fill_timings",
]


def build_strategy(
    name: str, engine: LlamaEngine | None, options: LocalOptions, collab: CollabContext | None, config: AgentConfig
) -> Strategy:
    """The strategy called ``name`` (``collab.strategy``): local, cloud, speculative or offload."""
    if name == "local":
        assert engine is not None
        return LocalStrategy(engine, options)
    assert collab is not None
    from ..collab.offload import OffloadPolicy, Rates
    from ..probes.sysfs import Root
    from .cloud import CloudStrategy
    from .offload import OffloadStrategy
    from .speculative import SpeculativeStrategy, check_vocabulary

    if name == "cloud":
        return CloudStrategy(collab.client, collab.runner, collab.rtt_ms)
    assert engine is not None
    c = config.values["collab"]
    if name == "speculative":
        protocol, reason = collab.verify_protocol()  # collab.verify = auto: probed here, before any request
        if protocol == "tokens":
            collab.vocabulary_check = check_vocabulary(engine, collab.client, collab.runner)
            reason += "; " + collab.vocabulary_check
        elif options.ignore_eos:
            raise UsageError(
                f"ignore_eos with the speculative strategy needs the token protocol (llama-server), not {protocol}: "
                "an OpenAI-compatible text API has no portable way to make the server generate past its "
                "end-of-sequence token"
            )
        return SpeculativeStrategy(
            engine,
            collab.client,
            collab.runner,
            k=c["draft_tokens"],
            protocol=protocol,
            adaptive=c["adaptive_draft"],
            rtt_ms=collab.rtt_ms,
            protocol_reason=reason,
            ignore_eos=options.ignore_eos,
        )
    return OffloadStrategy(
        local=LocalStrategy(engine, options),
        cloud=CloudStrategy(collab.client, collab.runner, collab.rtt_ms),
        policy=OffloadPolicy.from_config(config),
        root=Root(config.get("probes", "sysfs_root")),
        rates=Rates(rtt_ms=collab.rtt_ms),
        rng=random.Random(0),
    )
