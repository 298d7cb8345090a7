"""Zero-shot classification: exact accuracies on hand-made embeddings (ties to the lower class),
CLIP's template averaging, image folders and tfds datasets read offline, a trained demo model far
above chance on a folder of drawn shapes, and bad input as one clear UserError."""

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vlretrieval import parallel
from vlretrieval.data.builders import building
from vlretrieval.data.builders.scenes import Scene, SceneObject, render_scene
from vlretrieval.data.image_folder import load_image_folder, load_tfds_classification
from vlretrieval.data.tokenizer import TextTokenizer, train_wordpiece_tokenizer
from vlretrieval.errors import UserError
from vlretrieval.evaluation import zero_shot
from vlretrieval.evaluation.checkpoints import restore_for_evaluation
from vlretrieval.evaluation.zero_shot import classify, evaluate_zero_shot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (folder, shape, colour): single shapes the demo's captions name ("a large red square").
CLASSES = [("blue_circle", "circle", "blue"), ("green_triangle", "triangle", "green"),
           ("orange_cross", "cross", "orange"), ("purple_diamond", "diamond", "purple"),
           ("red_square", "square", "red"), ("white_circle", "circle", "white"),
           ("yellow_triangle", "triangle", "yellow"), ("cyan_square", "square", "cyan")]
IMAGES_PER_CLASS = 6


def test_hand_made_embeddings_give_the_exact_accuracies():
    """4 classes along the axes, 10 images whose class ranks are known: 7 right at top-1, the
    rest at ranks 2, 3 and 4 (an image equally near every class goes to class 0: the lower
    index wins ties). Neither norm matters: cosines."""
    class_embeddings = np.diag([3.0, 1.0, 2.0, 0.5])
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    images = np.array([
        [1.0, 0.5, 0.2, 0.1], [0.9, 0.1, 0.0, 0.0], [0.2, 1.0, 0.0, 0.0],  # class 0: right, right, rank 2
        [0.0, 1.0, 0.3, 0.0], [0.0, 1.0, 0.0, 0.5], [0.1, 0.2, 0.9, 0.3],  # class 1: right, right, rank 3
        [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.2],  # class 2: right, right
        [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.4, 1.0],  # class 3: a four-way tie (rank 4), right
    ]) * np.arange(1, 11)[:, None]
    results = classify(images, class_embeddings, labels, top_k=(1, 2, 3, 5))
    assert results == pytest.approx({
        "top1": 70.0, "top2": 80.0, "top3": 90.0,
        "top5": 100.0,  # 4 classes: top-5 is top-4
        "mean_per_class_recall": 100 * (2 / 3 + 2 / 3 + 1 + 1 / 2) / 4,  # 70.83
        "num_images": 10, "num_classes": 4,
    })
    assert set(classify(images, class_embeddings, labels)) == {
        "top1", "top5", "mean_per_class_recall", "num_images", "num_classes"}


def test_equal_class_embeddings_go_to_the_lower_class_and_missing_classes_do_not_count():
    """Two classes with one embedding (ImageNet has two "crane"s): their images all go to the
    lower class. A class without images is left out of the mean per-class recall."""
    class_embeddings = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    images = np.array([[1.0, 0.1, 0.0], [1.0, 0.0, 0.1], [1.0, 0.1, 0.0], [0.0, 1.0, 0.0]])
    labels = np.array([0, 2, 2, 1])  # class 3 has no image
    for _ in range(2):  # deterministic
        results = classify(images, class_embeddings, labels, top_k=(1, 2))
        assert results["top1"] == 50.0 and results["top2"] == 100.0
        assert results["mean_per_class_recall"] == pytest.approx(100 * (1 + 1 + 0) / 3)
        assert results["num_classes"] == 4


def test_class_embeddings_are_the_normalised_means_of_normalised_prompt_embeddings(monkeypatch):
    words = "a the photo picture of small large red blue green square circle triangle".split()
    tokenizer = TextTokenizer(train_wordpiece_tokenizer(iter(words * 10), vocab_size=80))
    table = np.random.default_rng(0).normal(size=(tokenizer.vocab_size, 6)).astype(np.float32)
    # A text "encoder" with unnormalised outputs of different norms: the sum of its token vectors.
    encode_text = jax.jit(lambda ids, mask: jnp.sum(jnp.asarray(table)[ids] * mask[..., None], axis=1))
    names, templates = ["red square", "blue circle", "green triangle"], ["a photo of a {}.", "{}", "a large {}."]
    assert zero_shot.prompts(names[:1], templates) == ["a photo of a red square.", "red square", "a large red square."]
    expected = []
    for name in names:
        vectors = []
        for template in templates:
            ids, mask = tokenizer.encode([template.replace("{}", name)], 12)
            vector = (table[ids[0]] * mask[0][:, None]).sum(axis=0)
            vectors.append(vector / np.linalg.norm(vector))
        mean = np.mean(vectors, axis=0)
        expected.append(mean / np.linalg.norm(mean))
    for devices, prompts_per_call in ((1, 8192), (8, 4)):  # 4: one class per embed_in_batches call
        monkeypatch.setattr(zero_shot, "_PROMPTS_PER_CALL", prompts_per_call)
        got = zero_shot.class_embeddings(encode_text, tokenizer, names, templates, 12, 5, parallel.make_mesh(devices))
        np.testing.assert_allclose(got, np.array(expected), rtol=1e-5, atol=1e-6)


def test_the_shipped_template_files():
    imagenet = zero_shot.load_templates(os.path.join(ROOT, "configs/zero_shot/imagenet_templates.json"))
    assert len(imagenet.templates) == len(set(imagenet.templates)) == 80
    assert imagenet.templates[:2] == ("a bad photo of a {}.", "a photo of many {}.")
    assert imagenet.templates[-1] == "a tattoo of the {}." and "itap of my {}." in imagenet.templates
    assert all("{}" in template for template in imagenet.templates) and imagenet.classes is None
    simple = zero_shot.load_templates(os.path.join(ROOT, "configs/zero_shot/simple_templates.json"))
    assert simple == zero_shot.PromptTemplates(("a photo of a {}.",))


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def _shape_images(shape: str, colour: str, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Demo-scene images of one shape: random size and place, speckled background."""
    images = []
    for _ in range(count):
        size = ("small", "large")[rng.integers(2)]
        x, y = rng.integers(14, 50, 2)
        images.append(render_scene(Scene((SceneObject(shape, colour, size, int(x), int(y)),), None), rng))
    return images


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    """root/test/<class>/*.png|jpg for CLASSES, one undecodable file and one non-image file."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(1)
    for index, (folder, shape, colour) in enumerate(CLASSES):
        (root / "test" / folder).mkdir(parents=True)
        for number, image in enumerate(_shape_images(shape, colour, IMAGES_PER_CLASS, rng)):
            if index == 0 and number == 0:  # one JPEG: the evaluation transform decodes any format
                Image.fromarray(image).save(root / "test" / folder / "0.jpg", quality=95)
            else:
                (root / "test" / folder / f"{number}.png").write_bytes(_png(image))
    (root / "test" / "red_square" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (root / "test" / "red_square" / "notes.txt").write_text("not an image")
    return root


def test_an_image_folder_loads_with_labels_names_and_skipped_images(shapes_folder):
    split = load_image_folder(shapes_folder, "test", 64)
    folders = sorted(folder for folder, _, _ in CLASSES)
    assert split.class_names == [folder.replace("_", " ") for folder in folders]
    assert split.images.shape == (len(CLASSES) * IMAGES_PER_CLASS, 64, 64, 3) and split.images.dtype == np.uint8
    np.testing.assert_array_equal(split.labels, np.repeat(np.arange(len(CLASSES)), IMAGES_PER_CLASS))
    assert split.bad_records["counts"] == {"undecodable image": 1}
    assert split.bad_records["examples"]["undecodable image"][0].endswith("red_square/broken.jpg")
    # PNGs of the model's size pass unchanged.
    first_png = np.asarray(Image.open(shapes_folder / "test" / folders[0] / "1.png"))
    np.testing.assert_array_equal(split.images[1], first_png)
    # Two hosts: each decodes every other usable image, all hosts hold every label.
    shares = [load_image_folder(shapes_folder, "test", 64, process_index=host, process_count=2) for host in (0, 1)]
    positions = np.arange(len(split))
    for host, share in enumerate(shares):
        np.testing.assert_array_equal(share.labels, split.labels)
        assert len(share.images.images) == len(split) // 2
        mine = positions[host::2]
        np.testing.assert_array_equal(share.images[mine], split.images[mine])
    # A class-names list in another order orders the labels; a mapping renames the prompts.
    reversed_names = shapes_folder / "classes.txt"
    reversed_names.write_text("\n".join(reversed(split.class_names)))
    reordered = load_image_folder(shapes_folder, "test", 64, class_names=str(reversed_names))
    assert reordered.class_names == split.class_names[::-1]
    last = len(CLASSES) - 1
    np.testing.assert_array_equal(reordered.images[reordered.labels == 0], split.images[split.labels == last])
    renamed = load_image_folder(shapes_folder, "test", 64, class_names={f: f.upper() for f in folders})
    assert renamed.class_names == [f.upper() for f in folders]
    np.testing.assert_array_equal(renamed.labels, split.labels)


def test_a_locally_prepared_tfds_dataset_reads_like_the_folder(tmp_path, shapes_folder):
    """A tiny tfds image-classification dataset (Image + ClassLabel) built offline, read back by
    name without its builder code (tfds finds it in data_dir): the same images, labels, names."""
    folders = ["blue_circle", "red_square"]
    encoded = [(label, (shapes_folder / "test" / folder / f"{n}.png").read_bytes())
               for label, folder in enumerate(folders) for n in range(1, 4)]

    with tfds.core.registered.skip_registration():
        class TinyShapes(building.LocalBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=folders)}))

            def _split_generators(self, dl_manager):
                return {"test": self._generate_examples()}

            def _generate_examples(self):
                for key, (label, data) in enumerate(encoded):
                    yield str(key), {"image": data, "label": label}

    with building.quiet_tfds():
        TinyShapes(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    split = load_tfds_classification("tiny_shapes", str(tmp_path), "test", 64)
    assert split.class_names == ["blue circle", "red square"]
    # tfds stores examples in its own (hashed) order: compare (label, pixels) pairs.
    label_of_pixels = {np.asarray(Image.open(io.BytesIO(data))).tobytes(): label for label, data in encoded}
    assert [label_of_pixels[image.tobytes()] for image in split.images] == split.labels.tolist()
    assert sorted(split.labels.tolist()) == [0, 0, 0, 1, 1, 1] and split.bad_records["counts"] == {}
    flipped = load_tfds_classification("tiny_shapes", str(tmp_path), "test", 64, ["red square", "blue circle"])
    np.testing.assert_array_equal(flipped.labels, 1 - split.labels)
    with pytest.raises(UserError, match="split 'train' is not in tfds dataset 'tiny_shapes'"):
        load_tfds_classification("tiny_shapes", str(tmp_path), "train", 64)
    with pytest.raises(UserError, match="'no_such_set' in .* cannot be opened .*not found"):
        load_tfds_classification("no_such_set", str(tmp_path), "test", 64)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="'mnist' in .* is not prepared"):  # a catalogue dataset: never downloaded
        load_tfds_classification("mnist", str(empty), "test", 64)
    assert not any(empty.iterdir())


@pytest.fixture(scope="module")
def trained_demo(short_demo_run):
    """The demo model trained for 250 steps (tests/conftest.py, shared with test_train) restored
    from its checkpoint as `vlretrieval eval` would."""
    config, workdir, _ = short_demo_run
    model, params, data, step = restore_for_evaluation(config, workdir)
    assert step == 250
    return config, model, params, data.tokenizer


def test_a_trained_demo_model_classifies_drawn_shapes_far_above_chance(shapes_folder, trained_demo):
    config, model, params, tokenizer = trained_demo
    split = load_image_folder(shapes_folder, "test", config.model.image_size)
    # Sizes marginalised by template averaging: the demo's captions always name a size.
    templates = ["a small {}.", "a large {}.", "a picture of a small {}.", "a picture of a large {}."]
    mesh = parallel.make_mesh()
    options = dict(mesh=mesh, batch_size=16, max_text_length=config.data.max_text_length)
    results = evaluate_zero_shot(model, params, split, tokenizer, templates, **options)
    chance = 100 / len(CLASSES)
    assert results["top1"] > 3 * chance, results
    assert results["mean_per_class_recall"] > 3 * chance, results
    assert results["num_images"] == len(CLASSES) * IMAGES_PER_CLASS and results["num_templates"] == 4
    # Precomputed image embeddings (a suite embeds a dataset's images once) give the same results.
    embeddings = zero_shot.embed_images(model, params, split, mesh=mesh, batch_size=16)
    assert evaluate_zero_shot(model, params, split, tokenizer, templates, image_embeddings=embeddings,
                              **options) == results
    with pytest.raises(UserError, match="the templates name 2 classes but .* has 8"):
        evaluate_zero_shot(model, params, split, tokenizer,
                           zero_shot.PromptTemplates(("a {}.",), ("red square", "blue circle")), **options)


def test_bad_input_is_one_clear_user_error(shapes_folder, tmp_path):
    folders = sorted(folder for folder, _, _ in CLASSES)
    wrong = [name.replace("_", " ") for name in folders[1:]] + ["pink star"]
    with pytest.raises(UserError, match=r"do not match .*classes without a name: 'blue_circle'; "
                                        r"names without a class: 'pink star'"):
        load_image_folder(shapes_folder, "test", 64, class_names=wrong)
    with pytest.raises(UserError, match="names without a class: 'black_hole'"):
        load_image_folder(shapes_folder, "test", 64, class_names={**{f: f for f in folders}, "black_hole": "x"})
    with pytest.raises(UserError, match="classes named more than once: 'red_square'"):
        load_image_folder(shapes_folder, "test", 64, class_names=[*folders, "red square"])
    with pytest.raises(UserError, match=r"split folder .*validation does not exist; .* has \['test'\]"):
        load_image_folder(shapes_folder, "validation", 64)
    with pytest.raises(UserError, match="image folder root .*nowhere does not exist"):
        load_image_folder(tmp_path / "nowhere", "test", 64)
    (tmp_path / "empty" / "some_class").mkdir(parents=True)
    with pytest.raises(UserError, match="split folder .*empty is empty"):
        load_image_folder(tmp_path, "empty", 64)
    broken = tmp_path / "broken" / "test" / "only_class"
    broken.mkdir(parents=True)
    (broken / "a.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="no image of .* is usable .*undecodable image"):
        load_image_folder(tmp_path / "broken", "test", 64)
    with pytest.raises(UserError, match=r"template 'a photo of a cat\.' .*has no \{\}"):
        zero_shot.check_templates(["a photo of a {}.", "a photo of a cat."])
    templates_file = tmp_path / "templates.json"
    templates_file.write_text(json.dumps({"templates": ["itap of a {}.", "a {}"], "clases": ["typo"]}))
    with pytest.raises(UserError, match=r"templates.json has unknown keys \['clases'\]"):
        zero_shot.load_templates(templates_file)
    templates_file.write_text(json.dumps({"templates": ["itap of a {}.", "a cat"]}))
    with pytest.raises(UserError, match=r"template 'a cat' in the templates file .*templates.json has no \{\}"):
        zero_shot.as_templates(str(templates_file))
    with pytest.raises(UserError, match="hold no template"):
        zero_shot.as_templates([])
    with pytest.raises(ValueError, match="labels must lie in"):
        classify(np.eye(2), np.eye(2), np.array([0, 2]))
