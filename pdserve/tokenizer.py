"""Tokenizers: the tiny model's byte tokenizer and real ones (tokenizers / sentencepiece files).

`load_tokenizer(model_dir)` picks the implementation from the files a model directory holds, so
the tiny model and a real checkpoint load the same way. Every implementation shares the config
handling (special tokens, chat template, eos ids, fingerprint) in the `Tokenizer` base class.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from pdserve.chat_template import (
    ERNIE45_CHAT_TEMPLATE,
    compile_chat_template,
    render_chat_template,
    select_chat_template,
)

BYTE_TOKENIZER_CLASS = "PdserveByteTokenizer"
BYTE_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "<|begin_of_sentence|>", "<|end_of_sentence|>",
    "<|reserved_5|>", "<|reserved_6|>", "<|reserved_7|>",
)  # fmt: skip
BYTE_OFFSET = len(BYTE_SPECIAL_TOKENS)  # byte b is token BYTE_OFFSET + b
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token",
)  # fmt: skip
# Files that decide how text is tokenized and templated; their bytes make the fingerprint.
TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "tokenizer.json", "tokenizer.model",
)  # fmt: skip
INSTALL_HINT = 'pip install "pdserve[tokenizers]"'


def _token_string(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class TokenizerFiles:
    """What a model directory says about its tokenizer, besides the vocabulary itself."""

    contents: Mapping[str, bytes]  # the TOKENIZER_FILES present, by name
    config: Mapping[str, Any]  # tokenizer_config.json over special_tokens_map.json
    special_tokens: Mapping[str, str]  # "bos_token" -> "<s>", ...
    extra_special_tokens: tuple[str, ...]  # additional_special_tokens (extra_... in HF 5)
    added_tokens: Mapping[str, int]  # added token string -> id
    special_added_ids: frozenset[int]
    generation_eos_ids: tuple[int, ...]  # generation_config.json eos_token_id

    @classmethod
    def read(cls, model_dir: Path) -> TokenizerFiles:
        contents = {n: (model_dir / n).read_bytes() for n in TOKENIZER_FILES
                    if (model_dir / n).is_file()}  # fmt: skip
        eos: Any = []
        generation = model_dir / "generation_config.json"
        if generation.is_file():
            eos = json.loads(generation.read_text()).get("eos_token_id", [])
        eos_ids = tuple(eos) if isinstance(eos, list) else (eos,) if isinstance(eos, int) else ()
        return cls.parse(contents, eos_ids)

    @classmethod
    def parse(
        cls, contents: Mapping[str, bytes], generation_eos_ids: tuple[int, ...] = ()
    ) -> TokenizerFiles:
        def load(name: str) -> dict[str, Any]:
            return json.loads(contents[name]) if name in contents else {}

        config = {**load("special_tokens_map.json"), **load("tokenizer_config.json")}
        named = {n: _token_string(config.get(n)) for n in SPECIAL_TOKEN_NAMES}
        named = {n: t for n, t in named.items() if t is not None}
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens", [])
        extra = [t for t in map(_token_string, extra.values() if isinstance(extra, dict) else extra)
                 if t is not None]  # fmt: skip
        added, special = {}, set()
        for key, token in config.get("added_tokens_decoder", {}).items():
            added[token["content"]] = int(key)
            if token.get("special", False):
                special.add(int(key))
        for content, token_id in load("added_tokens.json").items():
            added.setdefault(content, token_id)
            if content in extra or content in named.values():
                special.add(token_id)
        return cls(dict(contents), config, named, tuple(extra), added, frozenset(special),
                   generation_eos_ids)  # fmt: skip

    @property
    def chat_template(self) -> str:
        jinja = self.contents.get("chat_template.jinja")
        return select_chat_template(self.config, jinja.decode() if jinja is not None else None)

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.contents):
            data = self.contents[name]
            digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
            digest.update(data)
        return digest.hexdigest()


class Tokenizer(ABC):
    """Text <-> token ids for one model, plus its chat template.

    Subclasses supply the vocabulary (`_encode_text`, `decode`, `token_to_id`, `vocab_size`) and
    call `super().__init__(files)` once they can resolve tokens.
    """

    def __init__(self, files: TokenizerFiles) -> None:
        self.files = files
        self._template = compile_chat_template(files.chat_template)
        self._named_ids = {n: self.token_to_id(t) for n, t in files.special_tokens.items()}
        extra = (self.token_to_id(t) for t in files.extra_special_tokens)
        self._special_ids = frozenset(
            i for i in (*self._named_ids.values(), *extra, *files.special_added_ids)
            if i is not None
        )  # fmt: skip

    @abstractmethod
    def _encode_text(self, text: str) -> list[int]:
        """Ids of `text`, special-token strings included, without bos."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; bytes that do not form a whole UTF-8 character become U+FFFD."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of one token string, or None if the vocabulary lacks it."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`; with `add_special_tokens`, bos first if the config sets add_bos_token."""
        ids = self._encode_text(text)
        bos = self.bos_token_id
        if add_special_tokens and self.files.config.get("add_bos_token", False) and bos is not None:
            ids.insert(0, bos)
        return ids

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> str:
        """Render OpenAI-style messages to prompt text; ValueError if the template refuses them."""
        return render_chat_template(
            self._template, messages, add_generation_prompt, self.files.special_tokens,
            template_kwargs,
        )  # fmt: skip

    @property
    def bos_token_id(self) -> int | None:
        return self._named_ids.get("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._named_ids.get("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._named_ids.get("pad_token")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: eos, then generation_config.json's eos_token_id list."""
        ids = (self.eos_token_id, *self.files.generation_eos_ids)
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    @property
    def all_special_ids(self) -> tuple[int, ...]:
        return tuple(sorted(self._special_ids))

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the tokenizer files: equal fingerprints tokenize and template alike."""
        return self.files.fingerprint


def _split_pattern(tokens: Iterable[str]) -> re.Pattern[str] | None:
    """A pattern whose re.split puts the given tokens at odd indices, longest match first."""
    ordered = sorted(set(tokens), key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, ordered)) + ")") if ordered else None


def _split(pattern: re.Pattern[str] | None, text: str) -> list[str]:
    return pattern.split(text) if pattern is not None else [text]


class ByteTokenizer(Tokenizer):
    """The tiny model's tokenizer: 8 special tokens, then one token per UTF-8 byte (264 ids)."""

    def __init__(self, files: TokenizerFiles | None = None) -> None:
        self._pattern = _split_pattern(BYTE_SPECIAL_TOKENS)
        self._ids = {t: i for i, t in enumerate(BYTE_SPECIAL_TOKENS)}
        super().__init__(files or TokenizerFiles.parse(byte_tokenizer_files()))

    @property
    def vocab_size(self) -> int:
        return BYTE_OFFSET + 256

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, piece in enumerate(_split(self._pattern, text)):
            if i % 2:
                ids.append(self._ids[piece])
            else:
                ids.extend(BYTE_OFFSET + b for b in piece.encode())
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        parts, run = [], bytearray()
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the byte vocabulary (0..263)")
            if i >= BYTE_OFFSET:
                run.append(i - BYTE_OFFSET)
                continue
            parts.append(run.decode("utf-8", "replace"))
            run.clear()
            if not skip_special_tokens:
                parts.append(BYTE_SPECIAL_TOKENS[i])
        parts.append(run.decode("utf-8", "replace"))
        return "".join(parts)


def byte_tokenizer_files() -> dict[str, bytes]:
    """The tokenizer files of the tiny model, by name, as `write_byte_tokenizer_files` writes."""
    names = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>",
             "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>"}  # fmt: skip
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for i, t in enumerate(BYTE_SPECIAL_TOKENS)}  # fmt: skip
    config = {
        "tokenizer_class": BYTE_TOKENIZER_CLASS, "add_bos_token": False, "add_eos_token": False,
        **names, "added_tokens_decoder": added, "chat_template": ERNIE45_CHAT_TEMPLATE,
    }  # fmt: skip

    def dump(obj: dict[str, Any]) -> bytes:
        return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()

    return {"tokenizer_config.json": dump(config), "special_tokens_map.json": dump(names)}


def write_byte_tokenizer_files(model_dir: Path) -> None:
    """Write the tiny model's tokenizer_config.json and special_tokens_map.json into model_dir."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    for name, data in byte_tokenizer_files().items():
        (model_dir / name).write_bytes(data)


def _require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"loading this tokenizer needs {module}: {INSTALL_HINT}") from e


class HFTokenizer(Tokenizer):
    """A `tokenizer.json` run by the `tokenizers` library, as transformers' fast tokenizers do."""

    def __init__(self, files: TokenizerFiles) -> None:
        tokenizers = _require("tokenizers")
        self._tok = tokenizers.Tokenizer.from_str(files.contents["tokenizer.json"].decode())
        # As transformers does: config special tokens missing from tokenizer.json are added.
        self._tok.add_special_tokens([*files.special_tokens.values(), *files.extra_special_tokens])
        super().__init__(files)
        added = self._tok.get_added_tokens_decoder().items()
        self._special_ids |= {i for i, t in added if t.special}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _encode_text(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `tokenizer.model` plus added tokens, as ERNIE-4.5 ships.

    Added and special token strings are split out of the text first and map straight to their
    ids; sentencepiece encodes the pieces between them.
    """

    def __init__(self, files: TokenizerFiles) -> None:
        spm = _require("sentencepiece")
        self._sp = spm.SentencePieceProcessor(model_proto=files.contents["tokenizer.model"])
        self._added = dict(files.added_tokens)
        self._added_by_id = {i: t for t, i in self._added.items()}
        super().__init__(files)
        for token in (*files.special_tokens.values(), *files.extra_special_tokens):
            token_id = self.token_to_id(token)
            if token_id is not None:
                self._added.setdefault(token, token_id)
                self._added_by_id.setdefault(token_id, token)
        self._pattern = _split_pattern(self._added)

    @property
    def vocab_size(self) -> int:
        return max(self._sp.get_piece_size(), max(self._added_by_id, default=-1) + 1)

    def token_to_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        token_id = self._sp.piece_to_id(token)
        unknown = self._sp.is_unknown(token_id) and self._sp.id_to_piece(token_id) != token
        return None if unknown else token_id

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, piece in enumerate(_split(self._pattern, text)):
            if i % 2:
                ids.append(self._added[piece])
            elif piece:
                ids.extend(self._sp.encode(piece, out_type=int))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i not in self._added_by_id and i not in self._special_ids:
                run.append(i)
                continue
            parts.append(self._sp.decode(run))
            run = []
            if not (skip_special_tokens and i in self._special_ids):
                parts.append(self._added_by_id.get(i) or self._sp.id_to_piece(i))
        parts.append(self._sp.decode(run))
        return "".join(parts)


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer of a model directory.

    A tokenizer_config.json naming PdserveByteTokenizer gives `ByteTokenizer`; otherwise
    tokenizer.json gives `HFTokenizer` and tokenizer.model `SentencePieceTokenizer`.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model directory {model_dir} does not exist")
    files = TokenizerFiles.read(model_dir)
    if files.config.get("tokenizer_class") == BYTE_TOKENIZER_CLASS:
        return ByteTokenizer(files)
    if "tokenizer.json" in files.contents:
        return HFTokenizer(files)
    if "tokenizer.model" in files.contents:
        return SentencePieceTokenizer(files)
    raise ValueError(
        f"no tokenizer in {model_dir}: expected tokenizer.json, tokenizer.model, or a "
        f"tokenizer_config.json with tokenizer_class {BYTE_TOKENIZER_CLASS}"
    )
