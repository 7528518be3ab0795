"""Tokenizer: llama.cpp parity on the real model, GGUF metadata handling, streaming decode."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import pytest
from tiny_gguf import SPECIAL_TOKENS, TinySpec, write_tiny_gguf

from kvroute.engine.errors import ModelLoadError
from kvroute.engine.gguf_file import GGUFFile
from kvroute.engine.tokenizer import PRE_TOKENIZERS, StreamDecoder, Tokenizer

CASES = json.loads((Path(__file__).parent / "data" / "tokenizer_cases.json").read_text())["cases"]
N_SPECIAL = len(SPECIAL_TOKENS)  # tiny vocab: control tokens, then byte b at id N_SPECIAL + b


def byte_id(b: int) -> int:
    """Id of the single-byte token for byte ``b`` in the tiny vocabulary."""
    return N_SPECIAL + b


def utf8_ids(text: str) -> list[int]:
    """``text`` as one tiny-vocab token per UTF-8 byte, so characters split across tokens."""
    return [byte_id(b) for b in text.encode()]


@pytest.fixture(scope="module")
def real_gguf(model_path: Path) -> GGUFFile:
    return GGUFFile(model_path)


@pytest.fixture(scope="module")
def real_tok(real_gguf: GGUFFile) -> Tokenizer:
    return Tokenizer.from_gguf(real_gguf)


@pytest.fixture
def tiny_gguf(tiny_model_path: Path) -> GGUFFile:
    """A fresh GGUFFile per test, so a test may edit its ``meta``."""
    gguf = GGUFFile(tiny_model_path)
    gguf.meta = dict(gguf.meta)
    return gguf


@pytest.fixture(scope="module")
def tiny_tok(tiny_model_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(GGUFFile(tiny_model_path))


# --- real model: llama.cpp parity ------------------------------------------------------------


@pytest.mark.model
def test_all_cases_match_llamacpp(real_tok: Tokenizer) -> None:
    assert len(CASES) == 340
    mismatches = [
        (c["category"], c["text"], got, c["ids"])
        for c in CASES
        if (got := real_tok.encode(c["text"])) != c["ids"]
    ]
    assert not mismatches, f"{len(mismatches)} of {len(CASES)} differ, first: {mismatches[:3]}"


@pytest.mark.model
def test_real_round_trip(real_tok: Tokenizer) -> None:
    for c in CASES:
        assert real_tok.decode(c["ids"], special=True) == c["text"]
        # By default control tokens render as nothing.
        visible = [i for i in c["ids"] if not real_tok.is_control(i)]
        assert real_tok.decode(c["ids"]) == real_tok.decode(visible, special=True)


@pytest.mark.model
def test_real_metadata(real_tok: Tokenizer) -> None:
    assert real_tok.vocab_size == 49152
    assert (real_tok.bos_id, real_tok.eos_id, real_tok.add_bos) == (1, 2, False)
    # llama.cpp's end-of-generation set for this model: <|endoftext|> and <|im_end|>.
    assert real_tok.eot_ids == frozenset({0, 2})
    assert all(real_tok.is_control(i) for i in range(17))
    assert not real_tok.is_control(17)
    assert real_tok.token_bytes(2) == b""
    assert real_tok.token_text(2) == "<|im_end|>"
    assert real_tok.decode(real_tok.encode(" the")) == " the"


@pytest.mark.model
def test_special_tokens_are_atomic(real_tok: Tokenizer) -> None:
    enc = real_tok.encode
    assert enc("a<|im_start|>user\nhi<|im_end|>b") == [*enc("a"), 1, *enc("user\nhi"), 2, *enc("b")]
    # Almost a special token: plain text, no control id.
    assert not any(real_tok.is_control(i) for i in real_tok.encode("<|im_start|"))
    assert real_tok.encode("<|im_end|><|im_end|>") == [2, 2]
    assert real_tok.encode("") == []


@pytest.mark.model
def test_special_parsing_off_keeps_control_text_as_text(real_tok: Tokenizer) -> None:
    for text, token_id in real_tok.special_ids.items():
        ids = real_tok.encode(f"a{text}b", special=False)
        assert token_id not in ids and not any(real_tok.is_control(i) for i in ids)
        assert real_tok.decode(ids) == f"a{text}b"
        assert real_tok.encode(f"a{text}b") == [
            *real_tok.encode("a"),
            token_id,
            *real_tok.encode("b"),
        ]
    # Ordinary text is tokenized the same either way.
    for c in CASES:
        if not any(real_tok.is_control(i) for i in c["ids"]):
            assert real_tok.encode(c["text"], special=False) == c["ids"]


@pytest.mark.model
def test_real_build_is_fast(real_gguf: GGUFFile) -> None:
    started = time.perf_counter()
    Tokenizer.from_gguf(real_gguf)
    # A budget far above what the C byte-table lookup needs; a Python loop per byte would not fit.
    assert time.perf_counter() - started < 1.0


@pytest.mark.model
@pytest.mark.parametrize("category", ["emoji", "cjk", "unicode"])
def test_stream_decoder_on_real_multibyte_text(real_tok: Tokenizer, category: str) -> None:
    split_mid_char = 0
    for c in (c for c in CASES if c["category"] == category):
        stream = StreamDecoder(real_tok)
        chunks = [stream.push(i) for i in c["ids"]]
        split_mid_char += sum(
            1 for i, s in zip(c["ids"], chunks, strict=True) if s == "" and real_tok.token_bytes(i)
        )
        tail = stream.flush()
        assert "".join(chunks) + tail == real_tok.decode(c["ids"]) == stream.text
        assert "\ufffd" not in stream.text
    if category != "unicode":
        assert split_mid_char > 0, "no token ended mid-character: the test proves nothing"


# --- tiny model and metadata handling --------------------------------------------------------


def test_tiny_tokenizer(tiny_tok: Tokenizer) -> None:
    assert tiny_tok.vocab_size == N_SPECIAL + 256 + 12
    assert (tiny_tok.bos_id, tiny_tok.eos_id, tiny_tok.add_bos) == (1, 2, False)
    assert tiny_tok.eot_ids == frozenset({0, 2})
    ids = tiny_tok.encode("<|im_start|>user\nin the end<|im_end|>")
    # Merges "e r", "i n", "e n", and "Ġ t", "h e", "Ġt he" ("Ġ" is a space, "Ċ" a newline).
    texts = [tiny_tok.token_text(i) for i in ids]
    assert texts == [
        "<|im_start|>",
        "u",
        "s",
        "er",
        "Ċ",
        "in",
        "Ġthe",
        "Ġ",
        "en",
        "d",
        "<|im_end|>",
    ]
    assert tiny_tok.decode(ids) == "user\nin the end"
    assert tiny_tok.decode(ids, special=True) == "<|im_start|>user\nin the end<|im_end|>"
    assert tiny_tok.token_bytes(byte_id(0xFF)) == b"\xff"
    assert tiny_tok.token_bytes(byte_id(ord(" "))) == b" "


def test_tiny_special_parsing_off(tiny_tok: Tokenizer) -> None:
    assert tiny_tok.special_ids == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert tiny_tok.encode("<|im_end|>") == [2]
    plain = tiny_tok.encode("<|im_end|>", special=False)
    assert plain == [byte_id(b) for b in b"<|"] + tiny_tok.encode("im_end|>")
    assert tiny_tok.decode(plain) == "<|im_end|>"


def test_tiny_round_trip_any_text(tiny_tok: Tokenizer) -> None:
    for text in ["", " ", "  two  spaces\n\n", "naïve café 12345", "日本語 😀👍🏽", "\t\r\n\x00"]:
        ids = tiny_tok.encode(text)
        assert tiny_tok.decode(ids) == text
        assert all(0 <= i < tiny_tok.vocab_size for i in ids)


def test_token_id_out_of_range(tiny_tok: Tokenizer) -> None:
    for bad in (-1, tiny_tok.vocab_size):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tiny_tok.token_bytes(bad)


def test_missing_tokenizer_metadata(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "notok.gguf", TinySpec(with_tokenizer=False))
    with pytest.raises(ModelLoadError, match=r"notok\.gguf: missing metadata tokenizer\.ggml"):
        Tokenizer.from_gguf(GGUFFile(path))


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("tokenizer.ggml.model", "llama", "'llama' is not supported"),
        ("tokenizer.ggml.tokens", "oops", "tokens is not a list"),
        ("tokenizer.ggml.token_type", [1, 2], "token_type has 2 entries"),
        ("tokenizer.ggml.eos_token_id", 10**6, "outside the vocabulary"),
    ],
)
def test_bad_tokenizer_metadata(tiny_gguf: GGUFFile, key: str, value: object, match: str) -> None:
    tiny_gguf.meta[key] = value
    with pytest.raises(ModelLoadError, match=match) as info:
        Tokenizer.from_gguf(tiny_gguf)
    assert str(tiny_gguf.path) in str(info.value) and "\n" not in str(info.value)


def test_merges_outside_vocab_are_dropped(tiny_gguf: GGUFFile) -> None:
    # `tokenizers` would panic on these; llama.cpp could never produce such tokens.
    tiny_gguf.meta["tokenizer.ggml.merges"] = [*tiny_gguf.meta["tokenizer.ggml.merges"], "x yz"]
    tok = Tokenizer.from_gguf(tiny_gguf)
    assert tok.decode(tok.encode("xyz the")) == "xyz the"


def test_unknown_pre_tokenizer_falls_back(
    tiny_gguf: GGUFFile, caplog: pytest.LogCaptureFixture
) -> None:
    tiny_gguf.meta["tokenizer.ggml.pre"] = "no-such-pre"
    with caplog.at_level(logging.WARNING, logger="kvroute.engine.tokenizer"):
        tok = Tokenizer.from_gguf(tiny_gguf)
    assert "no-such-pre" in caplog.text
    assert tok.decode(tok.encode("abc 123")) == "abc 123"


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_known_pre_tokenizer_builds(tiny_gguf: GGUFFile, pre: str) -> None:
    tiny_gguf.meta["tokenizer.ggml.pre"] = pre
    del tiny_gguf.meta["tokenizer.ggml.add_bos_token"]
    tok = Tokenizer.from_gguf(tiny_gguf)
    text = "I'LL pay $1234.50 — naïve!\n\n  ok<|im_end|>"
    assert tok.decode(tok.encode(text), special=True) == text
    # llama.cpp adds BOS by default for the Llama 3 family only.
    assert tok.add_bos == (
        pre in {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral"}
    )


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("smollm", ["1", "2", "3", "4", "5", " ", "x", "y", "z"]),  # digits one by one
        ("gpt-2", ["12345", " ", "x", "y", "z"]),
        ("llama-bpe", ["123", "45", " xyz"]),  # digits by three; whole-word vocab hit
    ],
)
def test_pre_tokenizer_choice(tiny_gguf: GGUFFile, pre: str, pieces: list[str]) -> None:
    # Teach the tiny vocab digit merges, and a word " xyz" that no merge can reach: only
    # Llama 3's ignore_merges takes a pre-token straight from the vocabulary.
    meta = tiny_gguf.meta
    extra = ["12", "123", "1234", "12345", "45", "Ġxyz"]
    meta["tokenizer.ggml.tokens"] = [*meta["tokenizer.ggml.tokens"], *extra]
    meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"], *[1] * len(extra)]
    meta["tokenizer.ggml.merges"] = [*meta["tokenizer.ggml.merges"], "1 2", "12 3", "123 4"]
    meta["tokenizer.ggml.merges"].extend(["1234 5", "4 5"])
    meta["tokenizer.ggml.pre"] = pre
    tok = Tokenizer.from_gguf(tiny_gguf)
    got = [tok.token_bytes(i).decode() for i in tok.encode("12345 xyz")]
    assert got == pieces


def test_named_end_of_turn_tokens(tiny_gguf: GGUFFile) -> None:
    tiny_gguf.meta["tokenizer.ggml.eos_token_id"] = 1
    tiny_gguf.meta["tokenizer.ggml.eot_token_id"] = 5
    tok = Tokenizer.from_gguf(tiny_gguf)
    assert tok.eot_ids == frozenset({0, 1, 2, 5})


# --- StreamDecoder ---------------------------------------------------------------------------


def test_stream_buffers_a_split_character(tiny_tok: Tokenizer) -> None:
    stream = StreamDecoder(tiny_tok)
    emoji = utf8_ids("😀")  # 4 bytes, 4 tokens
    assert [stream.push(i) for i in emoji] == ["", "", "", "😀"]
    assert stream.push(byte_id(0xC3)) == ""  # first half of "é"
    assert stream.push(2) == ""  # a control token neither emits nor disturbs the buffer
    assert stream.push(byte_id(0xA9)) == "é"
    assert stream.flush() == ""
    assert stream.text == "😀é"


def test_stream_flush_replaces_incomplete_tail(tiny_tok: Tokenizer) -> None:
    stream = StreamDecoder(tiny_tok)
    assert stream.push(byte_id(ord("a"))) == "a"
    assert stream.push(byte_id(0xE6)) == ""  # 3-byte lead
    assert stream.push(byte_id(0x97)) == ""
    assert stream.flush() == "\ufffd"
    assert stream.text == "a\ufffd"
    assert stream.push(byte_id(ord("b"))) == "b"  # usable after a flush
    assert stream.text == "a\ufffdb"


def test_stream_invariant_random_ids(tiny_tok: Tokenizer) -> None:
    rng = random.Random(0)
    texts = ["日本語のテキスト", "emoji 👍🏽 and 🇫🇷 flags", "mixed é ñ ü ß", "plain ascii"]
    for trial in range(300):
        if trial % 3 == 0:  # arbitrary ids, invalid UTF-8 included
            ids = [rng.randrange(tiny_tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        else:  # valid text as bytes and merges, control tokens sprinkled in
            ids = utf8_ids(rng.choice(texts)) + tiny_tok.encode(rng.choice(texts))
            for _ in range(rng.randrange(3)):
                ids.insert(rng.randrange(len(ids) + 1), rng.randrange(N_SPECIAL))
        stream = StreamDecoder(tiny_tok)
        out = "".join(stream.push(i) for i in ids) + stream.flush()
        assert out == stream.text == tiny_tok.decode(ids)
