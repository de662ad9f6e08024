"""Measuring processes: CPU and memory from /proc, Redis GETs, percentiles, and the machine's own speed."""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

# == process measurements ===================================================================

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest rank."""
    if not sorted_values:
        return float("nan")
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def redis_gets(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_get", {}).get("calls", 0))


@dataclass
class Window:
    """CPU seconds of the watched processes and Redis GET calls over one measurement."""

    pids: dict[str, int]
    redis_client: redis.Redis

    def __enter__(self) -> "Window":
        self.cpu0 = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self.gets0 = redis_gets(self.redis_client)
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self.t0
        self.cpu = {k: cpu_seconds(p) - self.cpu0[k] for k, p in self.pids.items()}
        self.gets = redis_gets(self.redis_client) - self.gets0


def calibrate() -> float:
    """Milliseconds of CPU for a fixed pure-Python loop: how fast the machine is right now."""
    started = time.process_time()
    total = 0
    for i in range(1_000_000):
        total += i
    return round((time.process_time() - started) * 1000, 1)


def rotated(names: list[str], rep: int) -> list[str]:
    """Who goes first changes each repetition, so no server always follows the same one."""
    k = rep % len(names)
    return names[k:] + names[:k]


def stop_all(procs: list[Any], workdir: Path, keep: bool) -> None:
    """The end of a run: every process stopped, last started first; the work directory
    removed unless kept (or the run failed: ``keep`` then, to read its logs)."""
    for proc in reversed(procs):
        proc.stop()
    if keep:
        print(f"bench: logs and configs in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
