"""A tiny HTTP/1.1 server for probes and scrapes: ``/livez``, ``/readyz``, ``/metrics``.

Plain asyncio, one request per connection (``Connection: close``), GET and HEAD only, every
read bounded by a timeout, so a slow or hostile client costs one socket for a few seconds
and never a thread. It shares the service's event loop on purpose: if the loop is blocked,
the probes see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from postroom.metrics import Metrics

log = structlog.get_logger("postroom.health")

ReadyCheck = Callable[[], str | None]
"""Return None when the process is ready for work, else a short reason it is not."""

READ_TIMEOUT = 5.0
MAX_REQUEST_BYTES = 8192
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class HealthServer:
    """Serve liveness, readiness and metrics on *host*:*port* (port 0: an ephemeral one).

    ``/livez`` answers 200 while a heartbeat task on the loop has beaten within
    *stale_after* seconds (503 otherwise, or no answer at all if the loop is blocked);
    ``/readyz`` answers 200 when *ready* returns None, else 503 with the reason in JSON;
    ``/metrics`` renders *metrics* in the Prometheus text format.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        ready: ReadyCheck,
        metrics: Metrics,
        heartbeat_interval: float = 1.0,
        stale_after: float = 10.0,
        read_timeout: float = READ_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._host = host
        self._port = port
        self._ready = ready
        self._metrics = metrics
        self._interval = heartbeat_interval
        self._stale_after = stale_after
        self._read_timeout = read_timeout
        self._clock = clock
        self._beat = clock()
        self._server: asyncio.Server | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The port bound, once started (the real one when 0 was asked for)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the health server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and start serving; raises OSError if the port is taken."""
        self._server = await asyncio.start_server(
            self._serve, self._host, self._port, limit=MAX_REQUEST_BYTES
        )
        self._beat = self._clock()
        self._heartbeat = asyncio.create_task(self._beating(), name="postroom-health-heartbeat")
        log.info("health.serving", host=self._host, port=self.port)

    async def close(self) -> None:
        """Stop listening and the heartbeat; requests in progress are cut."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _beating(self) -> None:
        while True:
            expected = self._clock() + self._interval
            await asyncio.sleep(self._interval)
            self._beat = self._clock()
            self._metrics.loop_lag.set(max(0.0, self._beat - expected))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._read_timeout)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return  # a client that never finished its request gets no answer
            method, path = _parse(head)
            status, content_type, body, extra = self._route(method, path)
            writer.write(_response(status, content_type, body, method == "HEAD", extra))
            await asyncio.wait_for(writer.drain(), self._read_timeout)
        except (ConnectionError, TimeoutError):
            pass  # the client went away; nothing to tell it
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), self._read_timeout)

    def _route(self, method: str, path: str) -> tuple[int, str, bytes, dict[str, str]]:
        if method == "":
            return _json(400, {"status": "error", "reason": "malformed request"})
        routes = {"/livez": self._livez, "/readyz": self._readyz, "/metrics": self._scrape}
        handler = routes.get(path)
        if handler is None:
            return _json(404, {"status": "error", "reason": f"no such path; try {sorted(routes)}"})
        if method not in ("GET", "HEAD"):
            status, content_type, body, _ = _json(
                405, {"status": "error", "reason": "only GET and HEAD"}
            )
            return status, content_type, body, {"Allow": "GET, HEAD"}
        return handler()

    def _livez(self) -> tuple[int, str, bytes, dict[str, str]]:
        age = self._clock() - self._beat
        if age > self._stale_after:
            return _json(503, {"status": "stalled", "reason": f"no heartbeat for {age:.1f}s"})
        return _json(200, {"status": "alive"})

    def _readyz(self) -> tuple[int, str, bytes, dict[str, str]]:
        try:
            reason = self._ready()
        except Exception as exc:  # a broken check means "not ready", and says why
            log.warning("health.ready_check_failed", error=repr(exc)[:200])
            reason = f"readiness check failed: {type(exc).__name__}"
        if reason is not None:
            return _json(503, {"status": "unready", "reason": reason})
        return _json(200, {"status": "ready"})

    def _scrape(self) -> tuple[int, str, bytes, dict[str, str]]:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self._metrics.registry), {}


def _parse(head: bytes) -> tuple[str, str]:
    """Return (method, path without query) from a request head; ("", "") if malformed."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return "", ""
    return parts[0].upper(), parts[1].split("?", 1)[0]


def _json(status: int, payload: dict[str, str]) -> tuple[int, str, bytes, dict[str, str]]:
    return status, "application/json", json.dumps(payload).encode() + b"\n", {}


def _response(
    status: int, content_type: str, body: bytes, head_only: bool, extra: dict[str, str]
) -> bytes:
    headers = {
        "Content-Type": content_type,
        "Content-Length": str(len(body)),
        "Cache-Control": "no-store",
        "Connection": "close",
        **extra,
    }
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return raw if head_only else raw + body
