"""What follows from --dataset: one table (vilbert/refer_datasets.py), the shipped configs agreeing with it,
and flags or config values chosen on purpose staying as given."""

import pytest

from vilbert.options import PROJECT_ROOT, OptionsError, build_parser, load_task_config, parse_options
from vilbert.refer_datasets import DATASETS, UnknownSplitError, check_split, feature_files


def parse(argv):
    return parse_options(build_parser("test"), argv)[0]


@pytest.mark.parametrize("config, dataset", [("refcoco.yml", "refcoco"), ("refcoco+_12in1.yml", "refcoco+"),
                                             ("refcocog.yml", "refcocog")])
def test_12in1_configs_agree_with_the_table(config, dataset):
    values = load_task_config(PROJECT_ROOT / "config" / config)
    spec = DATASETS[dataset]
    assert values["dataset"] == dataset and values["splitBy"] == spec.splitBy
    assert values["task_id"] == spec.task_id_12in1  # vilbert_tasks.yml TASK9 / 10 / 11
    assert (values["features_h5path1"], values["features_h5path2"]) == feature_files(dataset, "12in1")
    assert (values["max_region_num"], values["tokenization"], values["dataroot"]) == (101, "12in1", "datasets/refcoco")


def test_dataset_flag_moves_what_follows_from_it():
    options = parse(["--dataset", "refcocog"])  # config/refcoco+.yml, vilbert_beta naming
    assert (options.splitBy, options.features_h5path1, options.features_h5path2, options.save_name) == (
        "umd", "refcocog_resnet101_faster_rcnn_genome.lmdb", "refcocog_gt_resnet101_faster_rcnn_genome.lmdb",
        "refcocog_bert_base_6layer_6conect")
    assert options.task_id == 0  # no task tokens in this config
    twelve = parse(["--task_config", "config/refcoco+_12in1.yml", "--dataset", "refcoco"])
    assert (twelve.splitBy, twelve.task_id, twelve.features_h5path1, twelve.save_name) == (
        "unc", 9, "refcoco_unc/refcoco_resnext152_faster_rcnn_genome.lmdb", "refcoco_12in1")
    demo = parse(["--demo", "--dataset", "refcocog"])
    assert (demo.dataroot, demo.save_name, demo.features_h5path1) == (
        "data/demo", "demo_refcocog", "refcocog_resnet101_faster_rcnn_genome.lmdb")


def test_explicit_flags_and_custom_config_values_stay(tmp_path):
    options = parse(["--dataset", "refcocog", "--features_h5path1", "mine.lmdb", "--save_name", "run",
                     "--splitBy", "google"])
    assert (options.features_h5path1, options.save_name, options.splitBy) == ("mine.lmdb", "run", "google")
    assert options.features_h5path2 == "refcocog_gt_resnet101_faster_rcnn_genome.lmdb"
    task = tmp_path / "task.yml"
    task.write_text("dataset: refcoco+\nfeatures_h5path1: /data/own_features.lmdb\n")
    assert parse(["--task_config", str(task), "--dataset", "refcoco"]).features_h5path1 == "/data/own_features.lmdb"


def test_unknown_dataset_split_scheme_or_split_is_one_error():
    with pytest.raises(OptionsError, match="dataset='refclef' must be one of refcoco, refcoco\\+, refcocog"):
        parse(["--dataset", "refclef"])
    with pytest.raises(OptionsError, match="splitBy='umd': refcoco\\+ has unc"):
        parse(["--splitBy", "umd"])
    with pytest.raises(OptionsError, match="val_split: refcocog \\(umd\\) has no split 'testA'; its splits are "
                                           "train, val, test"):
        parse(["--dataset", "refcocog", "--val_split", "testA"])
    with pytest.raises(UnknownSplitError, match="refcoco\\+ \\(unc\\) has no split 'testC'; its splits are train, "
                                                "val, testA, testB"):
        check_split("refcoco+", "testC")


def test_refcocog_trains_and_evaluates_end_to_end(tmp_path, capsys):
    import eval as eval_script
    import train
    from training_support import run_flags
    from vilbert.demo_data import make_demo_dataset

    root = make_demo_dataset(tmp_path / "data", dataset="refcocog", seed=0, num_train_images=8, num_val_images=4,
                             num_test_images=3)
    train.main(["--demo"] + run_flags(root, tmp_path / "out", num_train_epochs=1) + ["--dataset", "refcocog"])
    printed = capsys.readouterr().out
    assert "Epoch 0 done!" in printed
    run_dir = tmp_path / "out" / "run"
    assert "dataset: refcocog\nsplitBy: umd\n" in (run_dir / "config.yaml").read_text()
    eval_script.main(["--from_pretrained", str(run_dir / "best.pdparams"), "--split", "all"])
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith(("val ", "test "))]
    assert rows == ["val", "test"]
