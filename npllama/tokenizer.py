"""Text <-> token ids: Llama 3's byte-level BPE, run by tiktoken.

Text is first split by a regex (`pat_str`: words, 1-3 digit numbers, punctuation,
whitespace runs), each piece's UTF-8 bytes are then merged greedily by rank
(`mergeable_ranks`: bytes -> id, lower rank merges first), and a few hundred
special tokens (`<|begin_of_text|>`, `<|eot_id|>`...) sit above the BPE ids.
A token is therefore a run of *bytes*, not of characters: an emoji or a rare CJK
character may be split over several tokens, none of which is valid UTF-8 alone.
`decode` replaces such fragments with U+FFFD; `StreamDecoder` holds them back
until the character is complete, which is what printing token by token needs.

`Tokenizer` takes the vocabulary as plain data, never a file, so that every checkpoint format
can build one (npllama/formats/ reads the files): `llama3` takes the ranks of Meta's
tokenizer.model, and `from_byte_level_bpe` the GPT-2-style token strings that GGUF files and
Hugging Face's tokenizer.json store (SmolLM2, Llama 3 converted by llama.cpp).
"""

from __future__ import annotations

import codecs
import difflib
import hashlib
import operator
import re
from collections.abc import Iterable, Iterator, Sequence

import tiktoken

from .errors import TokenizerError

# Meta's split regex, verbatim from llama_models/llama3/tokenizer.py. `\p{N}{1,3}`
# makes numbers tokenize in groups of at most three digits.
LLAMA3_PAT_STR = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501

# GPT-2's split regex (also Hugging Face's ByteLevel pre-tokenizer with use_regex=True):
# contractions, letters, numbers, punctuation, each with at most one leading space.
GPT2_PAT_STR = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# SmolLM2 (llama.cpp's pre "smollm"; tokenizer.json: Digits(individual_digits) then ByteLevel):
# every digit is a piece of its own, and GPT-2's regex splits the text between digits. As one
# regex: `\p{N}` comes first, and GPT-2's `\s+(?!\S)` becomes `\s+(?![^\s\p{N}])` because a
# digit ends the piece the whitespace is in ("a  1" splits as "a", "  ", "1", not "a", " ", " ", "1").
SMOLLM_PAT_STR = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
# llama.cpp's names for split regexes (GGUF tokenizer.ggml.pre) -> pat_str.
PRE_TOKENIZERS = {"llama-bpe": LLAMA3_PAT_STR, "smollm": SMOLLM_PAT_STR, "gpt2": GPT2_PAT_STR}

# llama.cpp's token types (GGUF tokenizer.ggml.token_type, gguf.TokenType).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
# Types whose token is a name matched as a whole ("<|im_end|>"), not BPE bytes.
SPECIAL_TOKEN_TYPES = (TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED)

# Llama 3 places 256 special tokens right after the BPE ranks (ids 128000..128255).
# These are Meta's current names; the rest are <|reserved_special_token_2|> onwards.
LLAMA3_NUM_SPECIAL_TOKENS = 256
LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model wants a tool's answer
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
)
# A Llama 3 model stops at the end of the text, of a message or of a turn.
LLAMA3_STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")

# Meta's limits. tiktoken can panic on inputs of more than about 400k characters...
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
# ...and BPE time grows faster than linearly with the length of one regex piece, so a
# long run of non-whitespace ("a" * 100_000) or of whitespace is cut into pieces
# (https://github.com/openai/tiktoken/issues/195). Cutting changes the ids there, so
# npllama cuts exactly where Meta does.
MAX_NO_WHITESPACES_CHARS = 25_000

_SURROGATE = re.compile(r"[\ud800-\udfff]")


def llama3_special_tokens(num_base_tokens: int) -> dict[str, int]:
    """Llama 3's 256 special tokens, name -> id, numbered from `num_base_tokens` (128000)."""
    reserved = [f"<|reserved_special_token_{2 + i}|>"
                for i in range(LLAMA3_NUM_SPECIAL_TOKENS - len(LLAMA3_NAMED_SPECIAL_TOKENS))]
    names = list(LLAMA3_NAMED_SPECIAL_TOKENS) + reserved
    return {name: num_base_tokens + i for i, name in enumerate(names)}


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, used by every byte-level BPE vocabulary file.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, 0x7f-0xa0,
    0xad) are moved to U+0100 onwards, so the space byte is written "Ġ" and newline "Ċ"."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return dict(sorted(table.items()))


# str.translate table: each of GPT-2's characters -> the Latin-1 character of its byte, every
# other character below U+0100 -> U+FFFF, so that .encode("latin-1") refuses anything else.
_BYTES_OF_CHARS = {**{b: 0xFFFF for b in range(256)},
                   **{ord(char): byte for byte, char in gpt2_bytes_to_unicode().items()}}


def byte_level_token_bytes(token: str) -> bytes:
    """The bytes a byte-level BPE token string stands for ("Ġthe" -> b" the")."""
    try:
        return token.translate(_BYTES_OF_CHARS).encode("latin-1")
    except UnicodeEncodeError as e:
        raise ValueError(f"{token[e.start]!r} is not one of GPT-2's 256 byte characters") from None


def _check_vocabulary(name: str, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int]) -> None:
    """Refuse vocabularies tiktoken would accept but then panic or misbehave on.

    A vocabulary may lack single bytes (SmolLM2 has no token for 0x04, 0x06, 0xc0...): such
    text cannot be encoded at all, and `encode` says so instead of letting tiktoken panic."""
    ids = set(mergeable_ranks.values())
    if len(ids) != len(mergeable_ranks):
        raise TokenizerError(f"{name}: two BPE tokens share a rank; every token needs its own id")
    for token, i in special_tokens.items():
        if i in ids:
            raise TokenizerError(f"{name}: special token {token!r} has id {i}, which is already taken")
        ids.add(i)
    # Ids index the embedding matrix's rows, so each row must decode to something.
    n_words = len(ids)
    if ids != set(range(n_words)):
        unused = min(set(range(n_words)) - ids)
        raise TokenizerError(f"{name}: token ids must be 0..{n_words - 1} without gaps; id {unused} is unused")


def _check_merge_order(name: str, ids: dict[str, int], merges: Iterable[str]) -> None:
    """tiktoken merges the adjacent pair whose concatenation has the lowest id, so ids are merge
    priorities: each merge "a b" must join two tokens into a third, and later merges must make
    tokens with higher (or, for vocabularies converted from tiktoken, equal) ids than earlier
    ones, or tiktoken would merge in another order than the BPE the vocabulary was trained with
    and its ids would differ from llama.cpp's and HF's.
    `ids` maps the normal tokens' byte-level strings to ids (strings concatenate like bytes)."""
    previous = -1
    for index, merge in enumerate(merges):
        left, space, right = merge.partition(" ")
        result = ids.get(left + right)
        if not space or " " in right or result is None or left not in ids or right not in ids:
            raise TokenizerError(f"{name}: merge {index} ({merge!r}) is not two tokens of the "
                                 "vocabulary, separated by one space, that join into a third")
        if result < previous:
            raise TokenizerError(
                f"{name}: merge {index} ({merge!r}) makes token id {result}, lower than the "
                f"{previous} an earlier merge made; ids must follow the merge order (tiktoken uses "
                "them as merge priorities), so this vocabulary cannot be run by tiktoken")
        previous = result


class Tokenizer:
    """A byte-level BPE vocabulary and its special tokens; text in, token ids out.

    `mergeable_ranks` maps each BPE token's bytes to its id (which is also its merge
    priority); `special_tokens` maps names like "<|eot_id|>" to ids. Together the ids
    must be exactly 0..n_words-1. Single bytes without a token make text holding them
    unencodable (`encode` raises TokenizerError naming the character).
    `bos_id` is None for vocabularies without a begin-of-text token; `add_bos` says
    whether `encode` prepends it by default (Llama 3 does, SmolLM2 does not).
    `chat_template` is the model's Jinja chat template when its files ship one (GGUF,
    tokenizer_config.json); npllama does not run it, chat.py reads its default system prompt.
    """

    def __init__(self, name: str, pat_str: str, mergeable_ranks: dict[bytes, int],
                 special_tokens: dict[str, int], bos_id: int | None, eos_id: int,
                 stop_ids: Iterable[int], add_bos: bool = True, chat_template: str | None = None):
        _check_vocabulary(name, mergeable_ranks, special_tokens)
        self.name = name
        self.chat_template = chat_template
        missing = bytes(b for b in range(256) if bytes([b]) not in mergeable_ranks)
        self._missing_bytes = missing
        self._unencodable = re.compile(b"[" + re.escape(missing) + b"]") if missing else None
        self._n_words = len(mergeable_ranks) + len(special_tokens)
        self._special_tokens = dict(special_tokens)
        self._special_ids = frozenset(special_tokens.values())
        try:
            self._encoding = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                                               special_tokens=self._special_tokens)
        except ValueError as e:  # the regex engine rejected pat_str
            raise TokenizerError(f"{name}: the split pattern does not compile: {e}") from None
        if add_bos and bos_id is None:
            raise TokenizerError(f"{name}: add_bos=True needs a bos_id")
        self._bos_id = None if bos_id is None else self._checked_id(bos_id)
        self._eos_id = self._checked_id(eos_id)
        self._stop_ids = frozenset(self._checked_id(i) for i in stop_ids)
        self._add_bos = add_bos
        self._digest = None

    @classmethod
    def llama3(cls, name: str, ranks: dict[bytes, int]) -> Tokenizer:
        """Meta's Llama 3 / 3.1 / 3.2 / 3.3 vocabulary: the BPE ranks of its tokenizer.model
        (128000 of them; formats/meta.py reads the file), then 256 special tokens."""
        specials = llama3_special_tokens(len(ranks))
        return cls(
            name=name,
            pat_str=LLAMA3_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=specials,
            bos_id=specials["<|begin_of_text|>"],
            eos_id=specials["<|end_of_text|>"],
            stop_ids={specials[token] for token in LLAMA3_STOP_TOKENS},
        )

    @classmethod
    def from_byte_level_bpe(cls, name: str, tokens: Sequence[str], token_types: Sequence[int] | None,
                            pre: str, bos_id: int | None, eos_id: int, stop_ids: Iterable[int],
                            add_bos: bool, merges: Iterable[str] | None = None,
                            chat_template: str | None = None) -> Tokenizer:
        """A GPT-2-style byte-level BPE vocabulary, as GGUF (tokenizer.ggml.*) and Hugging Face's
        tokenizer.json store it.

        tokens[i] is token i's string: for normal tokens GPT-2's printable stand-ins for bytes
        ("Ġthe" is b" the"), for special ones (token_types CONTROL, USER_DEFINED, UNKNOWN, UNUSED;
        None means all normal) the name itself. The ids of normal tokens become tiktoken's ranks,
        which is right only if they follow the merge order: given `merges` ("Ġ t", ...) that is
        checked. `pre` names the split regex the way llama.cpp does (PRE_TOKENIZERS).
        """
        if pre not in PRE_TOKENIZERS:
            raise TokenizerError(
                f"{name}: pre-tokenizer {pre!r} is not supported; npllama knows "
                f"{', '.join(PRE_TOKENIZERS)} (Llama 3, SmolLM2, GPT-2), so this model's text would be "
                "split differently from how it was trained")
        if token_types is not None and len(token_types) != len(tokens):
            raise TokenizerError(f"{name}: {len(tokens)} tokens but {len(token_types)} token types")
        ranks: dict[bytes, int] = {}
        specials: dict[str, int] = {}
        normal: dict[str, int] = {}
        for i, token in enumerate(tokens):
            kind = TOKEN_NORMAL if token_types is None else int(token_types[i])
            if kind in SPECIAL_TOKEN_TYPES:
                if token in specials:
                    raise TokenizerError(f"{name}: special token {token!r} appears twice "
                                         f"(ids {specials[token]} and {i})")
                specials[token] = i
                continue
            if kind == TOKEN_BYTE:
                raise TokenizerError(f"{name}: token {i} ({token!r}) is a SentencePiece byte token; "
                                     "npllama reads byte-level BPE (GPT-2 style) vocabularies only")
            try:
                data = byte_level_token_bytes(token)
            except ValueError as e:
                raise TokenizerError(f"{name}: token {i} ({token!r}) is not a byte-level BPE token: {e}; "
                                     "is this a SentencePiece vocabulary (Llama 2)?") from None
            if data in ranks:
                raise TokenizerError(f"{name}: tokens {ranks[data]} and {i} both stand for {data!r}")
            ranks[data] = normal[token] = i
        if merges is not None:
            _check_merge_order(name, normal, merges)
        return cls(name, PRE_TOKENIZERS[pre], ranks, specials, bos_id, eos_id, stop_ids,
                   add_bos=add_bos, chat_template=chat_template)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, n_words={self._n_words})"

    @property
    def n_words(self) -> int:
        """Vocabulary size, special tokens included: the embedding matrix's row count."""
        return self._n_words

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token name -> id (a copy)."""
        return dict(self._special_tokens)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids at which generation ends (Llama 3: end of text, end of message, end of turn)."""
        return self._stop_ids

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    def id_of(self, special_name: str) -> int:
        """The id of a special token, e.g. id_of("<|eot_id|>") == 128009."""
        try:
            return self._special_tokens[special_name]
        except KeyError:
            close = difflib.get_close_matches(str(special_name), self._special_tokens, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise TokenizerError(f"{self.name} has no special token {special_name!r}{hint}") from None

    def is_special(self, token_id: int) -> bool:
        return self._checked_id(token_id) in self._special_ids

    def encode(self, text: str, bos: bool | None = None, eos: bool = False,
               allow_special: bool = False) -> list[int]:
        """Token ids of `text`, with begin-of-text first if `bos` (None: the add_bos default).

        Special-token text inside `text` ("<|eot_id|>" typed by a user, or pasted from a
        web page) is encoded as the plain characters it is made of, so it cannot end a
        turn or forge a system header: that would be prompt injection. Code that builds
        a chat template itself passes allow_special=True, or inserts `id_of(...)` ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}"
                            + ("; decode bytes first, e.g. data.decode('utf-8')"
                               if isinstance(text, (bytes, bytearray)) else ""))
        if (surrogate := _SURROGATE.search(text)) is not None:
            # tiktoken would silently turn it into U+FFFD, so decode(encode(text)) != text.
            i = surrogate.start()
            raise TokenizerError(
                f"cannot encode text[{i}] = U+{ord(text[i]):04X}, a surrogate code point, which UTF-8 "
                "cannot represent (such text comes from errors='surrogateescape' or a JSON '\\ud83e' "
                "escape split from its pair). Repair it first: "
                "text.encode('utf-16', 'surrogatepass').decode('utf-16', 'replace') rejoins split pairs "
                "and replaces lone halves with U+FFFD"
            )
        if self._unencodable is not None:
            self._check_representable(text)
        allowed_special = "all" if allow_special else set()
        ids = []
        for chunk in _chunks(text):
            ids.extend(self._encoding.encode(chunk, allowed_special=allowed_special, disallowed_special=()))
        if bos is None:
            bos = self._add_bos
        if bos:
            if self._bos_id is None:
                raise TokenizerError(f"{self.name} has no begin-of-text token; call encode with bos=False")
            ids.insert(0, self._bos_id)
        if eos:
            ids.append(self._eos_id)
        return ids

    def _check_representable(self, text: str) -> None:
        """Raise if the text holds a byte the vocabulary has no token for (tiktoken would panic)."""
        data = text.encode("utf-8")
        found = self._unencodable.search(data)
        if found is None:
            return
        index = len(data[:found.start()].decode("utf-8", errors="ignore"))  # the character holding it
        char = text[index]
        missing = ", ".join(f"0x{b:02x}" for b in self._missing_bytes[:8])
        more = " ..." if len(self._missing_bytes) > 8 else ""
        raise TokenizerError(
            f"cannot encode text[{index}] = {char!r} (U+{ord(char):04X}): its UTF-8 byte "
            f"0x{data[found.start()]:02x} has no token in {self.name}, whose vocabulary lacks "
            f"{len(self._missing_bytes)} of the 256 bytes ({missing}{more}), so the model has never "
            f"seen it. Remove or replace such characters first, e.g. text.replace({char!r}, ' ')")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the tokens stand for, concatenated; special tokens give their names."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TypeError(f"expected a sequence of token ids, got {type(ids).__name__}; "
                            "for one id use decode([id]) or piece(id)")
        return self._encoding.decode_bytes([self._checked_id(i) for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the tokens; bytes that are not valid UTF-8 (a character cut off at
        either end of `ids`) become U+FFFD, as in tiktoken. Stream with StreamDecoder."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def piece(self, token_id: int) -> str:
        """Display text of one token, e.g. for printing a prompt token by token: a special
        token's name, or the token's bytes with incomplete UTF-8 shown as U+FFFD."""
        return self._encoding.decode_single_token_bytes(self._checked_id(token_id)).decode("utf-8", errors="replace")

    def vocabulary_digest(self) -> str:
        """A hash of every id's bytes: equal for two tokenizers that map the same ids to the same
        text (a draft model must share its target's)."""
        if self._digest is None:
            h = hashlib.sha256()
            for i in range(self._n_words):
                piece = self._encoding.decode_single_token_bytes(i)
                h.update(len(piece).to_bytes(4, "little") + piece)
            self._digest = h.hexdigest()
        return self._digest

    def _checked_id(self, token_id: int) -> int:
        try:
            token_id = operator.index(token_id)  # ints and NumPy integers; not floats
        except TypeError:
            raise TypeError(f"token ids must be integers, got {type(token_id).__name__} {token_id!r}") from None
        if not 0 <= token_id < self._n_words:
            raise TokenizerError(f"token id {token_id} is out of range: {self.name} has ids 0..{self._n_words - 1}")
        return token_id


def _chunks(text: str) -> Iterator[str]:
    """Pieces of `text` tiktoken can encode safely (Meta's chunking, so ids match Meta's)."""
    for start in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
        yield from _split_long_runs(text[start:start + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS)


def _split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """Cut `s` so that no piece holds more than `max_run` consecutive whitespace or
    non-whitespace characters (Meta's `_split_whitespaces_or_nonwhitespaces`)."""
    if len(s) <= max_run:  # no run can be too long: skip the per-character loop
        yield s
        return
    run_len = 0
    run_is_space = s[0].isspace()
    piece_start = 0
    for i, char in enumerate(s):
        is_space = char.isspace()
        if run_is_space != is_space:
            run_len = 1
            run_is_space = is_space
        else:
            run_len += 1
            if run_len > max_run:
                yield s[piece_start:i]
                piece_start = i
                run_len = 1
    yield s[piece_start:]


class StreamDecoder:
    """Turns token ids into text one at a time, for printing while generating.

    `push` returns only complete characters: when a character's UTF-8 bytes are split
    over several tokens (emoji, rare CJK), the first tokens return "" and the last one
    returns the whole character, never a U+FFFD. `flush` returns what is still held
    (U+FFFD for bytes that never completed) and readies the decoder for a new stream.
    Pushing every token and flushing gives exactly `tokenizer.decode(ids)`, unless
    `skip_special` drops special tokens (whose names decode would include).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self.skip_special and self.tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self.tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
