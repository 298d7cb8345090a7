"""Tokenizers: fixed-shape ids and masks, [CLS]/[SEP] placement, loading from local paths."""

import os
import unicodedata

import numpy as np
import pytest
import tokenizers

from vlretrieval.data import tokenizer as tokenizer_lib
from vlretrieval.data.builders import demo_scenes
from vlretrieval.data.tokenizer import TextTokenizer, load_tokenizer, train_wordpiece_tokenizer
from vlretrieval.errors import UserError

CAPTION = "A small red circle to the left of a large blue square."


@pytest.fixture(scope="module")
def texts():
    examples = demo_scenes.split_examples(0, "train", 100)
    return [c for ex in examples for captions in ex["captions"].values() for c in captions]


@pytest.fixture(scope="module")
def tokenizer(texts):
    return TextTokenizer(train_wordpiece_tokenizer(texts))


def assert_one_line_user_error(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_special_token_ids(tokenizer):
    assert tokenizer.pad_id == 0
    names = [tokenizer.tokenizer.id_to_token(i) for i in range(5)]
    assert names == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) == (2, 3, 4)
    assert tokenizer.vocab_size == tokenizer.tokenizer.get_vocab_size()


def test_round_trip_of_a_caption(tokenizer):
    ids, mask = tokenizer.encode([CAPTION], 32)
    length = int(mask.sum())
    tokens = [tokenizer.tokenizer.id_to_token(int(i)) for i in ids[0, :length]]
    assert tokens == ["[CLS]", "a", "small", "red", "circle", "to", "the", "left", "of", "a",
                      "large", "blue", "square", ".", "[SEP]"]
    assert tokenizer.decode(ids[0]) == CAPTION.lower()


def test_padding_and_mask(tokenizer):
    ids, mask = tokenizer.encode(["A red circle.", CAPTION], 24)
    assert ids.shape == mask.shape == (2, 24)
    assert ids.dtype == mask.dtype == np.int32
    lengths = mask.sum(axis=1)
    assert list(lengths) == [6, 15]  # [CLS] a red circle . [SEP]
    for row, length in enumerate(lengths):
        assert ids[row, 0] == tokenizer.cls_id and ids[row, length - 1] == tokenizer.sep_id
        assert (mask[row, :length] == 1).all() and (mask[row, length:] == 0).all()
        assert (ids[row, length:] == tokenizer.pad_id).all()


def test_truncation_keeps_the_final_sep(tokenizer):
    full, _ = tokenizer.encode([CAPTION], 32)
    ids, mask = tokenizer.encode([CAPTION], 6)
    assert ids.shape == (1, 6) and mask.all()
    assert ids[0, 0] == tokenizer.cls_id and ids[0, -1] == tokenizer.sep_id
    np.testing.assert_array_equal(ids[0, 1:5], full[0, 1:5])


def test_empty_batch_and_bad_arguments(tokenizer):
    ids, mask = tokenizer.encode([], 16)
    assert ids.shape == mask.shape == (0, 16)
    with pytest.raises(TypeError):
        tokenizer.encode(CAPTION, 16)
    with pytest.raises(UserError) as error:
        tokenizer.encode([CAPTION], 2)
    assert_one_line_user_error(error, "max_length 2")


def test_lowercase_accents_kept_and_unicode_forms_agree(tokenizer):
    text = "Ein kleiner Kreis über einer Raute."  # no ß: "ß".upper() is "SS"
    ids, _ = tokenizer.encode([text, text.upper(), unicodedata.normalize("NFD", text)], 16)
    assert (ids[0] == ids[1]).all() and (ids[0] == ids[2]).all()
    assert tokenizer.tokenizer.token_to_id("über") is not None
    assert tokenizer.tokenizer.token_to_id("uber") is None


def test_unseen_words_fall_back_to_characters(tokenizer):
    ids, mask = tokenizer.encode(["zebra"], 16)
    unknown = tokenizer.tokenizer.token_to_id("[UNK]")
    assert not (ids[mask == 1] == unknown).any()


def test_training_is_deterministic(texts):
    first = train_wordpiece_tokenizer(texts, vocab_size=300)
    second = train_wordpiece_tokenizer(iter(list(reversed(texts))), vocab_size=300)
    assert first.to_str() == second.to_str()
    assert first.get_vocab_size() <= 300


def test_load_from_file_and_from_folder(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    assert os.listdir(tmp_path) == ["tokenizer.json"]  # no temporary file left behind
    expected = tokenizer.encode([CAPTION, "Un petit carré."], 20)
    for source in (path, tmp_path):
        loaded = load_tokenizer(str(source))
        for got, want in zip(loaded.encode([CAPTION, "Un petit carré."], 20), expected):
            np.testing.assert_array_equal(got, want)


def test_saved_padding_and_truncation_are_overridden(texts, tmp_path):
    raw = train_wordpiece_tokenizer(texts)
    raw.enable_truncation(4)
    raw.enable_padding(length=5, pad_id=0, pad_token="[PAD]")
    raw.save(str(tmp_path / "tokenizer.json"))
    ids, mask = load_tokenizer(str(tmp_path)).encode([CAPTION], 20)
    assert ids.shape == (1, 20) and mask.sum() == 15


def test_mask_id_is_none_without_a_mask_token():
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "hello": 4}
    plain = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    wrapped = TextTokenizer(plain)
    assert wrapped.mask_id is None and (wrapped.cls_id, wrapped.sep_id) == (2, 3)


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "no-such-tokenizer.json"
    with pytest.raises(UserError) as error:
        load_tokenizer(str(missing))
    assert_one_line_user_error(error, str(missing))

    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    with pytest.raises(UserError) as error:
        load_tokenizer(str(empty_folder))
    assert_one_line_user_error(error, str(empty_folder), "tokenizer.json")

    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"not": "a tokenizer"')
    with pytest.raises(UserError) as error:
        load_tokenizer(str(garbage))
    assert_one_line_user_error(error, str(garbage))


def test_special_tokens_constant_matches_training():
    assert tokenizer_lib.SPECIAL_TOKENS[0] == "[PAD]"


def test_a_hugging_face_folder_encodes_as_transformers_does(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local folder: nothing may be fetched
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.tokenizer, unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )
    fast.save_pretrained(str(tmp_path))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = [CAPTION, "Un piccolo cerchio rosso a sinistra di una croce.", "Ein großer Kreis."]
    ids, mask = load_tokenizer(str(tmp_path)).encode(texts, 40)
    for row, text in enumerate(texts):
        expected = reference(text)["input_ids"]
        assert ids[row][: mask[row].sum()].tolist() == expected


def test_a_sentencepiece_model_encodes_as_sentencepiece_does(texts, tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    prefix = str(tmp_path / "spiece")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=120, model_type="unigram",
        pad_id=3, unk_id=0, bos_id=1, eos_id=2,
    )
    reference = sentencepiece.SentencePieceProcessor(model_file=prefix + ".model")
    sample = texts[:5] + ["Un piccolo cerchio rosso."]
    for source in (prefix + ".model", str(tmp_path)):  # the file, or a folder holding spiece.model
        loaded = load_tokenizer(source)
        ids, mask = loaded.encode(sample, 160)
        assert loaded.pad_id == 3
        for row, text in enumerate(sample):
            assert ids[row][: mask[row].sum()].tolist() == [1, *reference.encode(text), 2]
