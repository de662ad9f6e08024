"""Logging: one JSON object per line (or plain text), and the decision log.

A decision log entry names the request, the key (alias and a 12-hex prefix of its
hash), the team, the model, the deployment, the outcome and the time taken: enough to
answer "why was this call refused" without ever holding a secret.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import Any

DECISIONS = logging.getLogger("extauthz.decision")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)  # logging's extra={"fields": {...}}: structured
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Plain lines; structured fields (an audit entry) follow the message as JSON."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        return f"{line} {json.dumps(fields, default=str)}" if isinstance(fields, dict) else line


def setup(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The providers' auth libraries log each token request (URLs, headers) at INFO: their
    # warnings and errors are enough, and a token never has a reason to be near a log.
    for noisy in ("azure", "msal", "google.auth", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class DecisionLog:
    """The decision log: one line per decision, written in batches.

    A line through the logging module costs more than the decision it records, so lines
    are formatted here and written to stderr together, a fraction of a second late (and at
    shutdown)."""

    BATCH = 256

    def __init__(self, fmt: str = "json") -> None:
        self.fmt = fmt
        self.enabled = DECISIONS.isEnabledFor(logging.INFO)
        self.lines: list[str] = []

    def write(self, outcome: str, code: str, status: int, metadata: dict[str, Any] | None, request_id: str,
              seconds: float) -> None:
        if not self.enabled:
            return
        entry = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "level": "info",
                 "logger": DECISIONS.name, "msg": outcome, "request_id": request_id, "outcome": outcome,
                 "code": code, "status": status, "latency_ms": round(seconds * 1000, 3),
                 # The whole key hash is for the usage report only: the log names the key by its prefix.
                 **{k: v for k, v in (metadata or {}).items() if k != "key_id"}}
        if self.fmt == "json":
            self.lines.append(json.dumps(entry))
        else:
            self.lines.append(" ".join(f"{k}={v}" for k, v in entry.items()))
        if len(self.lines) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.lines:
            return
        data = ("\n".join(self.lines) + "\n").encode()
        self.lines = []
        while data:
            written = os.write(sys.stderr.fileno(), data)
            data = data[written:]
