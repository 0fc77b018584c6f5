"""RefCOCO+ referring expressions, served as the official vilbert_beta `ReferExpressionDataset` serves them.

One sample per sentence of `REFER.getRefIds(split=split)`; the caption is the sentence's `raw` text.
- Text, `tokenization="beta"` (the run behind the paper's 72.34): `[CLS] + wordpieces + [SEP]`, then cut to
  `max_seq_length`, so an expression of more than T-2 wordpieces loses its [SEP]; `"12in1"`
  (vilbert-multi-task): the wordpieces cut to T-2, then `[CLS]`/`[SEP]` around them. Right-padded with 0;
  segment ids 0; input mask 1 on tokens.
- Regions: the detected boxes (whole-image row first); for the train split, followed by the referred
  objects' ground-truth boxes (without the gt file's whole-image row), cut to `max_region_num`.
- Target: the IoU ("+1" pixel convention) of every region with the referred box; in train, values below 0.5
  are zeroed. A batch (`batch`, or `collate` of samples) zero-pads the regions; padded rows are masked out
  by `image_mask`.

The tokenized entries of a split are cached under `cache_dir` in a file whose name carries a hash of
everything they depend on (vocab, lengths, tokenization style, annotation files), so a stale cache is never
read, unlike the official `<task>_<split>_<T>_<R>.pkl`. With a valid cache the annotations are not parsed.
"""

import functools
from pathlib import Path
from typing import Dict, List

import numpy as np
import paddle

from pyutils.refer import REFER, AnnotationError

from .features import FeatureReader, FeaturesError
from .batching import EntriesCache, batch_tokens, fill, region_rows, token_arrays
from .tokenization import BertTokenizer, check_tokenization

ENTRIES_FORMAT = 1  # bump when the cached entry arrays change
REGION_ARRAYS = ("features", "spatials", "boxes", "target", "image_mask")  # one row per region
TOKEN_ARRAYS = ("input_ids", "input_mask", "segment_ids")  # max_seq_length each, right-padded
_ENTRY_ARRAYS = ("caption", "sent_id", "ref_id", "image_id", "ref_box", "input_ids", "length")


def iou_plus_one(boxes: np.ndarray, ref_box) -> np.ndarray:
    """IoU [...] of x1y1x2y2 boxes [..., 4] with the boxes ref_box [..., 4] (broadcast: one box [4] for all, or
    [B, 1, 4] for a batch [B, R, 4]), boxes counted as inclusive pixel ranges (+1).

    Float32 arithmetic in the official order (`iou()` of the official dataset files), element by element, so
    the targets and the 0.5 decisions match the official ones exactly, batched or not.
    """
    boxes = np.asarray(boxes, np.float32)
    ref = np.asarray(ref_box, np.float32)
    one = np.float32(1)
    sides = boxes[..., 2:] - boxes[..., :2] + one  # [..., 2] width, height
    ref_sides = ref[..., 2:] - ref[..., :2] + one
    overlap = np.minimum(boxes[..., 2:], ref[..., 2:]) - np.maximum(boxes[..., :2], ref[..., :2]) + one
    np.maximum(overlap, 0, out=overlap)
    inter = overlap[..., 0] * overlap[..., 1]
    return inter / (sides[..., 0] * sides[..., 1] + ref_sides[..., 0] * ref_sides[..., 1] - inter)


def tokenize_expression(tokenizer: BertTokenizer, caption: str, max_seq_length: int,
                        tokenization: str = "beta") -> List[int]:
    """Token ids (not padded). beta: [CLS] + wordpieces + [SEP], cut to max_seq_length (the [SEP] goes first);
    12in1: the wordpieces cut to max_seq_length - 2, then [CLS] and [SEP] around them (always a [SEP])."""
    check_tokenization(tokenization)
    pieces = tokenizer.encode(caption)
    if tokenization == "12in1":
        return [tokenizer.cls_token_id] + pieces[:max_seq_length - 2] + [tokenizer.sep_token_id]
    return ([tokenizer.cls_token_id] + pieces + [tokenizer.sep_token_id])[:max_seq_length]


def collate(batch: List[Dict[str, np.ndarray]], region_keys=REGION_ARRAYS) -> Dict[str, np.ndarray]:
    """Samples -> one dict of numpy arrays (for `paddle.io.DataLoader(collate_fn=collate)`).

    Padding is decided here, once per batch: regions are zero-padded to the most regions any sample has, and
    tokens cut to the longest expression (the official code pads every sample to max_region_num and
    max_seq_length). Padded regions have image_mask 0 and target 0, so they add exactly 0 to the loss and are
    never chosen; padded tokens are only ever masked keys; the outputs on real rows are the same. Adds the
    all-zero co_attention_mask [B, R, T] the official batch carries. `ReferExpressionDataset.batch` builds
    the same batch of its own samples without them.
    """
    size = len(batch)
    counts = np.array([len(sample["image_mask"]) for sample in batch])
    regions = int(counts.max())
    tokens = max(max(int(sample["input_mask"].sum()) for sample in batch), 1)
    real = np.arange(regions) < counts[:, None]  # [B, R]: the rows that hold a region
    out = {}
    for key, first in batch[0].items():
        if key in region_keys:
            array = out[key] = np.empty((size, regions) + first.shape[1:],
                                        np.result_type(*(sample[key] for sample in batch)))
            array[real] = np.concatenate([sample[key] for sample in batch])
            array[~real] = 0
        elif key in TOKEN_ARRAYS:
            out[key] = np.stack([sample[key][:tokens] for sample in batch])
        else:
            out[key] = np.stack([sample[key] for sample in batch])
    out["co_attention_mask"] = np.zeros((size, regions, tokens), np.float32)
    return out


class ReferExpressionDataset(paddle.io.Dataset):
    """Samples of one split; see the module docstring for what each holds.

    det_features / gt_features are readers from `vilbert.features` (`open_features`) of the detected-box and
    ground-truth-box LMDBs; the ground-truth boxes are mixed in for the train split only, where they are
    required. `self[i]`, one row per kept region (n <= max_region_num; `batch` and `collate` pad batches):
    features [n, 2048] (float32, or float16 from a float16 cache), spatials [n, 5], boxes [n, 4] (pixels
    x1y1x2y2), target [n, 1], image_mask [n] (ones); input_ids / input_mask / segment_ids [T];
    sent_id / ref_id / image_id (scalars).
    """

    def __init__(self, dataroot, split: str, tokenizer: BertTokenizer, det_features: FeatureReader,
                 gt_features: FeatureReader = None, *, dataset: str = "refcoco+", splitBy: str = "unc",
                 max_seq_length: int = 20, max_region_num: int = 100, tokenization: str = "beta", cache_dir=None):
        check_tokenization(tokenization)  # before the entries cache, whose name depends on it
        if max_seq_length < 2 or max_region_num < 1:
            raise ValueError(f"need max_seq_length >= 2 and max_region_num >= 1, got {max_seq_length}, "
                             f"{max_region_num}")
        self.dataroot, self.split, self.dataset, self.splitBy = str(dataroot), split, dataset, splitBy
        self.max_seq_length, self.max_region_num, self.tokenization = max_seq_length, max_region_num, tokenization
        self.mixes_gt = split == "train"  # the official test: gt boxes join the candidates in training only
        if self.mixes_gt and gt_features is None:
            raise ValueError(f"split {split!r} mixes in the ground-truth boxes: pass gt_features, the reader of "
                             f"the {dataset}_gt_..._genome.lmdb features (see vilbert.features.open_features)")
        self.det_features = det_features
        self.gt_features = gt_features if self.mixes_gt else None
        self.cache = self._cache(tokenizer, cache_dir)
        arrays = self.cache.load(_ENTRY_ARRAYS, self._check_cached) or self._build(tokenizer)
        self._captions = arrays["caption"].tolist()
        self._sent_id, self._ref_id = arrays["sent_id"], arrays["ref_id"]
        self._image_id, self._ref_box, self._input_ids = arrays["image_id"], arrays["ref_box"], arrays["input_ids"]
        self._input_mask = (np.arange(max_seq_length) < arrays["length"][:, None]).astype(np.int64)
        self._check_features()

    # ---- entries and their cache ------------------------------------------------------------------------
    def _annotation_files(self) -> List[Path]:
        folder = Path(self.dataroot) / self.dataset
        files = [folder / f"refs({self.splitBy}).p", folder / "instances.json"]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: the {self.dataset} annotations are missing from "
                                        f"{self.dataroot}; run `bash download_dataset.sh`")
        return files

    def _cache(self, tokenizer: BertTokenizer, cache_dir) -> EntriesCache:
        key = {"format": ENTRIES_FORMAT, "tokenization": self.tokenization, "vocab_sha256": tokenizer.vocab_sha256,
               "do_lower_case": tokenizer.do_lower_case, "max_seq_length": self.max_seq_length,
               "max_region_num": self.max_region_num, "dataset": self.dataset, "splitBy": self.splitBy,
               "split": self.split}
        folder = Path(cache_dir) if cache_dir else Path(self.dataroot) / "cache"
        stem = f"{self.dataset}_{self.split}_{self.max_seq_length}_{self.max_region_num}"
        return EntriesCache(folder, stem, key, self._annotation_files())

    def _check_cached(self, arrays) -> None:
        count = len(arrays["sent_id"])
        if any(len(a) != count for a in arrays.values()) or arrays["input_ids"].shape[1:] != (self.max_seq_length,):
            raise ValueError("inconsistent array shapes")

    def _build(self, tokenizer: BertTokenizer) -> Dict[str, np.ndarray]:
        """Entries from the annotations, tokenized and padded, then written to the cache atomically."""
        refer = REFER(self.dataroot, dataset=self.dataset, splitBy=self.splitBy)
        refs = refer.loadRefs(refer.getRefIds(split=self.split))
        rows = []
        for ref in refs:
            x, y, w, h = refer.getRefBox(ref["ref_id"])
            ref_box = [x, y, x + w, y + h]  # no -1, as official
            for sent, sent_id in zip(ref["sentences"], ref["sent_ids"]):
                rows.append((sent["raw"], sent_id, ref["ref_id"], ref["image_id"], ref_box))
        if not rows:
            present = ", ".join(dict.fromkeys(ref["split"] for ref in refer.data["refs"]))
            raise AnnotationError(f"split {self.split!r} of {self.dataset} ({self.splitBy}) in {self.dataroot} holds "
                                  f"no referring expressions; the splits there are {present}")
        tokens = [tokenize_expression(tokenizer, row[0], self.max_seq_length, self.tokenization) for row in rows]
        input_ids = np.full((len(rows), self.max_seq_length), tokenizer.pad_token_id, np.int64)
        for i, ids in enumerate(tokens):
            input_ids[i, :len(ids)] = ids
        captions, sent_ids, ref_ids, image_ids, ref_boxes = zip(*rows)
        arrays = {"caption": np.array(captions, dtype=str), "sent_id": np.array(sent_ids, np.int64),
                  "ref_id": np.array(ref_ids, np.int64), "image_id": np.array(image_ids, np.int64),
                  "ref_box": np.array(ref_boxes, np.float64), "input_ids": input_ids,
                  "length": np.array([len(ids) for ids in tokens], np.int64)}
        self.cache.save(arrays)
        return arrays

    def _check_features(self) -> None:
        """Every image of the split must be in the features: one error naming what is missing."""
        image_ids = np.unique(self._image_id).tolist()
        readers = [("detected-box", self.det_features)] + ([("ground-truth-box", self.gt_features)]
                                                           if self.mixes_gt else [])
        for name, reader in readers:
            missing = [image_id for image_id in image_ids if image_id not in reader]
            if missing:
                shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
                raise FeaturesError(f"{len(missing)} of the {len(image_ids)} images of split {self.split!r} are "
                                    f"missing from the {name} features {reader.path} (image ids {shown}); do the "
                                    f"features belong to {self.dataset}, and did their download finish?")

    @functools.cached_property
    def entries(self) -> List[dict]:
        """Per sample: caption, sent_id, ref_id, image_id, ref_box (pixels x1y1x2y2 = REFER box [x, y, x+w, y+h])."""
        return [{"caption": caption, "sent_id": int(sent_id), "ref_id": int(ref_id), "image_id": int(image_id),
                 "ref_box": ref_box.tolist()}
                for caption, sent_id, ref_id, image_id, ref_box in
                zip(self._captions, self._sent_id, self._ref_id, self._image_id, self._ref_box)]

    # ---- samples ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._sent_id)

    def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
        """One sample: a batch of one has no padded regions; its tokens are padded to max_seq_length."""
        batch = self.batch([index])
        tokens = self._tokens(np.array([index]), self.max_seq_length)
        return {key: tokens.get(key, batch[key])[0] for key in batch if key != "co_attention_mask"}

    def batch(self, indices, empty=np.empty) -> Dict[str, np.ndarray]:
        """`collate([self[i] for i in indices])`, assembled for the whole batch at once.

        Per sample: the detected boxes' rows (whole-image row first), for the train split followed by the
        referred objects' ground-truth rows without the gt file's whole-image row, min(n + gn - 1, R) rows in
        all. Every feature row is copied once, from the feature readers' rows (the memory-mapped cache) into
        the batch, padding included, by one NumPy call (no Python between rows, so threads assembling batches
        hold the GIL little); the IoU targets of all rows are computed in one pass. `empty(shape, dtype)`
        allocates every array (the loader's: the memory the device copy reads, `vilbert.loader`).
        """
        indices = np.asarray(indices, np.int64)
        image_ids = self._image_id[indices].tolist()
        regions_cap = self.max_region_num
        samples = []
        for image_id in image_ids:
            det = self.det_features[image_id]
            parts = [(det, 0, min(det.num_boxes, regions_cap))]
            if self.mixes_gt:
                gt = self.gt_features[image_id]
                parts.append((gt, 1, 1 + min(gt.num_boxes - 1, regions_cap - parts[0][2])))
            samples.append(parts)
        out, real = region_rows(samples, empty)
        # IoU of the kept rows only: the same as 12-in-1's `target[:mix_num] = mix_target[:mix_num]`; beta
        # assigns the uncut mix_target and would crash when rows are cut
        target = iou_plus_one(out["boxes"], self._ref_box[indices][:, None, :])
        target[~real] = 0
        if self.mixes_gt:
            target[target < 0.5] = 0
        out["target"] = empty(real.shape + (1,), np.float32)
        out["target"][..., 0] = target
        tokens = batch_tokens(self._input_mask[indices].sum(1))
        fill(out, empty, self._tokens(indices, tokens))
        fill(out, empty, {name: values[indices] for name, values in
                          (("sent_id", self._sent_id), ("ref_id", self._ref_id), ("image_id", self._image_id))})
        fill(out, empty, {"co_attention_mask": np.zeros(real.shape + (tokens,), np.float32)})
        return out

    region_keys = REGION_ARRAYS  # the batch arrays with one row per region

    @property
    def entry_ids(self) -> np.ndarray:
        """The official id of every sample in order: its sent_id."""
        return self._sent_id

    @property
    def token_ids(self) -> np.ndarray:
        """[E, max_seq_length] token ids of every sample, zero-padded."""
        return self._input_ids

    def _tokens(self, indices: np.ndarray, length: int) -> Dict[str, np.ndarray]:
        return token_arrays(self._input_ids, self._input_mask, indices, length)
