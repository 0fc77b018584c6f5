"""Run options: YAML defaults, flags on top, typed checks, and the run's own config.yaml for eval."""

import dataclasses

import re

import pytest
import yaml

from vilbert.options import (DEFAULT_TASK_CONFIG, DEMO_TASK_CONFIG, OptionsError, RunOptions, build_parser,
                             load_task_config, parse_options)


def parse(argv, **kwargs):
    return parse_options(build_parser("test"), argv, **kwargs)[0]


def write_yaml(path, values: dict):
    path.write_text(yaml.safe_dump(values))
    return path


def test_yaml_gives_the_defaults(tmp_path):
    task = write_yaml(tmp_path / "task.yml", {"batch_size": 12, "learning_rate": 3.0e-4, "lr_milestones": [2],
                                              "feature_cache": False, "dataroot": "somewhere"})
    options = parse(["--task_config", str(task)])
    assert (options.batch_size, options.learning_rate, options.lr_milestones, options.feature_cache,
            options.dataroot) == (12, 3.0e-4, [2], False, "somewhere")
    assert options.num_train_epochs == RunOptions().num_train_epochs  # keys the YAML leaves out: dataclass defaults


def test_shipped_task_configs_load_as_documented():
    shipped = parse([])
    assert shipped == RunOptions(**load_task_config(DEFAULT_TASK_CONFIG))
    assert (shipped.batch_size, shipped.learning_rate, shipped.lr_milestones) == (256, 4e-5, [12, 16])
    demo = parse(["--demo"])
    assert demo == RunOptions(**load_task_config(DEMO_TASK_CONFIG)) and demo.config_file == "config/vilbert_demo.json"


def test_a_flag_overrides_the_yaml(tmp_path):
    task = write_yaml(tmp_path / "task.yml", {"batch_size": 12, "amp": "bf16", "learning_rate": 3.0e-4})
    options = parse(["--task_config", str(task), "--batch_size", "6", "--amp", "off", "--learning_rate", "1e-2"])
    assert (options.batch_size, options.amp, options.learning_rate) == (6, "off", 1e-2)


@pytest.mark.parametrize("in_yaml", [True, False])
def test_boolean_flags_go_both_ways(tmp_path, in_yaml):
    task = write_yaml(tmp_path / "task.yml", {"feature_cache": in_yaml})
    assert parse(["--task_config", str(task)]).feature_cache is in_yaml
    assert parse(["--task_config", str(task), "--feature_cache"]).feature_cache is True
    assert parse(["--task_config", str(task), "--no-feature_cache"]).feature_cache is False


def test_boolean_flag_takes_no_value():
    with pytest.raises(SystemExit):  # `--feature_cache false` would be True with type=bool: refused instead
        parse(["--feature_cache", "false"])


def test_list_flags_take_several_typed_values():
    options = parse(["--lr_milestones", "3", "4", "--head_patterns", "vision_logit", "vil_"])
    assert options.lr_milestones == [3, 4] and options.head_patterns == ["vision_logit", "vil_"]
    with pytest.raises(SystemExit):
        parse(["--lr_milestones", "three"])


def test_unknown_yaml_key_is_an_error(tmp_path):
    task = write_yaml(tmp_path / "task.yml", {"bach_size": 12, "learning_rate": 1.0e-3})
    with pytest.raises(OptionsError, match=r"task\.yml: unknown key 'bach_size'"):
        parse(["--task_config", str(task)])


@pytest.mark.parametrize("key, value, expected", [
    ("batch_size", "32", "int"), ("batch_size", 3.5, "int"), ("feature_cache", "yes please", "bool"),
    ("learning_rate", "1e-3", "float"),  # YAML 1.1 reads 1e-3 (no dot) as a string
    ("lr_milestones", 12, "a list of ints"), ("lr_milestones", [12, "16"], "a list of ints"),
])
def test_ill_typed_yaml_value_is_an_error(tmp_path, key, value, expected):
    task = write_yaml(tmp_path / "task.yml", {key: value})
    with pytest.raises(OptionsError, match=rf"{key}={re.escape(repr(value))} should be {expected}"):
        parse(["--task_config", str(task)])


def test_an_int_is_a_valid_float(tmp_path):
    options = parse(["--task_config", str(write_yaml(tmp_path / "task.yml", {"learning_rate": 1}))])
    assert options.learning_rate == 1.0 and isinstance(options.learning_rate, float)


def test_missing_or_broken_task_config_says_so(tmp_path):
    with pytest.raises(OptionsError, match="not found"):
        parse(["--task_config", str(tmp_path / "nope.yml")])
    (tmp_path / "broken.yml").write_text("batch_size: [1, 2\n")
    with pytest.raises(OptionsError, match="not valid YAML"):
        parse(["--task_config", str(tmp_path / "broken.yml")])
    (tmp_path / "list.yml").write_text("- 1\n- 2\n")
    with pytest.raises(OptionsError, match="must be a mapping"):
        parse(["--task_config", str(tmp_path / "list.yml")])
    (tmp_path / "binary.yml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(OptionsError, match=r"binary.yml is not a text file \(byte 0 is not UTF-8\)"):
        parse(["--task_config", str(tmp_path / "binary.yml")])
    (tmp_path / "empty.yml").write_text("")
    with pytest.raises(OptionsError, match="empty.yml is empty: give a YAML file of option: value"):
        parse(["--task_config", str(tmp_path / "empty.yml")])
    for name in ("broken", "binary", "empty"):  # one line each
        with pytest.raises(OptionsError) as raised:
            parse(["--task_config", str(tmp_path / f"{name}.yml")])
        assert "\n" not in str(raised.value)


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "6", "--gradient_accumulation_steps", "4"], "not a multiple of gradient_accumulation_steps"),
    (["--amp", "fp8"], "must be off, bf16 or fp16"),
    (["--tokenization", "bert"], "tokenization=.bert. must be one of beta, 12in1"),
    (["--num_train_epochs", "0"], "num_train_epochs=0 must be >= 1"),
    (["--warmup_proportion", "1.5"], r"warmup_proportion=1.5 must be in \[0, 1\]"),
    (["--gradient_accumulation_steps", "0"], "^gradient_accumulation_steps=0 must be >= 1$"),
    (["--learning_rate", "-1"], "^learning_rate=-1.0 must be > 0$"),
    (["--head_learning_rate", "0"], "^head_learning_rate=0.0 must be > 0$"),
    (["--learning_rate", "nan"], "^learning_rate=nan must be > 0$"),
    (["--weight_decay", "-0.01"], "^weight_decay=-0.01 must be >= 0$"),
    (["--device", "tpu"], "^device='tpu' must be auto, gpu or cpu$"),
])
def test_values_are_validated(argv, message):
    with pytest.raises(OptionsError, match=message):
        parse(argv)


def test_resolved_options_round_trip_through_config_yaml(tmp_path):
    options = parse(["--demo", "--batch_size", "4", "--no-feature_cache", "--lr_milestones", "1", "2"])
    (tmp_path / "config.yaml").write_text(options.to_yaml())
    assert RunOptions(**load_task_config(tmp_path / "config.yaml")) == options


def test_eval_reads_the_config_beside_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trained = dataclasses.replace(RunOptions(), batch_size=4, max_region_num=37, config_file="elsewhere.json")
    (run_dir / "config.yaml").write_text(trained.to_yaml())
    checkpoint = ["--from_pretrained", str(run_dir / "best.pdparams")]
    beside = parse(checkpoint, config_beside_checkpoint=True)
    assert beside == dataclasses.replace(trained, from_pretrained=str(run_dir / "best.pdparams"))
    assert parse(checkpoint + ["--max_region_num", "50"], config_beside_checkpoint=True).max_region_num == 50
    # --task_config wins over the run's config.yaml; train.py (no config_beside_checkpoint) never reads it
    explicit = parse(checkpoint + ["--task_config", str(DEFAULT_TASK_CONFIG)], config_beside_checkpoint=True)
    assert explicit.max_region_num == 100 and explicit.config_file == RunOptions().config_file
    assert parse(checkpoint).max_region_num == 100
    # a checkpoint outside a run directory (e.g. an official .bin) falls back to the default task config
    assert parse(["--from_pretrained", str(tmp_path / "x.bin")], config_beside_checkpoint=True).batch_size == 256
