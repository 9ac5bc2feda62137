"""`GET /healthz` (the process answers), `GET /readyz` (the database is reachable, migrated)."""

from __future__ import annotations

from functools import cache
from typing import Any

from alembic.config import Config
from alembic.script import ScriptDirectory
from flask import Blueprint, Flask, Response, jsonify
from sqlalchemy import select, text

from .config import PROJECT_ROOT
from .db import get_session
from .models import ShotstackBudget

bp = Blueprint("health", __name__)


@cache
def migration_head() -> str | None:
    """The newest revision in migrations/, read once per process."""
    config = Config(toml_file=str(PROJECT_ROOT / "pyproject.toml"))
    return ScriptDirectory.from_config(config).get_current_head()


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    body: dict[str, Any] = {"database": "unreachable", "migrated": False}
    session = get_session()
    try:
        session.execute(text("SELECT 1"))
        body["database"] = "ok"  # reachable, whether or not it is migrated
        current = session.execute(text("SELECT version_num FROM alembic_version")).scalar()
        body["migrated"] = current == migration_head()
        budget = session.execute(select(ShotstackBudget).limit(1)).scalar()
        body["shotstackAuthError"] = budget.auth_error if budget else None
    except Exception as exc:
        body["error"] = type(exc).__name__
    finally:
        session.rollback()
    ready = body["database"] == "ok" and body["migrated"]
    body["status"] = "ready" if ready else "not ready"
    return jsonify(body), 200 if ready else 503


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
