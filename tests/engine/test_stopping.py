"""Stop strings over streamed text: nothing of a stop string is ever released."""
from __future__ import annotations

import random

from engine.stopping import StopMatcher


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


def test_random_chunkings_agree_with_whole_text():
    rng = random.Random()
    for _ in range(200):
        text = "".join(rng.choice("ab ") for _ in range(30))
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 3))) for _ in range(2)]
        cuts = sorted(rng.sample(range(1, 30), 5))
        chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [30])]
        hits = [(text.find(s), s) for s in stops if s in text]
        want = (text[: min(hits)[0]], min(hits)[1]) if hits else (text, None)
        got = stream(stops, chunks)
        assert got[0] == want[0], (text, stops, chunks)
        assert (got[1] is None) == (want[1] is None)
