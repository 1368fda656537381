"""Tokenizer: Meta's ids exactly, special-token text kept plain, streaming that never
prints half a character, and errors that name what is wrong."""

import base64

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npllama.errors import ModelNotFoundError, TokenizerError
from npllama.formats.meta import read_tokenizer_model
from npllama.tokenizer import LLAMA3_PAT_STR, StreamDecoder, Tokenizer
from oracle.checkpoints import llama3_tokenizer_path


@pytest.fixture(scope="module")
def meta():
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    return MetaTokenizer(llama3_tokenizer_path())


# Pieces that stress the split regex and the byte-level BPE: whitespace runs, CRLF,
# digit groups, contractions, code, combining marks, CJK, emoji (ZWJ sequences,
# 4-byte characters split over tokens), special-token text, old <s> markers.
FRAGMENTS = [
    " ", "   ", "\n", "\n\n\n", "\r\n", "\t", " \n ", "\u00a0", "\u2028", "\x00", "\ufeff",
    "0", "42", "12345678", "3.14159", "1,000,000",
    "'s", "'LL", "don't", "I'M", "we've",
    "def f(x):\n    return x ** 2\n", "{'a': [1, 2]}", "a->b && c != d;", "    # comment",
    "é", "e\u0301", "ß", "İ", "Ωμέγα", "Привет", "مرحبا",
    "漢字", "日本語のテキスト", "한국어", "龘", "𠮷野家",
    "🦙", "👨‍👩‍👧", "🇫🇷", "\ufffd",
    "<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>user<|end_header_id|>", "<s>", "</s>",
]
CHARS = st.characters(exclude_categories=("Cs",))  # surrogates are not text; see the error tests
TEXTS = st.lists(st.one_of(st.text(CHARS, max_size=20), st.sampled_from(FRAGMENTS)), max_size=12).map("".join)


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def write_ranks(path, merges=()):
    """A tiny tiktoken BPE file: the 256 single bytes (ranks 0..255) then `merges`."""
    tokens = [bytes([b]) for b in range(256)] + list(merges)
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % rank for rank, t in enumerate(tokens)))
    return path


# ---- the notebook's example and Meta's reference ---------------------------------------

def test_notebook_prompt(tok, seed_prompt):
    assert tok.encode(seed_prompt) == [128000, 1820, 4320, 311, 279, 17139, 3488, 315, 2324, 11,
                                  279, 15861, 11, 323, 4395, 374, 220]
    assert tok.decode([2983]) == "42"
    assert tok.piece(2983) == "42"
    assert tok.piece(128000) == "<|begin_of_text|>"


def test_vocabulary_matches_meta(tok, meta):
    assert tok.special_tokens == meta.special_tokens
    assert tok.n_words == meta.n_words == 128256
    assert (tok.bos_id, tok.eos_id) == (meta.bos_id, meta.eos_id) == (128000, 128001)
    assert tok.stop_ids == set(meta.stop_tokens) == {128001, 128008, 128009}
    assert tok.id_of("<|eot_id|>") == 128009
    assert tok.id_of("<|reserved_special_token_245|>") == 128255


@settings(max_examples=300, deadline=None)
@given(text=TEXTS, bos=st.booleans(), eos=st.booleans())
def test_same_ids_as_meta(tok, meta, text, bos, eos):
    assert tok.encode(text, bos=bos, eos=eos) == meta.encode(text, bos=bos, eos=eos)
    assert (tok.encode(text, bos=bos, eos=eos, allow_special=True)
            == meta.encode(text, bos=bos, eos=eos, allowed_special="all"))
    assert tok.encode(text) == meta.encode(text, bos=True, eos=False)  # add_bos default


def test_long_inputs_are_chunked_like_meta(tok, meta):
    # Over 400k characters, with a whitespace and a non-whitespace run over 25k each.
    text = "word " * 81_000 + "x" * 26_000 + " " * 26_000 + "tail"
    ids = tok.encode(text, bos=False)
    assert ids == meta.encode(text, bos=False, eos=False)
    assert tok.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(text=TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, bos=False)) == text
    assert tok.decode(tok.encode(text, bos=False, allow_special=True)) == text
    assert tok.decode(tok.encode(text)) == "<|begin_of_text|>" + text


# ---- special tokens --------------------------------------------------------------------

def test_special_token_text_is_plain_by_default(tok):
    ids = tok.encode("<|eot_id|>", bos=False)
    assert len(ids) > 1 and max(ids) < 128000
    assert tok.decode(ids) == "<|eot_id|>"
    assert tok.encode("<|eot_id|>", bos=False, allow_special=True) == [128009]
    assert tok.encode("hi<|eot_id|>", allow_special=True) == [128000, 6151, 128009]


@pytest.mark.parametrize("text", ["<s>ss</s>", "sister", "ss", "s", "<s>", "</s>", "<|begin_of_text|>s"])
def test_decode_does_not_strip_characters(tok, text):
    # The notebook-era `.strip("<s>")` bug removed any leading/trailing '<', 's', '>'.
    assert tok.decode(tok.encode(text, bos=False)) == text


def test_numpy_ids_decode(tok):
    assert tok.decode(np.array([2983, 220, 2983], dtype=np.int64)) == "42 42"
    assert tok.piece(np.int32(2983)) == "42"


# ---- streaming -------------------------------------------------------------------------

STREAM_TEXT = "Llamas 🦙 eat 龘 at 𠮷野家 with 👨‍👩‍👧."


def test_stream_holds_back_split_characters(tok):
    ids = tok.encode(STREAM_TEXT, bos=False)
    # The premise: some tokens are fragments of a character (🦙 is f0 9f | a6 | 99).
    fragments = [i for i in ids if not is_utf8(tok.decode_bytes([i]))]
    assert len(fragments) >= 5
    assert tok.encode("🦙", bos=False) == [9468, 99, 247]
    assert "\ufffd" in tok.piece(9468)

    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + stream.flush() == STREAM_TEXT == tok.decode(ids)
    assert [stream.push(i) for i in [9468, 99, 247]] == ["", "", "🦙"]  # whole, at its last byte


@settings(max_examples=200, deadline=None)
@given(text=TEXTS.filter(lambda s: "\ufffd" not in s))
def test_stream_of_text_never_emits_replacement(tok, text):
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in tok.encode(text, bos=False)]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + stream.flush() == text


FRAGMENT_IDS = [9468, 99, 247, 172, 254, 106, 115, 84012, 246, 128000, 128009]


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.one_of(st.integers(0, 128255), st.sampled_from(FRAGMENT_IDS)), max_size=30))
def test_stream_equals_decode_for_any_ids(tok, ids):
    # Any ids, including byte soup that is not UTF-8: streaming changes when text
    # appears, never what it is.
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids)


def test_flush_replaces_incomplete_bytes_and_resets(tok):
    stream = StreamDecoder(tok)
    assert stream.push(9468) == ""  # first half of 🦙
    assert stream.flush() == "\ufffd"
    assert stream.flush() == ""
    assert "".join(stream.push(i) for i in tok.encode("hi 🦙", bos=False)) == "hi 🦙"
    assert stream.flush() == ""


def test_stream_special_tokens(tok):
    ids = tok.encode("hello", bos=True, eos=True)
    assert "".join(StreamDecoder(tok).push(i) for i in ids) == "<|begin_of_text|>hello<|end_of_text|>"
    assert "".join(StreamDecoder(tok, skip_special=True).push(i) for i in ids) == "hello"
    # A skipped special token does not break a character in progress.
    stream = StreamDecoder(tok, skip_special=True)
    assert "".join(stream.push(i) for i in [9468, 128009, 99, 247]) == "🦙"


# ---- errors ----------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nope.model not found"):
        read_tokenizer_model(tmp_path / "nope.model")
    with pytest.raises(ModelNotFoundError, match="is a directory"):
        read_tokenizer_model(tmp_path)


def test_rewritten_file_is_read_again(tmp_path):
    path = write_ranks(tmp_path / "tokenizer.model", [b"ab"])
    first = read_tokenizer_model(path)
    assert first.encode("ab cd", bos=False) == [256, 32, 99, 100]
    assert first.n_words == 257 + 256 and first.bos_id == 257
    write_ranks(path, [b"cd"])  # same path, same size
    second = read_tokenizer_model(path)
    assert second.encode("ab cd", bos=False) == [97, 98, 32, 256]


GOOD = b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256))


@pytest.mark.parametrize("tail, line, problem", [
    (b"YWI=\n", 257, "expected a token and a rank"),
    (b"YWI= 256 9\n", 257, "expected a token and a rank"),
    (b"YWI= -3\n", 257, "expected a token and a rank"),
    (b"\n\nYWI= x\n", 259, "expected a token and a rank"),  # blank lines still count
    (b"!!!! 256\n", 257, "b'!!!!' is not valid base64"),
    (b"YWI= 255\n", 257, "rank 255 was already given on line 256"),
    (b"YWI= 300\n", 257, "rank 300 skips rank 256"),
    (b"YQ== 256\n", 257, r"token b'a' already has rank 97 \(line 98\)"),
])
def test_malformed_line_is_named(tmp_path, tail, line, problem):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(GOOD + tail)
    with pytest.raises(TokenizerError, match=f"tokenizer.model, line {line}: {problem}"):
        read_tokenizer_model(path)


def test_not_a_tiktoken_file(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\n\x0b\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")  # SentencePiece-like protobuf
    with pytest.raises(TokenizerError, match="line 3: expected a token and a rank.*SentencePiece"):
        read_tokenizer_model(path)
    path.write_bytes(b"\n\n")
    with pytest.raises(TokenizerError, match="holds no tokens"):
        read_tokenizer_model(path)


def test_missing_single_bytes_make_text_unencodable(tmp_path):
    """A vocabulary may lack single bytes (SmolLM2 has no token for 0x04); text holding one is
    refused by encode with the character named, never a tiktoken panic."""
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"YQ== 0\nYg== 1\n")  # only "a" and "b"
    tok = read_tokenizer_model(path)
    assert tok.encode("abba", bos=False) == [0, 1, 1, 0]
    with pytest.raises(TokenizerError, match=r"text\[2\] = 'c' \(U\+0063\): its UTF-8 byte 0x63 has no "
                                             r"token in .*lacks 254 of the 256 bytes \(0x00, 0x01"):
        tok.encode("abc")
    with pytest.raises(TokenizerError, match=r"text\[1\] = 'é' \(U\+00E9\): its UTF-8 byte 0xc3"):
        tok.encode("aé")


@pytest.mark.parametrize("text, index, code", [("ab\ud800c", 2, "D800"), ("x\ud83e\udd99", 1, "D83E")])
def test_surrogates_refused(tok, text, index, code):
    with pytest.raises(TokenizerError, match=rf"text\[{index}\] = U\+{code}.*surrogatepass"):
        tok.encode(text)


@pytest.mark.parametrize("ids", [[128256], [-1], [1, 2, 10**12]])
def test_out_of_range_ids(tok, ids):
    with pytest.raises(TokenizerError, match=r"token id -?\d+ is out of range: .* has ids 0\.\.128255"):
        tok.decode(ids)
    with pytest.raises(TokenizerError, match="out of range"):
        StreamDecoder(tok).push(ids[-1])


def test_wrong_types(tok):
    with pytest.raises(TypeError, match=r"encode\(\) takes a str, got bytes; decode bytes first"):
        tok.encode(b"hello")
    with pytest.raises(TypeError, match=r"encode\(\) takes a str, got NoneType"):
        tok.encode(None)
    with pytest.raises(TypeError, match="token ids must be integers, got float"):
        tok.decode([2983.0])
    with pytest.raises(TypeError, match=r"for one id use decode\(\[id\]\) or piece\(id\)"):
        tok.decode(2983)
    with pytest.raises(TypeError, match="token ids must be integers"):
        tok.piece("42")


def test_unknown_special_token(tok):
    with pytest.raises(TokenizerError, match=r"no special token '<\|eot\|>'; did you mean <\|eot_id\|>"):
        tok.id_of("<|eot|>")


# ---- other vocabularies ----------------------------------------------------------------

BYTES = {bytes([b]): b for b in range(256)}


def test_vocabulary_without_bos():
    plain = Tokenizer("bytes", LLAMA3_PAT_STR, BYTES, {"<eos>": 256}, bos_id=None, eos_id=256,
                      stop_ids=[256], add_bos=False)
    assert plain.encode("hi", eos=True) == [104, 105, 256]
    with pytest.raises(TokenizerError, match="has no begin-of-text token; call encode with bos=False"):
        plain.encode("hi", bos=True)
    with pytest.raises(TokenizerError, match="add_bos=True needs a bos_id"):
        Tokenizer("bytes", LLAMA3_PAT_STR, BYTES, {"<eos>": 256}, bos_id=None, eos_id=256, stop_ids=[256])


@pytest.mark.parametrize("specials, problem", [
    ({"<s>": 255}, "special token '<s>' has id 255, which is already taken"),
    ({"<s>": 257}, r"ids must be 0\.\.256 without gaps; id 256 is unused"),
])
def test_inconsistent_ids_refused(specials, problem):
    with pytest.raises(TokenizerError, match=problem):
        Tokenizer("bytes", LLAMA3_PAT_STR, BYTES, specials, bos_id=None, eos_id=0, stop_ids=[], add_bos=False)


def test_bad_pattern_and_special_ids_refused():
    with pytest.raises(TokenizerError, match="split pattern does not compile"):
        Tokenizer("bytes", r"(\S+", BYTES, {"<s>": 256}, bos_id=256, eos_id=256, stop_ids=[256])
    with pytest.raises(TokenizerError, match=r"token id 999 is out of range"):
        Tokenizer("bytes", LLAMA3_PAT_STR, BYTES, {"<s>": 256}, bos_id=256, eos_id=999, stop_ids=[])
