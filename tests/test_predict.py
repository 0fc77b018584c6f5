"""predict.py on your own images: converted features, the JSONL batch mode, both checkpoint families (12-in-1's
with task tokens), the warnings about features unlike the family's, and the picture drawn on a JPEG."""

import json
import re

import numpy as np
import paddle
import pytest
from PIL import Image

import predict
import vilbert.engine
from training_support import DEMO_TASK, PROJECT, TEST_MODEL
from vilbert.checkpoint import save_checkpoint
from vilbert.config import ViLBertConfig
from vilbert.demo_data import REGION_FILES, REGIONS_DIR, make_demo_dataset
from vilbert.extractor_outputs import convert
from vilbert.features import ImageFeaturesReader
from vilbert.model import VILBertForVLTasks

TASK_12IN1 = PROJECT / "config" / "refcoco+_12in1.yml"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The demo's detected regions as .npz files, converted into a beta LMDB, and as .npy into an mt one."""
    folder = tmp_path_factory.mktemp("own")
    root = make_demo_dataset(folder / "root", seed=1, num_train_images=4, num_val_images=2, num_test_images=1,
                             region_files=("npz", "npy"))
    for fmt, layout in (("npz", "beta"), ("npy", "mt")):
        convert([str(root / REGIONS_DIR / REGION_FILES[fmt])], folder / f"{layout}.lmdb", progress=False)
    return {layout: folder / f"{layout}.lmdb" for layout in ("beta", "mt")}


def checkpoint(folder, task_tokens: bool):
    config = json.loads(TEST_MODEL.read_text())
    config["task_specific_tokens"] = task_tokens
    config_file = folder / f"model_{task_tokens}.json"
    config_file.write_text(json.dumps(config))
    paddle.seed(0)
    model = VILBertForVLTasks(ViLBertConfig.from_json(config_file))
    return config_file, save_checkpoint(model.state_dict(), folder / f"weights_{task_tokens}.pdparams")


@pytest.fixture(scope="module")
def beta_model(tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp("beta"), task_tokens=False)


@pytest.fixture(scope="module")
def mt_model(tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp("mt"), task_tokens=True)


def flags(model, features, task=DEMO_TASK, *more):
    config_file, weights = model
    return ["--task_config", str(task), "--config_file", str(config_file), "--from_pretrained", str(weights),
            "--features", str(features), *map(str, more)]


def warnings_in(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


def test_batch_mode_writes_one_line_per_query(converted, beta_model, tmp_path, capsys):
    reader = ImageFeaturesReader(converted["beta"])
    words = ["the red dog", "man in blue", "green car", "the white one"]
    queries = [{"image_id": reader.image_ids[i % len(reader)], "expression": words[i % 4], "id": i} for i in range(10)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries) + "\n")
    predict.main(flags(beta_model, converted["beta"], DEMO_TASK, "--batch", tmp_path / "q.jsonl", "--top_k", 2,
                       "--eval_batch_size", 4))
    out, err = capsys.readouterr()
    assert warnings_in(err) == []  # the demo config's features are the generated ones
    assert re.search(rf"Grounded 10 expressions in {len(reader)} images in [\d.]+ s \(\d+ expressions/s, batches "
                     rf"of up to 4, model loading not counted\); wrote {tmp_path / 'q.jsonl'}.predictions.jsonl", out)
    lines = [json.loads(line) for line in (tmp_path / "q.jsonl.predictions.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == list(range(10))
    for query, line in zip(queries, lines):
        assert line["image_id"] == query["image_id"] and line["expression"] == query["expression"]
        assert len(line["top_k"]) == 2 and line["top_k"][0] == {k: line[k] for k in ("region", "box", "score")}
        assert line["top_k"][0]["score"] >= line["top_k"][1]["score"]
        region = reader[query["image_id"]]
        assert 0 <= line["region"] < region.num_boxes
        np.testing.assert_allclose(line["box"], region.boxes[line["region"]], atol=0.051)

    # one query alone gives the same choice and score as in its batch
    predict.main(flags(beta_model, converted["beta"], DEMO_TASK, "--image_id", queries[5]["image_id"],
                       "--expression", queries[5]["expression"], "--out", tmp_path / "one.png"))
    single = re.search(r"region (\d+), box .* score (-?[\d.]+)", capsys.readouterr().out)
    assert int(single.group(1)) == lines[5]["region"] and abs(float(single.group(2)) - lines[5]["score"]) < 2e-3


def test_12in1_checkpoint_with_task_tokens(converted, mt_model, capsys, monkeypatch):
    image_id = ImageFeaturesReader(converted["mt"]).image_ids[0]
    given = []

    def recorded_task_ids(batch, task_id, model):
        given.append(vilbert.engine.task_ids_for.__wrapped__(batch, task_id, model).numpy().tolist())
        return paddle.to_tensor(given[-1])

    recorded_task_ids.__wrapped__ = vilbert.engine.task_ids_for
    monkeypatch.setattr(vilbert.engine, "task_ids_for", recorded_task_ids)
    predict.main(flags(mt_model, converted["mt"], TASK_12IN1, "--image_id", image_id, "--expression", "the red dog",
                       "--out", converted["mt"].parent / "p.png"))
    assert given == [[[10]]]  # config/refcoco+_12in1.yml's task token, for the model built with task tokens
    out, err = capsys.readouterr()
    assert warnings_in(err) == [] and '"the red dog" in image' in out  # 12-in-1 layout, up to 100 boxes

    predict.main(flags(mt_model, converted["beta"], TASK_12IN1, "--image_id", image_id, "--expression", "dog",
                       "--out", converted["mt"].parent / "p.png"))
    (warning,) = warnings_in(capsys.readouterr().err)
    assert "the features are in the vilbert_beta (str fields, base64 float32) layout; 12-in-1 checkpoints" in warning


def test_beta_family_warns_about_few_boxes(converted, beta_model, capsys):
    image_id = ImageFeaturesReader(converted["beta"]).image_ids[0]
    predict.main(flags(beta_model, converted["mt"], PROJECT / "config" / "refcoco+.yml", "--image_id", image_id,
                       "--expression", "dog", "--out", converted["mt"].parent / "p.png"))
    layout, boxes = warnings_in(capsys.readouterr().err)
    assert "layout; vilbert_beta checkpoints were trained on features of bottom-up-attention" in layout
    assert boxes.startswith("warning: 1 image(s) have a number of boxes outside 10-100")


def test_drawn_on_a_jpeg_photo(converted, beta_model, tmp_path, capsys):
    reader = ImageFeaturesReader(converted["beta"])
    image_id = reader.image_ids[1]
    size = (reader[image_id].image_w, reader[image_id].image_h)
    Image.new("RGB", size, (90, 140, 200)).save(tmp_path / "photo.jpg")
    predict.main(flags(beta_model, converted["beta"], DEMO_TASK, "--image_id", image_id, "--expression", "red dog",
                       "--image", tmp_path / "photo.jpg", "--out", tmp_path / "drawn.jpg"))
    out, err = capsys.readouterr()
    assert f"wrote {tmp_path / 'drawn.jpg'}" in out and warnings_in(err) == []
    assert (tmp_path / "drawn.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # a JPEG

    Image.new("RGB", (size[0] * 2, size[1] * 2)).save(tmp_path / "big.jpg")
    predict.main(flags(beta_model, converted["beta"], DEMO_TASK, "--image_id", image_id, "--expression", "red dog",
                       "--image", tmp_path / "big.jpg", "--out", tmp_path / "big.png"))
    (warning,) = warnings_in(capsys.readouterr().err)
    assert f"is {size[0] * 2}x{size[1] * 2} pixels but the features were extracted from a {size[0]}x{size[1]}" in warning


@pytest.mark.parametrize("content, expected", [
    ("{not json\n", "q.jsonl line 1 is not JSON"),
    ('{"image_id": 1}\n', 'q.jsonl line 1: expected {"image_id": ..., "expression": "..."}'),
    ('{"image_id": "x1", "expression": "dog"}\n', "q.jsonl line 1: image_id 'x1' is not an integer"),
    ('{"image_id": 1, "expression": 5}\n', "q.jsonl line 1: expression 5 is not a non-empty string"),
    ('{"image_id": 5, "expression": "dog"}\n', "q.jsonl query 1: image_id 5 is not in the features"),
    ("\n", "q.jsonl holds no queries"),
])
def test_bad_batch_files(converted, beta_model, tmp_path, capsys, content, expected):
    (tmp_path / "q.jsonl").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        predict.main(flags(beta_model, converted["beta"], DEMO_TASK, "--batch", tmp_path / "q.jsonl"))
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err.strip().splitlines()[-1]


def test_batch_excludes_single_query_flags(converted, beta_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        predict.main(flags(beta_model, converted["beta"], DEMO_TASK, "--batch", tmp_path / "q.jsonl", "--image_id", 1))
    assert "--batch takes the image ids and expressions from its file" in capsys.readouterr().err


def test_a_photo_that_is_not_an_image_is_one_line(converted, beta_model, tmp_path):
    image_id = ImageFeaturesReader(converted["beta"]).image_ids[1]
    (tmp_path / "notes.jpg").write_text("not a picture")
    with pytest.raises(SystemExit) as exit_info:
        predict.main(flags(beta_model, converted["beta"], DEMO_TASK, "--image_id", image_id, "--expression",
                           "red dog", "--image", tmp_path / "notes.jpg"))
    assert exit_info.value.code == (f"error: --image {tmp_path / 'notes.jpg'} is not an image Pillow can read: give "
                                    f"the JPEG or PNG the features were extracted from, or leave --image out to draw "
                                    f"on a blank canvas")
