"""``serve --workers N``: N processes serving the same ports through SO_REUSEPORT.

Python runs one decision at a time per process, so a second core needs a second
process. The workers are forked before any gRPC object exists (gRPC's threads do not
survive a fork); each one then builds its own server, Redis connections and cache,
and Envoy spreads its connections over them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile

from extauthz.config import Config

log = logging.getLogger("extauthz.workers")


def _worker(config: Config) -> int:
    from extauthz.server import serve  # imported after the fork, like everything gRPC

    try:
        asyncio.run(serve(config, reuse_port=True))
    except OSError as e:
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


def _serve_metrics(config: Config) -> None:
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(config.settings.metrics_port, config.settings.metrics_host, registry=registry)


def _supervise(config: Config) -> int:
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
    _serve_metrics(config)
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
