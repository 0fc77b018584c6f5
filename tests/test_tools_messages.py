"""What the dev tools print: check_parity.py without PyTorch, bf16_numerics.py's notes and verdict, and the
pytest run's own warnings."""

import json
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def test_check_parity_without_torch_says_what_it_needs_in_one_line():
    blocked = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['tools/check_parity.py']; "
               "runpy.run_path('tools/check_parity.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", blocked], cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "dev-only" in lines[0] and "pip install torch==2.13.0, CPU build" in lines[0]
    assert "official PyTorch ViLBERT" in lines[0]  # what it compares
    assert "tests/test_parity.py" in lines[0] and "selfcheck.py" in lines[0]  # the parity shipped without torch


def test_bf16_numerics_leaves_out_the_cpu_amp_note_and_states_its_bar(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(PROJECT / "tools"))
    import bf16_numerics

    def fake_train(argv):  # what train.main prints and writes, in a moment
        amp = argv[argv.index("--amp") + 1]
        run = Path(argv[argv.index("--output_dir") + 1]) / argv[argv.index("--save_name") + 1]
        run.mkdir(parents=True)
        if amp != "off":
            print("Note: --amp bf16 has no effect on CPU: Paddle's autocast only acts on GPU (and XPU) devices.",
                  flush=True)
        print(f"trained with --amp {amp}")
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "val_accuracy": 0.9 if amp == "off" else 0.895}))

    monkeypatch.setattr(bf16_numerics.train, "main", fake_train)
    monkeypatch.setattr(sys, "argv", ["bf16_numerics.py", "--output_dir", str(tmp_path)])
    bf16_numerics.main()
    out = capsys.readouterr().out
    assert "trained with --amp bf16" in out and "no effect on CPU" not in out
    assert "float32 - bf16: +0.50 points, within the 1 point bf16 may lose against float32" in out
    print("Note: --amp bf16 has no effect on CPU")  # print is itself again after the tool
    assert "no effect on CPU" in capsys.readouterr().out


def test_pytest_runs_without_paddles_ccache_warning(tmp_path):
    test = tmp_path / "test_import.py"
    test.write_text("def test_import():\n    import paddle.utils.cpp_extension  # noqa: F401\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                           str(PROJECT / "pyproject.toml"), "--rootdir", str(PROJECT), str(test)],
                          cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No ccache found" not in done.stdout + done.stderr
