"""Settings as an operator writes them (SPEC §2)."""

from __future__ import annotations

import pytest

from service.config import ConfigError, load_settings


@pytest.mark.parametrize(
    ("level", "fmt", "expected"),
    [("info", "json", ("INFO", "json")), ("Debug", "TEXT", ("DEBUG", "text"))],
)
def test_log_level_and_format_are_read_in_any_case(
    level: str, fmt: str, expected: tuple[str, str]
) -> None:
    settings = load_settings(_env_file=None, log_level=level, log_format=fmt)
    assert (settings.log_level, settings.log_format) == expected


def test_an_unknown_log_level_is_still_refused_in_one_line() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(_env_file=None, log_level="loud")
    assert "LOG_LEVEL" in str(refused.value) and "\n" not in str(refused.value)


def test_every_api_key_pair_is_kept_even_under_one_name() -> None:
    """`app:old,app:new` is a key being rotated: both tokens let the caller in, as `app`."""
    settings = load_settings(_env_file=None, api_keys="app:old-token, app:new-token,ops:x:y")
    pairs = [(name, token.get_secret_value()) for name, token in settings.api_keys]
    assert pairs == [("app", "old-token"), ("app", "new-token"), ("ops", "x:y")]
    assert {"old-token", "new-token", "x:y"} <= set(settings.secrets())
