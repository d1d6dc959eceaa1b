from __future__ import annotations

import math
import operator
import random
import re
import time

import msgspec
import pytest

from sumbatch.config import (
    MAX_TASKS_LIMIT,
    MAX_TASKS_SETTING,
    VARIABLES,
    ConfigError,
    Settings,
    resolve_handler,
)
from sumbatch.model.ids import MAX_PARTITIONS
from sumbatch.model.keys import Keys, partition_tag
from sumbatch.model.ranges import IntRange, SecondsRange
from sumbatch.model.tasks import Delay, parse_delay, retry_backoff, should_retry
from tests.support import ROOT


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
    with pytest.raises(ConfigError, match=r"expected 1 to 1073741824\b"):
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


def test_a_group_holds_at_most_100000_tasks() -> None:
    """The largest group a setting allows is submitted well within one API call's
    time (ops/bench/submit_time.py), and far inside what the scripts can hold."""
    assert MAX_TASKS_SETTING < MAX_TASKS_LIMIT
    assert Settings.from_env({"SUMBATCH_MAX_TASKS": "100000"}).max_tasks_per_group == 100_000
    with pytest.raises(ConfigError, match=r"SUMBATCH_MAX_TASKS.*100001"):
        Settings.from_env({"SUMBATCH_MAX_TASKS": "100001"})


def test_every_setting_is_read_from_one_variable() -> None:
    """A field without a variable would silently keep its default in every process."""
    fields = {f.name for f in msgspec.structs.fields(Settings)}
    assert set(VARIABLES) == fields
    names = [name for name, _ in VARIABLES.values()]
    assert len(set(names)) == len(names)


# --- every setting at its minimum, its maximum and one past -----------------------

# With no delay, so that any task timeout in its range is accepted on its own.
NO_DELAY = {"SUMBATCH_DELAY": "0"}
NUMBERS = {
    name: parse for name, parse in VARIABLES.values() if isinstance(parse, IntRange | SecondsRange)
}


def _field(name: str) -> str:
    return next(field for field, (variable, _) in VARIABLES.items() if variable == name)


def _below(bound: int | float, parse: IntRange | SecondsRange) -> str:
    return str(bound - 1) if isinstance(parse, IntRange) else repr(math.nextafter(bound, -math.inf))


def _above(bound: int | float, parse: IntRange | SecondsRange) -> str:
    return str(bound + 1) if isinstance(parse, IntRange) else repr(math.nextafter(bound, math.inf))


@pytest.mark.parametrize("name", sorted(NUMBERS))
def test_a_number_is_taken_at_both_ends_of_its_range_and_refused_one_past(name: str) -> None:
    parse = NUMBERS[name]
    for bound in (parse.low, parse.high):
        settings = Settings.from_env({**NO_DELAY, name: str(bound)})
        assert getattr(settings, _field(name)) == bound, name
    for past in (_below(parse.low, parse), _above(parse.high, parse)):
        with pytest.raises(ConfigError) as refused:
            Settings.from_env({**NO_DELAY, name: past})
        assert str(refused.value).startswith(f"{name}='{past}' is not valid: expected "), past


@pytest.mark.parametrize("name", sorted(NUMBERS))
@pytest.mark.parametrize("text", ["{1}", "1" * 5000, "nan", "inf", "-inf", "1e400", "one"])
def test_a_number_refuses_what_is_no_number_in_its_range(name: str, text: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}=.* is not valid: ") as refused:
        Settings.from_env({**NO_DELAY, name: text})
    assert len(str(refused.value)) < 200  # a long value is not echoed whole


def test_the_settings_that_broke_the_pipeline_are_refused() -> None:
    """Issue 17, item 6: each was accepted, then broke a script, a loop or `up`."""
    for name, value in [
        ("SUMBATCH_RESULT_TTL", "2147483647"),  # a negative cut-off id in the projector
        ("SUMBATCH_RESULT_TTL", "9300000000000000"),  # EXPIRE after the first writes
        ("SUMBATCH_CACHE_TTL", "9300000000000000"),
        ("SUMBATCH_LOG_RETENTION", "9300000000000000"),  # the trim raised every second
        ("SUMBATCH_WORKERS", "100000"),  # `up` forked without bound
        ("SUMBATCH_NAMESPACE", "{y}"),  # partition_tag looped for ever
        ("SUMBATCH_NAMESPACE", "a}b"),
        ("SUMBATCH_CLAIM_TIMEOUT", "1e300"),  # XAUTOCLAIM's idle time overflowed
        ("SUMBATCH_SHUTDOWN_GRACE", "1e300"),  # time.sleep overflowed
    ]:
        with pytest.raises(ConfigError, match=f"^{name}="):
            Settings.from_env({name: value})


def test_the_longest_kept_times_stay_inside_what_every_use_of_them_allows() -> None:
    """Ten years: the log's cut-off (now minus the retention, in ms) stays a positive
    entry id, and EXPIRE's ms arithmetic stays far below 2**63."""
    longest = NUMBERS["SUMBATCH_RESULT_TTL"].high
    assert NUMBERS["SUMBATCH_CACHE_TTL"] == NUMBERS["SUMBATCH_LOG_RETENTION"]
    assert NUMBERS["SUMBATCH_LOG_RETENTION"].high == longest == 10 * 365 * 86_400
    assert time.time() * 1000 - longest * 1000 > 0
    assert (time.time() + longest) * 1000 < 2**62


# --- strings: empty, braces, very long, and their own edges -----------------------

# Per variable: values taken (the text as the setting's value), values refused.
STRINGS: dict[str, tuple[list[str], list[str]]] = {
    "REDIS_URL": (
        [
            "redis://h",
            "redis://u:p@h:6379/15",
            "rediss://[::1]:1/",
            "unix:///tmp/r.sock",
            "redis://" + "h" * (4096 - 12) + ":1/0",
        ],
        [
            "redis://{y}:6379",
            "redis://h:0",
            "redis://h:65536",
            "redis://h:1/db",
            "unix://",
            "redis://" + "h" * (4096 - 11) + ":1/0",
        ],
    ),
    "SUMBATCH_NAMESPACE": (
        ["a", "my-app.v2_x", "n" * 64],
        ["{y}", "a}b", "{", "a:b", "a*", "a b", "é", "n" * 65],
    ),
    "SUMBATCH_HOST": (
        ["localhost", "0.0.0.0", "::", "fe80::1%eth0", "h" * 253],
        ["{h}", "a b", "h/x", "h" * 254],
    ),
    "SUMBATCH_DATA_DIR": (
        ["{x}", "/var/lib/sum batch", "d" * 1024],
        ["a\nb", "a\x00b", "d" * 1025],
    ),
    "SUMBATCH_HANDLER": (
        ["operator:add", "m" * 254 + ":f"],
        ["{m}:f", "m:{f}", "nosuch", "m" * 255 + ":f"],
    ),
    "SUMBATCH_API_TOKEN": (
        ["{t}", "t", "two words", "t" * 1024],
        [" t", "t ", "\tt", "é", "t" * 1025],
    ),
    "SUMBATCH_DELAY": (
        ["0", "3-10", "0-3600", "3600"],
        ["{1}", "-1", "0-" + repr(math.nextafter(3600, math.inf)), "3601", "1" * 5000],
    ),
    "SUMBATCH_DURABLE": (["true", "off", "YES"], ["{true}", "maybe", "t" * 5000]),
    "SUMBATCH_FSYNC": (["always", "everysec", "no"], ["{no}", "Always", "n" * 5000]),
    "SUMBATCH_LOG_LEVEL": (["debug", " INFO ", "CRITICAL"], ["{INFO}", "LOUD", "I" * 5000]),
}


def test_every_setting_has_its_range_walked() -> None:
    """Each variable is a number with a range (walked above) or a string here."""
    assert set(NUMBERS) | set(STRINGS) == {name for name, _ in VARIABLES.values()}
    assert not set(NUMBERS) & set(STRINGS)


@pytest.mark.parametrize("name", sorted(STRINGS))
def test_a_string_is_taken_within_its_range_and_refused_past_it(name: str) -> None:
    taken, refused = STRINGS[name]
    # Empty is unset: the default.
    assert Settings.from_env({name: ""}) == Settings.from_env({})
    timeout = {"SUMBATCH_TASK_TIMEOUT": "3601"}
    for value in taken:
        assert Settings.from_env({**timeout, name: value}), value
    for value in refused:
        with pytest.raises(ConfigError) as refusal:
            Settings.from_env({**timeout, name: value})
        message = str(refusal.value)
        assert message.startswith(f"{name}" if name == "REDIS_URL" else f"{name}="), message
        assert " is not valid: " in message and len(message) < 200, message
        if name == "REDIS_URL":
            assert "h" * 20 not in message and "u:p" not in message  # never echoed


def test_a_long_value_is_shown_by_its_start_and_length() -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"SUMBATCH_NAMESPACE": "n" * 100_000})
    assert "(100000 characters)" in str(refused.value)
    assert "100000 characters, at most 64" in str(refused.value)


def test_partition_tag_refuses_braces_and_finds_every_tag_of_the_longest_namespace() -> None:
    with pytest.raises(ValueError, match="no braces"):
        partition_tag("{y}", 0, 4)
    with pytest.raises(ValueError, match="no braces"):
        Keys("a}b")
    longest = "n" * 64
    tags = {partition_tag(longest, p, MAX_PARTITIONS) for p in range(MAX_PARTITIONS)}
    assert len(tags) == MAX_PARTITIONS


def test_the_docs_state_each_number_s_range() -> None:
    """docs/configuration.md's row of each variable names both ends of its range."""
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    # Each row of the table by its first cell, the variables it is about.
    rows = [(line.split("|")[1], line) for line in text.splitlines() if line.startswith("| `")]
    for name, parse in NUMBERS.items():
        row = next(line for first, line in rows if f"`{name}`" in first)
        for bound in (parse.low, parse.high):
            written = {f"{bound:,}", f"{bound:,}".replace(",", ""), f"{bound:g}"}
            # The number alone, not part of a longer one.
            alone = [rf"(?<![\w.,]){re.escape(text)}(?!\w|[.,]\d)" for text in written]
            assert any(re.search(pattern, row) for pattern in alone), f"{name}: {bound}"
