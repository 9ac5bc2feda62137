"""A stand-in for the Shotstack Serve API: a real HTTP server on 127.0.0.1, shaped as
shotstack-facts.md §2 describes, with switches for its open questions and injected faults.

Use it from the test process (add assets, inject faults, count calls) and from any other
process over HTTP (its `url` is a SHOTSTACK_API_URL). `python -m tests.standin` runs one on
its own and prints that URL, for trying the worker by hand.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

OWNER = "5ca6hu7s9k"
Fault = int | Literal["timeout", "reset"]


def stamp(when: datetime | None = None) -> str:
    """Format a time as Shotstack does: ISO 8601, UTC, milliseconds, `Z`."""
    when = when or datetime.now(UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


@dataclass
class _Fault:
    status: Fault
    retry_after: str | None
    body: dict[str, Any] | None


class ServeStandIn:
    """The Serve API of one environment, with one API key, in a daemon thread.

    Open questions of shotstack-facts.md §6 are switches: `by_id_shape` ("object" as the spec
    says, "list" as the guide shows), `empty_render` (an unknown render answers `{"data": []}`
    or 404), `second_delete` (deleting a deleted asset answers 204 or 404), `type_name`
    ("assets" in the docs, "asset" in the spec), `null_url_while_importing`.
    """

    def __init__(
        self,
        env: str = "stage",
        api_key: str = "standin-key-0123456789",
        latency: float = 0.0,
        *,
        by_id_shape: Literal["object", "list"] = "object",
        empty_render: Literal["list", "404"] = "list",
        second_delete: Literal[204, 404] = 204,
        type_name: str = "assets",
        null_url_while_importing: bool = False,
        timeout_sleep: float = 2.0,
    ) -> None:
        self.env, self.api_key, self.latency = env, api_key, latency
        self.by_id_shape, self.empty_render = by_id_shape, empty_render
        self.second_delete, self.type_name = second_delete, type_name
        self.null_url_while_importing = null_url_while_importing
        self.timeout_sleep = timeout_sleep
        # Runs in the handler thread before each answer: lets a test look at the world
        # (the database, say) while a call is in flight.
        self.on_call: Callable[[str, str], None] | None = None
        self._assets: dict[str, dict[str, Any]] = {}
        self._faults: deque[_Fault] = deque()
        self._calls: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> ServeStandIn:
        handler = type("Handler", (_Handler,), {"standin": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ServeStandIn:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base URL to use as SHOTSTACK_API_URL."""
        assert self._server is not None, "start the stand-in first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # --- state -----------------------------------------------------------------------------

    def add_asset(
        self,
        asset_id: str,
        render_id: str,
        status: str = "ready",
        filename: str | None = None,
        owner: str = OWNER,
        created: str | None = None,
        updated: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Host an asset; `extra` keys are sent as further attributes (unknown to clients)."""
        name = filename or f"{render_id}.mp4"
        now = stamp()
        attributes = {
            "id": asset_id,
            "owner": owner,
            "region": "au",
            "renderId": render_id,
            "providerId": asset_id,
            "filename": name,
            "url": f"https://cdn.shotstack.io/au/{self.env}/{owner}/{name}",
            "status": status,
            "created": created or now,
            "updated": updated or created or now,
            **extra,
        }
        with self._lock:
            self._assets[asset_id] = attributes
        return dict(attributes)

    def set_status(self, asset_id: str, status: str, updated: str | None = None) -> None:
        with self._lock:
            self._assets[asset_id]["status"] = status
            self._assets[asset_id]["updated"] = updated or stamp()

    def asset(self, asset_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._assets.get(asset_id)
            return dict(found) if found else None

    def fail_next(
        self,
        n: int = 1,
        status: Fault = 500,
        *,
        retry_after: str | float | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        """Answer the next `n` calls with a fault instead of serving them.

        `status` is an HTTP status (its body `{"message": ...}` unless `body` is given),
        "timeout" (answer nothing for `timeout_sleep` seconds) or "reset" (close the socket).
        """
        header = None if retry_after is None else str(retry_after)
        with self._lock:
            self._faults.extend(_Fault(status, header, body) for _ in range(n))

    @property
    def calls(self) -> list[tuple[float, str, str]]:
        """Every request seen, as (time.monotonic() on arrival, method, path)."""
        with self._lock:
            return list(self._calls)

    def count(self, method: str | None = None, path: str | None = None) -> int:
        return sum(
            1
            for _, m, p in self.calls
            if (method is None or m == method) and (path is None or p == path)
        )

    def max_in_window(self, window: float = 1.0) -> int:
        """The most calls that arrived within any closed interval `window` seconds long."""
        times = sorted(t for t, _, _ in self.calls)
        most, start = 0, 0
        for end, t in enumerate(times):
            while t - times[start] > window:
                start += 1
            most = max(most, end - start + 1)
        return most

    def reset_calls(self) -> None:
        with self._lock:
            self._calls.clear()

    # --- what the handler asks ---------------------------------------------------------------

    def _record(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            self._calls.append((time.monotonic(), method, path))
            return self._faults.popleft() if self._faults else None

    def _resource(self, attributes: dict[str, Any]) -> dict[str, Any]:
        shown = dict(attributes)
        if self.null_url_while_importing and shown["status"] == "importing":
            shown["url"] = shown["filename"] = None
        return {"type": self.type_name, "attributes": shown}

    def answer(self, method: str, path: str) -> tuple[int, dict[str, Any] | None]:
        """Serve one authenticated request of the Serve API: (status, JSON body or None)."""
        prefix = f"/serve/{self.env}/assets/"
        if not path.startswith(prefix):
            # API Gateway answers a call to another stage or path with 403, not 404.
            return 403, {"message": "Forbidden"}
        rest = path[len(prefix) :]
        by_render = rest.startswith("render/")
        ident = unquote(rest[len("render/") :] if by_render else rest)
        if not ident or "/" in ident:
            return 404, {"message": "Not Found"}
        with self._lock:
            if method == "GET" and by_render:
                found = [a for a in self._assets.values() if a["renderId"] == ident]
                if not found and self.empty_render == "404":
                    return 404, {"message": "Not Found"}
                return 200, {"data": [self._resource(a) for a in found]}
            if by_render:
                return 405, {"message": "Method Not Allowed"}
            asset = self._assets.get(ident)
            if method == "GET":
                if asset is None:
                    return 404, {"message": "Not Found"}
                resource = self._resource(asset)
                return 200, {"data": resource if self.by_id_shape == "object" else [resource]}
            if method == "DELETE":
                if asset is None:
                    return 404, {"message": "Not Found"}
                if asset["status"] == "deleted":
                    return (204, None) if self.second_delete == 204 else (404, None)
                asset["status"], asset["updated"] = "deleted", stamp()
                return 204, None
        return 405, {"message": "Method Not Allowed"}


class _Handler(BaseHTTPRequestHandler):
    standin: ServeStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test output clean

    def do_GET(self) -> None:
        self._serve("GET")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        standin = self.standin
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        path = urlsplit(self.path).path
        fault = standin._record(method, path)
        if standin.latency:
            standin._stopping.wait(standin.latency)
        if standin.on_call is not None:
            standin.on_call(method, path)
        if fault is not None:
            self._fault(fault)
            return
        if self.headers.get("x-api-key") != standin.api_key:
            self._send(403, {"message": "Forbidden"})
            return
        status, body = standin.answer(method, path)
        self._send(status, body)

    def _fault(self, fault: _Fault) -> None:
        if fault.status == "timeout":
            self.standin._stopping.wait(self.standin.timeout_sleep)
            self.close_connection = True
            return
        if fault.status == "reset":
            self.close_connection = True
            return
        messages = {429: "Too Many Requests", 403: "Forbidden", 401: "Unauthorized"}
        body = fault.body or {"message": messages.get(fault.status, "Internal server error")}
        headers = {}
        if fault.status == 429:
            headers["x-amzn-ErrorType"] = "TooManyRequestsException"
        if fault.retry_after is not None:
            headers["Retry-After"] = fault.retry_after
        self._send(fault.status, body, headers)

    def _send(
        self, status: int, body: dict[str, Any] | None, headers: dict[str, str] | None = None
    ) -> None:
        data = b"" if body is None or status == 204 else json.dumps(body).encode()
        try:
            self.send_response(status)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (its read timeout)


def main() -> None:
    """Run a stand-in until interrupted; print its URL and API key."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--env", default="stage")
    parser.add_argument("--api-key", default="standin-key-0123456789")
    args = parser.parse_args()
    with ServeStandIn(env=args.env, api_key=args.api_key) as standin:
        print(f"SHOTSTACK_API_URL={standin.url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
