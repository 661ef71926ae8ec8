"""What every request of the Serve app passes before and after its route: bearer auth, the
ingress in-flight cap and per-route metrics (plain ASGI middleware), and the JSON response that
writes numpy vectors directly."""

import collections
import hmac
import time
from typing import Any

import numpy as np
import orjson
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from raylib.ray_serve.errors import error_response

ROUTES = ("/v1/embeddings", "/v1/models", "/encode", "/rerank", "/health", "/metrics")
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]


class Stats:
    """Per-ingress-replica request counts and latencies for GET /metrics (also exported as
    ray.serve.metrics for Prometheus)."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.counts: collections.Counter = collections.Counter()
        self.latency_ms: dict[str, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=10_000))
        self.requests = Counter("raylib_serve_requests", description="HTTP requests by route/status",
                                tag_keys=("route", "status"))
        self.latency = Histogram("raylib_serve_latency_ms", description="HTTP latency by route",
                                 boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("route",))
        self.started = time.time()

    def record(self, route: str, status: int, ms: float) -> None:
        self.counts[(route, status)] += 1
        self.latency_ms[route].append(ms)
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(ms, tags={"route": route})

    def summary(self) -> dict:
        routes: dict[str, Any] = {}
        for (route, status), n in sorted(self.counts.items()):
            entry = routes.setdefault(route, {"count": 0, "by_status": {}})
            entry["count"] += n
            entry["by_status"][str(status)] = n
        for route, values in self.latency_ms.items():
            arr = np.asarray(values)
            routes.setdefault(route, {"count": 0, "by_status": {}})["latency_ms"] = {
                "p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)),
                "mean": float(arr.mean()), "window": len(arr)}
        return {"uptime_s": time.time() - self.started,
                "requests_total": sum(self.counts.values()), "routes": routes}


# Serve pickles the deployment classes by value (their module names point at Deployment objects),
# module-level functions by reference: the middleware finds its replica's ingress through here.
_INGRESS: dict[str, Any] = {}


def register_ingress(ingress: Any) -> None:
    _INGRESS["replica"] = ingress


class AuthLimitsMetrics:
    """Bearer auth (all routes but /health), the ingress in-flight cap, and metrics, as plain ASGI
    middleware (Starlette's BaseHTTPMiddleware costs a task and two memory streams per request)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # an app under a route_prefix
            path = path[len(root):] or "/"
        route = path if path in ROUTES else "other"
        ingress = _INGRESS.get("replica")
        if ingress is None:  # not initialized yet: fail closed
            response = error_response(503, "Server starting.", None, "starting",
                                      type="server_overloaded", headers={"Retry-After": "1"})
            return await response(scope, receive, send)
        rejected = None
        if ingress.api_key and path != "/health" and not _authorized(scope, ingress.api_key):
            rejected = error_response(401, "Missing or invalid API key: send 'Authorization: "
                                           "Bearer <key>'.", None, "invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
        elif ingress.in_flight >= ingress.args.ingress_max_ongoing_requests and path != "/health":
            rejected = ingress.overloaded("ingress at capacity")
        if rejected is not None:
            await rejected(scope, receive, send)
            ingress.stats.record(route, rejected.status_code, (time.perf_counter() - start) * 1e3)
            return
        status = 500  # an exception escaping the app is answered 500 by ServerErrorMiddleware

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        ingress.in_flight += 1
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            ingress.in_flight -= 1
            ingress.stats.record(route, status, (time.perf_counter() - start) * 1e3)


def _authorized(scope, api_key: str) -> bool:
    """'Authorization: Bearer <api_key>', compared in constant time."""
    header = Headers(scope=scope).get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              api_key.encode())


class FastJSONResponse(JSONResponse):
    """orjson, numpy arrays written directly: float32 vectors as their shortest round-trip text
    (exact, about half the bytes of Python's float64 repr) at ~30x the speed of json.dumps."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY, default=_plain)


def _plain(obj: Any) -> Any:
    """What orjson does not write itself: non-contiguous arrays and numpy scalars."""
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")
