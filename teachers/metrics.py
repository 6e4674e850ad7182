"""Prometheus metrics of a teacher server (prometheus_client), served on ``--prometheus_port`` when
``--enable_prometheus`` is given (Paddle Serving's flags) at ``GET /metrics``.

Names follow Prometheus' conventions (``distill_teacher_`` prefix, base units, ``_total`` counters):

- ``distill_teacher_requests_total{transport, err_no}``: answered requests by transport (grpc, http) and
  Paddle Serving ``err_no`` (the codes and their meaning: ``distill_base.status_codes``; ``bad_request`` for an
  HTTP/gRPC body that is not a Request at all);
- ``distill_teacher_request_duration_seconds{transport}``: histogram of request latency, receipt to answer;
- ``distill_teacher_samples_total``: samples answered;
- ``distill_teacher_batch_size``: histogram of samples per predictor run (merged runs included);
- ``distill_teacher_queue_depth``: gauge of requests waiting for a predictor;
- ``distill_teacher_predictor_runs_in_progress``: gauge of predictor worker processes running a batch now;
- ``distill_teacher_predictor_busy_seconds_total``: seconds predictors spent running (divide its rate by
  ``--thread`` for utilisation); ``distill_teacher_predictor_cpu_seconds_total``: CPU seconds of those runs
  (what the predictor costs; the rest of the process's CPU is the server's own cost per request);
- ``distill_teacher_serving``: gauge, 1 while health says SERVING.

Example::

    metrics = TeacherMetrics()
    metrics.observe_request("grpc", "0", 0.003, samples=32)
    text = metrics.exposition()          # bytes in the Prometheus text format
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class TeacherMetrics:
    """The metrics of one server, in their own registry (several servers may live in one process)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("distill_teacher_requests", "Requests answered, by transport and err_no",
                                ["transport", "err_no"], registry=self.registry)
        self.latency = Histogram("distill_teacher_request_duration_seconds", "Request latency, receipt to answer",
                                 ["transport"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.samples = Counter("distill_teacher_samples", "Samples answered", registry=self.registry)
        self.batch_size = Histogram("distill_teacher_batch_size", "Samples per predictor run",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.busy = Counter("distill_teacher_predictor_busy_seconds", "Seconds predictors spent running",
                            registry=self.registry)
        self.predictor_cpu = Counter("distill_teacher_predictor_cpu_seconds", "CPU seconds of predictor runs",
                                     registry=self.registry)
        self.queue_depth = Gauge("distill_teacher_queue_depth", "Requests waiting for a predictor",
                                 registry=self.registry)
        self.runs_in_progress = Gauge("distill_teacher_predictor_runs_in_progress",
                                      "Predictor worker processes running a batch now", registry=self.registry)
        self.serving = Gauge("distill_teacher_serving", "1 while the server's health is SERVING",
                             registry=self.registry)
        self._children: dict = {}

    def observe_request(self, transport: str, err_no: str, seconds: float, samples: int) -> None:
        children = self._children.get((transport, err_no))
        if children is None:
            children = self._children[(transport, err_no)] = (self.requests.labels(transport, err_no),
                                                               self.latency.labels(transport))
        children[0].inc()
        children[1].observe(seconds)
        if err_no == "0":
            self.samples.inc(samples)

    def observe_run(self, samples: int, seconds: float, cpu_seconds: float = 0.0) -> None:
        self.batch_size.observe(samples)
        self.busy.inc(seconds)
        self.predictor_cpu.inc(cpu_seconds)

    def track_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def track_runs(self, running: Callable[[], float]) -> None:
        self.runs_in_progress.set_function(running)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
