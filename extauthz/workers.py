"""``serve --workers N``: N processes serving the same ports through SO_REUSEPORT.

Python runs one decision at a time per process, so a second core needs a second
process. The workers are forked before any gRPC object exists (gRPC's threads do not
survive a fork); each one then builds its own server, Redis connections and cache,
and Envoy spreads its connections over them.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import signal
import sys
import tempfile

from extauthz.config import Config

log = logging.getLogger("extauthz.workers")


def _worker(config: Config) -> int:
    from extauthz.app import StartupError, serve  # imported after the fork, like everything gRPC

    try:
        asyncio.run(serve(config, reuse_port=True))
    except StartupError as e:
        log.error("worker %d cannot start: %s", os.getpid(), e)
        return 1
    return 0


def supervise(config: Config) -> int:
    """Fork the workers, pass SIGTERM/SIGINT/SIGHUP on, serve their metrics, and exit when
    they have all exited: 0 if every worker stopped cleanly, 1 if one died on its own (the
    rest are stopped, so the orchestrator restarts the whole set)."""
    # prometheus_client reads this when first imported: the workers write their values
    # there and this process sums them.
    metrics_dir = tempfile.mkdtemp(prefix="extauthz-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        return _supervise(config)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve_metrics(config: Config) -> bool:
    """The workers' summed metrics, served by this process; False (logged) when the port
    cannot be had. Started before any worker, so a taken port serves nothing at all."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    s = config.settings
    if not s.metrics_port:
        return True
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    try:
        start_http_server(s.metrics_port, s.metrics_host, registry=registry)
    except OSError as e:
        reason = "address in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e)).lower()
        log.error("cannot start: cannot listen for metrics on %s:%s: %s", s.metrics_host, s.metrics_port, reason)
        return False
    return True


def _supervise(config: Config) -> int:
    if not _serve_metrics(config):
        return 1
    children: set[int] = set()
    for _ in range(config.settings.workers):
        pid = os.fork()
        if pid == 0:
            code = _worker(config)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        children.add(pid)
    log.info("started %d workers: %s", len(children), sorted(children))
    from prometheus_client import multiprocess

    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            os.kill(child, signum)

    def reload(signum: int, _frame: object) -> None:
        for child in children:
            os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, reload)
    failed = False
    while children:
        pid, status = os.wait()
        children.discard(pid)
        multiprocess.mark_process_dead(pid)
        if os.waitstatus_to_exitcode(status) != 0 or not stopping:
            failed = True
            if not stopping:
                log.error("worker %d exited unexpectedly; stopping the others", pid)
                forward(signal.SIGTERM, None)
    return 1 if failed else 0
