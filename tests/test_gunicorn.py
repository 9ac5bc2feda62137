"""The `web` process as the Procfile runs it: real gunicorn, with gunicorn.conf.py."""

from __future__ import annotations

import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from service.config import PROJECT_ROOT, load_settings

from .conftest import API_TOKEN, WEBHOOK_TOKEN, app_settings
from .helpers import edit_callback, serve_callback
from .standin import ServeStandIn

BIN = Path(sys.executable).parent
START_WITHIN = 60.0  # seconds for gunicorn to answer /healthz; fails the test, never waits


@dataclass
class Web:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> str:
        """Stop gunicorn as a platform does (SIGTERM) and return everything it wrote."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        return self.log.read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def standin() -> Iterator[ServeStandIn]:
    with ServeStandIn() as standin:
        yield standin


def service_env(live_url: str, standin: ServeStandIn, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(
        {
            "DATABASE_URL": live_url,
            "WEBHOOK_TOKEN": f"{WEBHOOK_TOKEN},rotated-token-xyz",
            "API_KEYS": f"ci:{API_TOKEN},other:other-token-123",
            "SHOTSTACK_API_URL": standin.url,
            "SHOTSTACK_API_KEY": standin.api_key,
            "SHOTSTACK_RATE_LIMIT": "200",
            "RECONCILE_GRACE": "0",
            "WORKER_METRICS_PORT": "0",
            "PYTHONUNBUFFERED": "1",  # every line reaches the log file at once
            **extra,
        }
    )
    return env


@pytest.fixture
def gunicorn(
    live_url: str, live_engine: Engine, standin: ServeStandIn, tmp_path: Path
) -> Iterator[Callable[..., Web]]:
    started: list[Web] = []

    def start(**extra: str) -> Web:
        port = _free_port()
        log = tmp_path / f"web-{len(started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    str(BIN / "gunicorn"),
                    "--config",
                    str(PROJECT_ROOT / "gunicorn.conf.py"),
                    "--bind",
                    f"127.0.0.1:{port}",
                    "service:create_app()",
                ],
                env=service_env(live_url, standin, **extra),
                cwd=tmp_path,  # no .env of the checkout
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        web = Web(f"http://127.0.0.1:{port}", proc, log)
        started.append(web)
        give_up = time.monotonic() + START_WITHIN
        while time.monotonic() < give_up:
            assert proc.poll() is None, log.read_text()
            try:
                if requests.get(f"{web.url}/healthz", timeout=2).status_code == 200:
                    return web
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        pytest.fail(f"gunicorn did not answer: {log.read_text()}")

    yield start
    for web in started:
        web.stop()


def log_lines(text: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values


def post(url: str, body: Any, token: str = WEBHOOK_TOKEN) -> requests.Response:
    # A new connection each time, so the kernel hands the requests to either worker.
    return requests.post(
        f"{url}/webhooks/shotstack?token={token}",
        json=body,
        timeout=10,
        headers={"Connection": "close"},
    )


def test_metrics_are_summed_across_gunicorn_workers(gunicorn: Callable[..., Web]) -> None:
    web = gunicorn(WEB_CONCURRENCY="2")
    sent = 0
    pids: set[int] = set()
    with ThreadPoolExecutor(8) as pool:
        for batch in range(10):  # until both workers have answered some callbacks
            bodies = [serve_callback(f"m-{batch}-{n}", f"mr-{n % 4}") for n in range(20)]
            answers = list(pool.map(lambda b: post(web.url, b), bodies))
            assert {a.status_code for a in answers} == {200}
            sent += len(bodies)
            pids = {
                line["pid"]
                for line in log_lines(web.log.read_text())
                if line.get("path") == "/webhooks/shotstack"
            }
            if len(pids) >= 2:
                break
    assert len(pids) == 2, "both gunicorn workers answered callbacks"
    key = ("asset_tracker_callbacks_total", (("outcome", "processed"), ("type", "serve")))
    route = (("method", "POST"), ("route", "/webhooks/shotstack"), ("status", "200"))
    for _ in range(6):  # whichever worker answers the scrape, it sums them all
        values = scrape(web.url)
        assert values[key] == sent
        assert values[("asset_tracker_http_requests_total", route)] == sent
        histogram = (("method", "POST"), ("route", "/webhooks/shotstack"))
        assert values[("asset_tracker_http_request_duration_seconds_count", histogram)] == sent
    web.stop()


def _raw(web: Web, request: str) -> tuple[bytes, dict[str, Any]]:
    """Send `request` as it is written; return the status line and the JSON body."""
    host, port = web.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request.encode())
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/vnd.api+json" in head.lower(), answer
    return head.split(b"\r\n")[0], json.loads(body)


def test_requests_that_gunicorn_or_the_body_reader_refuse_get_json_errors(
    gunicorn: Callable[..., Web],
) -> None:
    """SPEC §4: never an HTML page, also when gunicorn answers before the app; no traceback."""
    web = gunicorn(WEB_CONCURRENCY="1")
    chunked = (
        f"POST /webhooks/shotstack?token={WEBHOOK_TOKEN} HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
    )
    status, body = _raw(web, chunked)
    assert status == b"HTTP/1.1 400 BAD REQUEST"
    assert body["errors"][0]["code"] == "unreadable_body"

    long_uri = f"GET /api/assets/{'x' * 5000} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, body = _raw(web, long_uri)
    assert status == b"HTTP/1.1 414 URI Too Long"
    assert body["errors"][0]["status"] == "414"

    big_header = f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {'y' * 9000}\r\n\r\n"
    status, body = _raw(web, big_header)
    assert status == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert body["errors"][0]["title"] == "Request Header Fields Too Large"

    # gunicorn quotes a target it cannot take in its detail: the token is redacted there.
    bad_target = f"GET /webhooks/shotstack?token={WEBHOOK_TOKEN}&x=\x7f HTTP/1.1\r\n\r\n"
    status, body = _raw(web, bad_target)
    assert status.startswith(b"HTTP/1.1 400")
    assert "[REDACTED]" in body["errors"][0]["detail"]
    assert WEBHOOK_TOKEN not in json.dumps(body)
    log = web.stop()
    assert "Traceback" not in log and WEBHOOK_TOKEN not in log


def test_a_slow_shotstack_call_does_not_hold_up_callbacks(
    gunicorn: Callable[..., Web], standin: ServeStandIn
) -> None:
    web = gunicorn(WEB_CONCURRENCY="1")  # one process: only its threads can keep it answering
    standin.add_asset("slow-1", "slow-r")
    callbacks_done = threading.Event()
    in_flight = threading.Event()

    def hold(method: str, path: str) -> None:
        if path.endswith("/slow-1"):
            in_flight.set()
            callbacks_done.wait(timeout=6)  # Shotstack takes its time

    standin.on_call = hold
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(
            requests.get,
            f"{web.url}/api/assets/slow-1?refresh=true",
            headers=auth,
            timeout=30,
        )
        assert in_flight.wait(timeout=30)
        answers = [post(web.url, serve_callback(f"q-{n}", "qr")) for n in range(5)]
        assert not slow.done(), "the callbacks were answered while Shotstack was still busy"
        callbacks_done.set()
        assert slow.result().status_code == 200
    assert [a.json() for a in answers] == [{"outcome": "processed"}] * 5


def test_no_secret_reaches_the_web_or_worker_logs(
    gunicorn: Callable[..., Web], standin: ServeStandIn, live_url: str, tmp_path: Path
) -> None:
    web = gunicorn(WEB_CONCURRENCY="2", LOG_LEVEL="DEBUG")
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    for n in range(3):
        standin.add_asset(f"sa-{n}", "sr-1", filename=f"sr-1-{n}.mp4")
    # Callbacks: the token in the query string, the rotated one, the header, a wrong one.
    assert post(web.url, edit_callback("sr-1")).status_code == 200
    assert post(web.url, serve_callback("sa-0", "sr-1", filename="sr-1-0.mp4")).status_code == 200
    assert post(web.url, serve_callback("sa-0", "sr-1"), token="rotated-token-xyz").ok
    assert post(web.url, {"not": "a callback"}).status_code == 200
    assert post(web.url, serve_callback("sa-9"), token="wrong-token").status_code == 401
    headers = {
        "X-Webhook-Token": WEBHOOK_TOKEN,
        "Connection": "close",
        "X-Shotstack-Attempt": "3",  # as Shotstack's publisher sends them
        "X-Shotstack-Event-Type": "serve",
    }
    assert (
        requests.post(
            f"{web.url}/webhooks/shotstack", data=b"{bad", headers=headers, timeout=10
        ).status_code
        == 400
    )
    # The API: reads, a refresh, a delete, a fallback, a Shotstack failure, a bad key.
    assert requests.get(f"{web.url}/api/assets", headers=auth, timeout=10).status_code == 200
    assert (
        requests.get(
            f"{web.url}/api/assets/sa-0?refresh=true", headers=auth, timeout=10
        ).status_code
        == 200
    )
    assert (
        requests.delete(f"{web.url}/api/assets/sa-0", headers=auth, timeout=10).status_code == 204
    )
    assert (
        requests.get(f"{web.url}/api/renders/sr-1/assets", headers=auth, timeout=10).status_code
        == 200
    )
    standin.fail_next(2, 500)
    assert (
        requests.delete(f"{web.url}/api/assets/sa-1", headers=auth, timeout=20).status_code == 502
    )
    standin.fail_next(1, 403)
    assert (
        requests.get(
            f"{web.url}/api/assets/sa-1?refresh=true", headers=auth, timeout=10
        ).status_code
        == 502
    )
    bad = {"Authorization": "Bearer other-token-123x"}
    assert requests.get(f"{web.url}/api/assets", headers=bad, timeout=10).status_code == 401
    web_log = web.stop()

    worker = subprocess.run(
        [str(BIN / "asset-tracker"), "worker", "--once"],
        env=service_env(live_url, standin, LOG_LEVEL="DEBUG"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert worker.returncode == 0, worker.stdout + worker.stderr
    worker_log = worker.stdout + worker.stderr

    settings = load_settings(**app_settings(live_url, shotstack_api_key=standin.api_key))
    secrets = settings.secrets()
    assert len(secrets) == 5
    for secret in secrets:
        assert secret not in web_log, secret
        assert secret not in worker_log, secret
    # The logs were there to look at: access lines of the callbacks, the worker's lookups.
    access = [line for line in log_lines(web_log) if line.get("logger") == "gunicorn.access"]
    assert any(line["path"] == "/webhooks/shotstack" and line["status"] == 401 for line in access)
    assert all(line["request_id"] for line in access)
    sent = {(line.get("shotstack_attempt"), line.get("shotstack_event_type")) for line in access}
    assert ("3", "serve") in sent  # Shotstack's headers, logged (shotstack-facts.md §1.6)
    assert "answered 500" in web_log  # Shotstack's failure was logged, its URL too
    assert log_lines(worker_log), worker_log[-2000:]


def test_config_follows_the_platform_conventions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PORT", "5123")
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    config = runpy.run_path(str(PROJECT_ROOT / "gunicorn.conf.py"))
    made = os.environ.pop("PROMETHEUS_MULTIPROC_DIR")
    try:
        assert config["bind"] == "0.0.0.0:5123"
        assert config["workers"] == 3
        assert config["worker_class"] == "gthread" and config["threads"] >= 4
        assert config["accesslog"] == "-" and config["errorlog"] == "-"
        assert config["logger_class"] == "service.logs.GunicornLogger"
        assert Path(made).is_dir() and made == config["_made_metrics_dir"]
    finally:
        config["on_exit"](None)
    assert not Path(made).exists()
    monkeypatch.delenv("WEB_CONCURRENCY")
    default = runpy.run_path(str(PROJECT_ROOT / "gunicorn.conf.py"))
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR")
    default["on_exit"](None)
    assert default["workers"] >= 2


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("SHOTSTACK_ENV", "prod", "SHOTSTACK_ENV"),
        ("SHOTSTACK_API_URL", "not-a-url", "SHOTSTACK_API_URL"),
        ("API_KEYS", "tokenwithoutname", "API_KEYS"),
    ],
)
@pytest.mark.parametrize("command", ["gunicorn", "worker", "release"])
def test_bad_configuration_stops_the_start_with_one_line(
    tmp_path: Path, command: str, variable: str, value: str, named: str
) -> None:
    bin_dir = Path(sys.executable).parent
    argv = {
        "gunicorn": [
            str(bin_dir / "gunicorn"),
            "-c",
            str(PROJECT_ROOT / "gunicorn.conf.py"),
            "-b",
            f"127.0.0.1:{_free_port()}",
            "service:create_app()",
        ],
        "worker": [str(bin_dir / "asset-tracker"), "worker", "--once"],
        # The Procfile's release runs in the project, where alembic finds its configuration.
        "release": [str(bin_dir / "alembic"), "upgrade", "head"],
    }[command]
    cwd = PROJECT_ROOT if command == "release" else tmp_path
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHOTSTACK_", "API_KEYS"))}
    env[variable] = value
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert named in lines[0]
    assert "Traceback" not in lines[0]


@pytest.mark.parametrize(
    ("variable", "value"), [("WEB_CONCURRENCY", "0"), ("GUNICORN_THREADS", "x")]
)
def test_a_process_or_thread_count_that_cannot_work_stops_gunicorn_with_one_line(
    tmp_path: Path, variable: str, value: str
) -> None:
    argv = [
        str(Path(sys.executable).parent / "gunicorn"),
        "-c",
        str(PROJECT_ROOT / "gunicorn.conf.py"),
        "-b",
        f"127.0.0.1:{_free_port()}",
        "service:create_app()",
    ]
    env = {**os.environ, variable: value}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert variable in lines[0]
