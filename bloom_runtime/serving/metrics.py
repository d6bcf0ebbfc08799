"""The server's Prometheus metrics: vLLM's names (`vllm:time_to_first_token_seconds`, ...) under
this project's prefix, in a registry of the server's own (two servers in one process, as in the
tests, keep separate counts)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "bloom_runtime:"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0, 160.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        self.running = self._one(Gauge, "num_requests_running", "Requests in the running batch.")
        self.waiting = self._one(Gauge, "num_requests_waiting", "Requests waiting to be admitted.")
        self.ttft = self._one(Histogram, "time_to_first_token_seconds", "Arrival to first token.",
                              buckets=LATENCY_BUCKETS)
        self.itl = self._one(Histogram, "inter_token_latency_seconds", "Time between a sequence's tokens.",
                             buckets=LATENCY_BUCKETS)
        self.e2e = self._one(Histogram, "e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=LATENCY_BUCKETS)
        self.queue = self._one(Histogram, "request_queue_time_seconds", "Arrival to admission.",
                               buckets=LATENCY_BUCKETS)
        self.batch_size = self._one(Histogram, "iteration_batch_size", "Sequences in each decode step.",
                                    buckets=BATCH_BUCKETS)
        self.prompt_tokens = self._one(Counter, "prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = self._one(Counter, "generation_tokens", "Tokens generated.")
        self._success = Counter(PREFIX + "request_success", "Requests completed, by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self._failure = Counter(PREFIX + "request_failure", "Requests not completed, by reason.",
                                ["model_name", "reason"], registry=self.registry)

    def _one(self, kind: type, name: str, doc: str, **kwargs):
        """A metric of `kind` labelled with the model name alone."""
        metric = kind(PREFIX + name, doc, ["model_name"], registry=self.registry, **kwargs)
        return metric.labels(model_name=self.model)

    def success(self, finished_reason: str) -> None:
        self._success.labels(model_name=self.model, finished_reason=finished_reason).inc()

    def failure(self, reason: str) -> None:
        self._failure.labels(model_name=self.model, reason=reason).inc()
