"""``s3://`` checkpoints and data roots, made local so the rest of the code only ever sees local paths.

Checkpoints are single objects; feature and annotation roots (LMDB folders holding ``data.mdb``/``lock.mdb``) are
prefixes. Both are mirrored once into a cache and reused while each file's size and ETag still match the object,
so a changed object is fetched again and an interrupted download never passes for a cached one. The ranks of one
machine fetch a path once: the first downloads under a file lock, the others wait and find it cached. The endpoint and
credentials come from the usual boto3 configuration, so ``AWS_ENDPOINT_URL`` selects an S3-compatible server
(MinIO, Ceph) without a project-specific flag. boto3 is imported only for ``s3://`` paths.
"""
import hashlib
import os
import tempfile
import time

from .fileio import atomic_write, file_lock

_CREDENTIALS_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for "
                     "an S3-compatible server")


def localize(path: str, cache_dir: str | None = None, endpoint_url: str | None = None) -> str:
    """Return a local path for ``path``: itself if local, else the cached copy of the ``s3://`` object or prefix.

    The cache root is ``cache_dir``, else ``$VILBERT_CACHE``, else ``~/.cache/vilbert-paddle/s3``; the copy lives
    at ``<root>/<bucket>/<key>``. A prefix becomes a directory with the objects' relative layout.
    """
    if not path.startswith("s3://"):
        return path
    bucket, _, key = path[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{path}: expected s3://bucket/key")
    client = _client(endpoint_url)
    objects = _list_objects(client, path, bucket, key)
    root = cache_dir or os.environ.get("VILBERT_CACHE") or os.path.expanduser("~/.cache/vilbert-paddle/s3")
    local = os.path.join(root, bucket, *_parts(bucket, key.strip("/")))
    fetched = []
    lock = os.path.join(root, ".locks", f"{hashlib.sha256(local.encode()).hexdigest()[:16]}.lock")  # not in the copy
    with file_lock(lock, waiting=f"Waiting for another process to finish fetching {path} ..."):
        for rel, obj_key, size, etag in objects:
            dest = os.path.join(local, *_parts(bucket, obj_key, rel))
            if not _is_cached(dest, size, etag):
                _download(client, bucket, obj_key, dest, size, etag)
                print(f"s3://{bucket}/{obj_key} -> {dest} ({_mb(size)})", flush=True)
                fetched.append(size)
    if fetched:
        print(f"{path}: downloaded {len(fetched)} of {len(objects)} files ({_mb(sum(fetched))}) into {local}",
              flush=True)
    return local


class EndpointUnreachable(ConnectionError):
    """The S3 endpoint did not answer (wrong AWS_ENDPOINT_URL, no network, a firewall)."""


def _client(endpoint_url):
    """A fresh session, not boto3's shared default one, so credentials set after it was first used count.
    Connecting gives up after 3 attempts of 10 s (boto3's defaults, 5 of 60 s, make a dead endpoint 5 minutes)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as err:
        raise ImportError("s3:// paths need boto3: pip install boto3") from err
    config = Config(connect_timeout=10, retries={"max_attempts": 3, "mode": "standard"})
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def _list_objects(client, path, bucket, key):
    """``[(relative path, key, size, etag)]``: one entry with path "" for an object, else all files under the prefix.

    An object wins over a prefix of the same name; "folder/" markers are skipped.
    """
    from botocore.exceptions import ClientError, NoCredentialsError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    started = time.time()
    try:
        if key and not key.endswith("/"):
            try:
                head = client.head_object(Bucket=bucket, Key=key)
                return [("", key, head["ContentLength"], head["ETag"])]
            except ClientError as err:
                if _status(err) != 404:
                    raise
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        objects = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if not rel.endswith("/"):
                    objects.append((rel, obj["Key"], obj["Size"], obj["ETag"]))
    except NoCredentialsError as err:
        raise PermissionError(f"{path}: no AWS credentials found; {_CREDENTIALS_HINT}") from err
    except BotoConnectionError as err:
        raise EndpointUnreachable(f"{path}: the S3 endpoint {client.meta.endpoint_url} did not answer in "
                                  f"{time.time() - started:.1f} s ({err}); check AWS_ENDPOINT_URL and the "
                                  f"network") from err
    except ClientError as err:
        if _status(err) == 404:
            raise FileNotFoundError(f"{path}: no such object or prefix (bucket or key not found)") from err
        if _status(err) == 403:
            raise PermissionError(f"{path}: access denied ({err}); {_CREDENTIALS_HINT}") from err
        raise
    if not objects:
        raise FileNotFoundError(f"{path}: no such object or prefix")
    return objects


def _parts(bucket, key, rel=None):
    """Path components of ``rel`` (default ``key``), refusing any that would leave the cache directory."""
    rel = key if rel is None else rel
    parts = rel.split("/") if rel else []
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"s3://{bucket}/{key}: key cannot be mirrored as a local path (empty, '.' or '..' part)")
    return parts


def _status(err):
    return err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _etag_file(dest):
    """Hidden sidecar, so listings of a mirrored data root show only the mirrored files."""
    folder, name = os.path.split(dest)
    return os.path.join(folder, f".{name}.etag")


def _is_cached(dest, size, etag):
    try:
        with open(_etag_file(dest)) as f:
            return os.path.getsize(dest) == size and f.read() == etag
    except OSError:
        return False


def _download(client, bucket, key, dest, size, etag):
    """Fetch into a temp file beside ``dest`` and rename; the sidecar comes last, so a crash leaves no cache hit."""
    folder = os.path.dirname(dest)
    os.makedirs(folder, exist_ok=True)
    try:
        os.remove(_etag_file(dest))
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(dest)}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            client.download_fileobj(bucket, key, f)
        if os.path.getsize(tmp) != size:
            raise OSError(f"s3://{bucket}/{key}: got {os.path.getsize(tmp)} bytes, expected {size}; retry")
        os.replace(tmp, dest)
        atomic_write(_etag_file(dest), etag)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _mb(size):
    return f"{size / 1e6:.1f} MB"
