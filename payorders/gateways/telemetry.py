"""The Prometheus metrics every gateway adapter records its calls in, so that a dashboard
reads the same series whichever gateway a deployment runs.

``op`` is the port's method (``open_trade``, ``close_trade``, ``refund``, ...); ``outcome``
is ``ok``, ``not_found``, or what went wrong (``ambiguous_timeout``, ``unavailable``,
``http_429``, ...). Adapters share this module and never import each other.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

CALLS = Counter(
    "payorders_gateway_calls_total", "Gateway calls by operation and outcome", ["op", "outcome"]
)
OBSERVED = Histogram("payorders_gateway_observed_seconds", "Call time seen by our client", ["op"])
PROCESSING = Histogram(
    "payorders_gateway_processing_seconds", "Time the gateway says it spent", ["op"]
)
