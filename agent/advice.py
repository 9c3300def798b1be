"""What the device accepts as advice: engine settings checked against its own configuration bounds and its own
capabilities before anything is measured, applied or written.

Whatever changes a device's settings — a recommendation in a sync acknowledgement, a tune's grid, a ``--try`` or
``--set`` on the command line, a drop-in found on disk — comes through :func:`refusal`. A value is refused when

- the agent's own configuration would refuse it (the key's parser in :data:`agent.config.SCHEMA`, whose integer
  ranges are :data:`lens_core.settings.BOUNDS`), or
- this device cannot run it (:class:`DeviceLimits`): more threads than it has CPUs, a batch larger than the
  context, a context larger than the model was trained for, more GPU layers than the model has (or any on a
  llama.cpp build without GPU offload).

A refused value is never measured: the sender may be a compromised aggregator or anything in the middle of the link,
and a value the engine cannot take can abort the process that loads it. What passes is still only measured in a
child process (:mod:`agent.tune_worker`), so an engine that aborts ends that candidate, not the service.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens_core.config import Invalid
from lens_core.settings import CONFIG_KEYS

log = logging.getLogger("agent.advice")


@dataclass(frozen=True)
class DeviceLimits:
    """What this device and this model can run."""

    cpus: int  # logical CPUs this process may use
    n_layers: int | None  # the model's transformer blocks (None: unknown)
    n_ctx_train: int | None  # the context length the model was trained with (None: unknown)
    gpu_offload: bool  # the llama.cpp build offloads layers to a GPU

    @classmethod
    def probe(cls, model_path: Path | None) -> DeviceLimits:
        layers, trained = model_shape(model_path) if model_path is not None else (None, None)
        return cls(cpus=usable_cpus(), n_layers=layers, n_ctx_train=trained, gpu_offload=gpu_offload_supported())

    @classmethod
    def for_config(cls, config: Any) -> DeviceLimits:
        """The limits for the configured model (``model.path``, else the bundled one); without a model file here its
        layers and context are unknown, and the other checks still hold."""
        from .engines.modelfile import resolve_model_path
        from .errors import LensError

        try:
            path: Path | None = resolve_model_path(config.get("model", "path"))
        except LensError:
            path = None
        return cls.probe(path)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def gpu_offload_supported() -> bool:
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except (ImportError, AttributeError, OSError):
        return False


def model_shape(path: Path) -> tuple[int | None, int | None]:
    """(block count, trained context length) from a GGUF file's metadata, without loading it; None where unknown."""
    try:
        import gguf

        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:
        log.debug("%s: GGUF metadata not read: %s", path, exc)
        return None, None

    def number(key: str) -> int | None:
        field = reader.fields.get(key)
        if field is None or not field.data:
            return None
        try:
            value = field.parts[field.data[0]][0]
            return int(value)
        except (IndexError, TypeError, ValueError):
            return None

    arch_field = reader.fields.get("general.architecture")
    try:
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field is not None else ""
    except (IndexError, UnicodeDecodeError):
        arch = ""
    if not arch:
        return None, None
    return number(f"{arch}.block_count"), number(f"{arch}.context_length")


def config_refusal(name: str, value: object) -> str | None:
    """Why the agent's configuration would refuse ``value`` for the setting ``name`` (None: it accepts it)."""
    from .config import SCHEMA

    section, key = CONFIG_KEYS[name]
    spec = SCHEMA[section][key]
    if isinstance(value, str):  # only typed values are advice: "4" from the wire is not 4
        return f"{section}.{key} = {value[:40]!r}: {spec.doc}; a value of its type is expected"
    try:
        parsed = spec.parse(value)
    except Invalid as exc:
        return f"{section}.{key} = {value!r} is refused by the agent's configuration: {exc}"
    if parsed is None or parsed != value or type(parsed) is not type(value):
        return f"{section}.{key} = {value!r} is not a value the agent's configuration takes as it is"
    return None


def refusal(settings: Mapping[str, Any], limits: DeviceLimits, changed: Iterable[str] | None = None) -> str | None:
    """Why this device refuses to run ``settings`` (engine settings: n_threads, n_batch, n_ctx, n_gpu_layers,
    flash_attn), or None. ``changed``: the names of the settings that are advice, checked against the
    configuration's bounds and the device's limits (by default all of them); the others are the operator's own."""
    names = set(changed if changed is not None else settings)
    for name in sorted(names):
        if name in CONFIG_KEYS:
            reason = config_refusal(name, settings[name])
            if reason is not None:
                return reason
    threads, batch, ctx, layers = (settings.get(k) for k in ("n_threads", "n_batch", "n_ctx", "n_gpu_layers"))
    if "n_threads" in names and isinstance(threads, int) and threads > limits.cpus:
        return f"model.n_threads = {threads}: this device has {limits.cpus} CPUs for the agent"
    if names & {"n_batch", "n_ctx"} and isinstance(batch, int) and isinstance(ctx, int) and batch > ctx:
        return f"model.n_batch = {batch} is larger than the context (model.n_ctx = {ctx})"
    if "n_ctx" in names and isinstance(ctx, int) and limits.n_ctx_train is not None and ctx > limits.n_ctx_train:
        return f"model.n_ctx = {ctx} is beyond the {limits.n_ctx_train} tokens the model was trained with"
    if "n_gpu_layers" in names and isinstance(layers, int) and layers != 0:
        if not limits.gpu_offload and layers > 0:
            return f"model.n_gpu_layers = {layers}: this llama.cpp build offloads no layers to a GPU"
        if limits.n_layers is not None and layers > limits.n_layers + 1:
            return f"model.n_gpu_layers = {layers}: the model has {limits.n_layers} layers (+1 output layer)"
    return None
