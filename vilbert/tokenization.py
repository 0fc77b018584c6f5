"""BERT uncased WordPiece, as the official code tokenizes (pytorch_pretrained_bert 0.6.2 `BertTokenizer`).

The pipeline is built from HF `tokenizers` parts (BERT normalizer, BERT pre-tokenizer, WordPiece; the same
parts as its `BertWordPieceTokenizer`), which give the original wordpieces at Rust speed; paddlenlp's
BertTokenizer does not (it splits `20°c` differently). Two details are kept from the original on purpose:
- no special tokens are registered with the Rust tokenizer, so `hello[CLS]` or `[cls]` inside an expression
  are split like any text, while a whitespace-separated `[CLS]`, `[SEP]`, ... is kept whole (the original's
  `never_split`);
- unknown wordpieces map to `[UNK]`, as the official dataset does (`vocab.get(w, vocab['[UNK]'])`).
Known remaining differences concern only code points missing from the Rust crate's Unicode tables
(unassigned or recently assigned characters) and the context-dependent final sigma.
"""

import hashlib
import os
import unicodedata
from pathlib import Path
from typing import Dict, List

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

SHIPPED_VOCABS = {"bert-base-uncased": Path(__file__).resolve().parent / "bert-base-uncased-vocab.txt"}
NEVER_SPLIT = ("[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]")
# the CJK Unified Ideograph blocks the original spaces out (`_is_chinese_char`)
CJK_BLOCKS = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
              (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
MAX_CHARS_PER_WORD = 100  # longer words become one [UNK], as in the original WordpieceTokenizer
# How an expression becomes ids (vilbert.dataset.tokenize_expression): vilbert_beta's or vilbert-multi-task's
TOKENIZATIONS = ("beta", "12in1")


def check_tokenization(tokenization: str) -> None:
    if tokenization not in TOKENIZATIONS:
        raise ValueError(f"tokenization={tokenization!r} must be one of {', '.join(TOKENIZATIONS)}")


def resolve_vocab(bert_model: str) -> Path:
    """'bert-base-uncased' -> the shipped vocab; a vocab file (or a folder holding vocab.txt) -> itself."""
    if bert_model in SHIPPED_VOCABS:
        return SHIPPED_VOCABS[bert_model]
    path = Path(bert_model)
    if path.is_dir():
        path = path / "vocab.txt"
    if path.is_file():
        return path
    raise FileNotFoundError(
        f"bert_model {bert_model!r} is neither one of {sorted(SHIPPED_VOCABS)} nor a WordPiece vocab file "
        f"(one token per line); pass --bert_model bert-base-uncased or the path of a vocab.txt")


class VocabError(ValueError):
    """The vocab file is not a BERT WordPiece vocab (binary, or without the special tokens)."""


class BertTokenizer:
    """Text -> wordpieces -> ids. `vocab_file` is a vocab path or a shipped name such as 'bert-base-uncased'."""

    def __init__(self, vocab_file: str = "bert-base-uncased", do_lower_case: bool = True):
        path = resolve_vocab(os.fspath(vocab_file))
        self.vocab_file, self.do_lower_case = str(path), do_lower_case
        self.vocab_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        try:
            self._rust = self._build(self.vocab_file, do_lower_case)
        except Exception as error:  # the tokenizers library raises a bare Exception for an unreadable file
            raise VocabError(f"vocab {path} cannot be read as a WordPiece vocab ({error}): give --bert_model a "
                             f"BERT vocab.txt, one token per line, or leave it at bert-base-uncased") from None
        self.vocab: Dict[str, int] = self._rust.get_vocab()
        missing = [t for t in NEVER_SPLIT if t not in self.vocab]
        if missing:
            raise VocabError(f"vocab {path} lacks the special tokens {missing}; is it a BERT WordPiece vocab? "
                             f"give --bert_model a BERT vocab.txt, or leave it at bert-base-uncased")
        self.unk_token_id = self.vocab["[UNK]"]
        self.cls_token_id, self.sep_token_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.pad_token_id, self.mask_token_id = self.vocab["[PAD]"], self.vocab["[MASK]"]

    @staticmethod
    def _build(path: str, do_lower_case: bool) -> Tokenizer:
        wordpiece = models.WordPiece.from_file(path, unk_token="[UNK]", max_input_chars_per_word=MAX_CHARS_PER_WORD)
        tokenizer = Tokenizer(wordpiece)
        # strip_accents=None: accents are stripped exactly when lowercasing, as in the original
        tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                          strip_accents=None, lowercase=do_lower_case)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        return tokenizer

    def __len__(self) -> int:
        return len(self.vocab)

    def _encode(self, text: str):
        return self._rust.encode(text, add_special_tokens=False)

    def tokenize(self, text: str) -> List[str]:
        if "[" not in text:  # fast path: no never_split token can occur
            return self._encode(text).tokens
        tokens, chunk = [], []
        for word in _basic_words(text):
            if word in NEVER_SPLIT:
                tokens += self._encode(" ".join(chunk)).tokens + [word]
                chunk = []
            else:
                chunk.append(word)
        return tokens + self._encode(" ".join(chunk)).tokens

    def convert_tokens_to_ids(self, tokens: List[str]) -> List[int]:
        return [self.vocab.get(token, self.unk_token_id) for token in tokens]

    def encode(self, text: str) -> List[int]:
        """Wordpiece ids of `text`, without [CLS]/[SEP]."""
        return self.convert_tokens_to_ids(self.tokenize(text))


def _basic_words(text: str) -> List[str]:
    """The original BasicTokenizer's words before lowercasing: control characters dropped, whitespace unified,
    CJK characters spaced out, then split on whitespace. Only used to find whole `never_split` words."""
    chars = []
    for char in text:
        category = unicodedata.category(char)
        if char in "\t\n\r" or category == "Zs":
            chars.append(" ")
        elif char == "\0" or char == "\ufffd" or category.startswith("C"):
            continue
        elif any(low <= ord(char) <= high for low, high in CJK_BLOCKS):
            chars.append(f" {char} ")
        else:
            chars.append(char)
    return "".join(chars).split()
