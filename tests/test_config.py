import json

import pytest

from vilbert.config import ConfigError, ViLBertConfig


@pytest.mark.parametrize("name", ["bert_base_2layer_2conect", "bert_base_4layer_4conect", "bert_base_6layer_6conect",
                                  "bert_base_8layer_8conect", "bert_large_2layer_2conect", "bert_large_4layer_4conect",
                                  "bert_large_6layer_6conect", "vilbert_demo"])
def test_shipped_configs_load(name):
    config = ViLBertConfig.from_json(f"config/{name}.json")
    assert len(config.v_biattention_id) == len(config.t_biattention_id)


def test_official_values_and_ignored_keys():
    config = ViLBertConfig.from_json("config/bert_base_6layer_6conect.json")
    assert (config.hidden_size, config.v_hidden_size, config.bi_hidden_size) == (768, 1024, 1024)
    assert config.t_biattention_id == [6, 7, 8, 9, 10, 11]
    assert config.fusion_method == "mul"  # `pooling_method` in the JSON is read by nothing
    assert not hasattr(config, "pooling_method")


def _write(tmp_path, **changes):
    values = json.load(open("config/bert_base_6layer_6conect.json"))
    values.update(changes)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(values))
    return path


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'hiden_size'"):
        ViLBertConfig.from_json(_write(tmp_path, hiden_size=10))


def test_ill_typed_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="hidden_size='768' should be int"):
        ViLBertConfig.from_json(_write(tmp_path, hidden_size="768"))
    with pytest.raises(ConfigError, match="v_biattention_id"):
        ViLBertConfig.from_json(_write(tmp_path, v_biattention_id=[0, "1"]))


def test_unsupported_variant_is_an_error_but_its_default_is_accepted(tmp_path):
    assert ViLBertConfig.from_json(_write(tmp_path, fast_mode=False)).hidden_size == 768
    with pytest.raises(ConfigError, match="fast_mode=True is not supported"):
        ViLBertConfig.from_json(_write(tmp_path, fast_mode=True))


def test_structure_is_validated_from_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not a multiple"):
        ViLBertConfig.from_json(_write(tmp_path, v_num_attention_heads=7))
    with pytest.raises(ConfigError, match="equal length"):
        ViLBertConfig.from_json(_write(tmp_path, t_biattention_id=[10, 11]))
    with pytest.raises(ConfigError, match="t_biattention_id"):
        ViLBertConfig.from_json(_write(tmp_path, t_biattention_id=[7, 8, 9, 10, 11, 12]))


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config/"):
        ViLBertConfig.from_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ViLBertConfig.from_json(tmp_path / "bad.json")
