import functools
import http.server
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import lmdb
import pytest

from vilbert.demo_data import make_demo_dataset
from vilbert.refer_datasets import feature_files

SCRIPT = Path(__file__).resolve().parents[1] / "download_dataset.sh"
ENTRIES = ("refcoco+/refs(unc).p", "refcoco+/instances.json", "refcoco+_resnet101_faster_rcnn_genome.lmdb",
           "refcoco+_gt_resnet101_faster_rcnn_genome.lmdb")
FILES = ("refcoco+/instances.json", "refcoco+/refs(unc).p", "refcoco+_resnet101_faster_rcnn_genome.lmdb/data.mdb",
         "refcoco+_resnet101_faster_rcnn_genome.lmdb/lock.mdb",
         "refcoco+_gt_resnet101_faster_rcnn_genome.lmdb/data.mdb",
         "refcoco+_gt_resnet101_faster_rcnn_genome.lmdb/lock.mdb")
needs_downloader = pytest.mark.skipif(not (shutil.which("curl") or shutil.which("wget")), reason="no curl or wget")


def run(*args, **env):
    """The script with this interpreter (the one whose packages the tests use) as its PYTHON."""
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, **env})


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; like many mirrors it ignores Range requests, so resuming has to fall back."""

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=served))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_check_on_an_empty_root_names_what_is_missing(tmp_path):
    result = run("--check", "--dataroot", str(tmp_path))
    assert result.returncode == 1
    for entry in ENTRIES:
        assert f"MISSING  {tmp_path / entry}" in result.stdout
    assert "4 of 4 missing or unreadable" in result.stdout
    assert "pytorch_model_8.bin" in result.stdout  # where the pretrained weights go


def test_check_passes_on_generated_roots(demo_root, demo_root_mt):
    beta = run("--check", "--dataroot", str(demo_root))
    assert beta.returncode == 0, beta.stdout + beta.stderr
    assert "All files present and readable." in beta.stdout and beta.stdout.count("vilbert_beta records") == 2
    mt = run("--check", DATA_ROOT=str(demo_root_mt))  # the environment variable works too
    assert mt.returncode == 0 and mt.stdout.count("vilbert-multi-task records") == 2


def test_check_reports_unreadable_files(tmp_path, demo_root):
    root = tmp_path / "root"
    shutil.copytree(demo_root, root)
    (root / "refcoco+" / "refs(unc).p").write_bytes(pickle.dumps(os.system))  # not plain data: never executed
    (root / "refcoco+" / "instances.json").write_text("<!DOCTYPE html><html>Dropbox</html>")
    gt = root / "refcoco+_gt_resnet101_faster_rcnn_genome.lmdb"
    shutil.rmtree(gt)
    lmdb.open(str(gt)).close()  # an LMDB without b'keys', as an interrupted conversion leaves it
    result = run("--check", "--dataroot", str(root))
    assert result.returncode == 1
    refs, instances = root / "refcoco+" / "refs(unc).p", root / "refcoco+" / "instances.json"
    assert f"{refs}: refusing to unpickle global posix.system" in result.stdout  # the training code's own message
    assert f"{instances} is an HTML page, not JSON" in result.stdout
    assert "no b'keys' record" in result.stdout and "3 of 4 missing or unreadable" in result.stdout


def test_check_reports_images_without_features(tmp_path, demo_root):
    root = tmp_path / "root"
    shutil.copytree(demo_root, root)
    env = lmdb.open(str(root / "refcoco+_resnet101_faster_rcnn_genome.lmdb"), map_size=1 << 30)
    with env.begin(write=True) as txn:
        keys = pickle.loads(txn.get(b"keys"))
        txn.put(b"keys", pickle.dumps(keys[:-2]))
    env.close()
    result = run("--check", "--dataroot", str(root))
    assert result.returncode == 1 and "2 referred images have no record" in result.stdout


@needs_downloader
def test_download_resumes_and_skips_what_is_there(mirror, demo_root, tmp_path):
    served, url = mirror
    shutil.copytree(demo_root, served, dirs_exist_ok=True)
    target = tmp_path / "data"
    partial = target / "refcoco+" / "instances.json.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes((served / "refcoco+" / "instances.json").read_bytes()[:100])  # an interrupted download
    result = run("--dataroot", str(target), "--mirror", url)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in FILES:
        assert (target / name).read_bytes() == (served / name).read_bytes(), name
    assert not list(target.rglob("*.part")) and "All files present and readable." in result.stdout
    again = run("--dataroot", str(target), "--mirror", url)
    assert again.returncode == 0 and again.stdout.count("already present") == len(FILES)


@needs_downloader
def test_download_refuses_an_html_page(mirror, demo_root, tmp_path):
    served, url = mirror
    shutil.copytree(demo_root, served, dirs_exist_ok=True)
    (served / "refcoco+" / "refs(unc).p").write_text("<!DOCTYPE html>\n<html><body>Sign in</body></html>")
    target = tmp_path / "data"
    result = run("--dataroot", str(target), "--mirror", url)
    assert result.returncode == 1 and "sent an HTML page, not the file" in result.stderr
    assert not (target / "refcoco+" / "refs(unc).p").exists()
    assert (target / "refcoco+" / "refs(unc).p.html").exists()
    assert (target / "refcoco+" / "instances.json").exists()  # the other files are still fetched


def test_unknown_argument_or_dataset():
    result = run("--datset", "refcocog")
    assert result.returncode == 1 and "unknown argument: --datset" in result.stderr
    result = run("--dataset", "refclef")
    assert result.returncode == 1 and "--dataset refclef: choose refcoco, refcoco+ or refcocog" in result.stderr


@pytest.fixture(scope="module")
def refcocog_root(tmp_path_factory):
    """A generated RefCOCOg root with its features under 12-in-1's names, as datasets.tar.gz holds them."""
    root = make_demo_dataset(tmp_path_factory.mktemp("refcocog"), dataset="refcocog", layout="mt", seed=0,
                             num_train_images=12, num_val_images=4, num_test_images=4)
    for beta, twelve in zip(feature_files("refcocog", "beta"), feature_files("refcocog", "12in1")):
        (root / twelve).parent.mkdir(exist_ok=True)
        (root / beta).rename(root / twelve)
    return root


def test_check_audits_the_layout_of_each_dataset(refcocog_root, tmp_path):
    result = run("--check", "--dataset", "refcocog", "--dataroot", str(refcocog_root))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "refcocog, umd splits: train, val, test" in result.stdout
    assert "All files present and readable." in result.stdout
    assert "refcocog_umd/refcocog_resnext152_faster_rcnn_genome.lmdb/" in result.stdout
    assert "multi_task_model.bin" in result.stdout and "config/refcocog.yml" in result.stdout
    empty = run("--check", "--dataset", "refcoco", "--dataroot", str(tmp_path))
    assert empty.returncode == 1
    for entry in ("refcoco/refs(unc).p", "refcoco/instances.json", *feature_files("refcoco", "12in1")):
        assert f"MISSING  {tmp_path / entry}" in empty.stdout
    assert f"run `bash download_dataset.sh --dataset refcoco --dataroot {tmp_path}`" in empty.stdout


@needs_downloader
def test_refcocog_comes_from_the_12in1_archive_and_only_it_is_extracted(mirror, refcocog_root, demo_root, tmp_path):
    served, url = mirror
    with tarfile.open(served / "datasets.tar.gz", "w:gz") as tar:  # 12-in-1's layout: datasets/refcoco/...
        tar.add(refcocog_root / "refcocog", "datasets/refcoco/refcocog")
        tar.add(refcocog_root / "refcocog_umd", "datasets/refcoco/refcocog_umd")
        tar.add(demo_root / "refcoco+", "datasets/refcoco/refcoco+")  # another dataset: must stay in the archive
    target = tmp_path / "data"
    result = run("--dataset", "refcocog", "--dataroot", str(target), "--mirror", url)
    assert result.returncode == 0, result.stdout + result.stderr
    size = (served / "datasets.tar.gz").stat().st_size
    assert "exist only in 12-in-1's datasets.tar.gz" in result.stdout and f"({size} bytes" in result.stdout
    assert sorted(p.name for p in target.iterdir()) == ["datasets.tar.gz", "refcocog", "refcocog_umd"]
    refs = Path("refcocog", "refs(umd).p")
    assert (target / refs).read_bytes() == (refcocog_root / refs).read_bytes()
    assert "All files present and readable." in result.stdout
    again = run("--dataset", "refcocog", "--dataroot", str(target), "--mirror", url)
    assert again.returncode == 0 and "datasets.tar.gz: already downloaded, skipped" in again.stdout
