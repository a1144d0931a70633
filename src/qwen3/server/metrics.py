"""Prometheus metrics for ``GET /metrics``: what the server did, and what the engine holds right now.

Counters and histograms are updated as requests flow (HTTP status, finish reasons, tokens, latencies);
engine state (running and waiting sequences, KV blocks, prefix-cache hits) is read at scrape time by a
collector, so the engine thread never does metrics work. Each app has its own registry, so several
servers (tests) can live in one process.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from qwen3.async_llm import AsyncLLM, StreamDelta

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
)
_TPOT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class EngineCollector(Collector):
    """Engine gauges, read when Prometheus scrapes (plain reads of ints; no lock needed for a gauge)."""

    def __init__(self, front: AsyncLLM) -> None:
        self.front = front

    def collect(self) -> Iterator[Metric]:
        engine = self.front.engine
        blocks = engine.blocks
        yield GaugeMetricFamily(
            "qwen3_num_requests_running", "Sequences in the running batch", value=self.front.num_running()
        )
        yield GaugeMetricFamily(
            "qwen3_num_requests_waiting",
            "Sequences submitted and not running (queued or preempted)",
            value=self.front.num_waiting(),
        )
        yield GaugeMetricFamily("qwen3_kv_cache_blocks_used", "KV-cache blocks in use", value=blocks.num_used)
        yield GaugeMetricFamily("qwen3_kv_cache_blocks_total", "KV-cache blocks", value=blocks.num_blocks)
        yield GaugeMetricFamily(
            "qwen3_kv_cache_usage_ratio",
            "Fraction of KV-cache blocks in use",
            value=blocks.num_used / blocks.num_blocks,
        )
        yield GaugeMetricFamily(
            "qwen3_prefix_cache_hit_rate",
            "Prompt blocks found in the prefix cache / looked up",
            value=blocks.hit_rate,
        )
        yield CounterMetricFamily(
            "qwen3_prefix_cache_queries",
            "Prompt blocks looked up in the prefix cache",
            value=blocks.prefix_queries,
        )
        yield CounterMetricFamily(
            "qwen3_prefix_cache_hits", "Prompt blocks found in the prefix cache", value=blocks.prefix_hits
        )
        yield CounterMetricFamily(
            "qwen3_num_preemptions",
            "Sequences preempted for lack of KV blocks",
            value=engine.scheduler.num_preemptions,
        )


class Metrics:
    """The server's own registry and instruments."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "qwen3_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.finished = Counter(
            "qwen3_request_finish",
            "Finished sequences by finish reason (abort: the client left or the server stopped)",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("qwen3_prompt_tokens", "Prompt tokens submitted", registry=r)
        self.generation_tokens = Counter("qwen3_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "qwen3_time_to_first_token_seconds",
            "Time from request arrival to its first generated token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "qwen3_time_per_output_token_seconds",
            "Time between output tokens of one sequence (after the first)",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "qwen3_e2e_request_latency_seconds",
            "Time from request arrival to a sequence's last token",
            buckets=_E2E_BUCKETS,
            registry=r,
        )

    def watch_engine(self, front: AsyncLLM) -> None:
        self.registry.register(EngineCollector(front))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def observe(self, stream: AsyncIterator[StreamDelta], arrival: float) -> AsyncIterator[StreamDelta]:
        """Pass a sequence's deltas through, timing them and counting its tokens and finish reason."""
        last: float | None = None
        reason = "abort"
        try:
            async for delta in stream:
                now = time.perf_counter()
                if delta.token_ids:
                    if last is None:
                        self.ttft.observe(now - arrival)
                    else:
                        per_token = (now - last) / len(delta.token_ids)
                        for _ in delta.token_ids:
                            self.tpot.observe(per_token)
                    last = now
                    self.generation_tokens.inc(len(delta.token_ids))
                if delta.finished:
                    reason = delta.finish_reason or "stop"
                    self.e2e.observe(now - arrival)
                yield delta
        finally:
            self.finished.labels(reason=reason).inc()
            await stream.aclose()  # type: ignore[attr-defined]
