"""Prometheus metrics of a node, with FastDeploy's metric names under a `pdserve:` prefix."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from pdserve.engine.messages import EngineStats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)


class NodeMetrics:
    """One registry per node (tests run several nodes in one interpreter)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "pdserve:"
        self.running = Gauge(p + "num_requests_running", "Requests being computed", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests waiting for KV blocks",
                             registry=r)  # fmt: skip
        self.kv_usage = Gauge(p + "gpu_cache_usage_perc", "Share of KV blocks in use (0-1)",
                              registry=r)  # fmt: skip
        self.free_blocks = Gauge(p + "kv_free_blocks", "KV blocks no request holds", registry=r)
        self.total_blocks = Gauge(p + "kv_total_blocks", "KV blocks in the pool", registry=r)
        self.prefix_queries = Gauge(p + "prefix_cache_queries_tokens",
                                    "Prompt tokens looked up in the prefix cache (cumulative)",
                                    registry=r)  # fmt: skip
        self.prefix_hits = Gauge(p + "prefix_cache_hits_tokens",
                                 "Prompt tokens found in the prefix cache (cumulative)",
                                 registry=r)  # fmt: skip
        self.prefix_hit_rate = Gauge(p + "prefix_cache_hit_rate",
                                     "prefix_cache_hits_tokens / prefix_cache_queries_tokens",
                                     registry=r)  # fmt: skip
        self.preemptions = Gauge(p + "num_preemptions", "Requests preempted (cumulative)",
                                 registry=r)  # fmt: skip
        self.host_blocks = Gauge(p + "swap_space_blocks", "KV blocks of the --swap-space tier",
                                 registry=r)  # fmt: skip
        self.swapped_in = Gauge(p + "swap_in_blocks", "Prefix blocks restored from the host tier "
                                "(cumulative)", registry=r)  # fmt: skip
        self.swapped_out = Gauge(p + "swap_out_blocks", "Prefix blocks saved to the host tier "
                                 "(cumulative)", registry=r)  # fmt: skip
        self.pd_fallback = Counter(p + "pd_fallback", "Remote prefills that failed and were "
                                   "recomputed locally", registry=r)  # fmt: skip
        self.kv_bytes_received = Counter(p + "kv_bytes_received", "KV bytes received from "
                                         "prefill nodes", registry=r)  # fmt: skip
        self.kv_bytes_sent = Counter(p + "kv_bytes_sent", "KV bytes pushed to decode nodes",
                                     registry=r)  # fmt: skip
        self.kv_transfers = Counter(p + "kv_transfers", "Prompt KV transfers pushed, by transport",
                                    ["transport"], registry=r)  # fmt: skip
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tpot = Histogram(p + "time_per_output_token_seconds", "Time between output tokens",
                              buckets=_TOKEN_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Request latency",
                             buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.requests = Counter(p + "request_success", "Finished requests by finish reason",
                                ["finish_reason"], registry=r)  # fmt: skip
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)

    def update_engine(self, s: EngineStats) -> None:
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.kv_usage.set(s.kv_usage)
        self.free_blocks.set(s.num_free_blocks)
        self.total_blocks.set(s.num_blocks)
        self.prefix_queries.set(s.prefix_queries)
        self.prefix_hits.set(s.prefix_hits)
        self.prefix_hit_rate.set(s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0)
        self.preemptions.set(s.num_preemptions)
        self.host_blocks.set(s.num_host_blocks)
        self.swapped_in.set(s.swapped_in)
        self.swapped_out.set(s.swapped_out)

    def render(self) -> bytes:
        return generate_latest(self.registry)
