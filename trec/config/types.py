"""Building blocks of config sections: enumerated choices and numeric ranges.

Both are used by every section, the model sections under trec/models/ included: a section
declares its allowed values next to its fields (``RANGES``), and :mod:`trec.config.validation`
checks them when the config is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Choice(str, Enum):
    """An enumerated option: compares equal to its string value, shown as that value in YAML."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: [low, high], either end open or absent."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def accepts(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(value: float | None) -> str:
    return str(value) if isinstance(value, int) or value is None else f"{value:g}"


POSITIVE = Range(1)  # counts and sizes: at least one
NON_NEGATIVE = Range(0)  # periods and counts where 0 means "off" or "none"
FRACTION = Range(0, 1)
PROBABILITY_OPEN = Range(0, 1, high_open=True)  # dropout: 1 would zero every input
SEED = Range(0, 2**63 - 1)  # numpy refuses negative seeds
