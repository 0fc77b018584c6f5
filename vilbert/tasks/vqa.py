"""VQA 2.0: task type "VL-classifier" of both official codebases (vilbert_beta TASK0, 12-in-1 TASK1).

The model classifies the pooled pair (`vil_prediction`, beta's weight-normed or 12-in-1's GeLU/LayerNorm MLP)
over the answer vocabulary of `cache/trainval_ans2label.pkl`; the loss is BCE against the soft targets times
the vocabulary size, and the score is the soft target of the argmax answer (the official "accuracy", the
bottom-up-attention one on cached targets). `eval.py` also writes the EvalAI results file and, where the split's
human answers are on disk (`v2_mscoco_val2014_annotations.json`), prints the official VQA accuracy.
"""

import functools
import json
from pathlib import Path
from typing import Dict, List

import numpy as np

from .. import vqa_data
from ..features import open_features
from ..metrics import vqa_loss, vqa_score
from ..vqa_answers import read_annotations, vqa_accuracy
from ..vqa_dataset import VQADataset
from ..vqa_demo_data import COMPLETE_MARKER, make_vqa_demo
from .base import Task, top_k

TOP_K = 8  # answers kept per question: beta's `<split>_others.json` holds the top 8


class VQATask(Task):
    name = "vqa"
    title = "VQA 2.0"
    datasets = ("vqa",)
    output = "vil_prediction"
    metric = "score"
    unit = "questions"
    id_key = "question_id"
    text_field = "question"
    predicted = "answered"
    configs = ("vqa.yml", "demo_vqa.yml")

    def validate(self, options) -> List[str]:
        problems = []
        if options.dataset not in self.datasets:
            problems.append(f"dataset={options.dataset!r}: the VQA task's dataset is vqa")
        for name in ("train_split", "val_split"):
            if getattr(options, name) not in vqa_data.SPLITS:
                problems.append(f"{name}={getattr(options, name)!r}: VQA's splits are {', '.join(vqa_data.SPLITS)}")
        if options.classifier not in ("beta", "12in1"):
            problems.append(f"classifier={options.classifier!r} must be beta (vilbert_beta's weight-normed MLP) or "
                            "12in1 (12-in-1's GeLU + LayerNorm MLP)")
        return problems

    def eval_splits(self, options, split: str) -> List[str]:
        splits = ["minval"] if split == "all" else [split]
        for name in splits:
            vqa_data.check_split(name)
        return splits

    def build_dataset(self, options, split: str, tokenizer) -> VQADataset:
        if split == "test":
            if not options.features_test:
                raise vqa_data.VQADataError("VQA's test split (test2015) has its own feature LMDB: set "
                                            "--features_test (config/vqa.yml names coco_test_resnet101_...lmdb)")
            lmdb = options.features_test
        else:
            lmdb = options.features_h5path1
        features = open_features(options.data_path(lmdb), cache=options.feature_cache,
                                 build=options.build_feature_cache)
        return VQADataset(options.dataroot, split, tokenizer, features, max_seq_length=options.max_seq_length,
                          max_region_num=options.max_region_num, tokenization=options.tokenization)

    def model_heads(self, options) -> Dict:
        return {"heads": ("vil_prediction",), "num_labels": len(_label2ans(options.dataroot)),
                "classifier": options.classifier}

    def data_marker(self, options) -> Path:
        return Path(options.dataroot, COMPLETE_MARKER)

    def download_args(self, options) -> str:
        return "--task vqa"

    def make_demo_data(self, options) -> None:
        make_vqa_demo(Path(options.dataroot).parent)

    def loss(self, logit, batch):
        return vqa_loss(logit, batch["target"])

    def scores(self, logit, batch):
        return vqa_score(logit, batch["target"])

    def predictions(self, logit, batch, dataset) -> List[dict]:
        """Per question: the answer (argmax), its soft score, the best soft score any answer has (the upper
        bound), and the top answers with their sigmoid probabilities (each answer is its own binary decision)."""
        score = vqa_score(logit, batch["target"]).numpy()
        best = batch["target"].max(axis=1).numpy()
        ranked = answers_of(logit.numpy(), dataset.label2ans, TOP_K)
        ids, images = batch["question_id"].numpy(), batch["image_id"].numpy()
        return [{"question_id": int(ids[i]), "image_id": int(images[i]), "answer": ranked[i][0][0],
                 "soft_score": float(score[i]), "upper_bound": float(best[i]),
                 "top_k": [{"answer": answer, "prob": round(prob, 4)} for answer, prob in ranked[i]]}
                for i in range(len(ids))]

    def summarize(self, predictions: List[dict]) -> Dict[str, float]:
        """score: the mean soft score (the official VQA "accuracy" of both codebases); upper_bound: the mean of
        the best soft score per question (answers outside the vocabulary cap it below 1)."""
        n = max(len(predictions), 1)
        return {"score": sum(p["soft_score"] for p in predictions) / n,
                "upper_bound": sum(p["upper_bound"] for p in predictions) / n}

    def official_metrics(self, predictions: List[dict], dataset) -> Dict[str, float]:
        """vqa_accuracy, the official VQA accuracy (vqaEval.py: min(#humans/3, 1) over the 10 leave-one-out
        subsets, answers normalised), when the human answers of every part of the split are on disk."""
        parts = [part for part, _ in vqa_data.SPLIT_PARTS[dataset.split]]
        paths = [Path(dataset.dataroot, vqa_data.ANNOTATION_FILES[p]) for p in parts if p in vqa_data.ANNOTATION_FILES]
        if len(paths) != len(parts) or not all(path.is_file() for path in paths):
            return {}
        annotations = {}
        for path in paths:
            annotations.update(read_annotations(path))
        predicted = {p["question_id"]: p["answer"] for p in predictions}
        return {"vqa_accuracy": vqa_accuracy(predicted, annotations)["overall"]}

    def result_files(self, predictions, dataset, stem: Path, options) -> Dict[Path, str]:
        """Ours (every field), the EvalAI results file (a list of {question_id, answer}, every question of the
        split once) and beta's `<split>_others.json` (the top 8 answers per question)."""
        files = {"predictions": predictions,
                 "result": [{"question_id": p["question_id"], "answer": p["answer"]} for p in predictions],
                 "others": [{"question_id": p["question_id"], "answer": [a["answer"] for a in p["top_k"]]}
                            for p in predictions]}
        return {stem.with_name(f"{stem.name}_{name}.json"): json.dumps(content) for name, content in files.items()}

    def prediction_line(self, query: dict, value, regions, top_k: int, options) -> dict:
        """The answer and its probability, and the top_k best answers."""
        best = [{"answer": answer, "prob": round(prob, 4)}
                for answer, prob in answers_of(value[None], _label2ans(options.dataroot), top_k)[0]]
        return {**query, **best[0], "top_k": best}

    def show_prediction(self, line: dict, regions, args) -> None:
        print(f'"{line["question"]}" on image {line["image_id"]}: {line["answer"]} (probability {line["prob"]:.3f})')
        for rank, candidate in enumerate(line["top_k"], 1):
            print(f"  #{rank}  {candidate['prob']:.3f}  {candidate['answer']}")

    def table(self, rows) -> str:
        lines = [f"{'split':<9}{'score':>8}{'VQA acc':>9}{'questions':>11}{'upper bound':>13}  results (EvalAI)"]
        for split, summary, count, files in rows:
            if split == "test":  # no answers: only the results file means something
                lines.append(f"{split:<9}{'-':>8}{'-':>9}{count:>11d}{'-':>13}  {files[1]}")
                continue
            official = summary.get("vqa_accuracy")
            lines.append(f"{split:<9}{summary['score']:>8.4f}{'-' if official is None else f'{official:.4f}':>9}"
                         f"{count:>11d}{summary['upper_bound']:>13.4f}  {files[1]}")
        return "\n".join(lines)


@functools.lru_cache(maxsize=4)
def _label2ans(dataroot: str) -> List[str]:
    return vqa_data.read_answer_vocab(dataroot)[1]


def answers_of(logit: np.ndarray, label2ans: List[str], k: int) -> List[List[tuple]]:
    """The top `k` (answer, sigmoid probability) of each row of [B, num_labels] logits, ranked by logit (the sigmoid
    rounds large ones to a tie at 1.0): what eval.py's predictions and predict.py list."""
    ranked = top_k(logit, k)
    probs = 1.0 / (1.0 + np.exp(-np.take_along_axis(logit, ranked, axis=1).astype(np.float64)))
    return [[(label2ans[j], float(p)) for j, p in zip(row, row_probs)] for row, row_probs in zip(ranked, probs)]
