import numpy as np
import paddle
import pytest

from vilbert.config import ViLBertConfig
from vilbert.model import TASK_HEADS, BertEncoder, VILBertForVLTasks

B, T, N = 2, 6, 5


def tiny_config(**changes):
    values = dict(vocab_size=50, hidden_size=24, num_hidden_layers=4, num_attention_heads=3, intermediate_size=32,
                  max_position_embeddings=16, v_feature_size=12, v_hidden_size=20, v_num_hidden_layers=3,
                  v_num_attention_heads=2, v_intermediate_size=28, bi_hidden_size=16, bi_num_attention_heads=4,
                  v_biattention_id=[0, 2], t_biattention_id=[2, 3])
    values.update(changes)
    return ViLBertConfig.from_dict(values)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    text_mask = np.ones((B, T), "int64")
    text_mask[1, 4:] = 0
    region_mask = np.ones((B, N), "int64")
    region_mask[0, 3:] = 0
    return dict(input_txt=paddle.to_tensor(rng.integers(1, 50, (B, T))),
                input_imgs=paddle.to_tensor(rng.standard_normal((B, N, 12)).astype("float32")),
                image_loc=paddle.to_tensor(rng.random((B, N, 5)).astype("float32")),
                token_type_ids=paddle.zeros([B, T], "int64"),
                attention_mask=paddle.to_tensor(text_mask), image_attention_mask=paddle.to_tensor(region_mask))


@pytest.fixture(scope="module")
def model():
    paddle.seed(0)
    model = VILBertForVLTasks(tiny_config())
    model.eval()
    return model


def test_named_outputs_have_each_streams_shape(model):
    out = model(**inputs())
    assert out.vision_logit.shape == [B, N, 1]
    assert out.sequence_output_t.shape == [B, T, 24]
    assert out.sequence_output_v.shape == [B, N, 20]
    assert out.pooled_output_t.shape == out.pooled_output_v.shape == [B, 16]


def test_padded_regions_get_minus_10000_and_do_not_change_the_rest(model):
    x = inputs()
    out = model(**x)
    logit = out.vision_logit.numpy()[..., 0]
    assert (logit[0, 3:] < -9000).all() and (logit[0, :3] > -100).all()
    changed = dict(x)
    feats = x["input_imgs"].numpy().copy()
    feats[0, 3:] += 100.0  # padded regions of sample 0
    ids = x["input_txt"].numpy().copy()
    ids[1, 4:] = 7  # padded tokens of sample 1
    changed.update(input_imgs=paddle.to_tensor(feats), input_txt=paddle.to_tensor(ids))
    again = model(**changed).vision_logit.numpy()[..., 0]
    np.testing.assert_allclose(again[0, :3], logit[0, :3], atol=1e-5)
    np.testing.assert_allclose(again[1], logit[1], atol=1e-5)


def test_init_is_the_official_one():
    model = VILBertForVLTasks(tiny_config(initializer_range=0.5))
    params = dict(model.named_parameters())
    assert abs(float(params["bert.embeddings.word_embeddings.weight"].std()) - 0.5) < 0.05
    assert float(params["bert.encoder.layer.0.attention.self.query.bias"].abs().max()) == 0
    assert float(params["bert.encoder.c_layer.0.biOutput.LayerNorm1.weight"].min()) == 1


def test_parameter_names_are_the_official_ones():
    names = set(VILBertForVLTasks(tiny_config()).state_dict())
    assert "bert.encoder.c_layer.1.biattention.query2.weight" in names
    assert "bert.encoder.v_layer.2.attention.output.LayerNorm.bias" in names
    assert "bert.v_embeddings.image_location_embeddings.weight" in names
    assert "vision_logit.weight" in names
    assert not any("q_dense" in n or n.startswith("cls.") for n in names)


def test_linear_weights_are_in_out():
    params = dict(VILBertForVLTasks(tiny_config()).named_parameters())
    assert params["bert.encoder.c_layer.0.biattention.query2.weight"].shape == [24, 16]  # text -> bi
    assert params["bert.encoder.c_layer.0.biOutput.dense1.weight"].shape == [16, 20]  # bi -> vision


def test_encoder_interleaves_streams_in_the_official_order(monkeypatch):
    encoder = BertEncoder(tiny_config())
    calls = []
    for kind, layers in (("t", encoder.layer), ("v", encoder.v_layer), ("c", encoder.c_layer)):
        for i, layer in enumerate(layers):
            layer.register_forward_post_hook(lambda *_, tag=f"{kind}{i}": calls.append(tag))
    encoder(paddle.zeros([1, 2, 24]), paddle.zeros([1, 3, 20]), paddle.zeros([1, 1, 1, 2]), paddle.zeros([1, 1, 1, 3]))
    # t ids [2, 3], v ids [0, 2]: text 0-1 | c0 | text 2, vision 0-1 | c1 | text 3, vision 2
    assert calls == ["t0", "t1", "c0", "t2", "v0", "v1", "c1", "t3", "v2"]


def test_task_token_adds_one_text_position():
    model = VILBertForVLTasks(tiny_config(task_specific_tokens=True))
    model.eval()
    out = model(**inputs(), task_ids=paddle.full([B, 1], 3, "int64"))
    assert out.sequence_output_t.shape == [B, T + 1, 24]
    assert "bert.embeddings.task_embeddings.weight" in model.state_dict()


def test_dropout_only_in_training(model):
    x = inputs()
    model.train()
    a, b = model(**x).vision_logit.numpy(), model(**x).vision_logit.numpy()
    model.eval()
    c, d = model(**x).vision_logit.numpy(), model(**x).vision_logit.numpy()
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(c, d)


@pytest.mark.filterwarnings("ignore:amp_guard can only be enabled")  # Paddle's own autocast is off on CPU
def test_vision_logit_head_runs_outside_bf16_autocast(model):
    """Under emulated bf16 autocast (tools/bf16_numerics.py) the trunk's matmuls are rounded, the head's are not:
    one number per region ranks the regions, and bf16 ties close candidates."""
    from tools.bf16_numerics import bf16_matmuls

    x = inputs()
    plain = model(**x)
    with bf16_matmuls(), paddle.amp.auto_cast(enable=True, dtype="bfloat16"):
        rounded = model(**x)
    assert not np.allclose(rounded.sequence_output_v.numpy(), plain.sequence_output_v.numpy(), rtol=0, atol=1e-6)
    padding = (1.0 - x["image_attention_mask"].astype("float32")) * -10000.0
    head = model.vision_logit(rounded.sequence_output_v) + padding.unsqueeze(2)  # float32, outside the emulation
    np.testing.assert_array_equal(rounded.vision_logit.numpy(), head.numpy())


def heads_model(classifier="beta", num_labels=7, **changes):
    paddle.seed(0)
    model = VILBertForVLTasks(tiny_config(**changes), heads=TASK_HEADS, num_labels=num_labels, classifier=classifier)
    model.eval()
    return model


def test_default_model_builds_only_vision_logit(model):
    out = model(**inputs())
    assert out.vil_prediction is None and out.vil_logit is None
    assert not any(name.startswith("vil_") for name in model.state_dict())


def test_a_model_without_vision_logit_returns_none_there():
    model = VILBertForVLTasks(tiny_config(), heads=("vil_logit",))
    model.eval()
    out = model(**inputs())
    assert out.vision_logit is None and out.vil_prediction is None and out.vil_logit.shape == [B, 1]
    assert {name for name in model.state_dict() if not name.startswith("bert.")} == {"vil_logit.weight",
                                                                                     "vil_logit.bias"}


@pytest.mark.parametrize("classifier, shapes", [
    ("beta", {"vil_prediction.main.0.weight_g": [], "vil_prediction.main.0.weight_v": [16, 32],
              "vil_prediction.main.0.bias": [32], "vil_prediction.main.3.weight_g": [],
              "vil_prediction.main.3.weight_v": [32, 7], "vil_prediction.main.3.bias": [7]}),
    ("12in1", {"vil_prediction.logit_fc.0.weight": [16, 32], "vil_prediction.logit_fc.0.bias": [32],
               "vil_prediction.logit_fc.2.weight": [32], "vil_prediction.logit_fc.2.bias": [32],
               "vil_prediction.logit_fc.3.weight": [32, 7], "vil_prediction.logit_fc.3.bias": [7]}),
])
def test_each_classifier_has_its_familys_official_names_and_output_shapes(classifier, shapes):
    model = heads_model(classifier)
    state = model.state_dict()
    assert {name: list(value.shape) for name, value in state.items() if name.startswith("vil_prediction.")} == shapes
    assert list(state["vil_logit.weight"].shape) == [16, 1]
    out = model(**inputs())
    assert out.vil_prediction.shape == [B, 7] and out.vil_logit.shape == [B, 1] and out.vision_logit.shape == [B, N, 1]
    assert out.vil_prediction.dtype == out.vil_logit.dtype == paddle.float32


@pytest.mark.parametrize("fusion", ["mul", "sum"])
def test_vil_heads_read_the_fused_pooled_vector(fusion):
    model = heads_model("12in1", fusion_method=fusion)
    out = model(**inputs())
    t, v = out.pooled_output_t, out.pooled_output_v
    pooled = t * v if fusion == "mul" else t + v
    np.testing.assert_allclose(out.vil_logit.numpy(), model.vil_logit(pooled).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.vil_prediction.numpy(), model.vil_prediction(pooled).numpy(), rtol=1e-6,
                               atol=1e-6)


def test_beta_classifier_is_the_weight_normed_mlp_and_starts_at_w_equal_v():
    model = heads_model("beta")
    out = model(**inputs())
    pooled = (out.pooled_output_t * out.pooled_output_v).numpy()
    first, last = model.vil_prediction.main[0], model.vil_prediction.main[3]
    for layer in (first, last):  # the official init: g = ||v||, zero bias
        assert abs(float(layer.weight_g) - np.linalg.norm(layer.weight_v.numpy())) < 1e-5
        assert not layer.bias.numpy().any()
    with paddle.no_grad():
        last.weight_g.set_value(np.array(2.0, "float32"))
        last.bias.set_value(np.arange(7, dtype="float32"))
    weight = [layer.weight_g.numpy() * layer.weight_v.numpy() / np.linalg.norm(layer.weight_v.numpy())
              for layer in (first, last)]
    expected = np.maximum(pooled @ weight[0] + first.bias.numpy(), 0) @ weight[1] + last.bias.numpy()
    np.testing.assert_allclose(model(**inputs()).vil_prediction.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_only_betas_classifier_has_dropout():
    """beta's head drops half its hidden units in training; 12-in-1's has no dropout (its argument is unused)."""
    off = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, v_hidden_dropout_prob=0.0,
               v_attention_probs_dropout_prob=0.0)
    for classifier, varies in (("beta", True), ("12in1", False)):
        paddle.seed(0)
        model = VILBertForVLTasks(tiny_config(**off), heads=TASK_HEADS, num_labels=7, classifier=classifier,
                                  dropout_prob=0.0)
        model.train()
        x = inputs()
        a, b = model(**x).vil_prediction.numpy(), model(**x).vil_prediction.numpy()
        assert (not np.array_equal(a, b)) == varies, classifier


def test_unknown_heads_and_a_classifier_without_answers_are_refused():
    with pytest.raises(ValueError, match="unknown task head"):
        VILBertForVLTasks(tiny_config(), heads=("vil_binary_prediction",))
    with pytest.raises(ValueError, match="num_labels"):
        VILBertForVLTasks(tiny_config(), heads=("vil_prediction",))
    with pytest.raises(ValueError, match="classifier"):
        VILBertForVLTasks(tiny_config(), heads=("vil_prediction",), num_labels=3, classifier="lxmert")


@pytest.mark.filterwarnings("ignore:amp_guard can only be enabled")
@pytest.mark.parametrize("classifier", ["beta", "12in1"])
def test_vil_heads_run_outside_bf16_autocast(classifier):
    from tools.bf16_numerics import bf16_matmuls

    model = heads_model(classifier)
    with bf16_matmuls(), paddle.amp.auto_cast(enable=True, dtype="bfloat16"):
        rounded = model(**inputs())
    pooled = rounded.pooled_output_t * rounded.pooled_output_v  # float32, outside the emulation
    np.testing.assert_array_equal(rounded.vil_prediction.numpy(), model.vil_prediction(pooled).numpy())
    np.testing.assert_array_equal(rounded.vil_logit.numpy(), model.vil_logit(pooled).numpy())
