"""In-process llama.cpp engine, timed with llama-cpp-python's low-level API.

The high-level streaming API costs 4–5 % per token over llama.cpp's own decode time, which would distort what
the lens measures. So the loop here is the one llama-bench runs: one ``llama_decode`` per token, greedy
selection with a numpy argmax over the logits row, and a ``perf_counter_ns`` stamp when the token is known.
Detokenization happens after the loop. The ``Llama`` object is still used to load the model, tokenize and
read metadata, so an application's own ``Llama`` can be measured with :meth:`LlamaEngine.from_llama`.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..errors import ModelLoadError, RequestError
from ..memory import ProcessMemory
from .modelfile import (
    ModelInfo,
    check_gguf,
    coarse_quantization,
    file_type_name,
    sha256_file,
)

log = logging.getLogger("agent.llama")
_llama_log = logging.getLogger("llama.cpp")
# ggml_log_level as of the pinned llama.cpp: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5.
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_log_callback: Any = None


def _route_llama_logs() -> None:
    """Send llama.cpp's own log lines to the ``llama.cpp`` Python logger instead of raw stderr."""
    global _log_callback
    import llama_cpp

    if _log_callback is not None:
        return
    last = [logging.DEBUG]

    def forward(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lvl = last[0] if level == 5 else _LEVELS.get(level, logging.DEBUG)
        last[0] = lvl
        if _llama_log.isEnabledFor(lvl):
            _llama_log.log(lvl, text.decode("utf-8", "replace").rstrip())

    _log_callback = llama_cpp.llama_log_callback(forward)  # kept referenced: C holds the pointer
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


def _quiet_failed_load() -> None:
    """A model llama.cpp refuses leaves a half-built ``LlamaModel`` whose ``__del__`` reads ``sampler``, which
    llama-cpp-python sets only after a successful load: an "Exception ignored … AttributeError" after the clear error.
    A class-level default makes that cleanup a no-op, as it is for a loaded model without custom samplers."""
    from llama_cpp import _internals

    if not hasattr(_internals.LlamaModel, "sampler"):
        _internals.LlamaModel.sampler = None


@dataclass(frozen=True)
class EngineSettings:
    """llama.cpp settings that move decode speed; recorded with every result."""

    n_ctx: int = 2048
    n_threads: int = 4
    n_batch: int = 512
    n_gpu_layers: int = 0
    flash_attn: bool = True

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_config(cls, config: Any) -> EngineSettings:
        """The ``[model]`` section's engine settings."""
        m = config.values["model"]
        return cls(
            n_ctx=m["n_ctx"],
            n_threads=m["n_threads"],
            n_batch=m["n_batch"],
            n_gpu_layers=m["n_gpu_layers"],
            flash_attn=m["flash_attn"],
        )


@dataclass
class LoadInfo:
    load_ms: float  # wall clock around Llama(...)
    engine_load_ms: float | None  # llama.cpp's own t_load_ms, read right after loading
    rss_before_bytes: int | None
    rss_after_bytes: int | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Generation:
    """What one timed request produced. Times are ``perf_counter_ns`` stamps."""

    start_ns: int
    token_ns: list[int]
    tokens: list[int]
    input_tokens: int
    prefill_ns: int
    stop_reason: str
    perf: dict[str, float | int] = field(default_factory=dict)
    text: str = ""


class LlamaEngine:
    """A loaded llama.cpp model and the timed generation loop."""

    def __init__(self, llm: Any, *, owns_model: bool) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.llm = llm
        self._owns = owns_model
        self._ctx = llm._ctx.ctx
        self._model = llm._model.model
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.n_ctx = int(llama_cpp.llama_n_ctx(self._ctx))
        self.n_batch = int(llama_cpp.llama_n_batch(self._ctx))
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._one = llama_cpp.llama_batch_init(1, 0, 1)
        self._one.n_tokens = 1
        self._one.n_seq_id[0] = 1
        self._one.seq_id[0][0] = 0
        self._one.logits[0] = 1
        self._eog_ids: np.ndarray | None = None
        # llama_get_logits_ith returning a plain address: np.ctypeslib.as_array on a LP_c_float costs ~25 µs
        # per token, a cached view of a known address costs nothing.
        proto = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)
        self._get_logits_addr = proto(("llama_get_logits_ith", llama_cpp.llama_cpp._lib))
        self._logits_views: dict[int, np.ndarray] = {}
        self._cached: list[int] = []
        self.load_info: LoadInfo | None = None
        self.info: ModelInfo | None = None
        self.settings: EngineSettings | None = None
        self.requests_since_load = 0

    # -- loading -------------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: Path | str,
        settings: EngineSettings,
        *,
        memory: ProcessMemory | None = None,
        compute_sha256: bool = True,
    ) -> LlamaEngine:
        """Load a GGUF model, timing the load (wall clock and llama.cpp's ``t_load_ms``) and RSS around it."""
        import llama_cpp

        path = check_gguf(Path(path))
        _route_llama_logs()
        _quiet_failed_load()
        memory = memory or ProcessMemory()
        before = memory.read().rss_bytes
        t0 = time.perf_counter_ns()
        try:
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=settings.n_ctx,
                n_threads=settings.n_threads,
                n_threads_batch=settings.n_threads,
                n_batch=settings.n_batch,
                n_gpu_layers=settings.n_gpu_layers,
                flash_attn=settings.flash_attn,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            reason = str(exc) or type(exc).__name__
            if "Failed to load model" in reason:
                reason = (
                    f"llama.cpp cannot read it ({path.stat().st_size:,} bytes; truncated or corrupt?): "
                    "download it again or check it against its published sha256"
                )
            raise ModelLoadError(str(path), reason) from None
        load_ms = (time.perf_counter_ns() - t0) / 1e6
        engine = cls(llm, owns_model=True)
        # t_load_ms is overwritten at the first evaluation: read it now.
        perf = llama_cpp.llama_perf_context(engine._ctx)
        engine.load_info = LoadInfo(
            load_ms=load_ms,
            engine_load_ms=float(perf.t_load_ms),
            rss_before_bytes=before,
            rss_after_bytes=memory.read().rss_bytes,
        )
        engine.settings = settings
        engine.info = engine.describe(path, compute_sha256=compute_sha256)
        return engine

    @classmethod
    def from_llama(cls, llm: Any) -> LlamaEngine:
        """Wrap an application's own ``llama_cpp.Llama`` (its settings and KV cache are shared with it)."""
        engine = cls(llm, owns_model=False)
        engine.requests_since_load = 1  # the load was not observed
        return engine

    def describe(self, path: Path, *, compute_sha256: bool = True) -> ModelInfo:
        meta: dict[str, str] = dict(self.llm.metadata)
        file_type = meta.get("general.file_type")
        exact = file_type_name(int(file_type)) if file_type is not None and file_type.isdigit() else None
        desc = ctypes.create_string_buffer(256)
        self._lib.llama_model_desc(self._model, desc, ctypes.sizeof(desc))
        n_ctx_train = meta.get(f"{meta.get('general.architecture', '')}.context_length")
        return ModelInfo(
            path=str(path),
            name=meta.get("general.name") or path.stem,
            file_bytes=path.stat().st_size,
            sha256=sha256_file(path) if compute_sha256 else "",
            architecture=meta.get("general.architecture"),
            quantization=exact,
            quantization_coarse=coarse_quantization(exact),
            description=desc.value.decode("utf-8", "replace") or None,
            n_params=int(self._lib.llama_model_n_params(self._model)),
            n_ctx_train=int(n_ctx_train) if n_ctx_train and n_ctx_train.isdigit() else None,
            chat_template="tokenizer.chat_template" in meta,
        )

    def close(self) -> None:
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_batch_free(self._one)
            self._batch = None
        if self._owns and self.llm is not None:
            self.llm.close()
        self.llm = None

    def __enter__(self) -> LlamaEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- prompt preparation (not timed) ----------------------------------------------------------------------
    def chat_prompt(self, user_text: str) -> str | None:
        """The prompt wrapped in the model's own chat template, or None when the model has none."""
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        eos_id, bos_id = self.llm.token_eos(), self.llm.token_bos()
        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self.llm._model.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=self.llm._model.token_get_text(bos_id) if bos_id != -1 else "",
        )
        return str(formatter(messages=[{"role": "user", "content": user_text}]).prompt)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """``text``'s ids; with ``add_bos``, a leading BOS where the model asks for one."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    # -- the timed loop --------------------------------------------------------------------------------------
    def _eog_mask(self) -> np.ndarray:
        if self._eog_ids is None:
            is_eog = self._lib.llama_vocab_is_eog
            self._eog_ids = np.asarray([t for t in range(self.n_vocab) if is_eog(self._vocab, t)], dtype=np.int64)
        return self._eog_ids

    def eog_ids(self) -> frozenset[int]:
        """The vocabulary's end-of-generation token ids (EOS, EOT, …)."""
        return frozenset(int(t) for t in self._eog_mask())

    def _logits_row(self) -> np.ndarray:
        """The last output row of logits as a numpy view (no copy)."""
        addr = self._get_logits_addr(self._ctx, -1)
        if not addr:
            raise RequestError("no_logits", "llama.cpp returned no logits for the last token")
        view = self._logits_views.get(addr)
        if view is None:
            buffer = (ctypes.c_float * self.n_vocab).from_address(addr)
            view = np.frombuffer(cast(Any, buffer), dtype=np.float32)  # ctypes arrays are buffers
            if len(self._logits_views) > 8:
                self._logits_views.clear()
            self._logits_views[addr] = view
        return view

    def _decode_prompt(self, tokens: list[int], start_pos: int) -> None:
        lib, batch = self._lib, self._batch
        for offset in range(0, len(tokens), self.n_batch):
            chunk = tokens[offset : offset + self.n_batch]
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = start_pos + offset + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 0
            batch.logits[len(chunk) - 1] = 1
            batch.n_tokens = len(chunk)
            rc = lib.llama_decode(self._ctx, batch)
            if rc != 0:
                raise RequestError("decode_failed", f"llama_decode returned {rc} on the prompt")

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int,
        ignore_eos: bool = False,
        reuse_cache: bool = False,
        on_token: Callable[[int], None] | None = None,
    ) -> Generation:
        """Time one request: tokenize, prefill, then one decode per token (greedy).

        The clock starts before tokenization; a token's stamp is taken once its id is known. With
        ``reuse_cache`` the longest common prefix with the previous request stays in the KV cache, as a chat
        application would keep it; otherwise every request starts from an empty cache.
        """
        if max_tokens < 1:
            raise ValueError("max_tokens must be ≥ 1")
        lib, ctx, vocab = self._lib, self._ctx, self._vocab
        _n_vocab, n_ctx = self.n_vocab, self.n_ctx
        eog = self._eog_mask() if ignore_eos else None
        memory = lib.llama_get_memory(ctx)
        lib.llama_perf_context_reset(ctx)
        clock = time.perf_counter_ns

        start = clock()
        tokens = self.tokenize(prompt)
        if not tokens:
            raise RequestError("empty_prompt", "the prompt has no tokens")
        if len(tokens) >= n_ctx:
            raise RequestError(
                "context_overflow", f"prompt has {len(tokens)} tokens; the context holds {n_ctx} (raise n_ctx)"
            )
        keep = 0
        if reuse_cache:
            for a, b in zip(self._cached, tokens[:-1], strict=False):
                if a != b:
                    break
                keep += 1
        lib.llama_memory_seq_rm(memory, -1, keep, -1) if keep else lib.llama_memory_clear(memory, True)
        self._cached = []
        prefill_start = clock()
        self._decode_prompt(tokens[keep:], keep)
        prefill_ns = clock() - prefill_start

        out: list[int] = []
        stamps: list[int] = []
        one = self._one
        pos = len(tokens)
        stop = "max_tokens"
        logits_row = self._logits_row
        decode = lib.llama_decode
        is_eog = lib.llama_vocab_is_eog
        while True:
            logits = logits_row()
            if eog is not None:
                logits[eog] = -np.inf
            tok = int(logits.argmax())
            stamps.append(clock())
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if eog is None and is_eog(vocab, tok):
                stop = "eos"
                break
            if len(out) >= max_tokens:
                break
            if pos >= n_ctx:
                stop = "context_full"
                break
            one.token[0] = tok
            one.pos[0] = pos
            rc = decode(ctx, one)
            if rc != 0:
                raise RequestError("decode_failed", f"llama_decode returned {rc} after {len(out)} tokens")
            pos += 1

        perf = lib.llama_perf_context(ctx)
        self._cached = tokens + out[:-1]
        self.requests_since_load += 1
        if not self._owns:
            self.llm.reset()  # the application's Llama must not trust its own view of the cache now
        text_tokens = out[:-1] if stop == "eos" else out
        text = self.llm.detokenize(text_tokens).decode("utf-8", "replace")
        return Generation(
            start_ns=start,
            token_ns=stamps,
            tokens=out,
            input_tokens=len(tokens),
            prefill_ns=prefill_ns,
            stop_reason=stop,
            perf={
                "t_p_eval_ms": float(perf.t_p_eval_ms),
                "n_p_eval": int(perf.n_p_eval),
                "t_eval_ms": float(perf.t_eval_ms),
                "n_eval": int(perf.n_eval),
            },
            text=text,
        )

    def accelerator(self) -> str:
        """What runs the model: the CPU, or a GPU through llama.cpp's layer offload."""
        layers = self.settings.n_gpu_layers if self.settings else 0
        if layers != 0 and bool(self._lib.llama_supports_gpu_offload()):
            return f"gpu offload ({'all' if layers < 0 else layers} layers)"
        if layers != 0:
            return "cpu (this llama.cpp build has no GPU offload; n_gpu_layers ignored)"
        return "cpu"

    # -- drafting for speculative decoding -------------------------------------------------------------------
    def piece(self, token: int) -> bytes:
        """The bytes a token stands for in the middle of a text (SentencePiece's ▁ as a space)."""
        buffer = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self._vocab, token, buffer, 64, 0, False)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buffer, -n, 0, False)
        return buffer.raw[:n]

    def sync_context(self, tokens: list[int]) -> None:
        """Make the KV cache hold exactly ``tokens`` with logits for the last one, reusing the common prefix."""
        if not tokens:
            raise RequestError("empty_prompt", "nothing to draft from")
        if len(tokens) >= self.n_ctx:
            raise RequestError("context_overflow", f"{len(tokens)} tokens; the context holds {self.n_ctx}")
        keep = 0
        for a, b in zip(self._cached, tokens[:-1], strict=False):
            if a != b:
                break
            keep += 1
        memory = self._lib.llama_get_memory(self._ctx)
        if keep:
            self._lib.llama_memory_seq_rm(memory, -1, keep, -1)
        else:
            self._lib.llama_memory_clear(memory, True)
        self._decode_prompt(tokens[keep:], keep)
        self._cached = list(tokens)

    def draft(self, k: int) -> list[int]:
        """Greedily extend the synced context by ``k`` tokens (end-of-generation tokens masked)."""
        eog = self._eog_mask()
        out: list[int] = []
        one = self._one
        for i in range(k):
            logits = self._logits_row()
            logits[eog] = -np.inf
            tok = int(logits.argmax())
            out.append(tok)
            if i + 1 < k:
                pos = len(self._cached)
                if pos >= self.n_ctx:
                    break
                one.token[0] = tok
                one.pos[0] = pos
                if self._lib.llama_decode(self._ctx, one) != 0:
                    raise RequestError("decode_failed", "llama_decode failed while drafting")
                self._cached.append(tok)
        return out

    def system_info(self) -> str:
        return bytes(self._lib.llama_print_system_info()).decode("utf-8", "replace").strip()
