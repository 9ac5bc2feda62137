"""Typed settings read from the environment (and `.env`), as SPEC §2 lists them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
INSTANCE_DIR = PROJECT_ROOT / "instance"
DEFAULT_DATABASE_URL = f"sqlite:///{INSTANCE_DIR / 'asset-tracker.sqlite3'}"


class ConfigError(Exception):
    """Configuration that the service refuses to start with; its message is one line."""


def _csv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value)


class Settings(BaseSettings):
    """Every variable of SPEC §2, validated once at start."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    database_url: str = DEFAULT_DATABASE_URL
    shotstack_api_key: SecretStr | None = None
    shotstack_env: Literal["stage", "v1"] = "stage"
    shotstack_api_url: str = "https://api.shotstack.io"
    shotstack_rate_limit: float = Field(5.0, gt=0)
    shotstack_timeout: Annotated[tuple[float, float], NoDecode] = (3.05, 10.0)
    webhook_token: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    # (name, token) pairs: one name may hold several tokens, so that a key can be rotated.
    api_keys: Annotated[tuple[tuple[str, SecretStr], ...], NoDecode] = ()
    reconcile_grace: float = Field(60.0, ge=0)
    reconcile_max_interval: float = Field(900.0, gt=0)
    reconcile_max_age: float = Field(86400.0, gt=0)
    reconcile_lease: float = Field(60.0, gt=0)
    reconcile_batch: int = Field(50, ge=1, le=1000)
    reconcile_idle: float = Field(1.0, gt=0)
    worker_metrics_port: int = Field(9101, ge=0, le=65535)
    event_retention_days: float = Field(30.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "text"] = "json"

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        for prefix in ("postgres://", "postgresql://"):
            if value.startswith(prefix):
                value = "postgresql+psycopg://" + value[len(prefix) :]
                break
        try:  # a bad port or an unknown database is one line now, not a traceback later
            make_url(value).get_dialect()
        except (ArgumentError, NoSuchModuleError, ValueError):
            # The message never repeats the URL: it may hold a password.
            raise ValueError(
                "must be an SQLAlchemy URL such as postgresql://user@host:5432/db"
            ) from None
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _any_case(cls, value: Any, info: ValidationInfo) -> Any:
        """`LOG_LEVEL=info` and `LOG_FORMAT=JSON` mean what they say."""
        if not isinstance(value, str):
            return value
        value = value.strip()
        return value.upper() if info.field_name == "log_level" else value.lower()

    @field_validator("shotstack_api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        message = "must be an http(s) URL such as https://api.shotstack.io"
        value = value.strip()
        parts = urlsplit(value)
        try:
            _ = parts.port  # a port that is not a number raises here, not on the first call
        except ValueError:
            raise ValueError(message) from None
        # A base URL: a host without blanks, and nothing after the path for /serve/... to follow.
        malformed = any(c.isspace() for c in value) or parts.query or parts.fragment
        if parts.scheme not in ("http", "https") or not parts.hostname or malformed:
            raise ValueError(message)
        return value.rstrip("/")

    @field_validator("shotstack_timeout", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> Any:
        parts = _csv(value) if isinstance(value, str) else list(value)
        try:
            numbers = [float(part) for part in parts]
        except (TypeError, ValueError):
            raise ValueError("must be seconds, as 'connect,read' or one number") from None
        if len(numbers) == 1:
            numbers *= 2
        if len(numbers) != 2 or min(numbers) <= 0:
            raise ValueError("must be two positive numbers of seconds, 'connect,read'")
        return tuple(numbers)

    @field_validator("webhook_token", mode="before")
    @classmethod
    def _tokens(cls, value: Any) -> Any:
        return tuple(_csv(value))

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return tuple(value.items())
        if not isinstance(value, str):
            return value
        keys: list[tuple[str, str]] = []
        for entry in _csv(value):
            name, sep, token = entry.partition(":")
            if not sep or not name.strip() or not token.strip():
                raise ValueError("each entry must be name:token (an entry has no name or token)")
            keys.append((name.strip(), token.strip()))
        return tuple(keys)

    @property
    def serve_url(self) -> str:
        return f"{self.shotstack_api_url}/serve/{self.shotstack_env}"

    def secrets(self) -> list[str]:
        """Every configured secret, so that log filters and tests can look for them."""
        values = [t.get_secret_value() for t in self.webhook_token]
        values += [token.get_secret_value() for _name, token in self.api_keys]
        if self.shotstack_api_key:
            values.append(self.shotstack_api_key.get_secret_value())
        return [v for v in values if v]


def load_settings(**overrides: Any) -> Settings:
    """Read the settings; raise ConfigError with one line naming what is wrong."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ".".join(str(p) for p in error["loc"]) or "settings"
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{name.upper()}: {message}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
