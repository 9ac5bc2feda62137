"""Shotstack Asset Tracker: Shotstack callbacks in, hosted assets tracked, a JSON:API out."""

from __future__ import annotations

from typing import Any

from flask import Flask

from .config import load_settings


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the app: settings, database, error handlers, then the blueprints.

    `test_config` overrides settings by their lower-case names (`database_url`, ...).
    """
    app = Flask(__name__)
    settings = load_settings(**(test_config or {}))
    app.config["SETTINGS"] = settings

    from . import api, db, health, jsonapi, logs, metrics, openapi, webhooks

    logs.init_app(app)
    db.init_app(app)
    metrics.init_app(app)
    jsonapi.init_app(app)
    health.init_app(app)
    webhooks.init_app(app)
    api.init_app(app)
    openapi.init_app(app)
    return app
