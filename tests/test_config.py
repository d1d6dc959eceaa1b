from __future__ import annotations

import random

import pytest

from sumbatch.config import ConfigError, Settings
from sumbatch.tasks import Delay, parse_delay, retry_backoff, should_retry


@pytest.mark.parametrize(
    ("text", "delay"),
    [("3-10", Delay(3, 10)), ("0.5-1", Delay(0.5, 1)), ("0", Delay(0, 0)), (" 2 ", Delay(2, 2))],
)
def test_parse_delay(text: str, delay: Delay) -> None:
    assert parse_delay(text) == delay


@pytest.mark.parametrize("text", ["", "a-b", "5-3", "-1", "1-2-3"])
def test_parse_delay_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_delay(text)


def test_delay_draw_stays_in_range() -> None:
    rng = random.Random(7)
    draws = [Delay(3, 10).draw(rng) for _ in range(1000)]
    assert min(draws) >= 3 and max(draws) <= 10
    assert Delay(0, 0).draw(rng) == 0


def test_settings_from_env() -> None:
    settings = Settings.from_env(
        {"REDIS_URL": "redis://u:p@h:1/2", "SUMBATCH_DELAY": "0.5-1", "SUMBATCH_PORT": "8000"}
    )
    assert settings.client_url == "redis://u:p@h:1/2"
    assert settings.delay == Delay(0.5, 1)
    assert settings.port == 8000


def test_without_redis_url_clients_use_the_embedded_server() -> None:
    settings = Settings.from_env({"SUMBATCH_EMBEDDED_PORT": "7001"})
    assert settings.redis_url is None
    assert settings.client_url == "redis://127.0.0.1:7001/0"


def test_bad_setting_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="SUMBATCH_WORKERS='two'"):
        Settings.from_env({"SUMBATCH_WORKERS": "two"})


def test_retry_policy() -> None:
    assert should_retry(1, 3) and should_retry(2, 3) and not should_retry(3, 3)
    rng = random.Random(1)
    waits = [retry_backoff(4, 0.5, rng) for _ in range(200)]
    assert all(0 <= w <= 4.0 for w in waits)
    assert max(waits) > 2.0  # full jitter spreads over the whole window
    assert retry_backoff(30, 1.0, rng, cap=5.0) <= 5.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SUMBATCH_MAX_ATTEMPTS", "0"),
        ("SUMBATCH_MAX_ATTEMPTS", "255"),  # attempts are counted in one byte
        ("SUMBATCH_CLAIM_TIMEOUT", "0"),
        ("SUMBATCH_WORKER_CONCURRENCY", "0"),
        ("SUMBATCH_MAX_TASKS", "0"),
        ("SUMBATCH_RESULT_TTL", "-1"),
        ("SUMBATCH_FSYNC", "sometimes"),
        ("SUMBATCH_DURABLE", "maybe"),
    ],
)
def test_settings_out_of_range_are_refused(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}='{value}' is not valid"):
        Settings.from_env({name: value})
