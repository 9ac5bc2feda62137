"""The quick-start path on the embedded SQLite default: a callback in, read back through the API."""

from __future__ import annotations

from pathlib import Path

from service import create_app
from service.db import make_engine

from .conftest import API_TOKEN, app_settings, upgrade
from .helpers import edit_callback, post_callback, serve_callback


def test_sqlite_quick_start(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'quick.sqlite3'}"
    engine = make_engine(url)
    with engine.begin() as conn:
        upgrade(conn)
    engine.dispose()

    app = create_app(app_settings(url))
    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    assert post_callback(client, edit_callback("r-9")).status_code == 200
    assert (
        post_callback(
            client, serve_callback("a-9", "r-9", status="importing", completed=None)
        ).status_code
        == 200
    )
    assert post_callback(client, serve_callback("a-9", "r-9")).status_code == 200
    assert post_callback(client, serve_callback("a-9", "r-9")).json == {"outcome": "duplicate"}

    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    listed = client.get("/api/assets", headers=auth)
    assert listed.status_code == 200
    assert listed.mimetype == "application/vnd.api+json"
    (asset,) = listed.json["data"]
    assert asset["id"] == "a-9"
    assert asset["attributes"]["status"] == "ready"
    assert asset["attributes"]["kind"] == "video"
    assert asset["attributes"]["firstSeenAt"].endswith("Z")
    render = client.get("/api/renders/r-9", headers=auth).json["data"]
    assert render["attributes"]["status"] == "done"
    assert render["relationships"]["assets"]["data"] == [{"type": "assets", "id": "a-9"}]
    app.extensions["db"].engine.dispose()


def test_readyz_tells_a_database_not_migrated_from_one_not_reachable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    app = create_app(app_settings(url))
    answer = app.test_client().get("/readyz")
    assert answer.status_code == 503
    assert answer.json["database"] == "ok"
    assert answer.json["migrated"] is False
    app.extensions["db"].engine.dispose()
