"""Prometheus metrics under vLLM's names and types (docs.vllm.ai, "Production Metrics"),
so dashboards and autoscalers written for vLLM read a twinserve server unchanged.

Gauges and the preemption / prefix-cache counters are read from the policy after every
step; token counters, request_success and the latency histograms are updated when a
request finishes (an aborted request counts in none of them). Every series carries the
`model_name` label (the served model name). The `twinserve:` histograms are the server's
own: the stages of the HTTP path around the engine's TTFT (benchmarks/compare_http.py
splits HTTP's cost on TTFT into the client's share and the server's with them).
"""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from server.backend import Finished

# vLLM's bucket boundaries (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
# the server's own stages of a request (twinserve's, not vLLM's): milliseconds matter
STAGE_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
                 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# the twin's pacing: how late a step's tokens leave (a sleep wakes ~0.05-0.1 ms late)
PACING_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    """One registry per server (tests run several in one process)."""
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]

        def gauge(name, doc):
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prefix_queries = counter("vllm:prefix_cache_queries",
                                      "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_hits = counter("vllm:prefix_cache_hits",
                                   "Prefix cache hits, in terms of number of cached tokens.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               labels + ["finished_reason"], registry=r)
        self.model_name = model_name
        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", REQUEST_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", REQUEST_BUCKETS)
        # Where the HTTP path spends a request's TTFT, on the server's side (twinserve's own
        # series): the client's TTFT = (client and transport) + prepare + the engine's TTFT
        # above + handoff + write, so the client's share is what remains.
        self.prepare = histogram("twinserve:request_prepare_seconds",
                                 "From the request's handler starting to the request queued in the "
                                 "engine (body read, parse, validation, tokenization).", STAGE_BUCKETS)
        self.handoff = histogram("twinserve:first_token_handoff_seconds",
                                 "Streamed requests: from the engine's first token to its stream "
                                 "handler holding it (engine process, pipe, event loop).", STAGE_BUCKETS)
        self.write = histogram("twinserve:first_chunk_write_seconds",
                               "Streamed requests: from the stream handler holding the first token "
                               "to its chunk written to the socket (detokenize, JSON, SSE, HTTP).",
                               STAGE_BUCKETS)
        self.pacing_late = histogram("twinserve:pacing_lateness_seconds",
                                     "The simulated backend only: how late each step's tokens "
                                     "left for the server against the twin's clock (its host "
                                     "keeping pace with the GPU it simulates).", PACING_BUCKETS)
        self.seen = {"preemptions": 0, "prefix_queries": 0, "prefix_hits": 0}

    def after_step(self, stats: dict) -> None:
        """The policy's state after a step (`Backend.stats()`)."""
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.kv_usage.set(stats["kv_usage"])
        for key, counter in (("preemptions", self.preemptions),
                             ("prefix_queries", self.prefix_queries), ("prefix_hits", self.prefix_hits)):
            now = stats[key]
            if now > self.seen[key]:
                counter.inc(now - self.seen[key])
            self.seen[key] = now

    def finished(self, f: Finished) -> None:
        self.prompt_tokens.inc(f.num_prompt_tokens)
        self.generation_tokens.inc(len(f.token_ids))
        if f.finish_reason in ("stop", "length"):
            self.success.labels(self.model_name, f.finish_reason).inc()
        times = f.token_times
        if times:
            self.ttft.observe(times[0] - f.arrival_time)
            for a, b in zip(times, times[1:]):
                self.itl.observe(b - a)
        if f.finish_time is not None:
            self.e2e.observe(f.finish_time - f.arrival_time)
        if f.first_scheduled_time is not None:
            self.queue.observe(f.first_scheduled_time - f.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
