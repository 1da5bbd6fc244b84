"""Stop-sequence matching over streamed text.

Text that might still become a stop sequence is held back, so a client never
receives part of a stop string that is then retracted.
"""
from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""  # text not yet released because it could start a stop string

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add new text; return (text safe to release, matched stop string or None)."""
        if not self.stops:
            return text, None
        buffer = self.pending + text
        # The stop string that completes first wins (on a tie, the longer one), as if the
        # text had arrived one character at a time: the result never depends on chunking.
        first = None
        for stop in self.stops:
            at = buffer.find(stop)
            if at != -1:
                key = (at + len(stop), at)
                if first is None or key < first[0]:
                    first = (key, stop)
        if first is not None:
            self.pending = ""
            return buffer[: first[0][1]], first[1]
        keep = self._partial_suffix(buffer)
        self.pending = buffer[len(buffer) - keep:] if keep else ""
        return buffer[: len(buffer) - keep], None

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest buffer suffix that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best
