"""Prometheus metrics (prometheus-client) and /healthz, served on loopback only."""

from __future__ import annotations

import ipaddress
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from reconciler.errors import ConfigError


class Metrics:
    """The daemon's metrics, in a registry of their own (no process-global state)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.reconcile_seconds = Histogram(
            "reconciler_reconcile_duration_seconds",
            "Duration of one reconcile pass (observe, plan, apply)", registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
        self.queue_depth = Gauge("reconciler_queue_depth", "Resources queued for a reconcile", registry=r)
        self.changes = Counter("reconciler_changes", "Changes applied, by kind, action and outcome",
                               ["kind", "action", "outcome"], registry=r)
        self.failures = Counter("reconciler_reconcile_failures",
                                "Changes that failed (they are retried with backoff), by kind",
                                ["kind"], registry=r)
        self.drift = Counter("reconciler_drift_detected",
                             "Resources found drifted from their manifest, by kind and policy",
                             ["kind", "policy"], registry=r)
        self.host_events = Counter("reconciler_host_events", "Host events received, by driver",
                                   ["driver"], registry=r)
        self.revision = Gauge("reconciler_applied_revision_info",
                              "The revision in force (value 1, the revision as a label)",
                              ["revision"], registry=r)
        self.rejected = Counter("reconciler_revisions_rejected",
                                "Revisions not applied because they did not validate", registry=r)
        self.resources = Gauge("reconciler_resources", "Resources by state", ["state"], registry=r)
        self.last_pass = Gauge("reconciler_last_reconcile_timestamp_seconds",
                               "Unix time the last reconcile pass ended", registry=r)
        self._revision: str | None = None

    def set_revision(self, revision: str) -> None:
        if self._revision is not None and self._revision != revision:
            self.revision.remove(self._revision)
        self._revision = revision
        self.revision.labels(revision).set(1)

    def set_states(self, counts: dict[str, int]) -> None:
        self.resources.clear()
        for state, n in counts.items():
            self.resources.labels(state).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """GET /metrics (Prometheus text) and GET /healthz (JSON; 200 healthy, 503 not), on a
    loopback address only."""

    def __init__(self, metrics: Metrics, health: Callable[[], tuple[bool, dict[str, Any]]],
                 host: str = "127.0.0.1", port: int = 9477):
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(f"metrics address {host!r}: only a loopback address (127.0.0.1, ::1) is allowed")
        metrics_ = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, metrics_.render())
                elif path == "/healthz":
                    ok, facts = health()
                    body = json.dumps({"status": "ok" if ok else "unhealthy", **facts}).encode()
                    self._send(200 if ok else 503, "application/json", body)
                else:
                    self._send(404, "text/plain", b"not found: try /metrics or /healthz\n")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                pass

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self._server.daemon_threads = True
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
