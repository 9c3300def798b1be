"""A loopback OTLP/HTTP receiver for the tests: decodes every request with opentelemetry-proto and keeps it.

It can play a backend that is down (503 with Retry-After), a captive portal or proxy answering ``200`` with a page,
a backend refusing (400) any request that carries a given trace id, a backend refusing (400) every request
(``refuse``), and one answering with an absurd ``partial_success`` count (``partial_rejected``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


def value_of(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def attrs(key_values: Any) -> dict[str, Any]:
    return {kv.key: value_of(kv.value) for kv in key_values}


@dataclass
class Receiver:
    mode: str = "ok"  # ok | down | portal (a captive portal or proxy answering 200) | refuse (400 to everything)
    refuse_trace_ids: set[bytes] = field(default_factory=set)
    partial_rejected: int | None = None  # partial_success.rejected_spans / rejected_data_points in every answer
    refuse_devices: set[str] = field(default_factory=set)  # 400 to any request carrying one of these devices
    traces: list[Any] = field(default_factory=list)  # ExportTraceServiceRequest, in arrival order
    metrics: list[Any] = field(default_factory=list)  # ExportMetricsServiceRequest
    logs: list[Any] = field(default_factory=list)  # ExportLogsServiceRequest
    answers: list[tuple[str, int]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post("/v1/traces", self.handle)
        app.router.add_post("/v1/metrics", self.handle)
        app.router.add_post("/v1/logs", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        signal = request.path.rsplit("/", 1)[1]
        body = await request.read()
        if self.mode == "down":
            self.answers.append((signal, 503))
            return web.Response(status=503, text="unavailable", headers={"Retry-After": "0"})
        if self.mode == "refuse":  # a backend that is wrong, not the records: 400 whatever arrives
            self.answers.append((signal, 400))
            return web.Response(status=400, text="invalid request")
        if self.mode == "portal":  # a sign-in page, then an empty 200 (a proxy's): neither is an OTLP answer
            self.answers.append((signal, 200))
            if sum(1 for name, _ in self.answers if name == signal) % 2:
                page = "<html><body>Sign in to the hotel Wi-Fi</body></html>"
                return web.Response(status=200, text=page, content_type="text/html")
            return web.Response(status=200, body=b"", content_type="text/plain")
        assert request.content_type == "application/x-protobuf"
        if signal == "traces":
            message = trace_service_pb2.ExportTraceServiceRequest()
            message.ParseFromString(body)
            ids = {s.trace_id for rs in message.resource_spans for ss in rs.scope_spans for s in ss.spans}
            devices = {attrs(rs.resource.attributes).get("lens.device.id") for rs in message.resource_spans}
            if ids & self.refuse_trace_ids or devices & self.refuse_devices:
                self.answers.append((signal, 400))
                return web.Response(status=400, text="invalid span")
            self.traces.append(message)
            answer: Any = trace_service_pb2.ExportTraceServiceResponse()
            if self.partial_rejected is not None:
                answer.partial_success.rejected_spans = self.partial_rejected
        elif signal == "logs":
            message = logs_service_pb2.ExportLogsServiceRequest()
            message.ParseFromString(body)
            if {attrs(rl.resource.attributes).get("lens.device.id") for rl in message.resource_logs} & (
                self.refuse_devices
            ):
                self.answers.append((signal, 400))
                return web.Response(status=400, text="invalid log record")
            self.logs.append(message)
            answer = logs_service_pb2.ExportLogsServiceResponse()
            if self.partial_rejected is not None:
                answer.partial_success.rejected_log_records = self.partial_rejected
        else:
            message = metrics_service_pb2.ExportMetricsServiceRequest()
            message.ParseFromString(body)
            if {attrs(rm.resource.attributes).get("lens.device.id") for rm in message.resource_metrics} & (
                self.refuse_devices
            ):
                self.answers.append((signal, 400))
                return web.Response(status=400, text="invalid data point")
            self.metrics.append(message)
            answer = metrics_service_pb2.ExportMetricsServiceResponse()
            if self.partial_rejected is not None:
                answer.partial_success.rejected_data_points = self.partial_rejected
        self.answers.append((signal, 200))
        return web.Response(body=answer.SerializeToString(), content_type="application/x-protobuf")

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """Every span received, with its resource's attributes."""
        return [
            (attrs(rs.resource.attributes), span)
            for message in self.traces
            for rs in message.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]

    def points(self) -> list[tuple[dict[str, Any], Any, Any]]:
        """Every histogram data point received: (resource attributes, metric, point)."""
        return [
            (attrs(rm.resource.attributes), metric, point)
            for message in self.metrics
            for rm in message.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            for point in metric.histogram.data_points
        ]

    def log_records(self) -> list[tuple[dict[str, Any], Any]]:
        """Every log record received, with its resource's attributes, in arrival order."""
        return [
            (attrs(rl.resource.attributes), record)
            for message in self.logs
            for rl in message.resource_logs
            for sl in rl.scope_logs
            for record in sl.log_records
        ]
