"""BertAdam, the LR schedule and the parameter groups against vilbert_beta's behaviour (model_spec.md §7.1).

`tests/data/bertadam_reference.npz` was produced by the OFFICIAL beta BertAdam + LambdaLR (torch) on fixed gradients
by `tools/make_optimizer_reference.py`; here the same gradients are replayed through our Paddle BertAdam.
"""
from pathlib import Path

import numpy as np
import paddle
import pytest

from vilbert import optimization
from vilbert.optimization import BertAdam, build_param_groups, describe_param_groups, lr_at

REFERENCE = Path(__file__).parent / 'data' / 'bertadam_reference.npz'
BETA = dict(base_lr=4e-5, t_total=1000, warmup=0.1, milestones=(12, 16), gamma=0.1)


def test_lr_at_warmup_uses_count_before_the_update():
    assert lr_at(0, 0, **BETA) == 0.0                       # the very first update has lr 0
    assert lr_at(50, 0, **BETA) == pytest.approx(2e-5)      # halfway through 10% of 1000 updates
    assert lr_at(99, 0, **BETA) == pytest.approx(3.96e-5)
    assert lr_at(100, 0, **BETA) == 4e-5                    # progress 0.1 is not < 0.1: warmup over
    assert lr_at(900, 0, **BETA) == 4e-5                    # warmup_constant: no decay within an epoch


def test_lr_at_epoch_milestones():
    assert lr_at(500, 11, **BETA) == 4e-5
    assert lr_at(500, 12, **BETA) == pytest.approx(4e-6, rel=1e-12)
    assert lr_at(500, 15, **BETA) == pytest.approx(4e-6, rel=1e-12)
    assert lr_at(500, 16, **BETA) == pytest.approx(4e-7, rel=1e-12)
    assert lr_at(999, 19, **BETA) == pytest.approx(4e-7, rel=1e-12)
    assert lr_at(50, 12, **BETA) == pytest.approx(2e-6, rel=1e-12)  # both factors multiply


@pytest.mark.parametrize('bad', [dict(t_total=0), dict(warmup=1.0), dict(warmup=-0.1)])
def test_lr_at_rejects_bad_schedule(bad):
    with pytest.raises(ValueError):
        lr_at(0, 0, **{**BETA, **bad})


def _named(names, shape=(2,)):
    return [(name, paddle.create_parameter(list(shape), 'float32')) for name in names]


def test_build_param_groups_follows_beta_substring_rules():
    names = ['bert.embeddings.word_embeddings.weight', 'bert.embeddings.LayerNorm.weight',
             'bert.encoder.c_layer.0.biOutput.LayerNorm1.weight', 'bert.encoder.c_layer.0.biOutput.LayerNorm1.bias',
             'bert.encoder.c_layer.0.biattention.query1.weight', 'bert.encoder.c_layer.0.biattention.query1.bias',
             'vil_prediction.main.0.weight_v', 'vil_prediction.main.0.bias', 'vision_logit.weight', 'vision_logit.bias']
    groups = build_param_groups(_named(names), base_lr=4e-5, head_lr=1e-4)
    got = {name: (g['lr'], g['weight_decay']) for g in groups for name in g['names']}
    assert got == {
        'bert.embeddings.word_embeddings.weight': (4e-5, 0.0),
        'bert.embeddings.LayerNorm.weight': (4e-5, 0.01),
        'bert.encoder.c_layer.0.biOutput.LayerNorm1.weight': (4e-5, 0.0),   # matches no decay substring
        'bert.encoder.c_layer.0.biOutput.LayerNorm1.bias': (4e-5, 0.01),    # through 'bias'
        'bert.encoder.c_layer.0.biattention.query1.weight': (4e-5, 0.0),    # 'biattention' is not 'bias'
        'bert.encoder.c_layer.0.biattention.query1.bias': (4e-5, 0.01),
        'vil_prediction.main.0.weight_v': (1e-4, 0.0),
        'vil_prediction.main.0.bias': (1e-4, 0.01),
        'vision_logit.weight': (4e-5, 0.0),                                # beta: the REC head at the base lr
        'vision_logit.bias': (4e-5, 0.01),
    }
    assert [(g['lr'], g['weight_decay']) for g in groups] == [(4e-5, 0.0), (4e-5, 0.01), (1e-4, 0.0), (1e-4, 0.01)]
    for g in groups:
        assert len(g['params']) == len(g['names'])


def test_build_param_groups_patterns_are_config_and_frozen_or_shared_params_are_left_out():
    named = _named(['bert.frozen.weight', 'bert.shared.weight', 'vision_logit.bias'])
    (_, frozen), (_, shared), (_, head) = named
    frozen.stop_gradient = True
    groups = build_param_groups(named + [('cls.tied.weight', shared)], base_lr=2e-5, head_lr=1e-4,
                                head_patterns=('vil_', 'vision_logit'), decay_patterns=())
    assert [(g['lr'], g['weight_decay'], g['names']) for g in groups] == [
        (2e-5, 0.0, ['bert.shared.weight']), (1e-4, 0.0, ['vision_logit.bias'])]
    assert groups[1]['params'][0] is head
    with pytest.raises(ValueError, match='no trainable'):
        build_param_groups([('bert.frozen.weight', frozen)], base_lr=2e-5, head_lr=1e-4)


def test_describe_param_groups_counts_tensors_and_params():
    named = _named(['bert.a.weight', 'bert.b.weight'], (3, 4)) + _named(['bert.a.bias'], (4,))
    table = describe_param_groups(build_param_groups(named, base_lr=4e-5, head_lr=1e-4))
    lines = table.splitlines()
    assert lines[0].split() == ['group', 'tensors', 'params', 'lr', 'weight', 'decay']
    assert lines[1].split() == ['0', '2', '24', '4.0e-05', '0']
    assert lines[2].split() == ['1', '1', '4', '4.0e-05', '0.01']
    assert lines[3].split() == ['total', '3', '28']


@pytest.fixture(scope='module')
def ref():
    with np.load(REFERENCE) as data:
        return {key: data[key] for key in data.files}


def _setup(ref):
    """Parameters at the recorded initial values, grouped by our rules, and a BertAdam with the recorded schedule."""
    names = [str(name) for name in ref['names']]
    params = [paddle.create_parameter(list(ref[f'init_{i}'].shape), 'float32') for i in range(len(names))]
    for i, param in enumerate(params):
        param.set_value(ref[f'init_{i}'])
    groups = build_param_groups(zip(names, params), base_lr=float(ref['base_lr']), head_lr=float(ref['head_lr']),
                                weight_decay=float(ref['weight_decay']))
    optimizer = BertAdam(groups, t_total=int(ref['t_total']), warmup=float(ref['warmup']),
                         milestones=tuple(ref['milestones'].tolist()), gamma=float(ref['gamma']))
    return names, params, groups, optimizer


def _apply(ref, params, optimizer, step):
    """Give each parameter the recorded gradient of `step` (none where the record has none), then update."""
    epoch = step // int(ref['steps_per_epoch'])
    optimizer.set_epoch(epoch)
    optimizer.clear_grad()
    loss = sum((param * paddle.to_tensor(ref[f'grads_{i}'][step])).sum()
               for i, param in enumerate(params) if ref['has_grad'][step, i])
    loss.backward()
    optimizer.step()


def test_groups_match_the_official_per_tensor_groups(ref):
    names, _, groups, _ = _setup(ref)
    got = {name: (g['lr'], g['weight_decay']) for g in groups for name in g['names']}
    assert [got[name] for name in names] == list(zip(ref['group_lr'].tolist(), ref['group_weight_decay'].tolist()))


def _replay(ref):
    """Our BertAdam over the whole recorded run -> (optimizer, names, params, max |ours - official| per tensor)."""
    names, params, _, optimizer = _setup(ref)
    assert optimizer.get_lr() == 0.0
    worst = np.zeros(len(names))
    for step in range(len(ref['show_lr'])):
        _apply(ref, params, optimizer, step)
        assert optimizer.get_lr() == pytest.approx(float(ref['show_lr'][step]), rel=1e-12, abs=0), step
        for i, param in enumerate(params):
            worst[i] = max(worst[i], np.abs(param.numpy() - ref[f'after_{i}'][step]).max())
    return optimizer, names, params, worst


def test_reference_spans_beta_schedule(ref):
    """The record covers warm-up, its end and both milestones at beta's learning rates."""
    rates = ref['show_lr']
    epochs = np.arange(len(rates)) // int(ref['steps_per_epoch'])
    assert len(rates) >= 100 and rates[0] == 0.0 and float(ref['base_lr']) == 4e-5
    assert {round(float(rate), 15) for rate in rates[epochs < 12][-6:]} == {4e-5}  # warm-up over before epoch 12
    assert set(np.round(rates[(epochs >= 12) & (epochs < 16)], 15)) == {4e-6}
    assert set(np.round(rates[epochs >= 16], 15)) == {4e-7}


def test_bertadam_matches_official_beta_bertadam(ref):
    optimizer, names, params, worst = _replay(ref)
    decayed = np.asarray(ref['group_weight_decay']) > 0
    print(f"max |ours - beta| over {len(ref['show_lr'])} steps: decayed tensors {worst[decayed].max():.2e}, "
          f"others {worst[~decayed].max():.2e}")
    for name, diff in zip(names, worst):
        assert diff <= 1e-7, f'{name} drifted {diff:.2e} from beta'  # the bar: <= 1e-6
    state = optimizer.state_dict()['state']
    for i, name in enumerate(names):
        if int(ref[f'step_{i}']) == 0:
            assert name not in state and np.array_equal(params[i].numpy(), ref[f'init_{i}'])  # never had a grad
            continue
        assert state[name]['step'] == int(ref[f'step_{i}'])
        for moment, official in (('moment1', 'next_m'), ('moment2', 'next_v')):
            expected = ref[f'{official}_{i}']  # float32 noise relative to the tensor's largest entry
            np.testing.assert_allclose(state[name][moment].numpy(), expected, rtol=0,
                                       atol=1e-6 * np.abs(expected).max(), err_msg=f'{moment} of {name}')


def test_the_device_update_equals_the_host_update(ref, monkeypatch):
    """Off the CPU the update runs as Paddle kernels (``update_tensors``); forced here, it gives the same bits."""
    _, _, host_params, _ = _replay(ref)
    monkeypatch.setattr(optimization, 'runs_on_host', lambda tensor: False)
    _, _, device_params, _ = _replay(ref)
    for host, device in zip(host_params, device_params):
        np.testing.assert_array_equal(device.numpy(), host.numpy())


def test_result_does_not_depend_on_the_thread_count(monkeypatch):
    """Tensors of several pieces, updated on 1 and on 3 threads: bit-identical (resume relies on it)."""
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(shape).astype(np.float32) for shape in [(3 * optimization._PIECE + 5,), (7, 3)]]
    grads = [[rng.standard_normal(value.shape).astype(np.float32) * 1e-3 for value in init] for _ in range(3)]
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(optimization.runtime, 'cpu_threads', lambda threads=threads: threads)
        named = [(f'bert.{i}.bias', paddle.create_parameter(list(value.shape), 'float32')) for i, value in
                 enumerate(init)]
        for (_, param), value in zip(named, init):
            param.set_value(value)
        optimizer = BertAdam(build_param_groups(named, base_lr=1e-3, head_lr=1e-3), t_total=3, warmup=0.0)
        for step_grads in grads:
            sum((param * paddle.to_tensor(grad)).sum() for (_, param), grad in zip(named, step_grads)).backward()
            optimizer.step()
            optimizer.clear_grad()
        results.append([param.numpy() for _, param in named])
    for one, three in zip(*results):
        np.testing.assert_array_equal(one, three)
    assert not np.array_equal(results[0][0], init[0])


def test_state_dict_round_trip_resumes_exactly(ref, tmp_path):
    steps = len(ref['show_lr'])
    _, params, _, optimizer = _setup(ref)
    for step in range(steps // 2 + 1):  # stop mid-epoch, after the late-starting tensor began
        _apply(ref, params, optimizer, step)
    paddle.save(optimizer.state_dict(), str(tmp_path / 'opt.pdopt'))
    _, resumed_params, _, resumed = _setup(ref)
    _, fresh_params, _, fresh = _setup(ref)
    for param, resumed_param, fresh_param in zip(params, resumed_params, fresh_params):
        resumed_param.set_value(param.numpy())
        fresh_param.set_value(param.numpy())
    resumed.set_state_dict(paddle.load(str(tmp_path / 'opt.pdopt')))
    assert resumed.get_lr() == optimizer.get_lr()
    for step in range(steps // 2 + 1, steps):
        for opt, ps in ((optimizer, params), (resumed, resumed_params), (fresh, fresh_params)):
            _apply(ref, ps, opt, step)
    for param, resumed_param in zip(params, resumed_params):
        np.testing.assert_array_equal(resumed_param.numpy(), param.numpy())
    # without the state the run differs, so the check above can fail
    assert not all(np.array_equal(f.numpy(), p.numpy()) for f, p in zip(fresh_params, params))


def test_set_state_dict_rejects_foreign_state(ref):
    _, params, _, optimizer = _setup(ref)
    _apply(ref, params, optimizer, 0)
    state = optimizer.state_dict()
    with pytest.raises(KeyError, match='does not train'):
        optimizer.set_state_dict({**state, 'state': {**state['state'], 'bert.not_here.weight': {}}})
    name = next(iter(state['state']))
    bad = {**state['state'][name], 'moment1': paddle.zeros([3, 3, 3])}
    with pytest.raises(ValueError, match='shape'):
        optimizer.set_state_dict({**state, 'state': {**state['state'], name: bad}})


def test_set_state_dict_reads_the_scaled_moments_of_earlier_versions(ref):
    """Before this optimizer, the fused kernel kept beta's moments times (1 - float32(beta)) / (1 - beta), saved with
    those factors as ``moment_scales``: a resume from such a state continues with beta's moments."""
    _, params, _, optimizer = _setup(ref)
    _apply(ref, params, optimizer, 0)
    state = optimizer.state_dict()
    scales = [(1 - float(np.float32(beta))) / (1 - beta) for beta in (0.9, 0.999)]
    old = {**state, 'moment_scales': scales,
           'state': {name: {**entry, **{key: entry[key].numpy() * scale for key, scale in
                                        zip(('moment1', 'moment2'), scales)}} for name, entry in state['state'].items()}}
    _, _, _, resumed = _setup(ref)
    resumed.set_state_dict(old)
    for name, entry in resumed.state_dict()['state'].items():
        for key in ('moment1', 'moment2'):
            np.testing.assert_allclose(entry[key].numpy(), state['state'][name][key].numpy(), rtol=1e-6)


def test_clipping_is_per_tensor_and_leaves_small_gradients_alone():
    (_, big), (_, small) = named = _named(['bert.big.weight', 'bert.small.weight'], (4,))
    optimizer = BertAdam(build_param_groups(named, base_lr=1.0, head_lr=1.0), t_total=10, warmup=0.0)
    (big * paddle.to_tensor([3.0, 4.0, 0.0, 0.0]) + small * paddle.to_tensor([0.3, 0.4, 0.0, 0.0])).sum().backward()
    optimizer.step()
    # norm 5 -> scale 1/(5 + 1e-6); norm 0.5 stays as it is (bit for bit)
    np.testing.assert_allclose(big.grad.numpy(), np.array([3, 4, 0, 0]) / (5 + 1e-6), rtol=1e-6)
    np.testing.assert_array_equal(small.grad.numpy(), np.float32([0.3, 0.4, 0.0, 0.0]))


def test_rejects_half_precision_parameters():
    param = paddle.create_parameter([2], 'float16')
    with pytest.raises(ValueError, match='float32'):
        BertAdam([{'lr': 1e-4, 'weight_decay': 0.0, 'names': ['x'], 'params': [param]}], t_total=10)


def test_grad_scaler_unscales_through_param_groups(ref, scaler_on_gpu):
    """paddle.amp.GradScaler (used with fp16 on GPU) unscales the gradients it finds in `_param_groups`."""
    scaler = paddle.amp.GradScaler(init_loss_scaling=1024.0)
    _, plain_params, _, plain = _setup(ref)
    _, scaled_params, _, scaled = _setup(ref)
    for step in range(3):
        _apply(ref, plain_params, plain, step)
        scaled.set_epoch(0)
        scaled.clear_grad()
        loss = sum((param * paddle.to_tensor(ref[f'grads_{i}'][step])).sum()
                   for i, param in enumerate(scaled_params) if ref['has_grad'][step, i])
        scaler.scale(loss).backward()
        assert scaler._enable
        scaler.step(scaled)
        scaler.update()
    for plain_param, scaled_param in zip(plain_params, scaled_params):
        np.testing.assert_allclose(scaled_param.numpy(), plain_param.numpy(), rtol=0, atol=1e-6)
