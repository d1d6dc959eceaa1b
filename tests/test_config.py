from __future__ import annotations

import operator
import random

import msgspec
import pytest

from sumbatch.config import ConfigError, Settings, resolve_handler
from sumbatch.model.tasks import Delay, parse_delay, retry_backoff, should_retry


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


@pytest.mark.parametrize("text", ["nan", "inf", "1-inf", "nan-1", "0-nan", "infinity"])
def test_parse_delay_rejects_non_finite(text: str) -> None:
    with pytest.raises(ValueError, match="finite"):
        parse_delay(text)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SUMBATCH_PORT", "99999"),
        ("SUMBATCH_PORT", "0"),
        ("SUMBATCH_EMBEDDED_PORT", "65536"),
        ("SUMBATCH_DELAY", "nan"),
        ("SUMBATCH_DELAY", "inf"),
        ("SUMBATCH_LOG_LEVEL", "LOUD"),
        ("SUMBATCH_HANDLER", "nosuch"),
        ("SUMBATCH_HANDLER", "a:b:c"),
        ("SUMBATCH_SHUTDOWN_GRACE", "nan"),
        ("SUMBATCH_CLAIM_TIMEOUT", "inf"),
        ("SUMBATCH_RETRY_BASE", "-1"),
    ],
)
def test_more_settings_out_of_range_are_refused(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}='{value}' is not valid"):
        Settings.from_env({name: value})


def test_ports_at_the_edges_are_taken() -> None:
    settings = Settings.from_env({"SUMBATCH_PORT": "65535", "SUMBATCH_EMBEDDED_PORT": "1"})
    assert (settings.port, settings.embedded_port) == (65535, 1)


def test_the_range_message_names_the_real_limit() -> None:
    with pytest.raises(ConfigError, match=r"expected 1 to 9223372036854775807\b"):
        Settings.from_env({"SUMBATCH_MAX_BODY_BYTES": str(2**63)})


@pytest.mark.parametrize("url", ["redis://h:1/0", "rediss://u:p@h:1", "unix:///tmp/r.sock"])
def test_redis_url_schemes_taken(url: str) -> None:
    assert Settings.from_env({"REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize("url", ["http://x", "h:6379", "redis+sentinel://u:s3cret@h"])
def test_redis_url_other_schemes_refused_without_echoing_it(url: str) -> None:
    with pytest.raises(ConfigError, match="REDIS_URL is not valid") as refused:
        Settings.from_env({"REDIS_URL": url})
    assert "s3cret" not in str(refused.value)


def test_log_level_is_a_setting() -> None:
    assert Settings.from_env({}).log_level == "INFO"
    assert Settings.from_env({"SUMBATCH_LOG_LEVEL": "debug"}).log_level == "DEBUG"


def test_task_timeout_must_exceed_the_longest_delay() -> None:
    with pytest.raises(ConfigError, match="SUMBATCH_TASK_TIMEOUT=10 is not valid"):
        Settings.from_env({"SUMBATCH_TASK_TIMEOUT": "10", "SUMBATCH_DELAY": "3-10"})
    taken = Settings.from_env({"SUMBATCH_TASK_TIMEOUT": "10.5", "SUMBATCH_DELAY": "3-10"})
    assert taken.task_timeout == 10.5


def test_resolve_handler() -> None:
    assert resolve_handler("") is None
    assert resolve_handler("operator:add") is operator.add
    with pytest.raises(ConfigError, match="SUMBATCH_HANDLER='nosuch:fn' is not valid"):
        resolve_handler("nosuch:fn")
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        resolve_handler("operator:nope")
    with pytest.raises(ConfigError, match="pi is not callable"):
        resolve_handler("math:pi")


def test_a_group_holds_at_most_2_to_the_29_tasks() -> None:
    assert Settings.from_env({"SUMBATCH_MAX_TASKS": str(2**29)}).max_tasks_per_group == 2**29
    with pytest.raises(ConfigError, match=r"SUMBATCH_MAX_TASKS.*expected 1 to 536870912\b"):
        Settings.from_env({"SUMBATCH_MAX_TASKS": str(2**29 + 1)})


def test_every_setting_is_read_from_one_variable() -> None:
    """A field without a variable would silently keep its default in every process."""
    from sumbatch.config import VARIABLES

    fields = {f.name for f in msgspec.structs.fields(Settings)}
    assert set(VARIABLES) == fields
    names = [name for name, _ in VARIABLES.values()]
    assert len(set(names)) == len(names)
