"""What a task does, and the policies around it. Pure: no I/O here."""

from __future__ import annotations

import math
import random
from typing import NamedTuple


class Delay(NamedTuple):
    """The simulated processing time, drawn uniformly from [low, high] seconds."""

    low: float
    high: float

    def draw(self, rng: random.Random) -> float:
        return rng.uniform(self.low, self.high) if self.high > 0 else 0.0


def parse_delay(text: str) -> Delay:
    """``"3-10"``, ``"0.5-1"`` or a single number such as ``"0"``."""
    low_text, sep, high_text = text.strip().partition("-")
    try:
        low = float(low_text)
        high = float(high_text) if sep else low
    except ValueError:
        raise ValueError("expected seconds like '3-10', '0.5-1' or '0'") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("expected finite seconds")
    if low < 0 or high < low:
        raise ValueError("expected 0 <= low <= high")
    return Delay(low, high)


def compute(param_a: int, param_b: int) -> int:
    return param_a + param_b


def should_retry(attempt: int, max_attempts: int) -> bool:
    """``attempt`` counts from 1; the task gets ``max_attempts`` runs in all."""
    return attempt < max_attempts


def retry_backoff(attempt: int, base: float, rng: random.Random, cap: float = 60.0) -> float:
    """Exponential backoff with full jitter (the AWS architecture blog's variant)."""
    return rng.uniform(0.0, min(cap, base * 2 ** (attempt - 1)))
