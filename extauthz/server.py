"""The serving process: the gRPC Check and health services and the admin API on one event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from dataclasses import dataclass

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from extauthz.admin import AdminApi
from extauthz.cache import CachedStore, RecordCache
from extauthz import config as config_module
from extauthz import logs, metrics, tracing
from extauthz.config import Config, ConfigError
from extauthz.runtime import Runtime
from extauthz.service import SERVICE as AUTHZ_SERVICE, AuthorizationService
from extauthz.invalidation import Invalidator
from extauthz.store import RedisStore

log = logging.getLogger("extauthz.server")
DECISION_LOG_FLUSH_S = 0.2
# Room in a CheckRequest beside the body: headers (Envoy's own limit is 60 KiB by
# default, up to 8 MiB when raised), path, addresses, metadata.
CHECK_REQUEST_HEADROOM = 9 * 1024 * 1024


def grpc_message_limit(settings: config_module.Settings) -> int:
    return settings.max_request_bytes + CHECK_REQUEST_HEADROOM



@dataclass
class RuntimeBox:
    """The current runtime; swapping it is how a new config takes effect."""

    current: Runtime
    reloads: int = 0
    reload_failures: int = 0

    def __call__(self) -> Runtime:
        return self.current

    def reload(self) -> None:
        """Read the config file again; swap it in whole, or keep the running one.

        The model list, aliases, pass-through paths and master key change at once; the
        process settings (ports, Redis, workers) need a restart and are kept."""
        old = self.current.config
        try:
            new = config_module.load(old.path)
        except ConfigError as e:
            self.reload_failures += 1
            metrics.CONFIG_RELOADS.labels("failed").inc()
            log.error("config reload failed, keeping the running config: %s", e)
            return
        self.current = Runtime.of(dataclasses.replace(new, settings=old.settings))
        self.reloads += 1
        metrics.CONFIG_RELOADS.labels("ok").inc()
        log.info("config reloaded from %s: %d deployments", old.path, len(new.deployments))

    def stats(self) -> dict[str, int]:
        return {"reloads": self.reloads, "reload_failures": self.reload_failures}


async def flush_forever(decision_log: logs.DecisionLog) -> None:
    while True:
        await asyncio.sleep(DECISION_LOG_FLUSH_S)
        decision_log.flush()


def metrics_app() -> web.Application:
    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app


async def serve(config: Config, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT. ``reuse_port``: one of several worker processes sharing
    the ports (SO_REUSEPORT), whose metrics the supervisor serves; a lone process serves
    its own and refuses a port already taken."""
    settings = config.settings
    tracing.setup(settings.tracing)
    runtime = RuntimeBox(Runtime.of(config))
    store = RedisStore(settings.redis_url, settings.redis_timeout_ms, settings.key_prefix)
    cache = RecordCache(settings.cache_max_entries, settings.cache_negative_ttl_s, settings.max_stale_s)
    invalidator = Invalidator(settings.redis_url, (store.key_id(""), store.team_id("")), cache,
                              settings.redis_timeout_ms / 1000)
    # Without a cache there is nothing to invalidate: every lookup reads Redis.
    invalidation = asyncio.create_task(invalidator.run()) if settings.cache_max_entries > 0 else None

    server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse_port)),
                                      # A check carries the whole body (Envoy buffers up to
                                      # max_request_bytes) plus headers: gRPC's 4 MiB default
                                      # would refuse the larger ones with an empty 503.
                                      ("grpc.max_receive_message_length", grpc_message_limit(settings))])
    service = AuthorizationService(runtime, CachedStore(store, cache), settings.log_allowed,
                                   logs.DecisionLog(settings.log_format))
    service.add_to(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    await server.start()

    stats = lambda: {"cache": cache.stats(), "config": runtime.stats()}  # noqa: E731
    runner = web.AppRunner(AdminApi(runtime, store, stats).app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.admin_host, settings.admin_port, reuse_port=reuse_port).start()
    counters = lambda: {**cache.stats(), "reconnects": invalidator.reconnects}  # noqa: E731
    metrics_sync = asyncio.create_task(metrics.sync_forever(counters, service.metrics.flush))
    log_flush = asyncio.create_task(flush_forever(service.decision_log))
    metrics_runner = None
    if not reuse_port:
        metrics_runner = web.AppRunner(metrics_app(), access_log=None)
        await metrics_runner.setup()
        await web.TCPSite(metrics_runner, settings.metrics_host, settings.metrics_port).start()

    for name in ("", AUTHZ_SERVICE):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving Check on %s, admin API on %s:%s, %d deployments",
             address, settings.admin_host, settings.admin_port, len(config.deployments))

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, runtime.reload)
    await stopping.wait()

    log.info("shutting down: health NOT_SERVING, finishing in-flight checks")
    await health.enter_graceful_shutdown()
    await server.stop(settings.shutdown_grace_s)
    await runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    metrics_sync.cancel()
    log_flush.cancel()
    service.close()
    service.metrics.flush()
    service.decision_log.flush()
    if invalidation is not None:
        invalidation.cancel()
    await store.close()
