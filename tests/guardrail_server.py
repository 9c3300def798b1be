"""A guardrail service on 127.0.0.1 that speaks NeMo Guardrails' checks endpoint and LLM Guard's API.

Neither server runs here offline (LLM Guard's scanners download their models at run time; NeMo Guardrails' rails call
an LLM), so this is a loopback implementation of the documented request/response shapes, with rails and scanners that
fire on planted words:

- ``POST /v1/guardrail/checks`` ``{"model"?, "messages": [{"role", "content"}, …], "guardrails"?: {"config_id"}}``:
  input rails run on the last user message when the last message is the user's, output rails on the assistant's when
  it is the assistant's. Answers ``{"status": "success"|"blocked", "rails_status": {rail: {"status": …}},
  "messages": […], "guardrails_data": {"config_ids": […]}}``; a body that does not fit → 422 as FastAPI answers.
- ``POST /v1/checks`` (the open-source ``nemoguardrails server``, 0.24): ``{"model", "messages", "guardrails":
  {"config_id" | "config_ids", "rail_types"?}}``; the rails of ``rail_types`` (else input rails when there is a user
  message, output rails when there is an assistant message) run in order, the first that blocks stops them; a masking
  rail rewrites the text. Answers ``{"status": "passed"|"modified"|"blocked", "content", "rail"?}``.
- ``POST /analyze/prompt`` ``{"prompt"}`` → ``{"sanitized_prompt", "is_valid", "scanners": {name: risk}}`` and
  ``POST /analyze/output`` ``{"prompt", "output"}`` → ``{"sanitized_output", "is_valid", "scanners"}``: a scanner
  scores ``hit_risk`` when one of its words is in the text, else ``miss_risk`` (LLM Guard's scores are in [-1, 1];
  ``is_valid`` is false when any scanner scores over 0). With ``token`` set, both APIs want ``Authorization: Bearer``.

``server_timing`` adds ``Server-Timing: guard;dur=<the handler's own ms>``; ``delay_s`` sleeps in the handler (time the
server spends, so it is in that figure). ``mode`` turns every answer hostile (see :data:`MODES`). It runs on its own
event loop in a thread, so synchronous checks can call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from aiohttp import web

from .loop_server import LoopServer

NEMO_RAILS: dict[str, tuple[str, tuple[str, ...]]] = {  # rail → (where it runs, planted words)
    "jailbreak detection": ("input", ("ignore all previous instructions",)),
    "detect sensitive data on input": ("input", ("alice@example.com",)),
    "self check input": ("input", ("build a bomb",)),
    "activefence moderation on input": ("input", ("you idiot",)),
    "detect sensitive data on output": ("output", ("alice@example.com",)),
    "content safety check output $model=llama-3.1-nemoguard-8b-content-safety": ("output", ("you idiot",)),
}
MASK_RAILS: dict[str, tuple[str, tuple[str, ...]]] = {  # the open-source server's masking rails (status modified)
    "mask sensitive data on output": ("output", ("bob@example.com",)),
}
LLM_GUARD_INPUT: dict[str, tuple[str, ...]] = {
    "PromptInjection": ("ignore all previous instructions",),
    "Anonymize": ("alice@example.com",),
    "Secrets": ("AKIAIOSFODNN7EXAMPLE",),
    "BanTopics": ("election",),
    "TokenLimit": (),
}
LLM_GUARD_OUTPUT: dict[str, tuple[str, ...]] = {
    "Sensitive": ("alice@example.com",),
    "Toxicity": ("you idiot",),
    "NoRefusal": (),
}

MODES = {
    "ok": "the documented answers",
    "garbage": "200 text/html that is not JSON",
    "nan": "200 JSON with a NaN where a number or status goes",
    "huge": "200 JSON streamed without a length, 4 MiB and more",
    "huge-declared": "200 with a Content-Length of 64 MiB",
    "wrong-types": "200 JSON of the right keys with the wrong types",
    "missing-fields": "200 JSON {} (no verdict)",
    "unknown-status": "200 JSON with status 'maybe' / rails with status 'unknown' (nemo)",
    "risk-out-of-range": "200 JSON with a scanner risk of 1.7 (llm-guard)",
    "valid-with-risk": "200 JSON is_valid true with PromptInjection scoring 1.0 (llm-guard: contradicts itself)",
    "valid-with-low-risk": "200 JSON is_valid true with Toxicity scoring 0.3 (llm-guard: over 0 is over the threshold)",
    "echo-422": "422 JSON echoing the request body, as FastAPI's validation errors do (the prompt in the answer)",
    "array": "200 JSON [] (not an object)",
    "500": "500 text/html",
    "404": "404 JSON",
    "redirect": "302 to the same path",
    "hang": "no answer at all",
    "slow-drip": "200 with a body trickling one byte every 300 ms",
    "close": "the connection closed before an answer",
    "bad-server-timing": "a documented answer with Server-Timing dur=abc",
    "server-timing-too-long": "a documented answer whose Server-Timing says 10 minutes",
}


class GuardrailServer(LoopServer):
    def __init__(
        self,
        *,
        token: str | None = None,
        server_timing: bool = True,
        delay_s: float = 0.0,
        hit_risk: float = 0.9,
        miss_risk: float = -1.0,
    ) -> None:
        self.token = token
        self.server_timing = server_timing
        self.delay_s = delay_s
        self.hit_risk = hit_risk
        self.miss_risk = miss_risk
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []  # the last 100: path, Authorization header, body, client address
        super().__init__()

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def _app(self) -> web.Application:
        app = web.Application(client_max_size=4 * 1024**2)
        app.router.add_post("/v1/guardrail/checks", self._nemo)
        app.router.add_post("/v1/checks", self._nemo_server)
        app.router.add_post("/analyze/prompt", self._analyze_prompt)
        app.router.add_post("/analyze/output", self._analyze_output)
        return app

    async def _stop(self) -> None:
        await super()._stop()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]  # handlers still hanging
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the documented APIs ----------------------------------------------------------------------------------------
    async def _read(self, request: web.Request) -> tuple[Any, web.Response | None]:
        raw = await request.read()
        self.requests.append(
            {
                "path": request.path,
                "authorization": request.headers.get("Authorization"),
                "body": raw.decode(),
                "peer": request.transport.get_extra_info("peername") if request.transport else None,
            }
        )
        del self.requests[:-100]
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return None, web.json_response({"detail": "Not authenticated"}, status=401)
        try:
            return json.loads(raw), None
        except ValueError:
            return None, web.json_response(
                {"detail": [{"type": "json_invalid", "msg": "JSON decode error"}]}, status=422
            )

    @staticmethod
    def _unprocessable(field: str) -> web.Response:
        return web.json_response(
            {"detail": [{"type": "missing", "loc": ["body", field], "msg": "Field required"}]}, status=422
        )

    async def _nemo(self, request: web.Request) -> web.StreamResponse:
        start = time.perf_counter()
        body, refused = await self._read(request)
        if refused is not None:
            return refused
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            return self._unprocessable("messages")
        for message in messages:
            if not (
                isinstance(message, dict)
                and message.get("role") in ("user", "assistant", "system")
                and isinstance(message.get("content"), str)
            ):
                return self._unprocessable("messages")
        guardrails = body.get("guardrails", {})
        if not isinstance(guardrails, dict) or not isinstance(guardrails.get("config_id", "default"), str):
            return self._unprocessable("guardrails")
        last = messages[-1]
        where = "output" if last["role"] == "assistant" else "input"
        content = last["content"].lower()
        rails: dict[str, Any] = {}
        for rail, (stage, words) in NEMO_RAILS.items():
            if stage == where:
                rails[rail] = {"status": "blocked" if any(w in content for w in words) else "success"}
        blocked = any(state["status"] == "blocked" for state in rails.values())
        answer: dict[str, Any] = {
            "status": "blocked" if blocked else "success",
            "rails_status": rails,
            "messages": messages,
            "guardrails_data": {"config_ids": [guardrails.get("config_id", "default")]},
        }
        if self.mode == "wrong-types":
            answer = {"status": 1, "rails_status": ["jailbreak detection"]}
        elif self.mode == "unknown-status":
            answer = {"status": "blocked", "rails_status": {rail: {"status": "unknown"} for rail in rails}}
        return await self._answer(request, answer, start)

    async def _nemo_server(self, request: web.Request) -> web.StreamResponse:
        start = time.perf_counter()
        body, refused = await self._read(request)
        if refused is not None:
            return refused
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return self._unprocessable("model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return web.json_response({"detail": "messages must be non-empty"}, status=422)
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            return self._unprocessable("messages")
        guardrails = body.get("guardrails", {})
        if not isinstance(guardrails, dict) or ("config_id" in guardrails and "config_ids" in guardrails):
            return self._unprocessable("guardrails")
        rail_types = guardrails.get("rail_types")
        if rail_types is None:
            roles = {m.get("role") for m in messages}
            rail_types = [t for t, role in (("input", "user"), ("output", "assistant")) if role in roles]
        if not isinstance(rail_types, list) or not all(t in ("input", "output") for t in rail_types):
            return self._unprocessable("guardrails.rail_types")
        answer: dict[str, Any] = {"status": "passed", "content": ""}
        for where in rail_types:
            answer = self._run_rails(where, messages)
            if answer["status"] != "passed":
                break
        if self.mode == "wrong-types":
            answer = {"status": 1, "content": 5}
        elif self.mode == "unknown-status":
            answer = {"status": "maybe", "content": ""}
        return await self._answer(request, answer, start)

    @staticmethod
    def _run_rails(where: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
        role = "user" if where == "input" else "assistant"
        said = [m["content"] for m in messages if m.get("role") == role]
        content = said[-1] if said else ""
        for rail, (stage, words) in NEMO_RAILS.items():
            if stage == where and any(w in content.lower() for w in words):
                return {"status": "blocked", "content": content, "rail": rail}
        for rail, (stage, words) in MASK_RAILS.items():
            if stage == where and any(w in content.lower() for w in words):
                for word in words:
                    content = content.replace(word, "<EMAIL_ADDRESS>")
                return {"status": "modified", "content": content, "rail": rail}
        return {"status": "passed", "content": content}

    async def _analyze_prompt(self, request: web.Request) -> web.StreamResponse:
        start = time.perf_counter()
        body, refused = await self._read(request)
        if refused is not None:
            return refused
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            return self._unprocessable("prompt")
        return await self._answer(request, self._scan(LLM_GUARD_INPUT, body["prompt"], "sanitized_prompt"), start)

    async def _analyze_output(self, request: web.Request) -> web.StreamResponse:
        start = time.perf_counter()
        body, refused = await self._read(request)
        if refused is not None:
            return refused
        for field in ("prompt", "output"):
            if not isinstance(body, dict) or not isinstance(body.get(field), str):
                return self._unprocessable(field)
        return await self._answer(request, self._scan(LLM_GUARD_OUTPUT, body["output"], "sanitized_output"), start)

    def _scan(self, scanners: dict[str, tuple[str, ...]], text: str, sanitized: str) -> dict[str, Any]:
        lowered = text.lower()
        scores = {
            name: self.hit_risk if any(w.lower() in lowered for w in words) else self.miss_risk
            for name, words in scanners.items()
        }
        answer: dict[str, Any] = {sanitized: text, "is_valid": all(s <= 0 for s in scores.values()), "scanners": scores}
        if self.mode == "wrong-types":
            answer = {sanitized: text, "is_valid": "yes", "scanners": list(scores)}
        elif self.mode == "risk-out-of-range":
            answer["scanners"] = {**scores, "PromptInjection": 1.7}
        elif self.mode == "unknown-status":
            answer["is_valid"] = None
        elif self.mode == "valid-with-risk":
            answer["scanners"] = {**scores, "PromptInjection": 1.0}
            answer["is_valid"] = True
        elif self.mode == "valid-with-low-risk":
            answer["scanners"] = {**scores, "Toxicity": 0.3}
            answer["is_valid"] = True
        return answer

    # -- answering, documented or hostile ---------------------------------------------------------------------------
    async def _answer(self, request: web.Request, answer: Any, start: float) -> web.StreamResponse:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        mode = self.mode
        headers: dict[str, str] = {}
        if self.server_timing:
            headers["Server-Timing"] = f"guard;dur={(time.perf_counter() - start) * 1000:.3f}"
        if mode == "bad-server-timing":
            headers["Server-Timing"] = "guard;dur=abc"
        elif mode == "server-timing-too-long":
            headers["Server-Timing"] = "guard;dur=600000"
        if mode in (
            "ok",
            "wrong-types",
            "unknown-status",
            "risk-out-of-range",
            "valid-with-risk",
            "valid-with-low-risk",
            "bad-server-timing",
        ):
            return web.json_response(answer, headers=headers)
        if mode == "echo-422":  # FastAPI's RequestValidationError answer: the body it refused, quoted back
            body = self.requests[-1]["body"] if self.requests else ""
            detail = {"type": "value_error", "loc": ["body"], "msg": "Value error", "input": json.loads(body or "null")}
            return web.json_response({"detail": [detail], "body": body}, status=422)
        if mode == "server-timing-too-long":
            return web.json_response(answer, headers=headers)
        if mode == "garbage":
            return web.Response(body=b"<html><body>Welcome to Hotel WiFi</body></html>", content_type="text/html")
        if mode == "nan":
            return web.Response(
                body=b'{"status": NaN, "is_valid": NaN, "scanners": {"X": NaN}}', content_type="application/json"
            )
        if mode == "missing-fields":
            return web.json_response({})
        if mode == "array":
            return web.json_response([answer])
        if mode == "500":
            return web.Response(status=500, body=b"<html>Internal Server Error</html>", content_type="text/html")
        if mode == "404":
            return web.json_response({"detail": "Not Found"}, status=404)
        if mode == "redirect":
            return web.Response(status=302, headers={"Location": request.path})
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "close":
            if request.transport is not None:
                request.transport.close()
            return web.Response()
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        if mode == "huge-declared":
            response.content_length = 64 * 1024**2
            await response.prepare(request)
            with contextlib.suppress(ConnectionError, OSError):
                await response.write(b'{"status": "')
            return response
        await response.prepare(request)
        with contextlib.suppress(ConnectionError, OSError):
            if mode == "huge":
                await response.write(b'{"status": "success", "padding": "')
                for _ in range(64):
                    await response.write(b"x" * 65536)
                await response.write(b'"}')
            elif mode == "slow-drip":
                for byte in json.dumps(answer).encode():
                    await response.write(bytes([byte]))
                    await asyncio.sleep(0.3)
            else:
                raise AssertionError(f"unknown mode {mode}")
        return response
