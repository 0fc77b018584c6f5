"""Wordpieces of the original BERT BasicTokenizer + WordpieceTokenizer (pytorch_pretrained_bert 0.6.2).

Expected outputs follow its rules: drop control chars, space out CJK, split on whitespace, lowercase and strip
accents (NFD, drop Mn) except whole never_split words, split on punctuation (ASCII non-alphanumerics and
Unicode P*, but not symbols such as ° € ²), then greedy longest-match wordpieces, [UNK] for a word that
cannot be covered or is longer than 100 characters. They were cross-checked against the original package.
"""

import pickle

import pytest

import train
from test_errors import one_line_error
from training_support import make_tiny_root, run_flags
from vilbert.tokenization import SHIPPED_VOCABS, BertTokenizer, VocabError


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizer("bert-base-uncased")


@pytest.mark.parametrize("text, pieces", [
    ("THE LADY WITH THE BLUE SHIRT", ["the", "lady", "with", "the", "blue", "shirt"]),
    ("lady w back to us", ["lady", "w", "back", "to", "us"]),
    ("20°c", ["20", "##°", "##c"]),  # ° is a symbol (So), not punctuation: no split
    ("€5 coffee", ["€", "##5", "coffee"]),
    ("x² + y²", ["x", "##²", "+", "y", "##²"]),
    ("Café naïve Zoë", ["cafe", "naive", "zoe"]),  # accents stripped with lowercasing
    ("Ärger über Öl", ["ar", "##ger", "uber", "ol"]),
    ("İstanbul", ["istanbul"]),
    ("man's shirt, left-most (red)!", ["man", "'", "s", "shirt", ",", "left", "-", "most", "(", "red", ")", "!"]),
    ("guy on left...", ["guy", "on", "left", ".", ".", "."]),
    ("黑色的猫 cat", ["[UNK]", "[UNK]", "的", "[UNK]", "cat"]),  # each CJK char is a word
    ("[CLS] man [SEP]", ["[CLS]", "man", "[SEP]"]),  # whole never_split words stay whole
    ("hello[CLS]", ["hello", "[", "cl", "##s", "]"]),
    ("[cls]", ["[", "cl", "##s", "]"]),
    ("a\tb\nc\r\nd", ["a", "b", "c", "d"]),
    ("ctrl\x07char", ["ct", "##rl", "##cha", "##r"]),  # control chars are dropped, not split on
    ("\ufffdbad", ["bad"]),
    ("😀 smile", ["[UNK]", "smile"]),
    ("ＡＢＣ fullwidth", ["[UNK]", "full", "##wi", "##dt", "##h"]),
    ("supercalifragilisticexpialidocious",
     ["super", "##cal", "##if", "##rag", "##ilis", "##tic", "##ex", "##pia", "##lid", "##oc", "##ious"]),
    ("a" * 101, ["[UNK]"]),  # over 100 characters
    ("   ", []),
])
def test_wordpieces(tokenizer, text, pieces):
    assert tokenizer.tokenize(text) == pieces


def test_ids_and_special_tokens(tokenizer):
    assert tokenizer.encode("THE LADY w") == [1996, 3203, 1059]
    assert tokenizer.encode("20°c") == [2322, 7737, 2278]
    assert (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id) == (101, 102, 0)
    assert tokenizer.convert_tokens_to_ids(["[CLS]", "man", "not-a-wordpiece"]) == [101, 2158, 100]
    assert len(tokenizer) == 30522


def test_long_word_limit_is_inclusive(tokenizer):
    pieces = tokenizer.tokenize("a" * 100)
    assert pieces[0] == "aaa" and "[UNK]" not in pieces


def test_vocab_resolution(tmp_path):
    assert BertTokenizer().vocab_file == str(SHIPPED_VOCABS["bert-base-uncased"])
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "##dish", "car"]) + "\n")
    custom = BertTokenizer(str(tmp_path))  # a folder holding vocab.txt
    assert custom.encode("Reddish CAR blue") == [5, 6, 7, 1]
    assert custom.vocab_sha256 != BertTokenizer().vocab_sha256
    cased = BertTokenizer(str(vocab), do_lower_case=False)
    assert cased.tokenize("Red red") == ["[UNK]", "red"]


def test_bad_vocab_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="bert-base-uncased"):
        BertTokenizer("bert-base-cased")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("red\ncar\n")
    with pytest.raises(VocabError, match=r"lacks the special tokens \['\[UNK\]'"):
        BertTokenizer(str(vocab))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(128, 256)) * 3)
    with pytest.raises(VocabError, match=r"binary.txt cannot be read as a WordPiece vocab \(.*UTF-8\): give "
                                         r"--bert_model a BERT vocab.txt"):
        BertTokenizer(str(binary))


def test_a_bad_vocab_is_one_line_from_train_py(tmp_path):
    (tmp_path / "vocab.txt").write_bytes(bytes(range(128, 256)))
    message = one_line_error(train.main, run_flags(make_tiny_root(tmp_path / "data"), tmp_path / "out",
                                                   bert_model=tmp_path / "vocab.txt"))
    assert message.startswith(f"error: vocab {tmp_path / 'vocab.txt'} cannot be read as a WordPiece vocab")


def test_pickles_for_worker_processes(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode("Café 20°c [SEP]") == tokenizer.encode("Café 20°c [SEP]") == [7668, 2322, 7737, 2278, 102]
