"""`asset-tracker purge`: old ready/failed assets deleted through Shotstack, safely restartable."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from service.assets import AssetFacts, record_asset
from service.cli import main
from service.db import utcnow
from service.models import Asset, Source
from service.shotstack import RateBudget

from .standin import ServeStandIn

ELIGIBLE = 24
RATE_LIMIT = 20
DELETE_PREFIX = "/serve/stage/assets/"


@pytest.fixture
def standin() -> Iterator[ServeStandIn]:
    with ServeStandIn() as standin:
        yield standin


@pytest.fixture
def seeded(live_engine: Engine, standin: ServeStandIn) -> dict[str, set[str]]:
    """Assets at Shotstack and here: old ready/failed ones, and ones a purge must not touch."""
    RateBudget(live_engine, RATE_LIMIT).reset()
    now = utcnow()
    old, recent = now - timedelta(days=10), now - timedelta(days=2)
    groups: dict[str, set[str]] = {"eligible": set(), "ineligible": set()}
    rows: list[tuple[str, str, Any]] = []
    for n in range(ELIGIBLE):
        rows.append((f"old-{n:02d}", "failed" if n % 5 == 0 else "ready", old))
    rows += [(f"importing-{n}", "importing", old) for n in range(3)]
    rows += [(f"deleted-{n}", "deleted", old) for n in range(2)]
    rows += [(f"recent-{n}", "ready", recent) for n in range(3)]
    with Session(live_engine) as session, session.begin():
        for asset_id, status, seen in rows:
            render_id = f"render-{asset_id}"
            facts = AssetFacts(id=asset_id, render_id=render_id, status=status)
            record_asset(session, facts, source=Source.LOOKUP, now=seen, grace=0)
            standin.add_asset(asset_id, render_id, status=status)
            eligible = status in ("ready", "failed") and seen == old
            groups["eligible" if eligible else "ineligible"].add(asset_id)
    return groups


def _env(live_url: str, standin: ServeStandIn) -> dict[str, str]:
    return {
        "DATABASE_URL": live_url,
        "SHOTSTACK_API_URL": standin.url,
        "SHOTSTACK_API_KEY": standin.api_key,
        "SHOTSTACK_ENV": "stage",
        "SHOTSTACK_RATE_LIMIT": str(RATE_LIMIT),
        "LOG_LEVEL": "WARNING",
    }


def _statuses(engine: Engine) -> dict[str, tuple[str, str | None]]:
    with Session(engine) as session:
        return {a.id: (a.status, a.deleted_by) for a in session.scalars(select(Asset))}


def _deletes(standin: ServeStandIn) -> Counter[str]:
    return Counter(
        path.removeprefix(DELETE_PREFIX) for _, method, path in standin.calls if method == "DELETE"
    )


def test_dry_run_lists_what_would_go_and_calls_no_one(
    seeded: dict[str, set[str]], live_url: str, standin: ServeStandIn
) -> None:
    result = CliRunner().invoke(
        main, ["purge", "--older-than", "7", "--dry-run"], env=_env(live_url, standin)
    )
    assert result.exit_code == 0, result.output
    listed = {line for line in result.output.splitlines() if line.startswith("old-")}
    assert listed == seeded["eligible"]
    assert f"{ELIGIBLE} asset(s)" in result.output
    assert standin.calls == []


def test_it_asks_first_and_no_means_nothing_happens(
    seeded: dict[str, set[str]], live_url: str, live_engine: Engine, standin: ServeStandIn
) -> None:
    before = _statuses(live_engine)
    result = CliRunner().invoke(
        main, ["purge", "--older-than", "7"], input="n\n", env=_env(live_url, standin)
    )
    assert result.exit_code == 1
    assert f"Delete {ELIGIBLE} asset(s)" in result.output and "Aborted" in result.output
    assert standin.calls == []
    assert _statuses(live_engine) == before


@pytest.mark.parametrize("days", ["0", "-3", "x"])
def test_days_must_be_at_least_one(days: str) -> None:
    result = CliRunner().invoke(main, ["purge", "--older-than", days, "--yes"])
    assert result.exit_code == 2
    assert "--older-than" in result.output


def test_purge_deletes_only_eligible_assets_within_the_rate_limit(
    seeded: dict[str, set[str]], live_url: str, live_engine: Engine, standin: ServeStandIn
) -> None:
    before = _statuses(live_engine)
    # One 429 on the way: every process pauses, the purge waits it out and goes on.
    standin.fail_next(1, 429, retry_after="0.3")
    result = CliRunner().invoke(
        main, ["purge", "--older-than", "7"], input="y\n", env=_env(live_url, standin)
    )
    assert result.exit_code == 0, result.output
    assert f"deleted {ELIGIBLE} asset(s); 0 failed" in result.output
    after = _statuses(live_engine)
    for asset_id in seeded["eligible"]:
        assert after[asset_id] == ("deleted", "purge")
        assert (standin.asset(asset_id) or {})["status"] == "deleted"
    for asset_id in seeded["ineligible"]:
        assert after[asset_id] == before[asset_id]
    deletes = _deletes(standin)
    assert set(deletes) == seeded["eligible"]
    assert sum(deletes.values()) == ELIGIBLE + 1  # the one answered 429 was sent again
    assert standin.max_in_window(1.0) <= RATE_LIMIT

    again = CliRunner().invoke(
        main, ["purge", "--older-than", "7", "--yes"], env=_env(live_url, standin)
    )
    assert again.exit_code == 0 and "no ready or failed asset" in again.output
    assert sum(_deletes(standin).values()) == ELIGIBLE + 1


def _purge_command() -> list[str]:
    return [str(Path(sys.executable).parent / "asset-tracker"), "purge", "--older-than", "7"]


@pytest.mark.parametrize("second_delete", [204, 404])
def test_purge_killed_at_a_random_point_and_run_again_finishes_the_job(
    seeded: dict[str, set[str]],
    live_url: str,
    live_engine: Engine,
    standin: ServeStandIn,
    second_delete: Any,
) -> None:
    standin.second_delete = second_delete
    before = _statuses(live_engine)
    kill_at = random.randint(1, ELIGIBLE)
    env = {**os.environ, **_env(live_url, standin)}
    proc = subprocess.Popen(
        [*_purge_command(), "--yes"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def kill_in_flight(method: str, _path: str) -> None:
        # The kill-th DELETE has reached Shotstack and its answer is not back yet.
        if method == "DELETE" and sum(_deletes(standin).values()) == kill_at:
            os.kill(proc.pid, signal.SIGKILL)

    standin.on_call = kill_in_flight
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, output
    standin.on_call = None
    in_flight = [p for _, m, p in standin.calls if m == "DELETE"][kill_at - 1]
    in_flight_id = in_flight.removeprefix(DELETE_PREFIX)
    middle = _statuses(live_engine)
    recorded = {a for a in seeded["eligible"] if middle[a][0] == "deleted"}
    assert len(recorded) == kill_at - 1, f"killed at DELETE #{kill_at}"
    assert in_flight_id not in recorded

    rerun = subprocess.run(
        [*_purge_command(), "--yes"], env=env, capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"deleted {ELIGIBLE - kill_at + 1} asset(s); 0 failed" in rerun.stdout

    after = _statuses(live_engine)
    for asset_id in seeded["eligible"]:
        assert after[asset_id] == ("deleted", "purge"), asset_id
    for asset_id in seeded["ineligible"]:
        assert after[asset_id] == before[asset_id], asset_id
    deletes = _deletes(standin)
    assert set(deletes) == seeded["eligible"]
    twice = {asset_id for asset_id, n in deletes.items() if n > 1}
    assert twice == {in_flight_id}, f"killed at DELETE #{kill_at}"
    assert deletes[in_flight_id] == 2


def test_an_unexpected_answer_for_one_asset_is_reported_and_the_purge_goes_on(
    seeded: dict[str, set[str]], live_url: str, live_engine: Engine, standin: ServeStandIn
) -> None:
    # Shotstack refuses one delete with a 4xx that is neither a key problem nor a 429.
    standin.fail_next(1, 409, body={"message": "Conflict"})
    result = CliRunner().invoke(
        main, ["purge", "--older-than", "7", "--yes"], env=_env(live_url, standin)
    )
    assert result.exit_code == 1, result.output
    assert f"deleted {ELIGIBLE - 1} asset(s); 1 failed" in result.output
    after = _statuses(live_engine)
    kept = [a for a in seeded["eligible"] if after[a][0] != "deleted"]
    assert len(kept) == 1
    assert set(_deletes(standin)) == seeded["eligible"]


def test_progress_shows_off_a_terminal_too(
    seeded: dict[str, set[str]], live_url: str, standin: ServeStandIn
) -> None:
    result = CliRunner().invoke(
        main, ["purge", "--older-than", "7", "--yes"], env=_env(live_url, standin)
    )
    assert result.exit_code == 0, result.output
    shown = [line for line in result.stderr.splitlines() if line.startswith("Deleting: ")]
    assert shown[-1] == f"Deleting: {ELIGIBLE}/{ELIGIBLE}"
    assert 2 <= len(shown) <= 11
