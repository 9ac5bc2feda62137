"""POST /webhooks/shotstack against real Postgres (SPEC §3)."""

from __future__ import annotations

from flask.testing import FlaskClient
from sqlalchemy import Connection, func, select

from service.models import Asset, WebhookEvent

from .helpers import post_callback, serve_callback


def _count(connection: Connection, model: type) -> int:
    return connection.execute(select(func.count()).select_from(model)).scalar_one()


def test_serve_callback_is_stored_and_applied(client: FlaskClient, connection: Connection) -> None:
    response = post_callback(client, serve_callback("a-1", "r-1"))
    assert response.status_code == 200
    assert response.json == {"outcome": "processed"}
    asset = connection.execute(select(Asset)).one()
    assert (asset.id, asset.render_id, asset.status) == ("a-1", "r-1", "ready")
    assert _count(connection, WebhookEvent) == 1


def test_wrong_token_stores_nothing(client: FlaskClient, connection: Connection) -> None:
    response = post_callback(client, serve_callback(), token="wrong")
    assert response.status_code == 401
    assert response.json["errors"][0]["status"] == "401"
    assert _count(connection, WebhookEvent) == 0
