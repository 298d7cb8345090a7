"""`vlretrieval benchmark`: a suite over the demo data, a Karpathy-layout fixture and an image
folder in one command; every output agrees with the others and with `vlretrieval eval`; each
dataset's images are embedded once; missing data is skipped with the reason."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tests import layout_fixtures
from tests.helpers import assert_nested_close
from vlretrieval import cli
from vlretrieval.config import load_config
from vlretrieval.data import datasets
from vlretrieval.data.builders import demo_scenes
from vlretrieval.data.tokenizer import load_tokenizer
from vlretrieval.evaluation.checkpoints import evaluate_checkpoint
from vlretrieval.train import train_and_evaluate

COLOURS = {"red": (220, 20, 20), "green": (20, 170, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("suite")
    data_dir = str(base / "data")
    tokenizer = demo_scenes.demo_tokenizer_path(
        datasets.open_dataset(load_config("configs/demo.py:tiny", [f"data.data_dir={data_dir}"]).data, seed=0).builder
    )
    overrides = [f"data.data_dir={data_dir}", f"data.tokenizer={tokenizer}"]
    workdir = str(base / "run")
    # One device: the run only has to exist (sharded evaluation is test_sharded_eval.py's).
    train_and_evaluate(load_config("configs/demo.py:tiny", [*overrides, "train.num_devices=1"]), workdir,
                       progress=False)
    return base, workdir, overrides


def _image_folder(root):
    for colour, rgb in COLOURS.items():
        folder = root / "test" / f"{colour}_square"
        folder.mkdir(parents=True)
        for number in range(3):
            pixels = np.zeros((64, 64, 3), np.uint8)
            pixels[16 + number:48, 16:48 - number] = rgb
            Image.fromarray(pixels).save(folder / f"{number}.png")


def test_a_suite_runs_in_one_command_and_every_output_agrees(trained, monkeypatch):
    base, workdir, overrides = trained
    karpathy = layout_fixtures.make_karpathy(base / "karpathy", "coco")
    _image_folder(base / "shapes")
    suite = {"tasks": [
        {"name": "demo", "task": "retrieval", "split": "test", "languages": ["en", "de"], "dataset": {}},
        {"name": "demo-fr", "task": "retrieval", "split": "test", "languages": ["fr"], "dataset": {}},
        {"name": "coco", "task": "retrieval", "split": "test", "languages": ["en"],
         "dataset": {"name": "karpathy", "manual_dir": karpathy.source_dir}},
        {"name": "shapes", "task": "zero_shot_classification", "split": "test",
         "dataset": {"layout": "image_folder", "root": str(base / "shapes")},
         "templates": "configs/zero_shot/simple_templates.json"},
        {"name": "absent", "task": "zero_shot_classification", "split": "test",
         "dataset": {"layout": "image_folder", "root": str(base / "no_such_folder")},
         "templates": "configs/zero_shot/simple_templates.json"},
    ]}
    suite_path = base / "suite.json"
    suite_path.write_text(json.dumps(suite))
    output = base / "benchmark"
    # Count every image embedding pass, wherever it is made (the suite, evaluate_split, zero-shot).
    from vlretrieval.data import pipeline
    from vlretrieval.evaluation import evaluate, zero_shot

    image_passes, embed = [], evaluate.embed_in_batches
    def counting(encode, arrays, *args, **kwargs):
        if isinstance(arrays[0], pipeline.NormalizedImages):
            image_passes.append(len(arrays[0]))
        return embed(encode, arrays, *args, **kwargs)
    monkeypatch.setattr(evaluate, "embed_in_batches", counting)
    monkeypatch.setattr(zero_shot, "embed_in_batches", counting)
    assert cli.run(["benchmark", "--config", "configs/demo.py:tiny", "--workdir", workdir, "--no_progress",
                    "--suite", str(suite_path), "--output", str(output),
                    *(f"--config.{override}" for override in overrides)]) == 0
    merged = json.loads((output / "suite.json").read_text())
    # demo and demo-fr share the demo test split: its images were embedded once; so were the others'.
    assert sorted(merged["image_passes"].values()) == [1, 1, 1]
    assert sorted(image_passes) == [2, 9, 64]  # coco's 2 test images, the 9 shapes, the demo's 64
    rows = {(r["name"], r.get("language")): r for r in merged["results"]}
    assert rows[("absent", None)]["skipped"] and "no_such_folder" in rows[("absent", None)]["skipped"]
    # The suite's demo figures are `vlretrieval eval`'s on the same split.
    evaluated = evaluate_checkpoint(load_config("configs/demo.py:tiny", overrides), workdir)
    for language in ("en", "de", "fr"):
        name = "demo-fr" if language == "fr" else "demo"
        assert_nested_close(rows[(name, language)]["metrics"], evaluated["languages"][language])
    # Every file says the same numbers: per-result JSON (CLIP_benchmark's names, fractions), CSV, Markdown.
    coco = json.loads((output / "coco_en_retrieval.json").read_text())
    assert coco["task"] == "zeroshot_retrieval" and coco["language"] == "en"
    assert coco["metrics"]["image_retrieval_recall@5"] == pytest.approx(
        rows[("coco", "en")]["metrics"]["text_to_image"]["R@5"] / 100)
    shapes = json.loads((output / "shapes_en_zero_shot_classification.json").read_text())
    assert shapes["task"] == "zeroshot_classification"
    assert shapes["metrics"]["acc1"] == pytest.approx(rows[("shapes", None)]["metrics"]["top1"] / 100)
    assert rows[("shapes", None)]["metrics"]["num_classes"] == 3
    with open(output / "results.csv") as handle:
        table = {(r["dataset"], r["language"]): r for r in csv.DictReader(handle)}
    demo_de = evaluated["languages"]["de"]["text_to_image"]["R@1"]
    assert float(table[("demo", "de")]["T→I R@1"]) == pytest.approx(demo_de, abs=1e-4)
    assert float(table[("shapes", "")]["top-1"]) == pytest.approx(rows[("shapes", None)]["metrics"]["top1"])
    assert "no_such_folder" in table[("absent", "")]["skipped"]
    markdown = (output / "results.md").read_text()
    demo_en = evaluated["languages"]["en"]
    assert f"| demo | en | {demo_en['text_to_image']['R@1']:.1f} |" in markdown
    assert "## Skipped" in markdown and "absent" in markdown
    for plot in ("retrieval.png", "zero_shot_classification.png"):
        assert Image.open(output / plot).size[0] > 100
    assert sorted(os.listdir(output)) == sorted([
        "demo_en_retrieval.json", "demo_de_retrieval.json", "demo-fr_fr_retrieval.json", "coco_en_retrieval.json",
        "shapes_en_zero_shot_classification.json", "suite.json", "results.csv", "results.md", "retrieval.png",
        "zero_shot_classification.png"])


def test_a_converted_checkpoint_benchmarks_with_the_same_command(trained, tmp_path):
    """A Hugging Face CLIPModel converted with `vlretrieval convert` (its tokenizer travelling
    with it) is benchmarked like a trained run: its folder is the workdir, its config.py the config."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    base, _, overrides = trained
    tokenizer = overrides[1].split("=", 1)[1]  # the demo's tokenizer.json: CLIP's vocabulary here
    vocab = load_tokenizer(tokenizer).vocab_size
    torch.manual_seed(0)
    text = dict(vocab_size=vocab, max_position_embeddings=32, hidden_size=32, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=64, eos_token_id=3, bos_token_id=2, pad_token_id=0)
    vision = dict(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(str(tmp_path / "clip"))
    shutil.copy(tokenizer, tmp_path / "clip" / "tokenizer.json")
    assert cli.run(["convert", "--from", "hf", str(tmp_path / "clip"), "--to", str(tmp_path / "converted"),
                    "--config", "configs/demo.py:tiny"]) == 0
    suite_path = tmp_path / "suite.json"
    suite_path.write_text(json.dumps({"tasks": [
        {"name": "demo", "task": "retrieval", "split": "test", "languages": ["en"], "dataset": {}}]}))
    data_dir = overrides[0].split("=", 1)[1]
    assert cli.run(["benchmark", "--config", str(tmp_path / "converted" / "config.py"), "--workdir",
                    str(tmp_path / "converted"), "--data_dir", data_dir, "--no_progress", "--suite", str(suite_path),
                    "--output", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "demo_en_retrieval.json").read_text())
    assert result["vlretrieval"]["step"] == 0 and result["vlretrieval"]["num_images"] == 64
    assert 0 <= result["metrics"]["image_retrieval_recall@5"] <= 1


def test_the_scene_object_suite_runs_on_all_five_layouts_and_writes_the_split_table(trained, tmp_path):
    """configs/suites/scene_object.json's five datasets, pointed at fixture folders: one command
    writes the table by group (scene: COCO, Flickr30K; object: CUB, ABO, Fashion200k) with each
    group's mean, and `benchmarks/scene_object_order.py` reads the models' order off two outputs."""
    from benchmarks import scene_object_order
    from tests import labelled_fixtures

    base, workdir, overrides = trained
    labelled = labelled_fixtures.write_all(tmp_path / "labelled")
    folders = {"coco": layout_fixtures.make_karpathy(tmp_path / "coco", "coco").source_dir,
               "flickr30k": layout_fixtures.make_karpathy(tmp_path / "flickr", "flickr30k").source_dir}
    folders.update({name: labelled[name].source_dir for name in ("cub", "abo", "fashion200k")})
    suite = json.loads(open("configs/suites/scene_object.json").read())
    for task in suite["tasks"]:
        task["dataset"]["manual_dir"] = folders[task["name"]]
        options = ",".join(f"{k}={v}" for k, v in labelled[task["name"]].options.items()) if (
            task["name"] in labelled) else ""
        if options:  # the fixtures' own split options (too few images for the defaults)
            task["dataset"]["layout_options"] = options
    suite_path = tmp_path / "suite.json"
    suite_path.write_text(json.dumps(suite))
    output = tmp_path / "benchmark"
    assert cli.run(["benchmark", "--config", "configs/demo.py:tiny", "--workdir", workdir, "--no_progress",
                    "--suite", str(suite_path), "--output", str(output),
                    *(f"--config.{override}" for override in overrides)]) == 0
    merged = json.loads((output / "suite.json").read_text())
    done = {row["name"]: row for row in merged["results"] if "skipped" not in row}
    assert sorted(done) == ["abo", "coco", "cub", "fashion200k", "flickr30k"], merged["results"]
    for group, names in (("scene", ("coco", "flickr30k")), ("object", ("cub", "abo", "fashion200k"))):
        assert all(done[name]["group"] == group for name in names)
        mean = np.mean([done[name]["metrics"]["mean_recall"] for name in names])
        assert merged["group_means"][group] == pytest.approx(mean)
    markdown = (output / "results.md").read_text()
    assert "## By group" in markdown
    assert "| **object mean** | | | " in markdown and f"**{merged['group_means']['object']:.1f}** |" in markdown
    # A second "model" that is better on scenes and worse on objects reverses the order.
    other = tmp_path / "other"
    other.mkdir()
    flipped = json.loads(json.dumps(merged))
    flipped["model"]["workdir"] = "other"
    for row in flipped["results"]:
        if "skipped" not in row:
            row["metrics"]["mean_recall"] += 10.0 if row["group"] == "scene" else -10.0
    (other / "suite.json").write_text(json.dumps(flipped))
    comparison = scene_object_order.compare([str(output), str(other)])
    assert comparison["order_by_group"]["scene"][0] == "other"
    assert comparison["order_by_group"]["object"][-1] == "other"
    assert comparison["kendall_tau"]["object vs scene"] == -1.0
