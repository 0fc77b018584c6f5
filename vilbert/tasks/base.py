"""What a task says about itself; the loop that runs every task knows it only through these methods."""

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..options import OptionsError


class Task:
    """One fine-tuning task. Subclasses set the attributes and implement the methods that raise here.

    The model is built with `model_heads(options)`; its output `output` is what `loss`, `scores` and
    `predictions` read (a float32 tensor). `metric` is the key of `summarize`'s result that picks the best
    epoch and is printed per epoch as `Val <metric>`.
    """

    name: str  # the `task` option's value
    title: str  # for messages
    datasets: Tuple[str, ...]  # the `dataset` option's values this task serves
    output: str  # the model output its loss reads (a field of `ViLBertOutput`)
    metric: str  # e.g. "accuracy": metrics.jsonl's val_<metric>, the best checkpoint's criterion
    unit: str  # what one sample is, plural ("expressions", "questions")
    id_key: str  # the batch key identifying a sample in messages ("sent_id", "question_id")
    text_field: str  # what predict.py's queries name the text ("expression", "question")
    predicted: str  # what predict.py did to them ("grounded", "answered")
    configs: Tuple[str, str]  # (full recipe, demo recipe) under config/, what `--task NAME` picks

    # ---- options and data ---------------------------------------------------------------------------------
    def validate(self, options) -> List[str]:
        """Problems with the options that concern this task (dataset, splits, ...), one line each."""
        raise NotImplementedError

    def eval_splits(self, options, split: str) -> List[str]:
        """What `eval.py --split SPLIT` evaluates ('all': the task's evaluation splits)."""
        raise NotImplementedError

    def build_dataset(self, options, split: str, tokenizer):
        """The dataset of `split`, with a `batch(indices, empty)` for the loader."""
        raise NotImplementedError

    def model_heads(self, options) -> Dict:
        """Keyword arguments of `VILBertForVLTasks` beyond the config: the heads this task needs."""
        raise NotImplementedError

    def data_marker(self, options) -> Path:
        """The file whose presence means the data root holds the task's data (written last by the demo data)."""
        raise NotImplementedError

    def download_args(self, options) -> str:
        """The `download_dataset.sh` arguments that fetch or audit this task's data."""
        raise NotImplementedError

    def make_demo_data(self, options) -> None:
        """Generate the task's demo data at `options.dataroot`."""
        raise NotImplementedError

    # ---- training and evaluation --------------------------------------------------------------------------
    def model_inputs(self, batch: dict) -> dict:
        """The batch as the model takes it. Tasks with several texts or images per sample (VCR's 4 choices,
        retrieval's 4 pairs) flatten them into the batch here, as the official code's `expand` / `view` do."""
        return batch

    def logit(self, output, batch):
        """The model output the loss and score read, in float32 (a multiple-choice task regroups it per sample)."""
        return getattr(output, self.output).astype("float32")

    def loss(self, logit, batch):
        raise NotImplementedError

    def scores(self, logit, batch):
        """Per-sample score [B] float32 whose mean is the train metric (the official train log's)."""
        raise NotImplementedError

    def predictions(self, logit, batch, dataset) -> List[dict]:
        """One JSON-able dict per sample of the batch."""
        raise NotImplementedError

    def summarize(self, predictions: List[dict]) -> Dict[str, float]:
        """The split's figures from all its predictions (the task's `metric` among them)."""
        raise NotImplementedError

    def sort_key(self, prediction: dict):
        return prediction[self.id_key]

    # ---- what eval.py prints and writes -------------------------------------------------------------------
    def official_metrics(self, predictions: List[dict], dataset) -> Dict[str, float]:
        """Figures eval.py adds that need more than the predictions (files beside the data); none by default."""
        return {}

    def draw(self, model, dataset, tokenizer, options, count: int, folder: Path) -> None:
        """eval.py --draw: pictures of the first `count` samples."""
        raise OptionsError(f"--draw draws the boxes of referring expressions; {self.title} has none to draw")

    def result_files(self, predictions: List[dict], dataset, stem: Path, options) -> Dict[Path, str]:
        """The files of one evaluated split beside the checkpoint (names start with `stem`) and their contents:
        eval.py prints its table before it writes any of them."""
        raise NotImplementedError

    # ---- what predict.py prints and writes ----------------------------------------------------------------
    def prediction_line(self, query: dict, value: np.ndarray, regions, top_k: int, options) -> dict:
        """The query's own fields, then what the model made of it (`value`: its output for the query, from
        `engine.score_queries`) with the `top_k` best candidates: one JSONL line of predict.py --batch."""
        raise NotImplementedError

    def show_prediction(self, line: dict, regions, args) -> None:
        """predict.py's output for one query (from the flags)."""
        raise NotImplementedError

    def table(self, rows: Sequence[Tuple[str, Dict[str, float], int, List[Path]]]) -> str:
        """The evaluation table of (split, summary, samples, files) rows."""
        raise NotImplementedError


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices [B, k] of the k largest values of each row, largest first (ties: lowest index first): the first k
    of a stable argsort. Rows whose k largest are the only values at or above the k-th (no tie at the k-th, no
    NaN) sort just those k: at VQA's 3,129 answers and eval batch 1,024, 24 ms against the full sort's 240 ms
    (AMD EPYC, AVX2). The other rows take the full sort."""
    k = min(k, values.shape[1])
    at_least = values >= np.partition(values, -k, axis=1)[:, -k, None]
    exact = at_least.sum(axis=1) == k
    chosen = np.nonzero(at_least[exact])[1].reshape(-1, k)  # in index order: ties stay lowest first
    order = np.argsort(-np.take_along_axis(values[exact], chosen, axis=1), axis=1, kind="stable")
    indices = np.empty((len(values), k), dtype=np.int64)
    indices[exact] = np.take_along_axis(chosen, order, axis=1)
    indices[~exact] = np.argsort(-values[~exact], axis=1, kind="stable")[:, :k]
    return indices
