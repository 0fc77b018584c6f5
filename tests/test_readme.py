"""Every command README.md shows that needs neither a GPU, the internet nor a checkpoint from outside runs as
written, in the README's order, on the demo data, in a copy of the working tree; none may fail or write into the
tracked tree. Where the README quotes what a command prints (the demos' epoch lines, an audit block), the
figures are checked. The commands it cannot run are listed with the reason, and their kinds are fixed here.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from training_support import PROJECT

# (pattern, reason): a command matching one is not run; the first match gives the reason
SKIPPED = (
    (r"\bpip install\b", "installs packages (the test runs in the installed environment)"),
    (r"-m pytest\b", "the test suite itself"),
    (r"paddle\.distributed\.launch", "several processes or machines (tests/test_distributed.py and "
                                     "tests/test_multinode.py launch them)"),
    (r"download_dataset\.sh(?!.*--check)", "downloads (needs the internet)"),
    (r"download_dataset\.sh(?!.*--dataroot data/demo)", "audits the real data root"),
    (r"\bscript/", "another repository's script"),
    (r"\bbench/", "a benchmark (minutes; its figures are measured once, with the machine)"),
    (r"selfcheck\.py(?!.*--demo)", "checks a GPU box with the real data"),
    (r"--from_pretrained (?!checkpoints/demo)", "needs a checkpoint from outside"),
    (r"\b(CKPT|SRC\.bin|DIR)\b|\.\.\.", "a placeholder to fill in"),
    (r"data/referExpression|data/VQA\b|datasets/|my_features|my_photos|mine\.lmdb", "needs the real data or your own files"),
    (r"train\.py(?!.*--demo)", "trains on the real data"),
)
MIN_RUN = 15  # the README's runnable commands; fewer means the selection above has gone wrong
EPOCH_LINE = re.compile(r"^Epoch \d+ done! .*$", re.M)


def readme_commands(text: str):
    """(command, the text block quoted right after its bash block or None) for every command of every bash block,
    continuation lines joined and `a && b` split."""
    blocks = list(re.finditer(r"```(\w*)\n(.*?)```", text, re.S))
    for number, block in enumerate(blocks):
        if block.group(1) != "bash":
            continue
        following = blocks[number + 1] if number + 1 < len(blocks) else None
        quoted = following.group(2) if following and following.group(1) == "" else None
        for line in re.sub(r"\\\n\s*", " ", block.group(2)).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                for command in line.split(" && "):
                    yield command.strip(), quoted


def skip_reason(command: str):
    code = command.split("  #")[0]
    return next((reason for pattern, reason in SKIPPED if re.search(pattern, code)), None)


def working_tree_copy(destination: Path) -> Path:
    """The tracked and untracked-but-not-ignored files, as a fresh git repository (to see what commands write)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=PROJECT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (PROJECT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT / name, destination / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    for argv in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "snapshot"]):
        subprocess.run(git + argv, cwd=destination, check=True, capture_output=True)
    return destination


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(command, its output, the quoted block) for every command run, in README order; skipped (command, reason)."""
    root = working_tree_copy(tmp_path_factory.mktemp("readme") / "repo")
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    ran, skipped, outputs = [], [], {}
    for command, quoted in readme_commands((PROJECT / "README.md").read_text()):
        reason = skip_reason(command)
        if reason:
            skipped.append((command, reason))
            continue
        code = command.split("  #")[0].strip()
        if code not in outputs:  # shown twice (the set-up and the demo section): run once
            result = subprocess.run(["bash", "-c", command], cwd=root, env=environment, capture_output=True,
                                    text=True, timeout=900)
            assert result.returncode == 0, f"{command}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}"
            outputs[code] = result.stdout
        ran.append((command, outputs[code], quoted))
    print("\n".join([f"ran: {command}" for command, *_ in ran] +
                    [f"skipped ({reason}): {command}" for command, reason in skipped]))
    status = subprocess.run(["git", "status", "--porcelain"], cwd=root, check=True, capture_output=True, text=True)
    return ran, skipped, status.stdout


def test_every_runnable_command_runs_and_writes_nothing_into_the_tree(runs):
    ran, skipped, status = runs
    assert len(ran) >= MIN_RUN, f"only {len(ran)} README commands ran"
    assert status == "", f"README commands changed or added files in the tracked tree:\n{status}"


def test_quoted_epoch_lines_and_audits_are_what_the_commands_print(runs):
    ran, _, _ = runs
    checked = 0
    for command, out, quoted in ran:
        if quoted is None:
            continue
        if "train.py --demo" in command:
            assert EPOCH_LINE.findall(out) == EPOCH_LINE.findall(quoted), command
            checked += 1
        elif "audit_features.py" in command:
            shown = [line.strip() for line in quoted.splitlines() if line.strip()]
            printed = [line.strip() for line in out.splitlines() if line.strip()]
            assert all(line in printed for line in shown), f"{command}: {shown} not all in {printed}"
            checked += 1
    assert checked >= 3  # the two demos' epoch lines and the audit block
