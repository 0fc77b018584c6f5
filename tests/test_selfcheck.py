"""selfcheck.py: its table and exit status on this machine, a failing data root, and its GPU branches forced onto
the CPU (the GPU itself is tests/test_gpu.py's)."""

import re
from types import SimpleNamespace

import paddle
import pytest

import selfcheck
from training_support import DEMO_TASK, PROJECT, TEST_MODEL, make_tiny_root
from vilbert.checkpoint import save_checkpoint
from vilbert.config import ViLBertConfig
from vilbert.model import VILBertForVLTasks
from vilbert.options import RunOptions, load_task_config
from vilbert.selfcheck import SelfCheck
from vilbert.tasks import get_task

DEMO_VQA = PROJECT / "config" / "demo_vqa.yml"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_tiny_root(tmp_path_factory.mktemp("tiny"))


def run_selfcheck(capsys, *argv) -> tuple:
    with pytest.raises(SystemExit) as exit_info:
        selfcheck.main(["--task_config", str(DEMO_TASK), "--quick", "--device", "cpu", *argv])
    out = capsys.readouterr().out
    table = out[out.index("\ncheck "):].splitlines()
    return exit_info.value.code, {line.split()[0]: line.split()[1] for line in table[2:] if line.strip()
                                  and not line.startswith(("PASS", "FAIL"))}, out


def test_a_ready_machine_passes_with_a_table(root, capsys):
    code, status, out = run_selfcheck(capsys, "--demo", "--dataroot", str(root))  # --demo: the data is there
    assert code == 0 and out.rstrip().endswith("PASS: ready")
    assert status == {"paddle": "PASS", "parity": "PASS", "optimizer": "PASS", "amp": "PASS", "launch": "SKIP",
                      "step": "INFO", "repeatable": "SKIP", "data": "PASS", "loader": "PASS",
                      "checkpoint": "SKIP"}


def test_a_vqa_run_checks_its_data_loader_and_checkpoint(vqa_root, tmp_path, capsys):
    """The VQA task's data audit, its loader's batches against collate, and a checkpoint with its answer head."""
    paddle.seed(0)
    heads = get_task("vqa").model_heads(RunOptions(**{**load_task_config(DEMO_VQA), "dataroot": str(vqa_root)}))
    model = VILBertForVLTasks(ViLBertConfig.from_json(TEST_MODEL), **heads)
    weights = save_checkpoint(model.state_dict(), tmp_path / "vqa.pdparams")
    with pytest.raises(SystemExit) as exit_info:
        selfcheck.main(["--task_config", str(DEMO_VQA), "--quick", "--device", "cpu", "--dataroot", str(vqa_root),
                        "--config_file", str(TEST_MODEL), "--from_pretrained", str(weights)])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.rstrip().endswith("PASS: ready"), out
    for check in ("data", "loader", "checkpoint"):
        assert re.search(rf"^{check} +PASS", out, re.M), check


def test_a_missing_data_root_and_checkpoint_fail_with_status_1(tmp_path, capsys):
    code, status, out = run_selfcheck(capsys, "--dataroot", str(tmp_path), "--from_pretrained",
                                      str(tmp_path / "none.bin"))
    assert code == 1 and status["data"] == status["checkpoint"] == "FAIL" and status["loader"] == "SKIP"
    assert out.rstrip().endswith("FAIL: data, checkpoint") and "download_dataset.sh" in out


@pytest.fixture
def fake_gpu(monkeypatch):
    """One 'GPU' whose kernels are the CPU's: what SelfCheck does on a GPU, minus the GPU."""
    flags = {}
    set_device = paddle.set_device
    monkeypatch.setattr(paddle, "set_device", lambda device: set_device("cpu"))
    monkeypatch.setattr(paddle, "set_flags", flags.update)
    cuda = paddle.device.cuda
    monkeypatch.setattr(paddle.device, "is_compiled_with_cuda", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: 1)
    monkeypatch.setattr(cuda, "synchronize", lambda: None)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda: 3 * 2 ** 30)
    monkeypatch.setattr(cuda, "get_device_properties", lambda _: SimpleNamespace(name="Fake", total_memory=2 ** 34))
    return flags


# the fake GPU runs the amp steps on the CPU, where Paddle says they do nothing
@pytest.mark.filterwarnings("ignore:amp_guard can only be enabled:UserWarning",
                            "ignore:AmpScaler can only be enabled:UserWarning")
def test_gpu_branches(fake_gpu, root):
    options = RunOptions(**{**load_task_config(DEMO_TASK), "dataroot": str(root), "amp": "fp16"})
    check = SelfCheck(options, quick=True, gpus=0, out=lambda *a: None)
    assert check.gpu and check.gpus == 1
    assert check.check_paddle()[1].endswith("1 x Fake, 16.0 GiB; training on 1")
    status, detail = check.check_parity()
    assert status == "PASS" and "gpu vs cpu 0.0e+00" in detail
    status, detail = check.check_step()
    assert status == "INFO" and detail.count("peak 3.0 GiB") == 2  # --amp fp16, then off
    assert "amp fp16: micro-batch 32" in detail and "--gradient_accumulation_steps 1 fits" in detail
    assert check.check_repeatable()[0] == "PASS"
    status, detail = check.check_loader()
    assert status == "PASS" and "val batches on gpu equal" in detail
    assert fake_gpu == {"FLAGS_cudnn_deterministic": True, "FLAGS_embedding_deterministic": 1}


def test_loader_check_names_the_arrays_that_differ(root, monkeypatch):
    import vilbert.selfcheck as module

    options = RunOptions(**{**load_task_config(DEMO_TASK), "dataroot": str(root)})
    assert module.loader_check(options, "cpu", timed=2)[0] == []
    eval_loader = module.eval_loader

    class Misplacing:  # a loader that hands over every region's spatials shifted
        def __init__(self, dataset, options):
            self.loader = eval_loader(dataset, options)
            self.batch_sampler = self.loader.batch_sampler

        def __iter__(self):
            return ({**batch, "spatials": batch["spatials"] + 1} for batch in self.loader)

    monkeypatch.setattr(module, "eval_loader", Misplacing)
    check = SelfCheck(options, quick=True, gpus=0, out=lambda *a: None)
    with pytest.raises(module.CheckFailed, match="differ from collate \\+ to_tensor in spatials$"):
        check.check_loader()


def test_a_micro_batch_that_runs_out_of_memory_is_halved_until_it_fits(monkeypatch):
    import vilbert.selfcheck as module

    def steps(model, optimizer, batch, amp, count):
        if batch["input_ids"].shape[0] > 8:
            raise MemoryError("Out of memory error on GPU 0")
    monkeypatch.setattr(module, "train_steps", steps)
    monkeypatch.setattr(module, "synthetic_batch", lambda config, size: {"input_ids": paddle.zeros([size, 2])})
    optimizer = SimpleNamespace(clear_grad=lambda: None)
    fitted, _, _ = module.fit_micro_batch(SimpleNamespace(config=None), optimizer, 64, "off", gpu=False)
    assert fitted == 8


def test_the_epoch_estimate_is_for_the_data_the_run_was_given(root, tmp_path):
    from vilbert.training import build_dataset
    from vilbert.tokenization import BertTokenizer

    options = RunOptions(**{**load_task_config(DEMO_TASK), "dataroot": str(root)})
    samples = len(build_dataset(options, "train", BertTokenizer(options.bert_model)))
    status, detail = SelfCheck(options, quick=True, gpus=0, out=lambda *a: None).check_step()
    assert status == "INFO" and detail.endswith(f"(epoch of the {samples:,} train samples in {root})")
    assert re.search(r"epoch ~\d+ s on 1 device\(s\)", detail), detail  # seconds, not ~0 min
    missing = RunOptions(**{**load_task_config(DEMO_TASK), "dataroot": str(tmp_path)})
    detail = SelfCheck(missing, quick=True, gpus=0, out=lambda *a: None).check_step()[1]
    assert "(epoch of the full refcoco+ train split, 120,191 expressions, assumed (no readable train data in " \
           f"{tmp_path}: " in detail


def test_the_amp_check_on_cpu_prints_no_paddle_amp_warnings(root):
    import warnings

    check = SelfCheck(RunOptions(**{**load_task_config(DEMO_TASK), "dataroot": str(root)}), quick=True, gpus=0,
                      out=lambda *a: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check.check_amp()[0] == "PASS"
    assert not [w for w in caught if "can only be enabled on CUDAPlace" in str(w.message)]
