"""Counting skipped samples and bad shards, and stopping when there are too many.

Loader workers send small count deltas along with their batches, so the counter the caller reads in the
main process is exact even with many worker processes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import DataError

log = logging.getLogger("moecl.data")

MIN_SAMPLES_FOR_FRACTION = 100  # a running check only after this many samples (one bad first sample != 100%)
MAX_EVENTS = 100


@dataclass
class StreamStats:
    """What a stream has seen: good samples, skipped samples, and which shards they came from."""
    samples: int = 0
    bad_samples: int = 0
    bad_shards: dict[str, int] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.samples + self.bad_samples

    @property
    def bad_fraction(self) -> float:
        return self.bad_samples / self.total if self.total else 0.0

    def merge(self, delta: dict[str, Any]) -> None:
        """Add a worker's delta ``{"samples": n, "bad": [{"shard", "key", "reason", "count"}, ...]}``."""
        self.samples += int(delta.get("samples", 0))
        for ev in delta.get("bad", ()):
            n = int(ev.get("count", 1))
            self.bad_samples += n
            self.bad_shards[ev["shard"]] = self.bad_shards.get(ev["shard"], 0) + n
            if len(self.events) < MAX_EVENTS:
                self.events.append(dict(ev))

    def check(self, max_bad_fraction: float, where: str, final: bool = False) -> None:
        """Raise DataError naming the shard when skipped samples exceed ``max_bad_fraction`` of those seen."""
        if not self.bad_samples:
            return
        if not final and self.total < MIN_SAMPLES_FOR_FRACTION:
            return
        if self.bad_fraction <= max_bad_fraction:
            return
        last = self.events[-1] if self.events else {}
        at = f"key {last['key']}: " if last.get("key") else ""
        shards = ", ".join(f"{s} ({n})" for s, n in sorted(self.bad_shards.items()))
        raise DataError(
            f"{where}: {self.bad_samples} of {self.total} samples ({100 * self.bad_fraction:.1f}%) were unusable, "
            f"above data.max_bad_fraction={max_bad_fraction}; last in shard {last.get('shard')} "
            f"({at}{last.get('reason')}). Bad shards: {shards}. Check them with "
            "`python -m data_tools verify ROOT`, rebuild them, or raise data.max_bad_fraction (a "
            f"data.max_bad_fraction={_suggest(self.bad_fraction)} argument to `moecl train` or `moecl eval`)")


def _suggest(fraction: float) -> str:
    """A tolerance just above ``fraction``, rounded up to two significant digits."""
    import math
    exp = math.floor(math.log10(fraction)) - 1
    return f"{min(1.0, math.ceil(fraction * 1.05 / 10 ** exp) * 10 ** exp):.{max(0, -exp)}f}"


def bad_event(shard: str, key: Optional[str], reason: str, count: int = 1) -> dict[str, Any]:
    log.warning("skipping %d sample(s) of shard %s (key %s): %s", count, shard, key, reason)
    return {"shard": shard, "key": key, "reason": reason, "count": count}
