"""sentence-transformers folders convert with their declared pooling and give its embeddings; a
converted text tower fine-tunes with the converted config's defaults, and a frozen one stays
bit-identical."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlretrieval import cli
from vlretrieval.config import load_config
from vlretrieval.convert import hf_in, native
from vlretrieval.data import datasets
from vlretrieval.data.builders import demo_scenes
from vlretrieval.data.tokenizer import load_tokenizer
from vlretrieval.models import build_model
from vlretrieval.state import parameter_path
from vlretrieval.train import train_and_evaluate

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

POOLING_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("data"))
    config = load_config("configs/demo.py:tiny", [f"data.data_dir={data_dir}", "data.num_train=2048",
                                                 "data.num_test=100"])
    data = datasets.open_dataset(config.data, seed=0)
    return data_dir, demo_scenes.demo_tokenizer_path(data.builder)


def write_sentence_transformer(folder, tokenizer_path, pooling="mean", normalize=True, width=64):
    """A tiny random BERT in sentence-transformers' folder layout (the Transformer module at the
    root, 1_Pooling, 2_Normalize), with the demo's tokenizer; returns the PyTorch model."""
    torch.manual_seed(0)
    vocab = load_tokenizer(tokenizer_path).vocab_size
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * width,
        max_position_embeddings=64)).eval()
    with torch.no_grad():  # LayerNorms and biases off their init too, so a swap would show
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(str(folder))
    shutil.copy(tokenizer_path, folder / "tokenizer.json")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": width, **{key: name == pooling for name, key in POOLING_KEYS.items()}}))
    return model


def sentence_embeddings(model, token_ids, mask, pooling):
    """What sentence-transformers computes: the model's token states, pooled over real tokens
    (its Pooling module's math), L2-normalised (its Normalize module)."""
    with torch.no_grad():
        states = model(input_ids=torch.tensor(token_ids), attention_mask=torch.tensor(mask)).last_hidden_state
    weights = torch.tensor(mask, dtype=states.dtype)[..., None]
    if pooling == "mean":
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    elif pooling == "cls":
        pooled = states[:, 0]
    else:
        pooled = states.masked_fill(weights == 0, -1e9).max(1).values
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_the_declared_pooling_gives_the_sentence_transformers_embeddings(demo, tmp_path, pooling):
    _, tokenizer_path = demo
    reference = write_sentence_transformer(tmp_path, tokenizer_path, pooling)
    converted = hf_in.convert_folder(str(tmp_path), native_base())
    assert converted.model["head"]["text_pooling"] == pooling and "sentence-transformers" in converted.notes[0]
    model = build_model(ml_collections.ConfigDict(converted.model), converted.vocab_size)
    tokenizer = load_tokenizer(str(tmp_path))
    token_ids, mask = tokenizer.encode(["a red square above a blue circle", "a small green cross", "red"], 16)
    params = native.nest({name: jnp.asarray(value) for name, value in converted.params.items()})
    sequence = model.apply({"params": params}, jnp.asarray(token_ids), jnp.asarray(mask), method=model.text_sequence)
    pooled = model.apply({"params": params}, sequence, jnp.asarray(mask), method=model.pool_text)
    ours = np.asarray(pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True))
    want = sentence_embeddings(reference, token_ids, mask, pooling)
    assert np.max(np.abs(ours - want)) < 1e-4


def native_base():
    from vlretrieval.convert import architectures

    config = load_config("configs/demo.py:tiny")
    return architectures.complete_section(config.model.to_dict())


def _text_params(workdir, step) -> dict[str, np.ndarray]:
    from tests.test_multihost import saved_params

    params = saved_params(workdir, step)
    return {parameter_path(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if parameter_path(path).startswith("text_encoder/")}


def test_a_converted_text_tower_fine_tunes_with_the_converted_defaults_and_a_frozen_one_stays_put(demo, tmp_path,
                                                                                                  capsys):
    data_dir, tokenizer_path = demo
    write_sentence_transformer(tmp_path / "minilm", tokenizer_path)
    converted_dir = tmp_path / "converted"
    assert cli.run(["convert", "--from", "hf", str(tmp_path / "minilm"), "--to", str(converted_dir),
                    "--config", "configs/demo.py:tiny"]) == 0
    written = (converted_dir / "config.py").read_text()
    assert "'optimizer.learning_rate': 0.0002" in written and "'optimizer.warmup_steps': 100" in written
    run = ["data.num_train=2048", "data.num_test=100", f"data.data_dir={data_dir}", "train.batch_size=64",
           "train.num_steps=300", "train.log_every=50", "train.checkpoint_every=300", "eval.batch_size=100",
           f"train.init_from={converted_dir}", "train.num_devices=1"]
    config = load_config(f"{converted_dir}/config.py:tiny", run)
    assert config.optimizer.learning_rate == 2e-4 and config.model.head.text_pooling == "mean"
    results = train_and_evaluate(config, str(tmp_path / "tuned"), progress=False)
    # Chance over 100 images: R@1 1%, R@10 10%. (The fixture's BERT is random, not pretrained, so
    # fine-tuning rates train it slower than the from-scratch demo's: measured R@1 6.2, R@10 46.)
    average = results["average"]
    assert average["text_to_image"]["R@1"] > 4 * 1.0 and average["text_to_image"]["R@10"] > 3 * 10.0, average
    # The same, the converted tower locked: not one bit of it moves (the image tower learns to it).
    frozen = load_config(f"{converted_dir}/config.py:tiny", [*run, "train.num_steps=20", "train.checkpoint_every=20",
                                                              "optimizer.freeze=('text_encoder/.*',)"])
    train_and_evaluate(frozen, str(tmp_path / "locked"), progress=False)
    converted = hf_in.convert_folder(str(tmp_path / "minilm"), native_base()).params
    before = {name: value for name, value in converted.items() if name.startswith("text_encoder/")}
    after = _text_params(str(tmp_path / "locked"), 20)
    assert before.keys() == after.keys() and len(before) > 10
    for name in before:
        assert np.array_equal(after[name], before[name]), name
    assert os.path.isdir(tmp_path / "tuned" / "checkpoints")
