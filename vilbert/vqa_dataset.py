"""VQA 2.0 questions, served as vilbert_beta's `VQAClassificationDataset` serves them.

One sample per question of the split (`vilbert/vqa_data.py` builds the splits as the official code does):
- Text: the question tokenized once, as each family does (`tokenization`: beta `[CLS] + wordpieces + [SEP]` cut
  to 16, so a question of more than 14 wordpieces loses its [SEP]; 12in1 the wordpieces cut to 21, then the
  specials, 23). Right-padded with 0, segment ids 0, input mask 1 on tokens.
- Regions: the image's rows as the reader returns them (the whole-image row first, then the boxes in LMDB
  order), the first `max_region_num` of them: 100 in beta (so an image of 100 boxes loses its last one), 101 in
  12-in-1. Padded rows are zeros, masked out by `image_mask`.
- Target [num_labels]: zeros, with the soft scores of the cached labels at their answer indices (the official
  `target.scatter_(0, labels, scores)`); all zeros for the test split and for questions none of whose answers
  is in the vocabulary.
A batch pads regions to the most any sample has and tokens to the longest question, as for referring
expressions (`vilbert/dataset.py`); padded rows and tokens change no output on real ones.
"""

import functools
from pathlib import Path
from typing import Dict, List

import numpy as np
import paddle

from . import vqa_data
from .batching import EntriesCache, batch_tokens, fill, region_rows, token_arrays
from .dataset import tokenize_expression
from .features import FeatureReader
from .tokenization import BertTokenizer, check_tokenization

ENTRIES_FORMAT = 1  # bump when the cached entry arrays change
_ENTRY_ARRAYS = ("question", "question_id", "image_id", "input_ids", "length", "label_offsets", "labels", "scores")


class VQADataset(paddle.io.Dataset):
    """Samples of one split. `det_features` is a reader from `vilbert.features.open_features` of the split's region
    LMDB (trainval for train/val splits, test2015 for test). `self[i]`: features [n, 2048], spatials [n, 5],
    boxes [n, 4], image_mask [n]; input_ids / input_mask / segment_ids [L]; target [num_labels] float32;
    question_id / image_id."""

    def __init__(self, dataroot, split: str, tokenizer: BertTokenizer, det_features: FeatureReader, *,
                 max_seq_length: int = 16, max_region_num: int = 100, tokenization: str = "beta", cache_dir=None):
        check_tokenization(tokenization)
        vqa_data.check_split(split)
        if max_seq_length < 2 or max_region_num < 1:
            raise ValueError(f"need max_seq_length >= 2 and max_region_num >= 1, got {max_seq_length}, "
                             f"{max_region_num}")
        self.dataroot, self.split = str(dataroot), split
        self.max_seq_length, self.max_region_num, self.tokenization = max_seq_length, max_region_num, tokenization
        self.det_features = det_features  # the detected boxes, named as ReferExpressionDataset names them
        self.ans2label, self.label2ans = vqa_data.read_answer_vocab(dataroot)
        self.num_labels = len(self.label2ans)
        self.cache = self._cache(tokenizer, cache_dir)
        arrays = self.cache.load(_ENTRY_ARRAYS, self._check_cached) or self._build(tokenizer)
        self._questions = arrays["question"].tolist()
        self._question_id, self._image_id = arrays["question_id"], arrays["image_id"]
        self._input_ids, self._length = arrays["input_ids"], arrays["length"]
        self._input_mask = (np.arange(max_seq_length) < self._length[:, None]).astype(np.int64)
        self._label_offsets, self._labels, self._scores = arrays["label_offsets"], arrays["labels"], arrays["scores"]
        self._check_features()

    # ---- entries and their cache ------------------------------------------------------------------------
    def _cache(self, tokenizer: BertTokenizer, cache_dir) -> EntriesCache:
        root = Path(self.dataroot)
        files = [vqa_data.require(root / name, root)
                 for name in vqa_data.split_files(self.split) + [vqa_data.ANS2LABEL]]
        key = {"format": ENTRIES_FORMAT, "tokenization": self.tokenization, "vocab_sha256": tokenizer.vocab_sha256,
               "do_lower_case": tokenizer.do_lower_case, "max_seq_length": self.max_seq_length, "split": self.split}
        folder = Path(cache_dir) if cache_dir else root / "cache"
        return EntriesCache(folder, f"VQA_{self.split}_{self.max_seq_length}", key, files)

    def _check_cached(self, arrays) -> None:
        count = len(arrays["question_id"])
        if (any(len(arrays[k]) != count for k in ("question", "image_id", "input_ids", "length"))
                or arrays["input_ids"].shape[1:] != (self.max_seq_length,)
                or len(arrays["label_offsets"]) != count + 1 or len(arrays["labels"]) != arrays["label_offsets"][-1]):
            raise ValueError("inconsistent array shapes")

    def _build(self, tokenizer: BertTokenizer) -> Dict[str, np.ndarray]:
        """Entries from the question and target files, tokenized and padded, written to the cache atomically."""
        entries = vqa_data.load_split(self.dataroot, self.split, self.num_labels)
        tokens = [tokenize_expression(tokenizer, e["question"], self.max_seq_length, self.tokenization)
                  for e in entries]
        input_ids = np.full((len(entries), self.max_seq_length), tokenizer.pad_token_id, np.int64)
        for i, ids in enumerate(tokens):
            input_ids[i, :len(ids)] = ids
        counts = [len(e["labels"]) for e in entries]
        arrays = {"question": np.array([e["question"] for e in entries], dtype=str),
                  "question_id": np.array([e["question_id"] for e in entries], np.int64),
                  "image_id": np.array([e["image_id"] for e in entries], np.int64),
                  "input_ids": input_ids, "length": np.array([len(ids) for ids in tokens], np.int64),
                  "label_offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                  "labels": np.array([l for e in entries for l in e["labels"]], np.int64),
                  "scores": np.array([s for e in entries for s in e["scores"]], np.float32)}
        self.cache.save(arrays)
        return arrays

    def _check_features(self) -> None:
        image_ids = np.unique(self._image_id).tolist()
        missing = [image_id for image_id in image_ids if image_id not in self.det_features]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            which = "test2015 (--features_test)" if self.split == "test" else "train2014 + val2014 (--features_h5path1)"
            raise vqa_data.VQADataError(
                f"{len(missing)} of the {len(image_ids)} images of VQA split {self.split!r} are missing from the "
                f"features {self.det_features.path} (image ids {shown}); the split needs the COCO {which} LMDB")

    @functools.cached_property
    def entries(self) -> List[dict]:
        """Per sample: question_id, image_id, question, and the cached answers {answer: soft score}."""
        offsets = self._label_offsets
        return [{"question_id": int(qid), "image_id": int(image_id), "question": question,
                 "answers": {self.label2ans[l]: float(s) for l, s in
                             zip(self._labels[offsets[i]:offsets[i + 1]], self._scores[offsets[i]:offsets[i + 1]])}}
                for i, (qid, image_id, question) in enumerate(zip(self._question_id, self._image_id, self._questions))]

    # ---- samples ----------------------------------------------------------------------------------------
    region_keys = ("features", "spatials", "boxes", "image_mask")  # the batch arrays with one row per region

    @property
    def entry_ids(self) -> np.ndarray:
        """The official id of every sample in order: its question_id."""
        return self._question_id

    @property
    def token_ids(self) -> np.ndarray:
        """[E, max_seq_length] token ids of every sample, zero-padded."""
        return self._input_ids

    def __len__(self) -> int:
        return len(self._question_id)

    def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
        """One sample: a batch of one, its tokens padded to max_seq_length."""
        batch = self.batch([index])
        tokens = token_arrays(self._input_ids, self._input_mask, np.array([index]), self.max_seq_length)
        return {key: tokens.get(key, batch[key])[0] for key in batch if key != "co_attention_mask"}

    def batch(self, indices, empty=np.empty) -> Dict[str, np.ndarray]:
        """The samples `indices` as one batch (see `ReferExpressionDataset.batch`: every feature row is copied
        once, into arrays from `empty`); the soft targets are scattered for the whole batch at once."""
        indices = np.asarray(indices, np.int64)
        samples = []
        for image_id in self._image_id[indices].tolist():
            regions = self.det_features[image_id]
            samples.append([(regions, 0, min(regions.num_boxes, self.max_region_num))])
        out, real = region_rows(samples, empty)
        out["target"] = empty((len(indices), self.num_labels), np.float32)
        out["target"][...] = 0
        starts, stops = self._label_offsets[indices], self._label_offsets[indices + 1]
        counts = stops - starts
        rows = np.repeat(np.arange(len(indices)), counts)
        flat = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        out["target"][rows, self._labels[flat]] = self._scores[flat]
        tokens = batch_tokens(self._length[indices])
        fill(out, empty, token_arrays(self._input_ids, self._input_mask, indices, tokens))
        fill(out, empty, {"question_id": self._question_id[indices], "image_id": self._image_id[indices],
                          "co_attention_mask": np.zeros(real.shape + (tokens,), np.float32)})
        return out
