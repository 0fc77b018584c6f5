"""`--help` of the entry scripts: the docstring's examples one per line, a help text on every flag, no
"(default: None)", and only the flags the script uses (eval.py and predict.py offer no training options); and
predict.py's other user-facing edges: its missing-file errors and where its picture goes."""

import argparse
import dataclasses
import re
import sys

import paddle
import pytest

import eval as eval_script
import predict
import train
from training_support import DEMO_TASK, PROJECT, TEST_MODEL, make_tiny_root
from vilbert.checkpoint import save_checkpoint
from vilbert.config import ViLBertConfig
from vilbert.demo_data import DETECTED_LMDB
from vilbert.features import ImageFeaturesReader
from vilbert.model import VILBertForVLTasks
from vilbert.options import EVAL, PREDICT, TRAIN, RunOptions, build_parser, parse_options

SCRIPTS = {TRAIN: train, EVAL: eval_script, PREDICT: predict}
FLAG_LINE = re.compile(r"^  (-\S+.*?)(?:\s{2,}(\S.*))?$")  # "  --flag METAVAR   help", help maybe on the next line


def help_of(module, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def flags_without_help(text: str) -> list:
    """The flag lines of a --help text that have no help after them, on the line or the next one."""
    lines = text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        match = FLAG_LINE.match(line)
        if not match:
            continue
        after = lines[i + 1] if i + 1 < len(lines) else ""
        if not match.group(2) and not re.match(r"^ {10,}\S", after):
            missing.append(match.group(1))
    return missing


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_the_examples_one_per_line(script, capsys, monkeypatch):
    text = help_of(SCRIPTS[script], capsys, monkeypatch)
    examples = [line for line in SCRIPTS[script].__doc__.splitlines() if line.lstrip().startswith("python ")]
    assert len(examples) >= 3
    for example in examples:
        assert example in text.splitlines(), example


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_a_help_text_and_no_default_none(script, capsys, monkeypatch):
    text = help_of(SCRIPTS[script], capsys, monkeypatch)
    assert flags_without_help(text) == []
    assert "(default: None)" not in text and "default: None" not in text
    assert text.count("--task_config") >= 2 and "(default: the --task's" in text


def test_the_flag_check_catches_a_flag_without_help():
    text = "options:\n  --bare N\n  --documented N       says what it does\n  --long_one LONG_METAVAR\n" \
           "                        on the next line\n"
    assert flags_without_help(text) == ["--bare N"]


@pytest.mark.parametrize("script", [EVAL, PREDICT])
def test_eval_and_predict_offer_no_training_flags(script, capsys, monkeypatch):
    text = help_of(SCRIPTS[script], capsys, monkeypatch)
    for flag in ("--learning_rate", "--resume", "--num_train_epochs", "--batch_size", "--output_dir",
                 "--save_name", "--lr_milestones", "--gradient_accumulation_steps", "--train_split"):
        assert not re.search(rf"{flag}\b", text), flag
    for flag in ("--from_pretrained", "--eval_batch_size", "--device", "--max_region_num", "--dataroot"):
        assert flag in text


def offered(parser) -> set:
    return {a.dest for a in parser._actions if a.help is not argparse.SUPPRESS}


def test_train_offers_every_option_but_the_test_features():
    flags = offered(build_parser("", TRAIN))
    assert {f.name for f in dataclasses.fields(RunOptions)} - flags == {"features_test"}  # only eval.py scores test


def test_every_option_has_help_and_names_its_scripts():
    for f in dataclasses.fields(RunOptions):
        assert f.metadata["help"] and f.metadata["used_by"] and f.metadata["used_by"] <= {TRAIN, EVAL, PREDICT}


def test_an_option_not_offered_still_comes_from_the_config_and_is_accepted(tmp_path):
    (tmp_path / "task.yml").write_text("learning_rate: 3.0e-4\nbatch_size: 12\n")
    flags = ["--task_config", str(tmp_path / "task.yml")]
    options, _ = parse_options(build_parser("", EVAL), flags)
    assert (options.learning_rate, options.batch_size) == (3.0e-4, 12)
    # a training command line's flags still parse (hidden, not refused): eval.py can be given the same flags
    options, _ = parse_options(build_parser("", EVAL), flags + ["--batch_size", "6", "--resume", "auto"])
    assert (options.batch_size, options.resume) == (6, "auto")


def test_build_parser_without_a_script_offers_every_flag():  # selfcheck.py and tools/dump_samples.py
    flags = offered(build_parser(""))
    assert {f.name for f in dataclasses.fields(RunOptions)} <= flags
    with pytest.raises(ValueError, match="script='fit'"):
        build_parser("", "fit")


# ---- predict.py: its missing files, and where its picture goes ------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny data root and random weights of the tiny model in a checkpoint folder of their own."""
    folder = tmp_path_factory.mktemp("predict")
    paddle.seed(0)
    checkpoint = save_checkpoint(VILBertForVLTasks(ViLBertConfig.from_json(TEST_MODEL)).state_dict(),
                                 folder / "ckpt" / "weights.pdparams")
    return make_tiny_root(folder / "root"), checkpoint


def predict_flags(root, checkpoint, *extra):
    return ["--task_config", str(DEMO_TASK), "--dataroot", str(root), "--config_file", str(TEST_MODEL),
            "--from_pretrained", str(checkpoint), "--device", "cpu", *map(str, extra)]


@pytest.mark.parametrize("extra, expected", [
    (("--image_id", 1, "--expression", "dog", "--image", "nope.jpg"),
     "error: --image nope.jpg not found; give the photo"),
    (("--batch", "nope.jsonl"), 'error: --batch nope.jsonl not found; give a JSONL file of {"image_id": ...'),
])
def test_predict_missing_files_are_one_line_errors(tiny, capsys, extra, expected):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(predict_flags(*tiny, *extra))
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith(expected) and "\n" not in message, message
    assert "usage:" not in capsys.readouterr().err


def test_predict_draws_beside_the_checkpoint_by_default(tiny, monkeypatch, tmp_path):
    root, checkpoint = tiny
    monkeypatch.chdir(tmp_path)  # not into the working directory
    image_id = next(iter(ImageFeaturesReader(str(root / DETECTED_LMDB)).image_ids))
    predict.main(predict_flags(root, checkpoint, "--image_id", image_id, "--expression", "red dog"))
    assert (checkpoint.parent / f"prediction_{image_id}.png").is_file() and not list(tmp_path.iterdir())


def test_make_demo_data_help_keeps_its_continued_example(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(PROJECT / "tools"))
    import make_demo_data

    with pytest.raises(SystemExit):
        make_demo_data.main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.endswith("--num_val_images 1500 \\") for line in lines)
    assert any(line.lstrip().startswith("--num_test_images 750 --max_detections 100") for line in lines)
    assert flags_without_help("\n".join(lines)) == []
