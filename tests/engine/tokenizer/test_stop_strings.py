"""Stop strings over streamed text: nothing of a stop string is ever released."""
from __future__ import annotations

import random

from lumen.engine.tokenizer.stop_strings import StopMatcher


def stream(stops: list[str], chunks: list[str]) -> tuple[str, str | None]:
    m = StopMatcher(stops)
    out = ""
    for chunk in chunks:
        text, matched = m.feed(chunk)
        out += text
        if matched:
            return out, matched
    return out + m.flush(), None


def test_stop_split_across_chunks():
    assert stream(["END"], ["abc E", "N", "D more"]) == ("abc ", "END")


def test_false_start_is_released():
    assert stream(["END"], ["abc EN", "x"]) == ("abc ENx", None)


def first_completed(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Slow reference: grow the text one character at a time; the first stop to appear wins."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return text[: end - len(stop)], stop
    return text, None


def test_overlapping_stops_first_completed_wins():
    assert stream(["abb", "b"], ["aabb"]) == ("aa", "b")
    assert stream(["abb", "b"], ["a", "a", "b", "b"]) == ("aa", "b")


def test_random_chunkings_agree_with_whole_text():
    rng = random.Random()
    for _ in range(200):
        text = "".join(rng.choice("ab ") for _ in range(30))
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 3))) for _ in range(2)]
        cuts = sorted(rng.sample(range(1, 30), 5))
        chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [30])]
        want = first_completed(text, stops)
        got = stream(stops, chunks)
        assert got[0] == want[0], (text, stops, chunks)
        assert got[1] == want[1]
