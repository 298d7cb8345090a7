"""Text tokenizers: Hugging Face `tokenizers` loaded from a local path, or trained for the demo.

The rest of the project sees only `TextTokenizer.encode`, which turns a batch of strings into
fixed-shape int32 arrays (ids and mask) ready to be stacked into a batch and sharded.
"""

from __future__ import annotations

import json
import os
import re
import string
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from vlretrieval.errors import UserError, first_line
from vlretrieval.files import replaced_atomically

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in a trained tokenizer
# Names of the same roles in the tokenizers people bring (BERT, XLM-R/RoBERTa, CLIP).
_PAD_NAMES = ("[PAD]", "<pad>", "<|pad|>")
_CLS_NAMES = ("[CLS]", "<s>", "<|startoftext|>", "<bos>")  # <bos>/<eos>: Gemma's (SigLIP 2)
_SEP_NAMES = ("[SEP]", "</s>", "<|endoftext|>", "<eos>")
_MASK_NAMES = ("[MASK]", "<mask>")


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> tokenizers.Tokenizer:
    """Trains a BERT-style WordPiece tokenizer (lowercase, accents kept) on `texts`, reproducibly.

    The vocabulary is the special tokens, then every character (alone and as a `##` continuation,
    so unseen words fall back to characters rather than [UNK]), then whole words by frequency.
    It is counted here rather than by `tokenizers.trainers.WordPieceTrainer`, whose token ids
    change from run to run (hash-map order), which would make two demo builds differ.
    """
    if vocab_size < len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is below the number of special tokens")
    tokenizer = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    # NFC first so a decomposed "u + combining diaeresis" and a composed "ü" give the same tokens;
    # accents are kept because they carry meaning in de/fr/es ("über", "à").
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.BertNormalizer(lowercase=True, strip_accents=False)]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_counts = _count_words(tokenizer, texts)

    vocab = list(SPECIAL_TOKENS)
    char_counts: Counter[str] = Counter()
    for word, count in word_counts.items():
        for char in word:
            char_counts[char] += count
    for char, _ in sorted(char_counts.items(), key=lambda item: (-item[1], item[0])):
        if len(vocab) + 2 > vocab_size:
            break
        vocab += [char, f"##{char}"]
    known = set(vocab)
    for word, _ in sorted(word_counts.items(), key=lambda item: (-item[1], item[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in known:
            vocab.append(word)
    tokenizer.model = models.WordPiece(
        vocab={token: index for index, token in enumerate(vocab)}, unk_token="[UNK]"
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(name, SPECIAL_TOKENS.index(name)) for name in ("[CLS]", "[SEP]")],
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))  # never split or normalised inside text
    return tokenizer


def _count_words(tokenizer: tokenizers.Tokenizer, texts: Iterable[str]) -> Counter[str]:
    """Counts the words the tokenizer's normaliser and pre-tokenizer make of `texts`.

    Texts are first split on whitespace in Python and each distinct piece is pre-tokenized once:
    captions repeat a few hundred pieces, and crossing into `tokenizers` per text is the slow part.
    """
    pieces: Counter[str] = Counter()
    for text in texts:
        pieces.update(text.split())
    words: Counter[str] = Counter()
    for piece, count in pieces.items():
        normalized = tokenizer.normalizer.normalize_str(piece)
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized):
            words[word] += count
    return words


class TextTokenizer:
    """A `tokenizers.Tokenizer` that encodes batches into fixed-length int32 ids and masks."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, source: str = "the tokenizer", *,
                 needs_start: bool = True) -> None:
        """`needs_start=False`: a tokenizer that marks only the end of a text (SigLIP's `text </s>`)."""
        self._tokenizer = tokenizer
        # One configured copy per max_length: encoding never mutates a tokenizer another caller
        # (or thread) is using, and the tokenizer's own saved padding/truncation are overridden.
        self._by_length: dict[int, tokenizers.Tokenizer] = {}
        padding = tokenizer.padding
        pad_id = padding["pad_id"] if padding else _first_id(tokenizer, _PAD_NAMES)
        cls_id, sep_id = _first_id(tokenizer, _CLS_NAMES), _first_id(tokenizer, _SEP_NAMES)
        for role, value, names in (("padding", pad_id, _PAD_NAMES), ("start", cls_id, _CLS_NAMES),
                                   ("end", sep_id, _SEP_NAMES)):
            if value is None and not (role == "start" and not needs_start):
                raise UserError(
                    f"{source} has no {role} token (none of {', '.join(names)}): "
                    "use a BERT-style tokenizer"
                )
        self._pad_id, self._sep_id = int(pad_id), int(sep_id)
        self._cls_id = None if cls_id is None else int(cls_id)
        self._mask_id = _first_id(tokenizer, _MASK_NAMES)

    @property
    def tokenizer(self) -> tokenizers.Tokenizer:
        """The wrapped Hugging Face tokenizer, as loaded."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included: the size of the embedding table."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def cls_id(self) -> int | None:
        return self._cls_id

    @property
    def sep_id(self) -> int:
        return self._sep_id

    @property
    def mask_id(self) -> int | None:
        """Id of the mask token for masked-LM, or None when the tokenizer has none."""
        return self._mask_id

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask (1 = real token), both int32 [len(texts), max_length].

        Long texts are cut before the special tokens are added, so the final [SEP] survives.
        """
        if isinstance(texts, str):  # a str is a Sequence[str] of characters: almost surely a bug
            raise TypeError("encode takes a sequence of texts, not a single string")
        encodings = self._configured(max_length).encode_batch_fast(list(texts))
        shape = (len(encodings), max_length)  # reshape: an empty batch still has max_length columns
        ids = np.array([e.ids for e in encodings], dtype=np.int32).reshape(shape)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int32).reshape(shape)
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        """Text of one row of ids, special tokens and padding dropped (for logs and debugging)."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: str) -> None:
        """Writes tokenizer.json to `path` atomically, so a reader never sees half a file."""
        with replaced_atomically(path) as temporary:
            self._tokenizer.save(temporary)

    def _configured(self, max_length: int) -> tokenizers.Tokenizer:
        configured = self._by_length.get(max_length)
        if configured is None:
            special = self._tokenizer.num_special_tokens_to_add(is_pair=False)
            if max_length <= special:
                raise UserError(
                    f"max_length {max_length} is too small: it must exceed the {special} "
                    "special tokens added to every text"
                )
            configured = tokenizers.Tokenizer.from_str(self._tokenizer.to_str())
            configured.enable_truncation(max_length)
            pad_token = self._tokenizer.id_to_token(self._pad_id) or "[PAD]"
            configured.enable_padding(length=max_length, pad_id=self._pad_id, pad_token=pad_token)
            self._by_length[max_length] = configured
        return configured


def _first_id(tokenizer: tokenizers.Tokenizer, names: Sequence[str]) -> int | None:
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


SENTENCEPIECE_NAMES = ("spiece.model", "sentencepiece.bpe.model", "sentencepiece.model", "tokenizer.model")


def load_tokenizer(path: str) -> TextTokenizer:
    """Loads a tokenizer from a local path; never downloads.

    `path` is a `tokenizer.json`, a Hugging Face folder holding one, a SentencePiece (unigram)
    `.model` file, or a folder holding only such a model (e.g. spiece.model).
    """
    location = Path(path)
    if not location.exists():
        raise UserError(
            f"tokenizer path {path} does not exist: "
            "pass a tokenizer.json file or a folder holding one"
        )
    if location.is_dir() and _tokenizer_class(location) == "SiglipTokenizer":
        return _load_siglip(location)
    if location.is_dir() and not (location / "tokenizer.json").is_file():
        models_here = [location / name for name in SENTENCEPIECE_NAMES if (location / name).is_file()]
        if models_here:
            location = models_here[0]
    if location.suffix == ".model":
        return _load_sentencepiece(location)
    file = location / "tokenizer.json" if location.is_dir() else location
    if not file.is_file():
        raise UserError(
            f"tokenizer folder {path} has no tokenizer.json: save the tokenizer there with a fast "
            "Hugging Face tokenizer (tokenizer.save_pretrained), or pass the file itself"
        )
    try:
        tokenizer = tokenizers.Tokenizer.from_file(os.fspath(file))
    except Exception as error:  # tokenizers raises a bare Exception for malformed JSON
        reason = first_line(error, "unreadable")
        raise UserError(
            f"cannot parse tokenizer file {file} ({reason}): pass a Hugging Face tokenizer.json"
        ) from error
    return TextTokenizer(tokenizer, source=f"tokenizer {file}")


def _tokenizer_class(folder: Path) -> str | None:
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("tokenizer_class")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"tokenizer config {config} is not JSON") from None


def _spm_unigram(file: Path) -> tokenizers.Tokenizer:
    try:
        # `from_spm` imports the model's protobuf schema as a top-level module; the sentencepiece
        # package ships it as a submodule, so point the name at that.
        from sentencepiece import sentencepiece_model_pb2

        sys.modules.setdefault("sentencepiece_model_pb2", sentencepiece_model_pb2)
        return tokenizers.SentencePieceUnigramTokenizer.from_spm(os.fspath(file))
    except Exception as error:  # protobuf / sentencepiece missing, or not a unigram model
        reason = first_line(error)
        raise UserError(
            f"cannot read SentencePiece model {file} ({reason}): it must be a unigram model, "
            "and the sentencepiece and protobuf packages must be installed"
        ) from error


def _load_siglip(folder: Path) -> TextTokenizer:
    """SigLIP's tokenizer (transformers' `SiglipTokenizer`, from big_vision): text lowercased, ASCII
    punctuation removed and whitespace collapsed before its SentencePiece model; `text </s>` with
    no start token; padded with `</s>`."""
    model = next((folder / name for name in SENTENCEPIECE_NAMES if (folder / name).is_file()), None)
    if model is None:
        names = ", ".join(SENTENCEPIECE_NAMES)
        raise UserError(f"SigLIP tokenizer folder {folder} has no SentencePiece model ({names})")
    tokenizer = _spm_unigram(model)
    punctuation = "[" + re.escape(string.punctuation) + "]"
    canonical = [normalizers.Lowercase(), normalizers.Replace(tokenizers.Regex(punctuation), ""),
                 normalizers.Replace(tokenizers.Regex(r"\s+"), " "), normalizers.Strip()]
    own = [tokenizer.normalizer] if tokenizer.normalizer else []
    tokenizer.normalizer = normalizers.Sequence([*canonical, *own])
    end = tokenizer.token_to_id("</s>")
    if end is None:
        raise UserError(f"SigLIP tokenizer {model} has no </s> token")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", end)])
    tokenizer.enable_padding(pad_id=end, pad_token="</s>")
    return TextTokenizer(tokenizer, source=f"SigLIP tokenizer {folder}", needs_start=False)


def _load_sentencepiece(file: Path) -> TextTokenizer:
    """A SentencePiece unigram model as a `tokenizers` tokenizer (same pieces, same ids), with
    `<s> text </s>` added around every text as XLM-R and mT5-style encoders expect."""
    tokenizer = _spm_unigram(file)
    start, end = _first_id(tokenizer, _CLS_NAMES), _first_id(tokenizer, _SEP_NAMES)
    if start is not None and end is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokenizer.id_to_token(start)} $A {tokenizer.id_to_token(end)}",
            special_tokens=[(tokenizer.id_to_token(start), start), (tokenizer.id_to_token(end), end)],
        )
    return TextTokenizer(tokenizer, source=f"SentencePiece model {file}")
