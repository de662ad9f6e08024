"""The serving process, composed in one place.

``App`` builds the parts (records, check service, admin API, metrics), then ``start``
binds every listening socket before it serves anything, so a port in use or an unusable
setting ends the process before Envoy or a probe can reach a half-started sidecar.
``stop`` takes the parts down in reverse order and awaits every task it started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from extauthz import config as config_module
from extauthz.admin.api import AdminApi
from extauthz.check.runtime import Runtime
from extauthz.check.service import SERVICE as AUTHZ_SERVICE
from extauthz.check.service import AuthorizationService
from extauthz.config import Config, ConfigError, Settings, setting_path
from extauthz.records import connection
from extauthz.records.cache import CachedStore, RecordCache
from extauthz.records.invalidation import Invalidator
from extauthz.records.models import MODEL_PREFIX, opened_entry
from extauthz.records.sealed import Sealer
from extauthz.records.store import RedisReader, StoreUnavailable
from extauthz.records.upsert import Upserts
from extauthz.records.writer import RedisWriter
from extauthz.telemetry import logs, metrics, tracing
from extauthz.tokens import Tokens
from extauthz.usage.counters import RateCounters
from extauthz.usage.reports import UsageReports

log = logging.getLogger("extauthz.server")
DECISION_LOG_FLUSH_S = 0.2
STOP_MARGIN_S = 5.0  # beyond shutdown_grace_s, for the parts after the gRPC server
# Room in a CheckRequest beside the body: headers (Envoy's own limit is 60 KiB by
# default, up to 8 MiB when raised), path, addresses, metadata.
CHECK_REQUEST_HEADROOM = 9 * 1024 * 1024


class StartupError(Exception):
    """Why the process cannot serve, in one line for the operator (no traceback)."""


def check_message_limit(settings: Settings) -> int:
    """The largest CheckRequest the service reads; larger ones are denied (413) by it."""
    return settings.max_request_bytes + CHECK_REQUEST_HEADROOM


@dataclass
class RuntimeBox:
    """The current runtime; swapping it is how a new config takes effect."""

    current: Runtime
    tokens: Tokens
    reloads: int = 0
    reload_failures: int = 0
    # The config file's (what a reload reads again) and the runtime models (what Redis
    # holds, store_model_in_db): the runtime is both, the file's first.
    file: Config | None = None
    models: list[tuple[str, Any, str | None]] = dataclasses.field(default_factory=list)
    # The upstream clusters of the Envoy rendered from the config the process started with.
    clusters: frozenset[str] | None = None

    def __call__(self) -> Runtime:
        return self.current

    def set_models(self, entries: list[tuple[str, Any, str | None]]) -> None:
        self.models = entries
        self.rebuild()

    def rebuild(self) -> None:
        file = self.file or self.current.config
        config = config_module.with_runtime_models(file, self.models) if file.store_model_in_db else file
        if self.clusters is not None:
            # (an Envoy this project rendered has the dynamic clusters; a mesh's routes do not)
            config = config_module.served_by(config, self.clusters, file.settings.upstream_authority)
        self.current = Runtime.of(config, self.tokens)
        self.tokens.keep({d.token for d in config.deployments if d.token is not None})
        self.tokens.start()  # a token a new model needs starts being refreshed

    def reload(self) -> None:
        """Read the config file again; swap it in whole, or keep the running one.

        The model list, aliases, pass-through paths and master key change at once; the
        process settings (ports, Redis, workers) need a restart and are kept."""
        old = self.file or self.current.config
        try:
            new = config_module.load(old.path)
        except ConfigError as e:
            self.reload_failures += 1
            metrics.CONFIG_RELOADS.labels("failed").inc()
            log.error("config reload failed, keeping the running config: %s", e)
            return
        if new.jwt != old.jwt:
            log.error("config reload: litellm_jwtauth changed; Envoy still verifies tokens with the keys it was "
                      "rendered with: re-render its config (extauthz envoy-config) and restart it. Until then the "
                      "sidecar accepts only the issuers and audiences of the new config.")
        if new.store_model_in_db != old.store_model_in_db:
            log.error("config reload: store_model_in_db changed; it takes effect when the sidecar restarts")
        self.file = dataclasses.replace(new, settings=old.settings, store_model_in_db=old.store_model_in_db)
        self.rebuild()
        self.reloads += 1
        metrics.CONFIG_RELOADS.labels("ok").inc()
        log.info("config reloaded from %s: %d deployments", old.path, len(new.deployments))
        report_config(self.current.config)

    def stats(self) -> dict[str, int]:
        config = self.current.config
        return {"reloads": self.reloads, "reload_failures": self.reload_failures,
                "deployments_not_routable": sum(not d.routable for d in config.deployments),
                "pass_through_not_served": sum(not p.routable for p in config.pass_through)}


def report_config(config: Config) -> None:
    """What the operator must know of a config that loaded: deployments the gateway cannot
    route, and settings deciding access that it does not enforce (each request relying on
    them is refused)."""
    routable = len(config.routable)
    metrics.count_deployments(routable, len(config.deployments) - routable)
    for d in config.deployments:
        if not d.routable:
            log.warning("deployment %s is not routable: %s", d.name, d.unavailable)
    served = sum(p.routable for p in config.pass_through)
    metrics.count_pass_through(served, len(config.pass_through) - served)
    for p in config.pass_through:
        if not p.routable:
            log.warning("pass-through endpoint %s is not served: %s", p.path, p.unavailable)
    for setting, effect in config.unenforced:
        log.error("config: %s is not enforced by extauthz: %s", setting_path(setting), effect)


def metrics_app() -> web.Application:
    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app


def listening_socket(what: str, host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=1024, reuse_port=reuse_port)
    except OSError as e:
        reason = "address in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e)).lower()
        raise StartupError(f"cannot listen for {what} on {host}:{port}: {reason}") from None


async def flush_forever(decision_log: logs.DecisionLog) -> None:
    while True:
        await asyncio.sleep(DECISION_LOG_FLUSH_S)
        decision_log.flush()


# The admin API's Redis replies may be large (a million keys listed): its own connections,
# with a timeout for that, apart from the check path's lookup timeout.
ADMIN_REDIS_TIMEOUT_S = 30.0


def grpc_port(server: grpc.aio.Server, what: str, host: str, port: int,
              credentials: grpc.ServerCredentials | None = None) -> int:
    """The port ``server`` listens on at host:port (0: any free one), or StartupError."""
    try:
        if credentials is not None:
            bound = server.add_secure_port(f"{host}:{port}", credentials)
        else:
            bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise StartupError(f"cannot listen for {what} on {host}:{port}: address in use or not available")
    return bound


def check_credentials(s: Any) -> grpc.ServerCredentials | None:
    """TLS for the Check port, mutual with a client CA; None: plaintext. Settings that
    could not do what they say stop the start."""
    if not (s.grpc_tls_cert_file or s.grpc_tls_key_file or s.grpc_tls_client_ca_file):
        return None
    if not (s.grpc_tls_cert_file and s.grpc_tls_key_file):
        raise StartupError("grpc_tls_cert_file and grpc_tls_key_file go together (and grpc_tls_client_ca_file "
                           "needs them)")
    try:
        files = [Path(path).read_bytes() if path else None
                 for path in (s.grpc_tls_key_file, s.grpc_tls_cert_file, s.grpc_tls_client_ca_file)]
    except OSError as e:
        raise StartupError(f"cannot read a grpc_tls file: {type(e).__name__} {e.filename}") from None
    key, cert, client_ca = files
    if key is None or cert is None:  # (the config requires both with TLS on)
        raise StartupError("grpc_tls needs grpc_tls_key_file and grpc_tls_cert_file")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


class App:
    """The sidecar's parts and their order. ``reuse_port``: one of several worker
    processes sharing the ports (SO_REUSEPORT), whose metrics the supervisor serves."""

    def __init__(self, config: Config, reuse_port: bool = False, ready_file: str | None = None) -> None:
        self.ready_file = ready_file
        self.ports: dict[str, int] = {}  # what was bound: port 0 in a setting means any free port
        s = self.settings = config.settings
        self.config, self.reuse_port = config, reuse_port
        self.tokens = Tokens()
        self.runtime = RuntimeBox(Runtime.of(config, self.tokens), self.tokens, file=config,
                                  clusters=config_module.envoy_clusters(config))
        report_config(config)
        self.cache = RecordCache(s.cache_max_entries, s.cache_negative_ttl_s, s.max_stale_s)
        try:
            redis = self.redis = connection.target(s)
            self.store = RedisReader(redis, s.redis_timeout_ms, s.key_prefix)
            prefixes = (self.store.key_id(""), self.store.team_id(""), self.store.user_id(""))
            # Runtime models: a change any replica makes reaches this one on the same channel.
            watch = (self.store.prefix + MODEL_PREFIX, self.models_dirty) if config.store_model_in_db else None
            self.invalidator = Invalidator(redis, prefixes, self.cache, s.redis_timeout_ms / 1000, watch)
        except ValueError as e:  # (connection.UnusableTarget, or what urllib or redis-py make of the URL)
            # Only our own messages are shown: another parser's may quote a piece of the URL,
            # a password included.
            why = str(e) if isinstance(e, connection.UnusableTarget) else f"{type(e).__name__} reading redis_url"
            raise StartupError(f"unusable Redis settings ({connection.redacted(s.redis_url)}): {why}") from None
        log.info("redis: %s", redis.describe())
        metrics.REDIS_TARGET.labels(redis.mode, redis.endpoint).set(1)
        self.redis_warnings: list[str] = []
        cached = CachedStore(self.store, self.cache)
        counters = RateCounters(self.store.redis, self.store, s.redis_timeout_ms / 1000)
        upsert_writer = RedisWriter(self.store, s.audit_max_entries, audit_max_bytes=s.audit_max_bytes)
        self.service = AuthorizationService(self.runtime, cached, s.log_allowed, logs.DecisionLog(s.log_format),
                                            check_message_limit(s), Upserts(cached, upsert_writer), counters)
        self.usage = UsageReports(counters, cached, lambda route_id, model: self.runtime().price(route_id, model),
                                  lambda model: self.runtime().catalog.same_model(model))
        self.health = health_aio.HealthServicer()
        self.grpc: grpc.aio.Server | None = None
        self.health_grpc: grpc.aio.Server | None = None  # health on a port of its own (health_port)
        self.runners: list[web.AppRunner] = []
        self.sockets: list[socket.socket] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.closers: list[Callable[[], Awaitable[Any]]] = []
        self.writer: RedisWriter | None = None
        self.models_lock = asyncio.Lock()
        self.models_pending = False
        self.models_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        s = self.settings
        tracing.setup(s.tracing)
        # Every socket first: a failure here serves nothing.
        self.grpc = grpc.aio.server(options=[
            ("grpc.so_reuseport", int(self.reuse_port)),
            # A check carries the whole body plus headers, so gRPC's 4 MiB default is far too
            # small. The service reads up to check_message_limit itself and denies larger
            # checks with a JSON error (and counts them); gRPC's own limit is only a guard.
            ("grpc.max_receive_message_length", 2 * check_message_limit(s))])
        self.service.add_to(self.grpc)
        self.usage.add_to(self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        bound = grpc_port(self.grpc, "gRPC", s.grpc_host, s.grpc_port, check_credentials(s))
        if s.health_port and s.health_port == bound:
            # (With workers, SO_REUSEPORT would let both servers share it: some checks would
            # reach the health-only one.)
            raise StartupError(f"health_port {s.health_port} is the Check port: give health a port of its own")
        if s.health_port:
            # Only grpc.health.v1 here: no Check, no usage reports (whose answers or
            # entries a prober has no business reaching).
            self.health_grpc = grpc.aio.server(options=[("grpc.so_reuseport", int(self.reuse_port))])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_grpc)
            health_bound = grpc_port(self.health_grpc, "gRPC health", s.health_host, s.health_port)
        admin_socket = listening_socket("the admin API", s.admin_host, s.admin_port, self.reuse_port)
        self.sockets.append(admin_socket)
        self.ports = {"grpc_port": bound, "admin_port": admin_socket.getsockname()[1],
                      **({"health_port": health_bound} if s.health_port else {})}
        metrics_socket = None
        if s.metrics_port and not self.reuse_port:
            metrics_socket = listening_socket("metrics", s.metrics_host, s.metrics_port, False)
            self.sockets.append(metrics_socket)
            self.ports["metrics_port"] = metrics_socket.getsockname()[1]

        # Then serve, in the order requests will need the parts.
        admin_redis = self.store.client(ADMIN_REDIS_TIMEOUT_S)
        self.closers.append(admin_redis.aclose)
        writer = RedisWriter(self.store, s.audit_max_entries, None, s.redis_wait_replicas, s.redis_wait_timeout_ms,
                             admin_redis, ADMIN_REDIS_TIMEOUT_S, audit_max_bytes=s.audit_max_bytes)
        self.closers.append(writer.close)
        self.writer = writer
        if self.config.store_model_in_db:  # (before the first check: a runtime model is never missing at start)
            try:
                await self.load_models()
            except StoreUnavailable as e:  # (loaded when the invalidation channel is up)
                log.error("runtime models not loaded (Redis: %s); only the config's are served until they are", e)
            except Exception:  # a bug, or a document no model can be made of: the config's models still serve
                log.exception("runtime models not loaded; only the config's are served")
        self.tokens.start()  # provider tokens, fetched in the background (a check finds none yet: 503)
        # Without a cache there is nothing to invalidate, but runtime models still change.
        if s.cache_max_entries > 0 or self.config.store_model_in_db:
            self.tasks.append(asyncio.create_task(self.invalidator.run(), name="invalidation"))
        await self.grpc.start()
        if self.health_grpc is not None:
            await self.health_grpc.start()
        stats = lambda: {"cache": self.cache.stats(), "config": self.runtime.stats(),  # noqa: E731
                         "redis_mode": self.redis.mode, "redis_endpoint": self.redis.endpoint,
                         "redis_tracking": self.cache.trusted, "redis_warnings": self.redis_warnings,
                         # a cluster's primaries: those the invalidation channel tracks (checked each second)
                         **({"redis_primary": ",".join(self.invalidator.tracked)} if self.redis.cluster else {})}
        await self.serve_http(AdminApi(self.runtime, writer, stats, self.service.store, self.service,
                                       self.load_models).app(), admin_socket)
        if metrics_socket is not None:
            await self.serve_http(metrics_app(), metrics_socket)
        counters = lambda: {**self.cache.stats(), "reconnects": self.invalidator.reconnects}  # noqa: E731
        self.tasks.append(asyncio.create_task(metrics.sync_forever(counters, self.service.metrics.flush,
                                                                   lambda: self.invalidator.tracked),
                                              name="metrics sync"))
        self.tasks.append(asyncio.create_task(flush_forever(self.service.decision_log), name="decision log"))
        self.tasks.append(asyncio.create_task(self.check_redis_safety(), name="redis safety"))
        for name in ("", AUTHZ_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving Check on %s:%d, admin API on %s:%d, %d deployments", s.grpc_host,
                 self.ports["grpc_port"], s.admin_host, self.ports["admin_port"], len(self.config.deployments))
        if self.ready_file:
            self.announce_ready(self.ready_file)

    async def load_models(self) -> None:
        """The runtime models as Redis holds them now, served from here on (credentials
        opened with the master key or LITELLM_SALT_KEY)."""
        if self.writer is None or not self.config.store_model_in_db:
            return
        async with self.models_lock:
            docs = await self.writer.models()
            sealer = Sealer.from_environment(self.runtime().config.master_key)  # (the running config's)
            entries = [opened_entry(doc, sealer, model_id) for model_id, doc in docs]
            self.runtime.set_models(entries)
            log.info("runtime models: %d served, %d not routable", sum(d.routable and d.model_id is not None
                     for d in self.runtime().config.deployments), sum(not d.routable and d.model_id is not None
                     for d in self.runtime().config.deployments))
            for model_id, _, problem in entries:
                if problem is not None:
                    log.error("runtime model %s is not served: %s", model_id, problem)

    def models_dirty(self) -> None:
        """A runtime model changed (or may have, while the channel was down): read them again,
        once for a burst of changes."""
        self.models_pending = True
        if self.models_task is None or self.models_task.done():
            self.models_task = asyncio.get_running_loop().create_task(self._refresh_models())

    async def _refresh_models(self) -> None:
        while self.models_pending:
            self.models_pending = False
            try:
                await self.load_models()
            except StoreUnavailable as e:  # (read again when the channel is up again)
                log.warning("runtime models not reloaded (Redis: %s)", e)
            except Exception:
                log.exception("runtime models not reloaded")

    async def check_redis_safety(self) -> None:
        """Once at start-up, off the serving path: the Redis server's settings that could lose
        records, logged as warnings, counted and shown by readiness."""
        self.redis_warnings = await self.store.safety_warnings()
        metrics.REDIS_UNSAFE.set(len(self.redis_warnings))
        for warning in self.redis_warnings:
            log.warning("redis: %s", warning)

    def announce_ready(self, path: str) -> None:
        """Say, once everything serves, which ports were bound: a supervisor (or a test)
        reads readiness and ports from the process instead of guessing them beforehand."""
        partial = f"{path}.{os.getpid()}.tmp"
        with open(partial, "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), **self.ports}, f)
        os.replace(partial, path)  # whole or absent, never half-written

    async def serve_http(self, app: web.Application, sock: socket.socket) -> None:
        # Open keep-alive connections get the same grace as in-flight checks, not aiohttp's 60 s.
        # Header fields up to 64 KiB: the acting headers name a token's teams (up to 200 of 256 characters).
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.settings.shutdown_grace_s,
                               max_field_size=64 * 1024, max_line_size=64 * 1024)
        await runner.setup()
        self.runners.append(runner)
        await web.SockSite(runner, sock).start()

    async def stop(self) -> None:
        """Everything ``start`` began, in reverse; safe after a failed or partial start."""
        if self.grpc is not None:
            await self.health.enter_graceful_shutdown()
            await self.grpc.stop(self.settings.shutdown_grace_s)  # in-flight checks finish
        if self.health_grpc is not None:
            await self.health_grpc.stop(0)
        for runner in reversed(self.runners):
            await runner.cleanup()
        for sock in self.sockets:
            sock.close()
        self.invalidator.stop()
        await end_tasks(self.tasks + self.tokens.take_tasks())
        self.service.close()
        self.service.metrics.flush()
        self.service.decision_log.flush()
        for close in (self.invalidator.close, self.store.close, *self.closers):
            try:  # a Redis that stopped answering must not hold the exit
                await asyncio.wait_for(close(), self.settings.redis_timeout_ms / 1000)
            except (asyncio.TimeoutError, OSError):
                pass


async def end_tasks(tasks: list[asyncio.Task[Any]], patience_s: float = 2.0) -> None:
    """Cancel the tasks and wait for them to end, cancelling again any that went on: a
    cancellation can be lost (Python 3.11's wait_for), and a task must not outlive stop."""
    pending = {t for t in tasks if not t.done()}
    deadline = asyncio.get_running_loop().time() + patience_s
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            log.error("tasks did not end when cancelled: %s", sorted(t.get_name() for t in pending))
            return
        _, pending = await asyncio.wait(pending, timeout=min(0.2, remaining))


async def serve(config: Config, reuse_port: bool = False, ready_file: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT; raises StartupError when the process cannot serve."""
    app = App(config, reuse_port, ready_file)
    try:
        await app.start()
    except BaseException:
        await app.stop()
        raise
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, app.runtime.reload)
    await stopping.wait()
    log.info("shutting down: health NOT_SERVING, finishing in-flight checks")
    try:  # bounded: a part that does not stop must not keep the process alive
        await asyncio.wait_for(app.stop(), app.settings.shutdown_grace_s + STOP_MARGIN_S)
    except asyncio.TimeoutError:
        log.error("shutdown did not finish within %.0f s; exiting anyway",
                  app.settings.shutdown_grace_s + STOP_MARGIN_S)
