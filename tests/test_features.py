"""Region features: both official LMDB layouts, the decoded cache, and every bad-input error."""

import base64
import functools
import json
import multiprocessing
import os
import pickle
import re
import shutil
import struct
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest

from vilbert import features
from vilbert.features import (FeatureCache, FeaturesError, ImageFeaturesReader, ImageNotInFeatures,
                              build_feature_cache, default_cache_path, open_features, read_stored, stored_keys)

DET = "refcoco+_resnet101_faster_rcnn_genome.lmdb"


def feature_record(image_id, width, height, boxes, features, layout="beta", override=None) -> bytes:
    """One LMDB value as the official conversions write it (beta: str + base64, with cls_prob; mt: arrays)."""
    boxes, features = np.asarray(boxes, np.float32), np.asarray(features, np.float32)
    if layout == "mt":
        record = {"image_id": image_id, "image_h": height, "image_w": width, "num_boxes": len(boxes),
                  "boxes": boxes, "features": features}
    else:
        def b64(array):
            return base64.b64encode(array.tobytes()).decode()
        record = {"image_id": str(image_id), "image_w": str(width), "image_h": str(height),
                  "num_boxes": str(len(boxes)), "boxes": b64(boxes), "features": b64(features),
                  "cls_prob": b64(np.full((len(boxes), 1601), 1 / 1601, np.float32))}
    record.update(override or {})
    return pickle.dumps(record)


def write_lmdb(path, records: dict, keys=True) -> str:
    """An LMDB folder of {image_id: value bytes}, then b'keys' last (left out with keys=False)."""
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for image_id, value in records.items():
            txn.put(str(image_id).encode(), value)
        if keys:
            txn.put(b"keys", pickle.dumps([str(i).encode() for i in records]))
    env.close()
    return str(path)


def random_features(rng, n):
    return rng.uniform(0, 5, (n, 2048)).astype(np.float32)


@pytest.fixture
def two_layouts(tmp_path):
    """The same three images written in the beta and the mt layout."""
    rng = np.random.default_rng(0)
    images = {}
    for image_id, (width, height, n) in {7: (100, 50, 2), 123: (640, 480, 5), 99: (333, 500, 1)}.items():
        x1, y1 = rng.uniform(0, width / 2, n), rng.uniform(0, height / 2, n)
        boxes = np.stack([x1, y1, x1 + rng.uniform(1, width / 2, n), y1 + rng.uniform(1, height / 2, n)], 1)
        images[image_id] = (width, height, boxes, random_features(rng, n))
    paths = {layout: write_lmdb(tmp_path / layout, {i: feature_record(i, *v, layout=layout) for i, v in images.items()})
             for layout in ("beta", "mt")}
    return paths, images


def test_region_features_hand_checked(tmp_path):
    features = np.zeros((2, 2048), np.float32)
    features[0, :3], features[1, :3] = (1, 2, 3), (3, 4, 9)
    path = write_lmdb(tmp_path / "f", {7: feature_record(7, 100, 50, [[10, 5, 30, 25], [0, 0, 50, 50]], features)})
    region = ImageFeaturesReader(path)[7]
    assert (region.num_boxes, region.image_w, region.image_h) == (3, 100, 50)
    assert region.features.shape == (3, 2048) and region.features.dtype == np.float32
    np.testing.assert_array_equal(region.features[0, :4], [2, 3, 6, 0])  # mean of the stored boxes
    np.testing.assert_array_equal(region.features[1:], features)
    np.testing.assert_allclose(region.spatials, [[0, 0, 1, 1, 1],
                                                 [0.1, 0.1, 0.3, 0.5, 400 / 5000],
                                                 [0.0, 0.0, 0.5, 1.0, 2500 / 5000]], rtol=1e-6)
    np.testing.assert_array_equal(region.boxes, [[0, 0, 100, 50], [10, 5, 30, 25], [0, 0, 50, 50]])
    assert region.spatials.dtype == region.boxes.dtype == np.float32


def test_both_layouts_read_identically(two_layouts):
    paths, images = two_layouts
    beta, mt = ImageFeaturesReader(paths["beta"]), ImageFeaturesReader(paths["mt"])
    assert beta.image_ids == mt.image_ids == [7, 123, 99] and len(beta) == 3
    for image_id, (width, height, boxes, features) in images.items():
        a, b = beta[image_id], mt[image_id]
        for field in a._fields:
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
        np.testing.assert_array_equal(a.boxes[1:], boxes.astype(np.float32))
        np.testing.assert_allclose(a.features[0], features.mean(0), rtol=1e-5)


def test_demo_layouts_read_identically(demo_root, demo_root_mt):
    beta, mt = ImageFeaturesReader(Path(demo_root) / DET), ImageFeaturesReader(Path(demo_root_mt) / DET)
    assert beta.image_ids == mt.image_ids
    for image_id in beta.image_ids[:50]:
        a, b = beta[image_id], mt[image_id]
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_lookup_by_any_id_type(two_layouts):
    reader = ImageFeaturesReader(two_layouts[0]["beta"])
    assert 123 in reader and np.int64(123) in reader and "123" in reader and 5 not in reader
    np.testing.assert_array_equal(reader[np.int64(123)].features, reader["123"].features)
    assert reader.keys() == [b"7", b"123", b"99"]


def test_missing_image_id(two_layouts):
    reader = ImageFeaturesReader(two_layouts[0]["beta"])
    with pytest.raises(ImageNotInFeatures, match=r"image id 5 not in .*beta; the features do not cover this split\?"):
        reader[5]


def test_missing_path_and_not_an_lmdb(tmp_path):
    with pytest.raises(FileNotFoundError, match="bash download_dataset.sh"):
        ImageFeaturesReader(tmp_path / "nowhere.lmdb")
    (tmp_path / "empty.lmdb").mkdir()
    with pytest.raises(FeaturesError, match="not an LMDB folder"):
        ImageFeaturesReader(tmp_path / "empty.lmdb")
    (tmp_path / "junk.lmdb").mkdir()
    (tmp_path / "junk.lmdb" / "data.mdb").write_bytes(b"this is an HTML error page, not LMDB" * 300)
    with pytest.raises(FeaturesError, match="cannot be opened as an LMDB"):
        ImageFeaturesReader(tmp_path / "junk.lmdb")


def test_no_keys_means_interrupted_conversion(tmp_path):
    rng = np.random.default_rng(0)
    path = write_lmdb(tmp_path / "f", {1: feature_record(1, 10, 10, [[0, 0, 5, 5]], random_features(rng, 1))},
                      keys=False)
    with pytest.raises(FeaturesError, match="no b'keys' record.*interrupted"):
        ImageFeaturesReader(path)


@pytest.mark.parametrize("layout, override, message", [
    ("beta", {"features": base64.b64encode(b"\0" * 4000).decode()},
     r"image id 1 .* corrupt or truncated: field 'features' holds 4000 bytes, expected 1 x 2048"),
    ("beta", {"boxes": "not base64!"}, r"image id 1 .* field 'boxes' is not base64"),
    ("beta", {"num_boxes": "two"}, r"image id 1 .* num_boxes 'two' is not an integer"),
    ("mt", {"boxes": np.zeros((2, 4), np.float32)}, r"image id 1 .* 2 boxes but 1 feature rows"),
    ("mt", {"features": np.zeros(100, np.float32)}, r"image id 1 .* field 'features' \(\(100,\)\)"),
    ("beta", {"image_w": "wide"}, r"image id 1 .* image_w/image_h 'wide'/'10' are not integers"),
])
def test_corrupt_record_names_id_and_field(tmp_path, layout, override, message):
    rng = np.random.default_rng(0)
    path = write_lmdb(tmp_path / "f", {1: feature_record(1, 10, 10, [[0, 0, 5, 5]], random_features(rng, 1),
                                                         layout=layout, override=override)})
    with pytest.raises(FeaturesError, match=message):
        ImageFeaturesReader(path)[1]


def test_unreadable_missing_and_empty_records(tmp_path):
    good = feature_record(1, 10, 10, [[0, 0, 5, 5]], np.ones((1, 2048)))
    empty = feature_record(3, 10, 10, np.zeros((0, 4)), np.zeros((0, 2048)))
    record = pickle.loads(good)
    del record["features"]
    path = write_lmdb(tmp_path / "f", {1: good[:len(good) // 2], 2: pickle.dumps(record), 3: empty})
    env = lmdb.open(path, map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(b"keys", pickle.dumps([b"1", b"2", b"3", b"4"]))  # 4 is listed but has no record
    env.close()
    reader = ImageFeaturesReader(path)
    with pytest.raises(FeaturesError, match="record of image id 1 .* cannot unpickle"):
        reader[1]
    with pytest.raises(FeaturesError, match="image id 2 .* no field 'features'"):
        reader[2]
    with pytest.raises(FeaturesError, match="image id 3 .* has no boxes"):
        reader[3]
    with pytest.raises(FeaturesError, match="image id 4 .* listed in b'keys' but missing"):
        reader[4]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_records_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_lmdb(tmp_path / "f", {1: pickle.dumps({"features": _Exploit()})})
    with pytest.raises(FeaturesError, match="refusing to unpickle global posix.system: not part of a feature record"):
        ImageFeaturesReader(path)[1]
    assert not (tmp_path / "pwned.txt").exists()


def _read_in_child(reader, image_id, queue):
    queue.put(reader[image_id].features[0, :8].tolist())


def test_forked_and_repeated_readers(two_layouts):
    """An LMDB read in the parent, then in a forked child (its own environment), and by two readers at once."""
    path = two_layouts[0]["beta"]
    reader = ImageFeaturesReader(path)
    expected = reader[123].features[0, :8].tolist()  # the parent has the LMDB open now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(reader, 123, queue))
    child.start()
    assert queue.get(timeout=60) == expected
    child.join(timeout=60)
    assert child.exitcode == 0
    assert ImageFeaturesReader(path)[123].features[0, :8].tolist() == expected
    assert pickle.loads(pickle.dumps(reader))[123].features[0, :8].tolist() == expected


@pytest.mark.parametrize("float16", [False, True])
def test_cache_matches_lmdb(two_layouts, float16):
    path = two_layouts[0]["beta"]
    reader = ImageFeaturesReader(path)
    cache_path = build_feature_cache(path, float16=float16, progress=False)
    assert cache_path == default_cache_path(path) and not list(cache_path.parent.glob("*.tmp*"))
    cache = open_features(path)
    assert isinstance(cache, FeatureCache)
    assert cache.image_ids == reader.image_ids and len(cache) == 3 and 123 in cache and 5 not in cache
    for image_id in reader.image_ids:
        a, b = reader[image_id], cache[image_id]
        assert b.features.dtype == (np.float16 if float16 else np.float32)
        if float16:
            np.testing.assert_allclose(b.features, a.features, rtol=1e-3, atol=1e-3)
        else:
            np.testing.assert_array_equal(b.features, a.features)
        for field in ("spatials", "boxes", "num_boxes", "image_w", "image_h"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    with pytest.raises(ImageNotInFeatures, match="image id 5 not in"):
        cache[5]
    assert pickle.loads(pickle.dumps(cache))[99].num_boxes == 2


def test_stale_or_corrupt_cache_falls_back_to_lmdb(two_layouts, tmp_path, caplog):
    path = two_layouts[0]["mt"]
    cache_path = build_feature_cache(path, progress=False)
    data = os.path.join(path, "data.mdb")
    stat = os.stat(data)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the LMDB was replaced since
    with pytest.raises(FeaturesError, match="is stale"):
        FeatureCache(cache_path, source=path)
    assert isinstance(open_features(path), ImageFeaturesReader)
    assert "stale" in caplog.text
    with pytest.raises(FeaturesError, match="is stale"):
        open_features(path, cache=cache_path)  # an explicitly named cache must be valid

    build_feature_cache(path, progress=False)
    assert isinstance(open_features(path), FeatureCache)
    cache_path.write_bytes(cache_path.read_bytes()[:-10])  # truncated
    with pytest.raises(FeaturesError, match="truncated or corrupt"):
        FeatureCache(cache_path)
    assert isinstance(open_features(path), ImageFeaturesReader)
    assert isinstance(open_features(path, cache=False), ImageFeaturesReader)
    with pytest.raises(FileNotFoundError, match="tools/build_feature_cache.py"):
        open_features(path, cache=tmp_path / "absent.cache")


def many_images(tmp_path, count=40, boxes=10) -> str:
    """An LMDB of `count` images of `boxes` boxes each: 40 x 11 rows of float32 features span 3.4 MiB."""
    rng = np.random.default_rng(1)
    records = {i: feature_record(i, 100, 100, [[0, 0, 50, 50]] * boxes, random_features(rng, boxes))
               for i in range(1000, 1000 + count)}
    return write_lmdb(tmp_path / "many", records)


def damage(path, offset: int, count: int) -> None:
    """Overwrite `count` bytes at `offset` with random ones, leaving size and header intact (as bit rot or a
    bad copy does)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.random.default_rng(2).integers(0, 256, count, dtype=np.uint8).tobytes())
    # A later process reads every cache afresh; this one keys what it verified by mtime, whose clock may not have
    # ticked since the cache was written a moment ago.
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))


def test_a_damaged_cache_is_refused_naming_the_images_it_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(features, "CHECKSUM_BLOCK", 256 << 10)  # 14 blocks: damage names a few images
    path = many_images(tmp_path)
    cache = build_feature_cache(path, progress=False)
    FeatureCache(cache, source=path)  # intact: opens
    row = 11 * 2048 * 4  # one image's features
    at = features.CACHE_ALIGN + 20 * row + 100  # inside image 1020's features
    damage(cache, at, 1000)
    with pytest.raises(FeaturesError) as error:
        FeatureCache(cache, source=path)
    message = str(error.value)
    block = (at - features.CACHE_ALIGN) // (256 << 10)
    start = features.CACHE_ALIGN + block * (256 << 10)
    assert message.startswith(f"feature cache {cache} is damaged: 1 of its 14 blocks of 256 KiB fail their checksum "
                              f"(bytes {start:,}-{start + (256 << 10):,}), holding the features of ")
    ids = message.split("(ids ")[1].split(")")[0].split(", ")
    assert ids == ["1017", "1018", "1019", "1020"]  # bytes 1.57 to 1.84 MB: images 17.5 to 20.4 of 90,112 bytes each
    assert message.endswith(f"rebuild it: python tools/build_feature_cache.py {path}") and "\n" not in message
    damage(cache, json.loads(_header_of(cache))["arrays"]["index"][0], 4)
    with pytest.raises(FeaturesError, match=r"2 of its 14 blocks of 256 KiB fail their checksum \(bytes "
                                            r"1,572,928-1,835,072, 3,407,936-3,621,696\), holding features rows "
                                            r"192-224, 416-440 and the spatials, boxes, index array\(s\); delete "
                                            r"it or rebuild it"):
        FeatureCache(cache)


def _header_of(cache) -> bytes:
    raw = open(cache, "rb").read()
    offset, length = struct.unpack("<QQ", raw[8:24])
    return raw[offset:offset + length]


def test_a_damaged_cache_is_rebuilt_by_a_run_and_passed_over_by_a_reader(tmp_path, caplog, capsys):
    path = many_images(tmp_path)
    cache = open_features(path, build=True)
    damage(cache.path, 5 << 10, 1 << 10)
    assert isinstance(open_features(path), ImageFeaturesReader)  # not building: the LMDB, never the damaged file
    assert f"feature cache {cache.path} is damaged: 1 of its 1 blocks of 4.0 MiB fail" in caplog.text
    capsys.readouterr()
    rebuilt = open_features(path, build=True)
    assert (f"Building the float16 feature cache of {path} at {cache.path} (again: feature cache {cache.path} is "
            f"damaged: ") in capsys.readouterr().out
    assert np.array_equal(rebuilt[1003].features, ImageFeaturesReader(path)[1003].features.astype(np.float16))


def test_a_damaged_header_and_an_old_version_are_refused(tmp_path):
    path = many_images(tmp_path, count=2)
    cache = build_feature_cache(path, progress=False)
    raw = bytearray(cache.read_bytes())
    at = raw.index(b'"source_path": "') + 16
    raw[at] ^= 1  # still JSON, another path
    cache.write_bytes(bytes(raw))
    with pytest.raises(FeaturesError, match=r"has a damaged header \(its checksum differs\); delete it or rebuild"):
        FeatureCache(cache)
    raw[at] ^= 1
    header = _header_of(cache).replace(b'"version": 2', b'"version": 1')
    cache.write_bytes(bytes(raw[:len(raw) - len(header)]) + header)  # a cache of the earlier format
    with pytest.raises(FeaturesError, match="has version 1, this code reads 2; delete it or rebuild it"):
        FeatureCache(cache)


def test_a_cache_is_read_whole_once_per_process(tmp_path, monkeypatch):
    path = many_images(tmp_path, count=2)
    checks = []
    real = features.FeatureCache.damage
    monkeypatch.setattr(features.FeatureCache, "damage", lambda self: checks.append(self.path) or real(self))
    cache = build_feature_cache(path, progress=False)
    FeatureCache(cache, source=path)  # written by this process: its checksums are of these very bytes
    assert checks == []
    stat = os.stat(cache)
    os.utime(cache, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # changed since (as by another process)
    FeatureCache(cache, source=path)  # the train split's open: read whole
    FeatureCache(cache, source=path)  # the val split's: already verified
    assert checks == [str(cache)]


def test_failed_build_leaves_nothing(tmp_path):
    rng = np.random.default_rng(0)
    huge = random_features(rng, 1) * 1e5  # beyond float16
    path = write_lmdb(tmp_path / "f", {1: feature_record(1, 10, 10, [[0, 0, 5, 5]], huge)})
    with pytest.raises(FeaturesError, match="beyond the float16 range"):
        build_feature_cache(path, float16=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_nan_features_are_named_as_damage_not_as_a_range(tmp_path):
    broken = random_features(np.random.default_rng(0), 1)
    broken[0, 7] = np.nan
    path = write_lmdb(tmp_path / "f", {1: feature_record(1, 10, 10, [[0, 0, 5, 5]], broken)})
    for float16 in (True, False):
        with pytest.raises(FeaturesError, match=r"^image id 1 of .* has NaN or infinite features: the LMDB is damaged "
                                                r"there; extract that image again"):
            build_feature_cache(path, float16=float16, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_cli_builds_the_default_cache(two_layouts, capsys):
    from tools.build_feature_cache import main

    path = two_layouts[0]["beta"]
    main([path, "--float16"])
    assert "float16 features" in capsys.readouterr().out
    assert open_features(path).dtype == np.float16


def test_first_use_builds_the_float16_cache_and_later_ones_reuse_it(two_layouts, capsys):
    path = two_layouts[0]["beta"]
    assert isinstance(open_features(path), ImageFeaturesReader) and not default_cache_path(path).exists()
    cache = open_features(path, build=True)
    assert isinstance(cache, FeatureCache) and cache.dtype == np.float16
    assert cache.path == str(default_cache_path(path))
    assert "Building the float16 feature cache" in capsys.readouterr().out
    built = os.stat(cache.path).st_mtime_ns
    assert isinstance(open_features(path, build=True), FeatureCache)
    assert capsys.readouterr().out == "" and os.stat(cache.path).st_mtime_ns == built  # reused, not rebuilt

    data = os.path.join(path, "data.mdb")
    os.utime(data, ns=(os.stat(data).st_atime_ns, os.stat(data).st_mtime_ns + 10**9))  # the LMDB changed
    assert isinstance(open_features(path, build=True), FeatureCache)
    assert "Building the float16 feature cache of" in capsys.readouterr().out  # stale: built again


_real_build = features.build_feature_cache


def _build_counting(log, path, *args, **kwargs):
    with open(log, "a") as f:
        f.write("build\n")
    time.sleep(0.5)  # the other process arrives while this one builds
    return _real_build(path, *args, **kwargs)


def _ensure_in_child(path, queue):
    queue.put(str(features.ensure_feature_cache(path, progress=False)))


def test_processes_starting_together_build_once(two_layouts, tmp_path, monkeypatch, capsys):
    path = two_layouts[0]["mt"]
    log = tmp_path / "builds.log"
    monkeypatch.setattr(features, "build_feature_cache", functools.partial(_build_counting, log))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_ensure_in_child, args=(path, queue)) for _ in range(2)]
    for child in children:
        child.start()
    built = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert built == [str(default_cache_path(path))] * 2
    assert log.read_text() == "build\n"  # one built, the other waited and read it
    assert isinstance(FeatureCache(built[0], source=path), FeatureCache)


def test_read_only_lmdb_folder_puts_the_cache_under_the_cache_folder(two_layouts, tmp_path, monkeypatch):
    path = two_layouts[0]["beta"]
    folder = os.path.dirname(path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == folder else real_access(p, mode))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = open_features(path, build=True)
    assert Path(cache.path).parent == tmp_path / "xdg" / "vilbert-paddle" / "features"
    assert Path(cache.path) == features.fallback_cache_path(path) and not default_cache_path(path).exists()
    assert open_features(path).path == cache.path  # found there by later runs, without building


def test_not_enough_disk_space_is_one_clear_error(two_layouts, monkeypatch):
    path = two_layouts[0]["beta"]
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(FeaturesError, match=r"not enough disk space for the feature cache .* needs about \d+\.\d MiB "
                                            r"and .* has 1 KiB free; .* --no-build_feature_cache"):
        open_features(path, build=True)
    assert not default_cache_path(path).exists()


def test_building_off_reads_the_lmdb(two_layouts):
    path = two_layouts[0]["beta"]
    assert isinstance(open_features(path, build=False), ImageFeaturesReader)
    assert isinstance(open_features(path, cache=False, build=True), ImageFeaturesReader)
    assert not default_cache_path(path).exists()


@pytest.mark.parametrize("make", ["empty folder", "no folder", "junk data.mdb"])
def test_a_folder_that_is_no_lmdb_fails_before_any_cache_is_announced(tmp_path, capsys, make):
    """A failed download leaves such folders: the one error comes first, no "Building ..." line, no lock file."""
    path = tmp_path / DET
    if make != "no folder":
        path.mkdir()
    if make == "junk data.mdb":
        (path / "data.mdb").write_bytes(b"<html>Dropbox</html>" * 300)
    with pytest.raises((FeaturesError, FileNotFoundError), match="bash download_dataset.sh"):
        open_features(path, build=True)
    assert capsys.readouterr().out == ""
    assert sorted(p.name for p in tmp_path.rglob("*") if p != path and p.parent != path) == []


def test_a_damaged_lmdb_page_is_one_error_naming_the_folder(tmp_path):
    path = tmp_path / "damaged.lmdb"
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i in range(2000):
            txn.put(f"{i:06d}".encode(), bytes(100))
    env.close()
    with open(path / "data.mdb", "r+b") as f:  # four pages of the tree overwritten
        f.seek(4096 * 3)
        f.write(b"\xff" * 4096 * 4)
    with pytest.raises(FeaturesError, match=rf"^{re.escape(str(path))} is damaged \(CorruptedError: .*MDB_CORRUPTED"):
        for key in stored_keys(path):
            read_stored(path, key)
