"""Streaming detokenizer: valid UTF-8 at every step, stop strings held back."""

from hypothesis import given, settings
from hypothesis import strategies as st

from cope_local.decode.detok import StreamDetokenizer


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=40), st.lists(st.integers(1, 5), min_size=1, max_size=60))
def test_any_byte_split_streams_the_exact_text_with_no_replacement_chars(text, cuts):
    data = text.encode("utf-8")
    pieces, i, k = [], 0, 0
    while i < len(data):
        n = cuts[k % len(cuts)]
        pieces.append(data[i:i + n]); i += n; k += 1
    d = StreamDetokenizer()
    shown = [d.feed(p) for p in pieces] + [d.flush()]
    assert "".join(shown) == text
    assert all("\ufffd" not in s for s in shown) or "\ufffd" in text


def test_emoji_split_across_tokens_never_shows_garbage():
    d = StreamDetokenizer()
    emoji = "🙂".encode()  # 4 bytes
    assert d.feed(b"hi " + emoji[:2]) == "hi "
    assert d.feed(emoji[2:3]) == ""
    assert d.feed(emoji[3:] + "漢".encode()[:1]) == "🙂"
    assert d.feed("漢".encode()[1:]) == "漢"


def test_stop_string_across_pieces_is_cut_and_never_shown():
    d = StreamDetokenizer(stop=("\n\nUser:",))
    out = d.feed(b"Hello there.\n") + d.feed(b"\nUs") + d.feed(b"er: more")
    assert out == "Hello there."
    assert d.stopped and d.text == "Hello there."
    assert d.feed(b"ignored") == "" and d.flush() == ""


def test_held_prefix_is_released_when_it_turns_out_not_to_be_a_stop():
    d = StreamDetokenizer(stop=("END",))
    assert d.feed(b"the EN") == "the "
    assert d.feed(b"D") == ""
    d2 = StreamDetokenizer(stop=("END",))
    assert d2.feed(b"the EN") == "the "
    assert d2.feed(b"ding") == "ENding"
    assert d2.flush() == ""


def test_incomplete_character_at_the_end_becomes_one_replacement():
    d = StreamDetokenizer()
    assert d.feed("é".encode()[:1]) == ""
    assert d.flush() == "\ufffd"
