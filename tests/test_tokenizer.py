import pytest

from course_utils.errors import ConfigError, DataError
from course_utils.tokenizer import (
    BOS, EOS, IM_END, IM_START, PAD, load_tokenizer, require_pad_token, save_tokenizer, train_tokenizer,
)


def test_special_tokens_are_single_ids(tokenizer):
    for tok in (BOS, EOS, PAD, IM_START, IM_END):
        ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == tok
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # padding must be distinguishable from EOS


def test_no_special_tokens_added_implicitly(tokenizer):
    ids = tokenizer("Pip the fox")["input_ids"]
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids


@pytest.mark.parametrize("text", ["Pip the fox lives in Mossbrook.", "émoji 🦊 and 中文 never seen", "  spaces\tand\nlines "])
def test_byte_level_roundtrip_is_lossless(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_bpe_compresses_the_corpus(tokenizer, corpus):
    # the smoke vocabulary has only ~60 merges, yet it must cut held-out text well below one token per byte
    texts = [d["text"] for d in corpus[1]]
    n_tokens = sum(len(tokenizer(t)["input_ids"]) for t in texts)
    assert n_tokens < 0.7 * sum(len(t.encode()) for t in texts)


def test_chat_template_places_bos_and_eos(tokenizer):
    msgs = [{"role": "user", "content": "Where does Pip live?"}, {"role": "assistant", "content": "In Mossbrook."}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text.startswith(BOS + IM_START + "user\n")
    assert "In Mossbrook." + IM_END + EOS in text
    gen = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert gen.endswith(IM_START + "assistant\n")


def test_save_load_roundtrip(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    text = "One day Pip the fox went to Reedwater."
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.chat_template == tokenizer.chat_template
    assert not list(tmp_path.glob(".tok.tmp-*"))  # the temporary folder is gone


@pytest.mark.parametrize("records,msg", [
    ([{"text": "fine"}, {"text": None}], "record 1 is None"),
    ([{"text": "fine"}, {"text": "   "}], "record 1 is empty"),
    (["ok", 3], "record 1 is int"),
    ([], "no text records"),
])
def test_bad_text_records_are_named(records, msg):
    with pytest.raises(DataError, match=msg):
        train_tokenizer(records, 300)


def test_vocab_too_small_for_bytes():
    with pytest.raises(ConfigError, match="at least 262"):
        train_tokenizer(["some text"], 100)


def test_missing_pad_token_is_a_clear_error(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path / "tok")
    no_pad = load_tokenizer(tmp_path / "tok")
    no_pad.pad_token = None
    with pytest.raises(ConfigError, match="no pad token"):
        require_pad_token(no_pad)
    assert require_pad_token(tokenizer) == tokenizer.pad_token_id


def test_load_from_empty_folder_fails_clearly(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
