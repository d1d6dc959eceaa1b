"""What a setting's text may say: the parsers that read it and hold it to its range,
numbers (``IntRange``, ``SecondsRange``) and strings (``Text``). Pure; ``config`` reads
the environment through these, and each setting's bounds, and why, are written there.
A value past its range raises ValueError saying the range, never the value's use."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from sumbatch.model.tasks import Delay, parse_delay


def _shown(number: float) -> str:
    """A bound as a user writes it: 86400, 0.1 (no exponent, no trailing .0)."""
    return str(int(number)) if float(number).is_integer() else repr(number)


@dataclass(frozen=True)
class IntRange:
    """A whole number from ``low`` to ``high``, both included."""

    low: int
    high: int

    def __call__(self, text: str) -> int:
        expected = ValueError(f"expected {self.low} to {self.high}")
        try:
            # Digits past 40 are no number in any range: not worth converting.
            value = int(text) if len(text) <= 40 else None
        except ValueError:
            raise expected from None
        if value is None or not self.low <= value <= self.high:
            raise expected
        return value


@dataclass(frozen=True)
class SecondsRange:
    """A finite number of seconds from ``low`` to ``high``, both included."""

    low: float
    high: float

    def __call__(self, text: str) -> float:
        expected = ValueError(f"expected {_shown(self.low)} to {_shown(self.high)} seconds")
        try:
            value = float(text)
        except ValueError:
            raise expected from None
        if not math.isfinite(value) or not self.low <= value <= self.high:
            raise expected
        return value


@dataclass(frozen=True)
class Text:
    """A string of at most ``longest`` characters that ``pattern`` matches whole;
    ``expected`` says what that is, for the message."""

    pattern: re.Pattern[str]
    longest: int
    expected: str

    def __call__(self, text: str) -> str:
        if len(text) > self.longest:
            raise ValueError(f"{len(text)} characters, at most {self.longest}")
        if not self.pattern.fullmatch(text):
            raise ValueError(f"expected {self.expected}")
        return text


def delay_within(high: float) -> Callable[[str], Delay]:
    """SUMBATCH_DELAY's text (``parse_delay``), its longest time at most ``high``."""

    def parse(text: str) -> Delay:
        delay = parse_delay(text)
        if delay.high > high:
            raise ValueError(f"expected at most {_shown(high)} seconds")
        return delay

    return parse


def choice(*words: str, fold: bool = False) -> Callable[[str], str]:
    """One of ``words`` (upper-cased and stripped first when ``fold``)."""

    def parse(text: str) -> str:
        word = text.strip().upper() if fold else text
        if word not in words:
            raise ValueError("expected " + ", ".join(words[:-1]) + f" or {words[-1]}")
        return word

    return parse


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


REDIS_SCHEMES = ("redis", "rediss", "unix")
# A host name or an address: letters, digits, dots, dashes, underscores, colons of
# IPv6, and % of an IPv6 zone.
HOST = re.compile(r"[A-Za-z0-9._:%-]+")


def redis_url(longest: int) -> Callable[[str], str]:
    """A redis://, rediss:// or unix:// URL the client can connect with: a host of
    HOST's characters, a port 1-65535, a database number. The URL may hold a password:
    no message echoes any part of it but the scheme."""

    def parse(text: str) -> str:
        if len(text) > longest:
            raise ValueError(f"{len(text)} characters, at most {longest}")
        parts = urlsplit(text)
        if parts.scheme not in REDIS_SCHEMES:
            scheme = parts.scheme or "(none)"
            raise ValueError(f"scheme {scheme!r}; expected redis://, rediss:// or unix://")
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("expected unix:///path/of/the.sock")
            return text
        if parts.hostname is not None and not HOST.fullmatch(parts.hostname):
            raise ValueError("its host is not a host name or an address")
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError("its port is not 1 to 65535")
        if not re.fullmatch(r"/?(\d{1,5})?", parts.path):
            raise ValueError("its path is not a database number")
        return text

    return parse
