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


@pytest.mark.parametrize(
    "url",
    [
        "not-a-url",
        "ftp://api.shotstack.io",
        "https://api.shotstack.io:abc",
        "https://api shotstack.io",
        "https://:443",
        "https://user@",
        "https://api.shotstack.io?x=1",
        "https://api.shotstack.io/#top",
    ],
)
def test_a_malformed_shotstack_api_url_is_refused_in_one_line(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(_env_file=None, shotstack_api_url=url)
    assert "SHOTSTACK_API_URL" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("url", "serve"),
    [
        ("https://api.shotstack.io/", "https://api.shotstack.io/serve/stage"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/serve/stage"),
        ("http://[::1]:9/base", "http://[::1]:9/base/serve/stage"),
    ],
)
def test_a_good_shotstack_api_url_gives_the_serve_url(url: str, serve: str) -> None:
    assert load_settings(_env_file=None, shotstack_api_url=url).serve_url == serve
