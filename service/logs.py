"""Logging: one JSON object per line (or text), a request id on every line, secrets redacted.

Web and worker alike call `configure(settings)` once at start. A request id lives in a context
variable: the web sets it per request (from `X-Request-ID` when sent) and returns it in the
response; the worker binds one per pass or render with `request_id(...)`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TypeVar

from flask import Flask, Response, g, request
from gunicorn.glogging import Logger as _GunicornLogger  # type: ignore[import-untyped]

from .config import Settings

REQUEST_ID_HEADER = "X-Request-ID"
REDACTED = "[REDACTED]"
# What a caller may choose as a request id: short and printable, so it cannot forge log lines.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Secrets in shapes we know, even when they are not (or no longer) configured: callback URLs
# carry `?token=`, API clients send bearer keys and Shotstack gets `x-api-key`.
# Each shape, with a lowercase text that any line it matches contains.
_SECRET_SHAPES = (
    ("token=", re.compile(r"(?i)(\btoken=)[^&\s\"'<>]+")),
    ("bearer", re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]+")),
    ("x-api-key", re.compile(r"(?i)(\bx-api-key[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+")),
)
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "request_id", "taskName"}
)

T = TypeVar("T")
_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    return _request_id.get()


@contextmanager
def request_id(value: str | None = None) -> Iterator[str]:
    """Tag every log line inside the block with a request id (a new one unless given)."""
    rid = value or new_request_id()
    token = _request_id.set(rid)
    try:
        yield rid
    finally:
        _request_id.reset(token)


def with_request_id(prefix: str, fn: Callable[..., T], *args: Any) -> T:
    """Call `fn(*args)` with a new request id, `prefix:<random>`, on its log lines.

    For the worker's units of work (one render's lookup, one housekeeping pass), which may
    run in a pool's threads.
    """
    with request_id(f"{prefix}:{new_request_id()[:12]}"):
        return fn(*args)


class Redactor:
    """Replace every configured secret, and anything shaped like one, with a marker."""

    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()

    def set_secrets(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        found = {s for s in secrets if s}
        self._secrets = tuple(sorted(found, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        # Most lines name no secret's shape: the regexes run only where one may match. (On
        # ASCII text, (?i) matches just what lower() equates; on other text they always run.)
        lowered = text.lower() if text.isascii() else None
        for hint, shape in _SECRET_SHAPES:
            if lowered is None or hint in lowered:
                text = shape.sub(rf"\g<1>{REDACTED}", text)
        return text


# One per process: gunicorn's own loggers and the app's share it.
redact = Redactor()


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, then extras."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "pid": record.process,
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD_ATTRS and not name.startswith("_"):
                doc[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        return redact(json.dumps(doc, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request_id"):
            record.request_id = None
        return redact(super().format(record))


def make_formatter(log_format: str) -> logging.Formatter:
    return TextFormatter() if log_format == "text" else JsonFormatter()


def _prepare(handler: logging.Handler, log_format: str) -> None:
    handler.setFormatter(make_formatter(log_format))
    # The formatters redact the whole line they write (message, extras, traceback), so no
    # filter redacts it a second time.
    if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
        handler.addFilter(RequestIdFilter())


def configure(settings: Settings) -> None:
    """Send every log line to stdout in the configured format and level, secrets redacted.

    Every logger propagates to the root handler, werkzeug's request lines (which carry the
    query string) included, so all of them pass through the redactor.

    Safe to call again (tests build many apps): the handler it added before is replaced.
    """
    redact.set_secrets(settings.secrets())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_asset_tracker", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stdout)
    handler._asset_tracker = True  # type: ignore[attr-defined]
    _prepare(handler, settings.log_format)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    # gunicorn's loggers do not propagate; the app's settings decide their format too.
    for name in ("gunicorn.error", "gunicorn.access"):
        for gunicorn_handler in logging.getLogger(name).handlers:
            _prepare(gunicorn_handler, settings.log_format)


def _start_request() -> None:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    rid = given if _VALID_REQUEST_ID.fullmatch(given) else new_request_id()
    g.request_id = rid
    g.request_id_token = _request_id.set(rid)


def _return_request_id(response: Response) -> Response:
    rid = g.get("request_id")
    if rid:
        response.headers[REQUEST_ID_HEADER] = rid
    return response


def _end_request(_exc: BaseException | None) -> None:
    token = g.pop("request_id_token", None)
    if token is not None:
        _request_id.reset(token)


def init_app(app: Flask) -> None:
    configure(app.config["SETTINGS"])
    app.before_request(_start_request)
    app.after_request(_return_request_id)
    app.teardown_request(_end_request)


# --- gunicorn -----------------------------------------------------------------------------


_SHOTSTACK_HEADERS = (
    ("shotstack_attempt", "HTTP_X_SHOTSTACK_ATTEMPT"),
    ("shotstack_event_type", "HTTP_X_SHOTSTACK_EVENT_TYPE"),
)


class GunicornLogger(_GunicornLogger):  # type: ignore[misc]  # gunicorn ships no types
    """gunicorn's logger, writing the same JSON lines to stdout, with no query string.

    The access line names the path only: the webhook token travels in the query string
    (SPEC §3), and a query string is no business of an access log anyway.
    """

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        from .config import ConfigError, load_settings

        try:
            settings = load_settings()
        except ConfigError:  # the app refuses to start with one clear line of its own
            settings = None
        log_format = settings.log_format if settings else "json"
        if settings:
            redact.set_secrets(settings.secrets())
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
                    handler.setStream(sys.stdout)
                _prepare(handler, log_format)

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if not self.access_log_enabled:
            return
        headers = dict((k.lower(), v) for k, v in getattr(resp, "headers", []) or [])
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        self.access_log.info(
            "%s %s %s",
            environ.get("REQUEST_METHOD"),
            environ.get("PATH_INFO"),
            status,
            extra={
                "method": environ.get("REQUEST_METHOD"),
                "path": environ.get("PATH_INFO"),
                "status": int(status) if str(status).isdigit() else status,
                "bytes": getattr(resp, "sent", None),
                "duration_ms": round(request_time.total_seconds() * 1000, 3),
                "remote": environ.get("REMOTE_ADDR"),
                "user_agent": environ.get("HTTP_USER_AGENT"),
                "request_id": headers.get(REQUEST_ID_HEADER.lower()),
                # Shotstack's publisher sends these; they are not documented, so they are only
                # logged (shotstack-facts.md §1.6), for a callback's story across its retries.
                **{
                    name: value[:100]
                    for name, key in _SHOTSTACK_HEADERS
                    if (value := environ.get(key))
                },
            },
        )
