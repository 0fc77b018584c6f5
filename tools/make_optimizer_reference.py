"""Record what vilbert_beta's own BertAdam + LambdaLR do on fixed gradients (dev-only: needs torch and the mirror).

    python tools/make_optimizer_reference.py [--beta-git-dir /work/.mirror/jiasenlu+vilbert_beta/repo]

Writes ``tests/data/bertadam_reference.npz``, which ``tests/test_optimization.py`` replays through our Paddle
``BertAdam`` without torch. The official ``vilbert/optimization.py`` is read from the beta git mirror at run time
and imported under its own module name (it would clash with our ``vilbert`` package). Groups are built exactly as
beta's ``train_tasks.py`` builds them (one group per tensor, substring rules), the LambdaLR is beta's
``lr_lambda_fun`` over beta's whole RefCOCO+ schedule at its learning rates (120 steps in 20 epochs: warm-up and
both milestones), and the gradients cover: decay / no decay / head lr, clipped and unclipped
tensors, a tensor that never gets a gradient and one whose gradients start mid-warmup.
"""
import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

# (name, shape, first step with a gradient or None for never, gradient scale: > 1 makes clipping happen)
PARAMS = [
    ('bert.embeddings.word_embeddings.weight', (10, 4), 0, 0.05),
    ('bert.encoder.layer.0.attention.output.LayerNorm.weight', (4,), 0, 0.3),
    ('bert.encoder.layer.0.attention.output.dense.bias', (4,), 0, 2.0),
    ('bert.encoder.c_layer.0.biattention.query1.weight', (4, 6), 0, 0.1),
    ('bert.encoder.c_layer.0.biOutput.LayerNorm1.weight', (6,), 0, 5.0),
    ('bert.encoder.c_layer.0.biOutput.LayerNorm1.bias', (6,), 0, 3.0),
    ('vil_prediction.main.0.weight_v', (6, 3), 5, 0.5),
    ('vil_prediction.main.0.bias', (3,), 0, 4.0),
    ('vision_logit.weight', (6, 1), 0, 1.0),
    ('cls.predictions.bias', (10,), None, 1.0),
]
# beta's RefCOCO+ recipe over 20 epochs of 6 steps: warm-up ends at step 12, the milestones fall at steps 72 and 96
HYPER = dict(base_lr=4e-5, head_lr=1e-4, weight_decay=0.01, warmup=0.1, steps_per_epoch=6, epochs=20,
             milestones=(12, 16), gamma=0.1)


def load_beta_optimization(git_dir, workdir):
    source = subprocess.run(['git', '--git-dir', str(git_dir), 'show', 'HEAD:vilbert/optimization.py'],
                            check=True, capture_output=True).stdout
    path = Path(workdir) / 'beta_optimization.py'
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location('beta_optimization', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--beta-git-dir', default='/work/.mirror/jiasenlu+vilbert_beta/repo')
    parser.add_argument('--out', default=str(Path(__file__).resolve().parents[1] / 'tests/data/bertadam_reference.npz'))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        beta = load_beta_optimization(args.beta_git_dir, workdir)
    rng = np.random.default_rng(0)
    h = HYPER
    steps = h['steps_per_epoch'] * h['epochs']
    # LayerNorm weights start near 1, as trained ones are: there float32 steps are 6e-8 apart, coarser than lr*wd
    init = [(1 + 0.05 * rng.standard_normal(shape) if 'LayerNorm' in name and name.endswith('weight')
             else rng.standard_normal(shape)).astype(np.float32) for name, shape, _, _ in PARAMS]
    # per step, per tensor: a gradient whose scale wanders over two decades so some steps clip and some do not
    grads = [[(rng.standard_normal(shape) * scale * 10 ** rng.uniform(-1, 1)).astype(np.float32)
              if start is not None and step >= start else None for _, shape, start, scale in PARAMS]
             for step in range(steps)]

    params = [torch.nn.Parameter(torch.from_numpy(value.copy())) for value in init]
    groups = []
    for (name, _, _, _), param in zip(PARAMS, params):  # beta train_tasks.py: one group per tensor
        lr = h['head_lr'] if 'vil_prediction' in name else h['base_lr']
        decay = h['weight_decay'] if any(nd in name for nd in ['bias', 'LayerNorm.bias', 'LayerNorm.weight']) else 0.0
        groups.append({'params': [param], 'lr': lr, 'weight_decay': decay})
    t_total = steps
    optimizer = beta.BertAdam(groups, lr=h['base_lr'], warmup=h['warmup'], t_total=t_total,
                              schedule='warmup_constant')
    milestones = np.array(h['milestones'])
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda=lambda epoch: pow(h['gamma'], np.sum(milestones <= epoch)))

    trajectory = [[] for _ in PARAMS]
    rates = []
    for epoch in range(h['epochs']):
        for step in range(epoch * h['steps_per_epoch'], (epoch + 1) * h['steps_per_epoch']):
            for param, grad in zip(params, grads[step]):
                param.grad = None if grad is None else torch.from_numpy(grad.copy())
            optimizer.step()
            rates.append(optimizer.show_lr())  # lr of this step's last update (vision_logit, in step with tensor 0)
            for i, param in enumerate(params):
                trajectory[i].append(param.detach().numpy().copy())
        lr_scheduler.step()

    record = {'names': np.array([name for name, _, _, _ in PARAMS]),
              'group_lr': np.array([g['initial_lr'] for g in optimizer.param_groups]),
              'group_weight_decay': np.array([g['weight_decay'] for g in optimizer.param_groups]),
              'has_grad': np.array([[grad is not None for grad in row] for row in grads]),
              'show_lr': np.array(rates),
              't_total': t_total, **{k: np.array(v) for k, v in h.items()}}
    for i, param in enumerate(params):
        record[f'init_{i}'] = init[i]
        record[f'grads_{i}'] = np.stack([row[i] if row[i] is not None else np.zeros(init[i].shape, np.float32)
                                         for row in grads])
        record[f'after_{i}'] = np.stack(trajectory[i])
        state = optimizer.state[param]
        record[f'step_{i}'] = state.get('step', 0)
        if state:
            record[f'next_m_{i}'] = state['next_m'].numpy()
            record[f'next_v_{i}'] = state['next_v'].numpy()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix='.npz', delete=False) as tmp:
        np.savez_compressed(tmp, **record)
    os.replace(tmp.name, out)
    print(f"wrote {out} ({out.stat().st_size} bytes): {len(PARAMS)} tensors x {steps} steps, torch {torch.__version__}",
          file=sys.stderr)


if __name__ == '__main__':
    main()
