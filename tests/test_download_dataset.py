import functools
import http.server
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import lmdb
import pytest

from vilbert.demo_data import make_demo_dataset
from vilbert.features import build_feature_cache
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


def test_check_verifies_the_feature_caches_and_names_a_damaged_one(tmp_path, demo_root):
    root = tmp_path / "root"
    shutil.copytree(demo_root, root)
    lmdb_dir = root / "refcoco+_resnet101_faster_rcnn_genome.lmdb"
    cache = build_feature_cache(lmdb_dir, float16=True, progress=False)
    intact = run("--check", "--dataroot", str(root))
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert re.search(rf"feature cache +{re.escape(str(cache))}: every checksum matches \([\d.]+ [KM]iB read in "
                     rf"[\d.]+ s, ", intact.stdout)
    with open(cache, "r+b") as f:  # random bytes behind an intact header, as bit rot or a bad copy leaves
        f.seek(100)
        f.write(os.urandom(2000))
    damaged = run("--check", "--dataroot", str(root))
    assert damaged.returncode == 1
    assert re.search(rf"feature cache +{re.escape(str(cache))}: DAMAGED \(below\)", damaged.stdout)
    assert re.search(rf"PROBLEM: feature cache {re.escape(str(cache))} is damaged: 1 of its \d+ blocks of 4.0 MiB "
                     rf"fail their checksum \(bytes 64-[\d,]+\), holding features rows 0-\d+ and the spatials, ",
                     damaged.stdout), damaged.stdout


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


# ---------------------------------------------------------------- VQA 2.0 (--task vqa)

VQA_CACHE = ("cache/train_target.pkl", "cache/val_target.pkl", "cache/trainval_ans2label.pkl",
             "cache/trainval_label2ans.pkl")
VQA_ZIPS = {"v2_Questions_Train_mscoco.zip": "v2_OpenEnded_mscoco_train2014_questions.json",
            "v2_Questions_Val_mscoco.zip": "v2_OpenEnded_mscoco_val2014_questions.json",
            "v2_Questions_Test_mscoco.zip": "v2_OpenEnded_mscoco_test2015_questions.json",
            "v2_Annotations_Train_mscoco.zip": "v2_mscoco_train2014_annotations.json",
            "v2_Annotations_Val_mscoco.zip": "v2_mscoco_val2014_annotations.json"}
COCO_LMDBS = ("coco_trainval_resnet101_faster_rcnn_genome.lmdb", "coco_test_resnet101_faster_rcnn_genome.lmdb")


def vqa_problems(stdout):
    """The audit's problem lines (not tools/audit_features.py's tables after it)."""
    return [line.strip() for line in stdout.split("\nregion-feature LMDB")[0].splitlines()
            if line.strip().startswith(("MISSING", "UNREADABLE", "PROBLEM"))]


@pytest.fixture
def vqa_copy(tmp_path, vqa_root):
    """A copy of the generated VQA root (and its coco/ beside it) to damage; returns its data root."""
    shutil.copytree(vqa_root.parent, tmp_path / "data")
    return tmp_path / "data" / "VQA"


def test_vqa_check_passes_on_a_generated_root(vqa_root):
    result = run("--check", "--task", "vqa", "--dataroot", str(vqa_root))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Data root: {vqa_root} (VQA 2.0; features in {vqa_root.parent / 'coco'})" in result.stdout
    assert "All files present and readable." in result.stdout and vqa_problems(result.stdout) == []
    assert result.stdout.count("vilbert_beta records") == 2 and result.stdout.count("problems         none") == 2
    assert "minval is all of val, trainval is train only" in result.stdout
    assert "pytorch_model_19.bin" in result.stdout and "config/vqa_12in1.yml" in result.stdout
    same = run("--check", "--dataset", "vqa", "--dataroot", str(vqa_root))  # the configs' dataset name picks the task
    assert same.returncode == 0 and "All files present and readable." in same.stdout


def other_questions_targets(root):
    """cache/train_target.pkl replaced by the val questions' targets."""
    (root / "cache" / "train_target.pkl").write_bytes((root / "cache" / "val_target.pkl").read_bytes())
    return (f"PROBLEM  {root / 'cache' / 'train_target.pkl'} holds ",
            "they are not of the same questions; take both from one download")


def no_test_lmdb(root):
    shutil.rmtree(root.parent / "coco" / COCO_LMDBS[1])
    return f"MISSING  {root.parent / 'coco' / COCO_LMDBS[1]}", ""


def image_without_features(root):
    """The first image's record and key removed from the trainval LMDB."""
    path = root.parent / "coco" / COCO_LMDBS[0]
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        keys = pickle.loads(txn.get(b"keys"))
        txn.delete(keys[0])
        txn.put(b"keys", pickle.dumps(keys[1:]))
    env.close()
    return (f"PROBLEM  {path}: 1 of the {len(keys)} images of v2_OpenEnded_mscoco_train2014_questions.json and "
            f"v2_OpenEnded_mscoco_val2014_questions.json have no record, e.g. [{int(keys[0])}]",
            "these features are not of these questions; take them from one download")


def swapped_ans2label(root):
    """Two answers' labels swapped in ans2label only."""
    label2ans = pickle.loads((root / "cache" / "trainval_label2ans.pkl").read_bytes())
    ans2label = pickle.loads((root / "cache" / "trainval_ans2label.pkl").read_bytes())
    ans2label[label2ans[0]], ans2label[label2ans[1]] = 1, 0
    (root / "cache" / "trainval_ans2label.pkl").write_bytes(pickle.dumps(ans2label, protocol=2))
    return (f"PROBLEM  {root / 'cache' / 'trainval_ans2label.pkl'} ({len(ans2label)} answers) and "
            f"{root / 'cache' / 'trainval_label2ans.pkl'} ({len(label2ans)}) do not describe the same answer "
            "vocabulary", "take both from one download")


@pytest.mark.parametrize("damage", [other_questions_targets, no_test_lmdb, image_without_features, swapped_ans2label])
def test_vqa_check_names_each_problem_in_one_line(vqa_copy, damage):
    start, fix = damage(vqa_copy)
    result = run("--check", "--task", "vqa", "--dataroot", str(vqa_copy))
    (problem,) = vqa_problems(result.stdout)  # one line, naming the file, what is wrong and the fix
    assert result.returncode == 1 and problem.startswith(start) and fix in problem, problem
    assert (f"1 of 11 missing, unreadable or inconsistent: run `bash download_dataset.sh --task vqa --dataroot "
            f"{vqa_copy}`") in result.stdout


def test_vqa_check_on_an_empty_root_lists_every_file(tmp_path):
    result = run("--check", "--task", "vqa", "--dataroot", str(tmp_path / "VQA"))
    assert result.returncode == 1
    problems = vqa_problems(result.stdout)
    assert len(problems) == 9 and all(line.startswith("MISSING") for line in problems)  # annotations: optional
    assert result.stdout.count("absent   (optional") == 2
    assert f"run `bash download_dataset.sh --task vqa --dataroot {tmp_path / 'VQA'}`" in result.stdout


def test_vqa_arguments():
    result = run("--task", "vqa", "--dataset", "refcocog", "--check")
    assert result.returncode == 1 and "--dataset refcocog is a referring-expression dataset" in result.stderr
    result = run("--task", "gqa")
    assert result.returncode == 1 and "--task gqa: choose refer or vqa" in result.stderr


@pytest.fixture
def vqa_mirror(mirror, vqa_root):
    """visualqa.org's zips, 12-in-1's datasets.tar.gz (VQA/cache/ and more) and the COCO LMDBs, served."""
    served, url = mirror
    for archive, name in VQA_ZIPS.items():
        with zipfile.ZipFile(served / archive, "w") as z:
            z.write(vqa_root / name, name)
    with tarfile.open(served / "datasets.tar.gz", "w:gz") as tar:
        for name in VQA_CACHE:
            tar.add(vqa_root / name, f"datasets/VQA/{name}")
        tar.add(vqa_root / VQA_ZIPS["v2_Questions_Val_mscoco.zip"], "datasets/VQA/cache/VQA_minval_23_cleaned.pkl")
    for name in COCO_LMDBS:
        (served / name).mkdir()
        shutil.copy(vqa_root.parent / "coco" / name / "data.mdb", served / name / "data.mdb")
    return served, url


@needs_downloader
def test_vqa_download_from_a_mirror_then_skips_what_is_there(vqa_mirror, vqa_root, tmp_path):
    served, url = vqa_mirror
    target = tmp_path / "data" / "VQA"
    result = run("--task", "vqa", "--dataroot", str(target), "--mirror", url)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in (*VQA_ZIPS.values(), *VQA_CACHE):
        assert (target / name).read_bytes() == (vqa_root / name).read_bytes(), name
    assert sorted(p.name for p in target.iterdir()) == sorted([*VQA_ZIPS.values(), "cache", "datasets.tar.gz"])
    assert sorted(p.name for p in (target / "cache").iterdir()) == sorted(Path(name).name for name in VQA_CACHE)
    for name in COCO_LMDBS:
        fetched = tmp_path / "data" / "coco" / name / "data.mdb"
        assert fetched.read_bytes() == (served / name / "data.mdb").read_bytes()
    size = (served / "datasets.tar.gz").stat().st_size
    assert "The VQA answer caches" in result.stdout and f"({size} bytes, as the server reports it)" in result.stdout
    assert "All files present and readable." in result.stdout and not list(tmp_path.rglob("*.part"))
    again = run("--task", "vqa", "--dataroot", str(target), "--mirror", url)
    assert again.returncode == 0 and again.stdout.count("already present") == len(VQA_ZIPS) + 1 + len(COCO_LMDBS)


def test_vqa_download_says_where_the_coco_features_come_from(vqa_root, tmp_path):
    """vilbert_beta's COCO features have no direct link: with everything else there, the script names the
    Dropbox folder and where each LMDB goes, fetches nothing, and exits 1."""
    shutil.copytree(vqa_root, tmp_path / "data" / "VQA")
    result = run("--task", "vqa", "--dataroot", str(tmp_path / "data" / "VQA"))
    assert result.returncode == 1
    assert "https://www.dropbox.com/sh/09182lupkagw1ov/AACShSEVClAh6CzbhyIKxmtga?dl=0" in result.stdout
    for name in COCO_LMDBS:
        assert f"{tmp_path / 'data' / 'coco' / name / 'data.mdb'}\n" in result.stdout
    assert "features_100/COCO_trainval_resnext152_faster_rcnn_genome.lmdb/data.mdb" in result.stdout


def test_check_reports_an_lmdb_folder_without_data_mdb_as_missing(tmp_path, demo_root):
    """What a failed download used to leave: the folder, no data.mdb in it (here a lock.mdb and a .part)."""
    root = tmp_path / "root"
    shutil.copytree(demo_root, root)
    det = root / "refcoco+_resnet101_faster_rcnn_genome.lmdb"
    (det / "data.mdb").rename(det / "data.mdb.part")
    result = run("--check", "--dataroot", str(root))
    assert result.returncode == 1
    assert f"MISSING  {det / 'data.mdb'} (the folder is there, its data.mdb is not" in result.stdout
    assert "UNREADABLE" not in result.stdout and "1 of 4 missing or unreadable" in result.stdout


@needs_downloader
def test_a_failed_download_leaves_no_empty_lmdb_folder(mirror, demo_root, tmp_path):
    served, url = mirror
    shutil.copytree(demo_root / "refcoco+", served / "refcoco+")  # the annotations only: the LMDBs are 404
    target = tmp_path / "data"
    result = run("--dataroot", str(target), "--mirror", url)
    assert result.returncode == 1 and "download failed" in result.stderr
    assert sorted(p.name for p in target.iterdir()) == ["refcoco+"]
    assert result.stdout.count("      MISSING  ") == 2 and "UNREADABLE" not in result.stdout


@needs_downloader
@pytest.mark.parametrize("task", ["refer", "vqa"])
def test_an_unreachable_network_fails_at_once_in_one_line(tmp_path, task):
    """Connection refused (a closed loopback port): one line naming the way out, not every URL retried."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = tmp_path / "data" / ("VQA" if task == "vqa" else "refer")
    result = run("--task", task, "--dataroot", str(target), "--mirror", f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert errors == [line for line in result.stderr.splitlines() if line.strip() and "curl" not in line]
    assert len(errors) == 1 and "the network is unreachable" in errors[0] and "--mirror URL" in errors[0]
    assert "copy them by hand" in errors[0] and "download failed" not in result.stderr
    assert result.stdout.count("<-") == 1  # the first URL only
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".lmdb")]
