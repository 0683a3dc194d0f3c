"""The process's own routes, without a token: ``/healthz`` (liveness), ``/readyz`` (ready
only when PostgreSQL and Temporal answer) and ``/metrics`` (Prometheus's; see
``payorders.service.metrics``)."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from payorders.service.deps import DepsDep

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    """Prometheus exposition of the default registry (``payorders_api_*``,
    ``payorders_gateway_*``, the process); not itself counted in the request metrics."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/readyz", responses={503: {"description": "not ready"}})
async def readyz(deps: DepsDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        await deps.store.ping()
        checks["postgres"] = "ok"
    except Exception as e:
        checks["postgres"] = type(e).__name__
    try:
        await deps.client.service_client.check_health(timeout=timedelta(seconds=2))
        checks["temporal"] = "ok"
    except Exception as e:
        checks["temporal"] = type(e).__name__
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)
