from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from pdserve.chat_template import ERNIE45_CHAT_TEMPLATE
from pdserve.detokenizer import IncrementalDetokenizer
from pdserve.tokenizer import (
    BYTE_OFFSET,
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    write_byte_tokenizer_files,
)

SPECIALS = ["<|begin_of_sentence|>", "<|end_of_sentence|>"]
CORPUS = [
    "Hello world, this is a small test corpus.",
    "The quick brown fox jumps over the lazy dog.",
    "User: what is the capital of France?\nAssistant: Paris.",
    "ERNIE serves prompts with prefill and decode on separate nodes.",
    "中文 文本 和 表情 😀 也 在 这里。",
]
TEXTS = [
    "Hello world",
    "  leading and  double  spaces\tand tabs\n",
    "héllo 中文 😀👍🏽 naïve café",
    "<|begin_of_sentence|>User: hi\nAssistant: hello<|end_of_sentence|>",
    "no specials <s but <|begin_of_sentence| almost",
    "",
]
MULTIBYTE = "a中b😀c👍🏽 é\u0301 ∑ 日本語"


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj))


def make_sp_dir(tmp_path: Path) -> Path:
    """A sentencepiece model dir: two specials inside the model, one added beyond its vocab."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=400,
        hard_vocab_limit=False, user_defined_symbols=SPECIALS, byte_fallback=True,
        character_coverage=1.0, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2,
    )  # fmt: skip
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    pieces = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()

    def added(content: str) -> dict:
        return {"content": content, "special": True, "lstrip": False, "rstrip": False,
                "normalized": False, "single_word": False}  # fmt: skip

    write_json(tmp_path / "tokenizer_config.json", {
        "tokenizer_class": "Ernie4_5_Tokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<unk>", "cls_token": SPECIALS[0],
        "sep_token": SPECIALS[1],
        "added_tokens_decoder": {"3": added(SPECIALS[0]), "4": added(SPECIALS[1])},
    })  # fmt: skip
    write_json(tmp_path / "added_tokens.json", {"<|IMAGE_PLACEHOLDER|>": pieces})
    write_json(tmp_path / "special_tokens_map.json",
               {"additional_special_tokens": ["<|IMAGE_PLACEHOLDER|>"]})  # fmt: skip
    write_json(tmp_path / "generation_config.json", {"eos_token_id": [2, 4]})
    return tmp_path


def make_hf_dir(tmp_path: Path) -> Path:
    """A tokenizer.json (byte-level BPE trained here) with a tokenizer_config.json."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    raw.train_from_iterator(CORPUS * 10, trainer=trainer)
    raw.save(str(tmp_path / "tokenizer.json"))
    write_json(tmp_path / "tokenizer_config.json", {
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "add_bos_token": True,
        "sep_token": SPECIALS[1], "mask_token": "<mask>",  # "<mask>" is not in tokenizer.json
    })  # fmt: skip
    return tmp_path


def stream(tokenizer: Tokenizer, ids: list[int], **kwargs: object) -> list[str]:
    """Feed ids one at a time; the chunks emitted, flush last."""
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    return [detok.step([i]) for i in ids] + [detok.flush()]


# --- byte tokenizer -------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS + ["\x00\x7f\u0080\uffff\U0010ffff", "<s></s><unk>"])
def test_byte_tokenizer_round_trips(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 264 for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_byte_tokenizer_special_strings_map_to_ids() -> None:
    tok = ByteTokenizer()
    text = "<s>a</s><|begin_of_sentence|><|end_of_sentence|><unk><|reserved_5|><|reserved_7|>"
    assert tok.encode(text) == [1, BYTE_OFFSET + ord("a"), 2, 3, 4, 0, 5, 7]
    assert tok.encode("<|reserved_8|>") == [BYTE_OFFSET + b for b in b"<|reserved_8|>"]
    assert tok.encode("é") == [BYTE_OFFSET + 0xC3, BYTE_OFFSET + 0xA9]
    assert tok.decode(tok.encode(text)) == "a"  # specials skipped by default
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (264, 1, 2, 0)
    assert tok.all_special_ids == tuple(range(8))
    assert tok.eos_token_ids == (2,)
    assert tok.encode("x", add_special_tokens=True) == [BYTE_OFFSET + ord("x")]  # no add_bos


# --- chat template --------------------------------------------------------------------------


CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {
        "role": "user",
        "content": [{"type": "text", "text": "How are"}, {"type": "text", "text": "you?"}],
    },  # noqa: E501
]


def test_ernie_chat_template_renders_exactly() -> None:
    tok = ByteTokenizer()
    expected = (
        "<|begin_of_sentence|>You are helpful.\nUser: Hi\n"
        "Assistant: Hello!<|end_of_sentence|>User: How are\nyou?\n"
    )
    assert tok.apply_chat_template(CONVERSATION) == expected + "Assistant: "
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=False) == expected


@pytest.mark.parametrize("role", ["tool", "narrator"])
def test_unknown_chat_role_is_value_error(role: str) -> None:
    with pytest.raises(ValueError, match=role):
        ByteTokenizer().apply_chat_template([{"role": role, "content": "x"}])


def test_unsupported_content_part_is_value_error() -> None:
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    with pytest.raises(ValueError, match="image_url"):
        ByteTokenizer().apply_chat_template([message])


def test_chat_template_from_named_list_and_jinja_file(tmp_path: Path) -> None:
    write_byte_tokenizer_files(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{{ bos_token }}{{ messages | length }}{{ greeting }}"},
    ]
    write_json(config_path, config)
    tok = load_tokenizer(tmp_path)
    assert tok.apply_chat_template(CONVERSATION, greeting="!") == "<s>4!"

    del config["chat_template"]
    write_json(config_path, config)
    template = "{% for m in messages %}[{{ m.role }}]{% endfor %}"
    (tmp_path / "chat_template.jinja").write_text(template)
    assert load_tokenizer(tmp_path).apply_chat_template(CONVERSATION) == (
        "[system][user][assistant][user]"
    )


def test_template_raise_exception_is_value_error(tmp_path: Path) -> None:
    write_byte_tokenizer_files(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no tools here') }}")
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    write_json(config_path, config)
    with pytest.raises(ValueError, match="no tools here"):
        load_tokenizer(tmp_path).apply_chat_template(CONVERSATION)


# --- loading --------------------------------------------------------------------------------


def test_load_byte_tokenizer_from_written_files(tmp_path: Path) -> None:
    write_byte_tokenizer_files(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PdserveByteTokenizer"
    assert config["chat_template"] == ERNIE45_CHAT_TEMPLATE
    assert config["added_tokens_decoder"]["4"]["content"] == "<|end_of_sentence|>"
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["sep_token"] == (
        "<|end_of_sentence|>"
    )
    write_json(tmp_path / "generation_config.json", {"eos_token_id": [2, 4]})

    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, ByteTokenizer)
    assert tok.fingerprint == ByteTokenizer().fingerprint
    assert tok.eos_token_ids == (2, 4)
    assert tok.apply_chat_template(CONVERSATION) == ByteTokenizer().apply_chat_template(
        CONVERSATION
    )
    assert tok.encode(TEXTS[3]) == ByteTokenizer().encode(TEXTS[3])

    config["add_bos_token"] = True
    write_json(tmp_path / "tokenizer_config.json", config)
    changed = load_tokenizer(tmp_path)
    assert changed.encode("x", add_special_tokens=True) == [1, BYTE_OFFSET + ord("x")]
    assert changed.fingerprint != tok.fingerprint


def test_missing_tokenizer_files_name_the_directory(tmp_path: Path) -> None:
    write_json(tmp_path / "config.json", {"vocab_size": 10})
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


def test_missing_sentencepiece_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    make_sp_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # makes the import fail
    with pytest.raises(ImportError, match=r'pip install "pdserve\[tokenizers\]"'):
        load_tokenizer(tmp_path)


# --- sentencepiece --------------------------------------------------------------------------


def test_sentencepiece_loads_and_round_trips(tmp_path: Path) -> None:
    tok = load_tokenizer(make_sp_dir(tmp_path))
    assert isinstance(tok, SentencePieceTokenizer)
    image = tok.vocab_size - 1  # added beyond the sentencepiece vocabulary
    for text in TEXTS + ["an image <|IMAGE_PLACEHOLDER|> here", "<s>x</s>"]:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    ids = tok.encode("<|begin_of_sentence|>User: hi<|IMAGE_PLACEHOLDER|><|end_of_sentence|></s>")
    assert (ids[0], ids[-3], ids[-2], ids[-1]) == (3, image, 4, 2)
    assert tok.decode(ids) == "User: hi"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok.eos_token_ids == (2, 4)
    assert set(tok.all_special_ids) == {0, 1, 2, 3, 4, image}
    assert len(tok.encode("Hello world")) < len("Hello world")  # real merges, not characters


def test_sentencepiece_incremental_detokenizer(tmp_path: Path) -> None:
    tok = load_tokenizer(make_sp_dir(tmp_path))
    ids = tok.encode(MULTIBYTE + " Hello world")
    chunks = stream(tok, ids, prompt_ids=tok.encode("User: hi\nAssistant: "))
    assert "".join(chunks) == tok.decode(ids) == MULTIBYTE + " Hello world"
    assert not any("\ufffd" in c for c in chunks)


# --- tokenizer.json -------------------------------------------------------------------------


def test_tokenizer_json_matches_transformers(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    make_hf_dir(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    bare = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    configured = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    for text in TEXTS + CORPUS + ["unseen words: zyzzyva quokka 🦘"]:
        ids = tok.encode(text)
        assert ids == bare.encode(text, add_special_tokens=False), text
        assert ids == configured.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special_tokens=False) == text
    masked = "a <mask> b"
    assert tok.encode(masked) == configured.encode(masked, add_special_tokens=False)
    assert tok.decode(tok.encode(masked)) == configured.decode(configured.encode(masked), True)
    assert tok.encode("x", add_special_tokens=True)[0] == tok.bos_token_id == 1
    assert tok.decode(tok.encode(TEXTS[3])) == "User: hi\nAssistant: hello"
    assert {0, 1, 2, 3, 4} <= set(tok.all_special_ids)


def test_tokenizer_json_incremental_detokenizer(tmp_path: Path) -> None:
    tok = load_tokenizer(make_hf_dir(tmp_path))
    ids = tok.encode(MULTIBYTE)
    chunks = stream(tok, ids)
    assert "".join(chunks) == MULTIBYTE
    assert not any("\ufffd" in c for c in chunks)


# --- incremental detokenizer ----------------------------------------------------------------


def test_incremental_detokenizer_holds_partial_characters() -> None:
    tok = ByteTokenizer()
    ids = tok.encode(MULTIBYTE)
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == MULTIBYTE
    assert not any("\ufffd" in c for c in chunks)
    # "中" is three byte tokens: nothing comes out until the last one arrives.
    assert stream(tok, tok.encode("中")) == ["", "", "中", ""]


def test_incremental_detokenizer_specials_and_many_ids_per_step() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("<s>" + MULTIBYTE + "<|end_of_sentence|>😀</s>")
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, prompt_ids=[1, 3], skip_special_tokens=skip)
        chunks = [detok.step(ids[i : i + 5]) for i in range(0, len(ids), 5)] + [detok.flush()]
        assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in c for c in chunks)


def test_incremental_detokenizer_emits_invalid_bytes_eventually() -> None:
    tok = ByteTokenizer()
    ids = [BYTE_OFFSET + b for b in b"\xffab\xe4\xb8cd\xf0"] + tok.encode("中")
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids)
    assert chunks[-1] == ""  # nothing held to the end: an invalid byte cannot block the stream


class CountingTokenizer(ByteTokenizer):
    decoded_ids = 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded_ids += len(ids)
        return super().decode(ids, skip_special_tokens)


def test_incremental_detokenizer_cost_is_linear() -> None:
    tok = CountingTokenizer()
    ids = tok.encode(MULTIBYTE * 200)  # about 6,000 byte tokens
    chunks = stream(tok, ids)
    assert "".join(chunks) == MULTIBYTE * 200
    assert tok.decoded_ids < 30 * len(ids)  # re-decoding everything would be ~len(ids)**2 / 2
