"""MURAL multitask training: translation-pair data, the task mixture, multilingual evaluation."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlretrieval import parallel
from vlretrieval.config import load_config
from vlretrieval.data import datasets, pipeline
from vlretrieval.data.builders import captions, demo_scenes, translation_pairs
from vlretrieval.data.builders.demo_scenes import DemoScenesConfig
from vlretrieval.errors import UserError
from vlretrieval.evaluation.evaluate import evaluate_split, write_results
from vlretrieval.train import train

SMALL = DemoScenesConfig(name="mural_small", seed=0, num_train=200, num_validation=20, num_test=30)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("data"))
    demo_scenes.prepare_demo_data(directory, SMALL)
    return directory


def test_low_resource_language_is_captioned_for_evaluation_only(data_dir):
    builder = demo_scenes.prepare_demo_data(data_dir, SMALL)
    low = captions.LOW_RESOURCE_LANGUAGE
    train_split = builder.as_data_source(split="train")
    assert all(len(train_split[i]["captions"][low]) == 0 for i in range(len(train_split)))
    assert all(len(train_split[i]["captions"]["en"]) == 5 for i in range(len(train_split)))
    test_split = builder.as_data_source(split="test")
    assert all(len(test_split[i]["captions"][low]) == 5 for i in range(len(test_split)))


def test_demo_translation_pairs_pair_english_with_every_other_language(data_dir):
    built = demo_scenes.prepare_demo_translations(data_dir, SMALL)
    sources = translation_pairs.pair_sources(built)
    others = [language for language in captions.LANGUAGES if language != "en"]
    assert sorted(sources) == sorted(f"en-{language}" for language in others)
    italian = captions.WORD_FORMS["it"]
    for index in range(20):
        pair = sources["en-it"][index]
        assert pair["source_language"] == b"en" and pair["target_language"] == b"it"
        target = pair["target"].decode()
        # The Italian side names the same shapes: at least one Italian shape noun is in it.
        assert any(noun in target for nouns in italian["shape"].values() for noun in nouns), target


def _write(path, lines):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def test_tsv_builder_reads_pairs_and_names_a_malformed_line(tmp_path):
    tsv = tmp_path / "tsv"
    tsv.mkdir()
    _write(tsv / "en-it.tsv", ["a red circle\tun cerchio rosso", "a blue square\tun quadrato blu"])
    _write(tsv / "en-de.tsv", ["a red circle\tein roter Kreis"])
    built = translation_pairs.prepare(str(tsv), str(tmp_path / "data"), "mine")
    sources = translation_pairs.pair_sources(built)
    assert {pair: len(source) for pair, source in sources.items()} == {"en-it": 2, "en-de": 1}
    texts = {sources["en-it"][i]["target"].decode() for i in range(2)}
    assert texts == {"un cerchio rosso", "un quadrato blu"}

    _write(tsv / "en-fr.tsv", ["a red circle\tun cercle rouge", "ok\tok", "one\ttwo\tthree"])
    with pytest.raises(UserError, match=r"en-fr\.tsv, line 3: expected 2 tab-separated columns .* found 3"):
        translation_pairs.prepare(str(tsv), str(tmp_path / "data2"), "broken")
    assert not (tmp_path / "data2" / "translation_pairs").exists()  # nothing half-built
    (tsv / "en-fr.tsv").unlink()
    _write(tsv / "english-italian.tsv", ["a\tb"])
    with pytest.raises(UserError, match="name it <source>-<target>.tsv"):
        translation_pairs.translation_files(str(tsv))


def test_unknown_languages_and_pairs_are_refused_with_the_known_ones(data_dir):
    config = load_config("configs/mural_demo.py:tiny", [f"data.data_dir={data_dir}"])
    config.data.num_train, config.data.num_validation, config.data.num_test = 200, 20, 30
    config.data.languages = ("en", "xx")
    with pytest.raises(UserError, match=r"config.data.languages names \['xx'\].*'de', 'en', 'es', 'fr', 'it'"):
        datasets.open_dataset(config.data, seed=0)
    config.bitext.language_pairs = ("en-it", "en-xx")
    with pytest.raises(UserError, match=r"\['en-xx'\].*'en-de', 'en-es', 'en-fr', 'en-it'"):
        datasets.open_translations(config.bitext, config.data, seed=0)
    config.bitext.language_pairs = ("en-it",)
    config.bitext.pair_weights = (1.0, 2.0)
    with pytest.raises(UserError, match="one non-negative weight per language pair"):
        datasets.open_translations(config.bitext, config.data, seed=0)


def test_the_mixture_draws_language_pairs_in_the_configured_proportions():
    sources = {
        pair: [{"source": f"{pair} {i}", "target": f"{i} {pair}"} for i in range(50)]
        for pair in ("en-de", "en-it", "en-fr")
    }
    mixture = pipeline.TranslationMixture(sources, [2.0, 1.0, 1.0], seed=0)
    drawn = np.array([mixture[i]["pair"] for i in range(8000)])
    np.testing.assert_allclose(np.bincount(drawn) / len(drawn), [0.5, 0.25, 0.25], atol=0.02)
    assert mixture[123] == mixture[123]  # a pure function of the index: exact resume

    class Words:  # one id per word: enough to see what was batched
        def encode(self, texts, max_length):
            ids = np.array([[len(word) for word in text.split()][:max_length] for text in texts])
            return ids.astype(np.int32), np.ones_like(ids, dtype=np.int32)

    hosts = [
        pipeline.translation_dataset(mixture, Words(), local_batch_size=16, max_text_length=4,
                                     process_index=host, process_count=2)
        for host in range(2)
    ]
    batch = hosts[0][3]
    assert batch["bitext_source_ids"].shape == (16, 2) and batch["bitext_pair"].shape == (16,)
    # The two hosts read disjoint slices of each global batch of the one mixture: host h,
    # batch b, row r is item 32 b + 16 h + r.
    assert [int(p) for p in hosts[1][3]["bitext_pair"]] == [
        mixture[32 * 3 + 16 + row]["pair"] for row in range(16)
    ]


class _HandMade(nn.Module):
    """Embeds image k (all pixels 10 k) and a text whose first token id is k as the unit vector e_k."""

    @nn.compact
    def encode_image(self, images, *, train=False):
        index = jnp.round((images[:, 0, 0, 0] + 1.0) * 127.5 / 10.0).astype(jnp.int32)
        return jax.nn.one_hot(index, 4) + 0.0 * self.param("unused", nn.initializers.zeros, ())

    def encode_text(self, token_ids, text_mask, *, train=False):
        return jax.nn.one_hot(token_ids[:, 0], 4)

    def __call__(self, images):
        return self.encode_image(images)


class _Indexes:
    """A tokenizer stand-in: caption "k" encodes to the single id k."""

    def encode(self, texts, max_length):
        ids = np.array([[int(text)] + [0] * (max_length - 1) for text in texts], np.int32)
        return ids, (ids >= 0).astype(np.int32)


def test_per_language_metrics_on_hand_made_embeddings(tmp_path):
    model = _HandMade()
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)))["params"]
    images = np.stack([np.full((4, 4, 3), 10 * k, np.uint8) for k in range(3)])
    split = {
        "images": images,
        "captions": {
            "en": [["0", "0"], ["1", "1"], ["2", "2"]],  # every caption names its own image
            "it": [["1"], ["2"], ["0"]],  # every caption names the next image: all wrong
            "de": [["0", "1"], ["1", "2"], ["2", "0"]],  # one right caption per image
        },
    }
    # Pessimistic ties (each tie with a negative counts against): the values below are worked
    # out by hand that way; tests/test_ties.py checks every policy.
    results = evaluate_split(model, params, split, _Indexes(), mesh=parallel.make_mesh(2),
                             batch_size=4, max_text_length=2, recall_at=(1, 2), ties="pessimistic")
    languages = results["languages"]
    assert languages["en"]["mean_recall"] == 100.0
    # Its own image ties with another at 0 below the named one: ties count against, rank 3.
    assert languages["it"]["mean_recall"] == 0.0
    # Half of German captions are right. Each image's right caption ties with another image's
    # caption that names it: ties count against, so second.
    assert languages["de"]["text_to_image"]["R@1"] == 50.0
    assert languages["de"]["image_to_text"]["R@1"] == 0.0
    assert languages["de"]["image_to_text"]["R@2"] == 100.0
    # MURAL's mean recall: the mean of R@K both ways.
    de = languages["de"]
    assert de["mean_recall"] == pytest.approx(np.mean(
        [de[d][f"R@{k}"] for d in ("text_to_image", "image_to_text") for k in (1, 2)]))
    assert results["average"]["mean_recall"] == pytest.approx(
        np.mean([languages[lang]["mean_recall"] for lang in ("en", "it", "de")]))
    write_results(results, str(tmp_path), "results.json")
    with open(tmp_path / "results.json") as handle:
        assert set(json.load(handle)["languages"]) == {"en", "it", "de"}


@pytest.mark.parametrize("kind", ["decomposed", "dual"])
def test_multitask_training_runs_with_both_tower_models(data_dir, tmp_path, kind):
    config = load_config("configs/mural_demo.py:tiny", [
        f"data.data_dir={data_dir}", "data.num_train=200", "data.num_validation=20",
        "data.num_test=30", f"model.kind={kind}", "objectives.text_text_margin=0.1",
        "train.num_steps=4", "train.log_every=2",
    ])
    train(config, str(tmp_path), progress=False)
    with open(os.path.join(tmp_path, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    assert all(np.isfinite(r["text_text_loss"]) and np.isfinite(r["contrastive_loss"]) for r in records)
    assert 0.0 <= records[-1]["source_to_target_accuracy"] <= 1.0
