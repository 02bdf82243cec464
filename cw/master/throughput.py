"""Results per second, from samples of the master's routed count.

    Master: PeriodicCallback(SAMPLE_INTERVAL) --> Throughput.add(wall, mono, routed, queue)
    status reply  <-- rate(): results/s over the last WINDOW seconds
    dashboard     <-- series(): one [wall time, routed, results/s, queue] per sample
"""
from __future__ import annotations

from collections import deque

SAMPLE_INTERVAL = 1.0   # seconds between throughput samples
HISTORY = 600           # samples kept: ten minutes at one per second
WINDOW = 60.0           # seconds averaged by throughput_last_minute


class Throughput:
    """A ring buffer of (wall, monotonic, routed, queue) samples and the rates they imply."""

    def __init__(self, maxlen: int = HISTORY):
        self.samples: deque[tuple[float, float, int, int]] = deque(maxlen=maxlen)

    def add(self, wall: float, mono: float, routed: int, queue: int) -> None:
        """Record one sample; the master calls this once per SAMPLE_INTERVAL."""
        self.samples.append((wall, mono, routed, queue))

    def rate(self, mono: float, routed: int, window: float = WINDOW) -> float:
        """Results per second between the oldest sample inside ``window`` and now."""
        oldest = next((s for s in self.samples if s[1] >= mono - window), None)
        if oldest is None or mono - oldest[1] <= 0:
            return 0.0
        return max(0, routed - oldest[2]) / (mono - oldest[1])

    def series(self) -> list[list]:
        """``[wall time, routed, results/s since the previous sample, queue]`` per sample."""
        out: list[list] = []
        prev: tuple | None = None
        for wall, mono, routed, queue in self.samples:
            rate = 0.0 if prev is None or mono <= prev[1] else \
                max(0, routed - prev[2]) / (mono - prev[1])
            out.append([round(wall, 3), routed, round(rate, 3), queue])
            prev = (wall, mono, routed, queue)
        return out
