"""`tokenlean serve --replicas N`: the server's FastAPI app on N Ray Serve replicas.

Each replica is its own Ray actor process with its own model and the very app of
`tokenlean.serve.app.create_app`, so auth, /health, /metrics and streaming work unchanged
behind Ray's HTTP proxy; Ray routes the requests (at most `max_ongoing_requests` in a
replica at once) and can autoscale the replicas. Needs: pip install 'tokenlean[ray]'.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import signal
import sys
import time
from pathlib import Path

import ray
from ray import serve
from ray.serve.exceptions import RayServeException

from tokenlean.errors import UserError

APP_NAME = "tokenlean"
REPLICA_HEADER = b"x-tokenlean-replica"
QUIET = {"log_level": "WARNING", "enable_access_log": False}


@dataclasses.dataclass(frozen=True)
class ReplicaSpec:
    """What every replica loads and serves: the single-process server's options."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    method: str = "greedy"
    method_args: dict | None = None
    kv: object = None  # a kv.registry.KVConfig
    api_key: str | None = None
    max_queue: int = 64
    model_id: str | None = None
    request_timeout: float | None = 300.0
    threads: int = 1  # torch threads, and the CPUs Ray reserves for the replica
    scheduler: object = None  # an engine.scheduler.SchedulerConfig (continuous batching)


class ReplicaHeader:
    """Pure ASGI middleware (streaming passes through): names the replica that answered."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER, replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


def build_app(spec: ReplicaSpec):
    """Runs inside each replica process: load the model, build the plain server's app."""
    import torch

    from tokenlean.lm import load
    from tokenlean.serve.app import create_app

    torch.set_num_threads(spec.threads)  # as many as the CPUs Ray gave this replica
    lm = load(spec.model, device=spec.device, dtype=spec.dtype)
    lm.drafter(spec.method, spec.method_args)  # build the drafter now, not on the 1st request
    app = create_app(lm, spec.method, spec.method_args, kv=spec.kv, api_key=spec.api_key,
                     max_queue=spec.max_queue, model_id=spec.model_id,
                     request_timeout=spec.request_timeout, scheduler=spec.scheduler)
    # Added last, so outermost: 401s and errors are named too.
    app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_tag)
    return app


def make_deployment(spec: ReplicaSpec, replicas: int = 1,
                    autoscale: tuple[int, int] | None = None, max_ongoing_requests: int = 16,
                    num_gpus: float = 0):
    """The Ray Serve deployment: a FastAPI ingress whose app is built in the replica."""

    # serve.ingress (Ray >= 2.47) calls a builder function once per replica, in the replica,
    # with no arguments: the closure carries the spec there.
    def builder():
        return build_app(spec)

    scaling = ({"autoscaling_config": {"min_replicas": autoscale[0],
                                       "max_replicas": autoscale[1]}}
               if autoscale else {"num_replicas": replicas})
    return serve.deployment(
        serve.ingress(builder)(), name=APP_NAME, max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": spec.threads, "num_gpus": num_gpus},
        logging_config=QUIET, **scaling)


def deploy(spec: ReplicaSpec, host: str, port: int, **deployment_options) -> None:
    """Start Serve's HTTP proxy on host:port (Ray must be up) and the replicas; returns once
    every replica answers."""
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no INFO line per step
    serve.start(http_options={"host": host, "port": port}, logging_config=QUIET)
    try:
        serve.run(make_deployment(spec, **deployment_options).bind(), name=APP_NAME,
                  route_prefix="/", logging_config=QUIET)
    except RuntimeError:  # a replica's constructor failed (Ray retried it a few times)
        raise UserError(f"the replicas did not start: {_replica_error()} (Ray's logs: "
                        "/tmp/ray/session_latest/logs)") from None


def _replica_error() -> str:
    """The last line of the replicas' traceback, which Serve keeps in the status."""
    try:
        message = serve.status().applications[APP_NAME].deployments[APP_NAME].message
    except (KeyError, AttributeError):
        return "unknown error"
    last = (message.strip().splitlines() or ["unknown error"])[-1]
    return last.removeprefix("tokenlean.errors.UserError: ")


def run(spec: ReplicaSpec, host: str, port: int, replicas: int = 1,
        autoscale: tuple[int, int] | None = None, max_ongoing_requests: int = 16,
        ray_address: str | None = None) -> int:
    """`tokenlean serve --replicas N`: serve until Ctrl-C or SIGTERM, then shut down."""
    from tokenlean.lm import resolve_model

    # Fail here in one line, not in N replicas that Ray restarts; a hub id downloads once.
    name, _ = resolve_model(spec.model)
    if spec.model and Path(spec.model).exists():  # replicas need not share our cwd
        spec = dataclasses.replace(spec, model=str(Path(spec.model).resolve()))
    num_gpus = 1 if _wants_cuda(spec.device) else 0
    local = ray_address is None
    # Quiet: the replicas' own output stays in Ray's log files; their errors reach us
    # through serve.status (see deploy).
    if local:  # a private single-machine instance, without the dashboard
        _start_local_ray(loopback=_is_loopback(host))
    else:
        try:
            ray.init(address=ray_address, logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as e:
            raise UserError(f"cannot join the Ray cluster at {ray_address}: {e}") from None
    # ray.init installs its own SIGTERM handler; ours turns SIGTERM into Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if local:  # else Serve would wait forever for CPUs or GPUs this machine lacks
            _check_fits(autoscale[0] if autoscale else replicas, spec.threads, num_gpus)
        deploy(spec, host, port, replicas=replicas, autoscale=autoscale,
               max_ongoing_requests=max_ongoing_requests, num_gpus=num_gpus)
        count = f"{autoscale[0]} to {autoscale[1]} replicas (autoscaled)" if autoscale \
            else f"{replicas} replicas"
        print(f"tokenlean: serving {name} (method {spec.method}, kv {spec.kv}) on "
              f"http://{host}:{port}/v1 with {count}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("tokenlean: shutting down the replicas", file=sys.stderr, flush=True)
    finally:
        # Only our application (the cluster may be shared): its replicas finish their
        # requests and stop; then a local instance goes down with ray.shutdown.
        try:
            serve.delete(APP_NAME)
        except RayServeException:  # Serve never started
            pass
        ray.shutdown()
    return 0


def _start_local_ray(loopback: bool) -> None:
    """A new Ray instance of our own, even where RAY_ADDRESS is set or /tmp/ray/
    ray_current_cluster names the cluster of an earlier `ray start` (ray.init() joins that
    one, dead or alive: a stale file means 'Failed to connect to GCS'). On a loopback --host
    its processes listen on 127.0.0.1 only, as the server does."""
    # Ray's default for a new local instance (token auth, the token in ~/.ray/auth_token)
    # without its warning about that default on stderr.
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    if loopback:
        _pin_ray_to_loopback()
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)


def _pin_ray_to_loopback() -> None:
    """Ray turns a loopback node address (ray.init(_node_ip_address="127.0.0.1")) into the
    machine's external IP and binds GCS, raylet and workers there or on every interface,
    except in its single-machine mode (the default on macOS and Windows), where the node is
    127.0.0.1 and they bind loopback only. That mode is read from the environment when
    `ray` is imported: set it for Ray's processes, and in this one's (already imported)
    constants."""
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def _check_fits(replicas: int, cpus: int, gpus: int) -> None:
    have = ray.cluster_resources()
    if replicas * cpus > have.get("CPU", 0):
        raise UserError(f"{replicas} replicas x {cpus} CPUs (--threads) need "
                        f"{replicas * cpus} CPUs; Ray sees {have.get('CPU', 0):g} here")
    if replicas * gpus > have.get("GPU", 0):
        raise UserError(f"{replicas} replicas on CUDA need {replicas * gpus} GPUs; Ray sees "
                        f"{have.get('GPU', 0):g} here (or --device cpu)")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _wants_cuda(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device == "auto":  # as tokenlean.lm picks: cuda when this machine has it
        import torch

        return torch.cuda.is_available()
    return False
