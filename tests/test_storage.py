"""``localize`` against a real S3-compatible HTTP server (moto in server mode) on 127.0.0.1 only."""
import concurrent.futures
import os
import re
import socket
import sys
import time
import uuid

import lmdb
import pytest

from vilbert.storage import EndpointUnreachable, localize

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(endpoint, monkeypatch, tmp_path):
    """A client and an empty bucket; dummy credentials, no config files, no instance-metadata lookups."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
                 "VILBERT_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    client = boto3.session.Session().client("s3", endpoint_url=endpoint)
    bucket = f"vilbert-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_local_path_is_returned_unchanged_without_boto3(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "boto3", None)  # any import of boto3 now raises ImportError
    for path in (str(tmp_path / "model.bin"), "relative/dir", "data/refcoco+"):
        assert localize(path) == path
    with pytest.raises(ImportError, match="pip install boto3"):
        localize("s3://bucket/model.bin")


def test_object_is_downloaded_once_then_reused(s3, cache, capsys):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="ckpt/pytorch_model_9.bin", Body=b"weights-v1")
    local = localize(f"s3://{bucket}/ckpt/pytorch_model_9.bin", cache_dir=cache)
    assert local == os.path.join(cache, bucket, "ckpt", "pytorch_model_9.bin")
    assert _read(local) == b"weights-v1"
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"s3://{bucket}/ckpt/pytorch_model_9.bin -> {local} (0.0 MB)"
    assert "downloaded 1 of 1 files" in out.splitlines()[1]
    stat = os.stat(local)

    assert localize(f"s3://{bucket}/ckpt/pytorch_model_9.bin", cache_dir=cache) == local
    assert capsys.readouterr().out == ""  # nothing printed when cached
    assert os.stat(local).st_mtime_ns == stat.st_mtime_ns and os.stat(local).st_ino == stat.st_ino
    assert sorted(os.listdir(os.path.dirname(local))) == [".pytorch_model_9.bin.etag", "pytorch_model_9.bin"]


def test_changed_object_is_downloaded_again(s3, cache, capsys):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="model.pdparams", Body=b"aaaa")
    local = localize(f"s3://{bucket}/model.pdparams", cache_dir=cache)
    client.put_object(Bucket=bucket, Key="model.pdparams", Body=b"bbbb")  # same size, new ETag
    capsys.readouterr()
    assert localize(f"s3://{bucket}/model.pdparams", cache_dir=cache) == local
    assert _read(local) == b"bbbb"
    assert "downloaded 1 of 1 files" in capsys.readouterr().out


def test_cache_root_from_env_and_endpoint_argument(s3, endpoint, monkeypatch, tmp_path):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="model.bin", Body=b"x")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("VILBERT_CACHE", str(tmp_path / "env-cache"))
    local = localize(f"s3://{bucket}/model.bin", endpoint_url=endpoint)
    assert local == str(tmp_path / "env-cache" / bucket / "model.bin") and _read(local) == b"x"


def test_prefix_mirrors_a_data_root_with_an_lmdb(s3, cache, tmp_path, capsys):
    client, bucket = s3
    source = tmp_path / "source.lmdb"
    env = lmdb.open(str(source), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"keys", b"[b'1', b'2']")
        txn.put(b"1", b"features of image 1")
    env.close()
    assert sorted(os.listdir(source)) == ["data.mdb", "lock.mdb"]
    for name in ("data.mdb", "lock.mdb"):
        client.upload_file(str(source / name), bucket, f"datasets/refcoco+/features.lmdb/{name}")
    client.put_object(Bucket=bucket, Key="datasets/refcoco+/annotations/refs(unc).p", Body=b"refs")
    client.put_object(Bucket=bucket, Key="datasets/refcoco+/empty-folder/", Body=b"")  # console "folder" marker
    client.put_object(Bucket=bucket, Key="datasets/refcoco+-other/x", Body=b"not under the prefix")

    root = localize(f"s3://{bucket}/datasets/refcoco+", cache_dir=cache)
    assert root == os.path.join(cache, bucket, "datasets", "refcoco+")
    assert sorted(os.listdir(root)) == ["annotations", "features.lmdb"]
    assert _read(os.path.join(root, "annotations", "refs(unc).p")) == b"refs"
    env = lmdb.open(os.path.join(root, "features.lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(b"1") == b"features of image 1" and txn.get(b"keys") == b"[b'1', b'2']"
    env.close()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and "downloaded 3 of 3 files" in out[3]  # one line per file, then the summary

    assert localize(f"s3://{bucket}/datasets/refcoco+/", cache_dir=cache) == root  # trailing slash: same folder
    assert capsys.readouterr().out == ""


def test_missing_key_prefix_and_bucket(s3, cache):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="present.bin", Body=b"x")
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/absent.bin: no such object or prefix"):
        localize(f"s3://{bucket}/absent.bin", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/absent/: no such object or prefix"):
        localize(f"s3://{bucket}/absent/", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket/k: no such object or prefix"):
        localize("s3://no-such-bucket/k", cache_dir=cache)
    assert not os.path.exists(os.path.join(cache, bucket, "absent.bin"))


def test_missing_credentials_name_the_env_vars(s3, cache, monkeypatch):
    _, bucket = s3
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(PermissionError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        localize(f"s3://{bucket}/model.bin", cache_dir=cache)


def test_interrupted_download_is_never_a_cache_hit(s3, cache, monkeypatch, capsys):
    """Also covers the sidecar: written after the rename, so a crash between them leaves a file without one."""
    import vilbert.storage as storage

    client, bucket = s3
    client.put_object(Bucket=bucket, Key="model.bin", Body=b"complete weights")
    local = os.path.join(cache, bucket, "model.bin")

    def crash(src, dst):  # the process dies after the bytes arrived, before the rename
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(storage.os, "replace", crash)
        localize(f"s3://{bucket}/model.bin", cache_dir=cache)
    assert os.listdir(os.path.dirname(local)) == []  # no final file, no sidecar, temp file removed

    # leftovers of a hard kill: a full-size temp file, and a truncated file at the final path without its sidecar
    with open(os.path.join(os.path.dirname(local), ".model.bin.abc123.part"), "wb") as f:
        f.write(b"complete weights")
    with open(local, "wb") as f:
        f.write(b"complete")
    capsys.readouterr()
    assert localize(f"s3://{bucket}/model.bin", cache_dir=cache) == local
    assert _read(local) == b"complete weights"
    assert "downloaded 1 of 1 files" in capsys.readouterr().out

    # a file whose size no longer matches its sidecar (e.g. truncated by hand) is fetched again too
    with open(local, "wb") as f:
        f.write(b"complete")
    assert localize(f"s3://{bucket}/model.bin", cache_dir=cache) == local
    assert _read(local) == b"complete weights"


def test_processes_fetching_together_download_once(s3, cache, monkeypatch, capsys):
    """The ranks of one machine localize the same data root at once: one downloads, the others find it cached."""
    import vilbert.storage as storage

    client, bucket = s3
    for name in ("a.bin", "b.bin"):
        client.put_object(Bucket=bucket, Key=f"root/{name}", Body=name.encode() * 1000)
    downloads, real_download = [], storage._download

    def slow_download(*args):
        downloads.append(args[2])
        time.sleep(0.2)  # long enough for every thread to reach the lock while the first one fetches
        real_download(*args)

    monkeypatch.setattr(storage, "_download", slow_download)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # each thread opens the lock file itself, as a process
        roots = list(pool.map(lambda _: localize(f"s3://{bucket}/root", cache_dir=cache), range(4)))
    assert roots == [os.path.join(cache, bucket, "root")] * 4
    assert sorted(downloads) == ["root/a.bin", "root/b.bin"]
    assert capsys.readouterr().out.count("Waiting for another process to finish fetching") >= 1
    assert sorted(os.listdir(roots[0])) == [".a.bin.etag", ".b.bin.etag", "a.bin", "b.bin"]


def test_an_unreachable_endpoint_is_one_line_saying_how_long_it_tried(s3, cache, monkeypatch):
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(EndpointUnreachable) as raised:
        localize("s3://bucket/model.bin", cache_dir=cache)
    message = str(raised.value)
    assert re.fullmatch(rf"s3://bucket/model.bin: the S3 endpoint http://127.0.0.1:{port} did not answer in "
                        rf"\d+\.\d s \(Could not connect to the endpoint URL: .*\); check AWS_ENDPOINT_URL and the "
                        rf"network", message), message
