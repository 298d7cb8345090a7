"""SigLIP (`SiglipModel`, also SigLIP 2 at a fixed resolution) and `SiglipVisionModel` conversion,
checked against the transformers (PyTorch) forward, a round trip, and a few sigmoid-loss steps.

Reference models are random-initialised offline from tiny configs and saved with `save_pretrained`.
What is compared: HF's `image_embeds` / `text_embeds` are the pooled outputs L2-normalised, as
ours are; `logits_per_image` = exp(logit_scale) * cosine + logit_bias; the pooled outputs before
normalisation (`pooler_output`: the attention-pooling head's output, the text head's output).
"""

import io
import json
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from configs.demo import get_config  # noqa: E402
from vlretrieval import cli, parallel  # noqa: E402
from vlretrieval.convert import architectures, hf_in, native  # noqa: E402
from vlretrieval.models import build_model  # noqa: E402

TOLERANCE = 1e-4
VOCAB, TEXT_POSITIONS, IMAGE, PATCH = 100, 16, 32, 8
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
# Above CLIP's clip at 100: a converted scale that were clipped would break the logits.
LOGIT_SCALE = 120.0


def _randomise(model):
    """LayerNorms and biases off their init (ones, zeros), so a swapped or missing one shows."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 or name.endswith("probe"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    """(SiglipModel in eval mode, its saved folder)."""
    torch.manual_seed(0)
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=VOCAB, max_position_embeddings=TEXT_POSITIONS, **SIZES),
        vision_config=dict(image_size=IMAGE, patch_size=PATCH, **SIZES),
    )
    model = _randomise(transformers.SiglipModel(config))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(LOGIT_SCALE))
        model.logit_bias.fill_(-3.0)
    folder = tmp_path_factory.mktemp("hf") / "siglip"
    model.save_pretrained(folder)
    return model, str(folder)


@pytest.fixture(scope="module")
def siglip_vision(tmp_path_factory):
    """(SiglipVisionModel in eval mode, its saved folder): 3 heads, another width."""
    torch.manual_seed(1)
    config = transformers.SiglipVisionConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=24,
                                             num_hidden_layers=2, num_attention_heads=3,
                                             intermediate_size=40)
    model = _randomise(transformers.SiglipVisionModel(config))
    folder = tmp_path_factory.mktemp("hf") / "siglip_vision"
    model.save_pretrained(folder)
    return model, str(folder)


def base_model():
    config = get_config()
    config.model.kind = "dual"
    return architectures.complete_section(config.model.to_dict())


def variables_of(converted):
    """Our model and variables: converted parameters, zeros for any the source does not cover."""
    shapes = hf_in.expected_shapes(converted.model, converted.vocab_size or 1)
    flat = {path: np.zeros(shape, np.float32) for path, shape in shapes.items()}
    model = build_model(ml_collections.ConfigDict(converted.model), converted.vocab_size or 1)
    return model, {"params": native.nest({**flat, **converted.params})}


def text_inputs(batch=3):
    """Ids padded to the full length with SigLIP's pad id (1), as its tokenizer pads them."""
    rng = np.random.RandomState(0)
    ids = rng.randint(2, VOCAB, (batch, TEXT_POSITIONS))
    mask = np.ones_like(ids)
    for row, real in enumerate([TEXT_POSITIONS, 9, 4, 12, 6, 16, 3, 10][:batch]):
        mask[row, real:] = 0
    ids[mask == 0] = 1
    return ids, mask


def images(batch=3, size=IMAGE, seed=1):
    pixels = np.random.RandomState(seed).randn(batch, 3, size, size).astype(np.float32)
    return pixels, jnp.asarray(pixels.transpose(0, 2, 3, 1))  # PyTorch NCHW, ours NHWC


def record(name, got, want):
    difference = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
    assert difference < TOLERANCE, f"{name}: max abs difference {difference:.3g}"


def pooled(model, variables, pixels=None, ids=None, mask=None):
    def run(module):
        if pixels is not None:
            return module.pool_image(module.image_sequence(pixels))
        return module.pool_text(module.text_sequence(ids, mask), mask)
    return model.apply(variables, method=run)


def test_siglip_matches_transformers(siglip):
    reference, folder = siglip
    converted = hf_in.convert_folder(folder, base_model())  # what `convert --from hf` runs
    assert converted.parts == ("text", "image", "projections")
    head = converted.model["head"]
    assert (head["text_pooling"], head["image_pooling"], head["logit_bias"]) == ("last_position", "map", True)
    model, variables = variables_of(converted)
    assert not set(hf_in.expected_shapes(converted.model, VOCAB)) - set(converted.params)  # all converted
    ids, mask = text_inputs()
    pixels, ours = images()
    # With the attention mask (HF hides padded keys, as ours does) and without (every position
    # real: SigLIP's texts padded to the full length, no mask).
    for label, hf_mask, our_mask in (("", torch.tensor(mask), mask), (" unmasked", None, np.ones_like(mask))):
        with torch.no_grad():
            want = reference(input_ids=torch.tensor(ids), attention_mask=hf_mask,
                             pixel_values=torch.tensor(pixels))
        outputs = model.apply(variables, ours, jnp.asarray(ids), jnp.asarray(our_mask))
        assert abs(float(outputs["logit_scale"]) - LOGIT_SCALE) < 1e-3  # not clipped at 100
        record(f"siglip{label} image_embeds", outputs["image_embeddings"], want.image_embeds)
        record(f"siglip{label} text_embeds", outputs["text_embeddings"], want.text_embeds)
        logits = (outputs["logit_scale"] * outputs["image_embeddings"] @ outputs["text_embeddings"].T
                  + outputs["logit_bias"])
        record(f"siglip{label} logits_per_image", logits, want.logits_per_image)
        text = model.apply(variables, method=lambda m, ids, mask: m.text_projection(
            m.pool_text(m.text_sequence(ids, mask), mask)), ids=jnp.asarray(ids), mask=jnp.asarray(our_mask))
        record(f"siglip{label} text pooler_output", text, want.text_model_output.pooler_output)
    record("siglip vision pooler_output", pooled(model, variables, ours),
           want.vision_model_output.pooler_output)


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def hf_state(folder):
    return {k: v for k, v in load_file(os.path.join(folder, "model.safetensors")).items()
            if not k.endswith(hf_in.IGNORED_SUFFIXES)}


def assert_same_state(back, original):
    back, original = hf_state(back), hf_state(original)
    assert sorted(back) == sorted(original)
    for name in original:
        np.testing.assert_array_equal(back[name], original[name], err_msg=name)


def assert_loads_cleanly(model_class, folder):
    _, info = model_class.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


@pytest.mark.parametrize("which", ["siglip", "siglip_vision"])
def test_round_trip_gives_the_original_state_dict(siglip, siglip_vision, tmp_path, capsys, which):
    _, folder = {"siglip": siglip, "siglip_vision": siglip_vision}[which]
    code, _, err = run_cli(capsys, "convert", "--from", "hf", folder, "--to", str(tmp_path / "ours"))
    assert code == 0, err
    code, _, err = run_cli(capsys, "convert", "--from", "vlretrieval", str(tmp_path / "ours"),
                           "--to-hf", str(tmp_path / "back"), "--arch", which)
    assert code == 0, err
    assert_same_state(tmp_path / "back", folder)
    model_class = {"siglip": transformers.SiglipModel, "siglip_vision": transformers.SiglipVisionModel}[which]
    assert_loads_cleanly(model_class, tmp_path / "back")


def test_siglip_vision_model_converts_as_an_image_tower(siglip_vision, siglip, tmp_path, capsys):
    reference, folder = siglip_vision
    converted = hf_in.convert_folder(folder, base_model())
    assert converted.parts == ("image",) and converted.vocab_size is None
    model, variables = variables_of(converted)
    pixels, ours = images(2)
    with torch.no_grad():
        want = reference(pixel_values=torch.tensor(pixels))
    sequence = model.apply(variables, ours, method=lambda m, x: m.image_sequence(x))
    record("siglip_vision last_hidden_state", sequence, want.last_hidden_state)  # post_layernorm'd
    record("siglip_vision pooler_output", pooled(model, variables, ours), want.pooler_output)

    # A transformers-4 checkpoint (every name under vision_model.) reads the same.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    save_file({f"vision_model.{k}": v for k, v in hf_state(folder).items()},
              str(legacy / "model.safetensors"), metadata={"format": "pt"})
    again = hf_in.convert_folder(str(legacy), base_model()).params
    assert sorted(again) == sorted(converted.params)
    for name in again:
        np.testing.assert_array_equal(again[name], converted.params[name])

    # --init_from hf: puts the tower into a dual encoder (fresh text tower and projection).
    from vlretrieval.convert.initialise import initial_params
    section = ml_collections.ConfigDict(converted.model)
    template = native.nest({path: np.full(shape, 0.5, np.float32) for path, shape in
                            hf_in.expected_shapes(converted.model, 50).items()})
    params = initial_params(f"hf:{folder}", template, section)
    record("siglip_vision via --init_from pooler_output",
           pooled(build_model(section, 50), {"params": params}, ours), want.pooler_output)

    # SiglipModel's image tower exports alone and computes what its vision_model does.
    full_model, full_folder = siglip
    assert run_cli(capsys, "convert", "--from", "hf", full_folder, "--to", str(tmp_path / "full"))[0] == 0
    code, _, err = run_cli(capsys, "convert", "--from", "vlretrieval", str(tmp_path / "full"),
                           "--to-hf", str(tmp_path / "vision"), "--arch", "siglip_vision")
    assert code == 0, err
    exported = transformers.SiglipVisionModel.from_pretrained(str(tmp_path / "vision")).eval()
    pixels, _ = images(2)
    with torch.no_grad():
        record("siglip -> siglip_vision export pooler_output",
               exported(pixel_values=torch.tensor(pixels)).pooler_output,
               full_model.vision_model(pixel_values=torch.tensor(pixels)).pooler_output)

    # Interpolated positions (no class token row to keep): the model runs at the new size.
    larger = hf_in.convert_folder(folder, base_model(), image_size=2 * IMAGE)
    assert larger.params["image_encoder/embeddings/position"].shape == ((2 * IMAGE // PATCH) ** 2, 24)
    model, variables = variables_of(larger)
    assert pooled(model, variables, images(1, 2 * IMAGE)[1]).shape == (1, 24)


def test_converted_siglip_trains_with_the_sigmoid_loss(siglip, tmp_path, capsys):
    from vlretrieval.checkpoint import Checkpointer
    from vlretrieval.config import load_config
    from vlretrieval.objectives import check_objectives, make_objective
    from vlretrieval.state import create_train_state, make_optimizer
    from vlretrieval.train import make_train_step

    reference, folder = siglip
    outdir = tmp_path / "siglip"
    code, _, err = run_cli(capsys, "convert", "--from", "hf", folder, "--to", str(outdir),
                           "--config", "configs/demo.py:tiny")
    assert code == 0, err
    config = load_config(str(outdir / "config.py"))
    assert config.objectives.contrastive_loss == "sigmoid" and config.model.head.logit_bias
    # Texts padded to the length the last-position pooling was trained at, not the base's 32.
    assert config.data.max_text_length == TEXT_POSITIONS
    model = build_model(config.model, VOCAB)
    check_objectives(config.objectives, model, None, False)
    tx, schedule = make_optimizer(config.optimizer, 10)
    checkpointer = Checkpointer(str(outdir))
    _, state = checkpointer.restore_latest(jax.eval_shape(lambda: create_train_state(model, tx, config.seed)))
    checkpointer.close()
    assert int(state.step) == 0
    objective = make_objective(model, config.objectives, patch_size=config.model.patch_size, mask_id=None,
                               vocab_size=VOCAB, tower_losses=parallel.CrossDeviceLosses(parallel.make_mesh(1)))
    step = jax.jit(make_train_step(objective, tx, schedule))
    ids, mask = text_inputs(8)
    pixels, ours = images(8, seed=2)
    batch = {"images": ours, "token_ids": jnp.asarray(ids, jnp.int32),
             "text_mask": jnp.asarray(mask, jnp.int32)}
    with torch.no_grad():
        want = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         pixel_values=torch.tensor(pixels), return_loss=True).loss
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    # The first step's loss is SigLIP's own (HF's return_loss): the sigmoid loss, not softmax.
    assert abs(losses[0] - float(want)) < 1e-4 * max(1.0, float(want)), (losses[0], float(want))
    assert losses[-1] < 0.5 * losses[0], losses


def _sentencepiece_tokenizer(folder):
    """SigLIP's tokenizer files (spiece.model, tokenizer_config.json) from a tiny unigram model
    trained offline."""
    import sentencepiece

    texts = ["a photo of a cat", "a dog on the grass", "two birds in a tree", "a red car"] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=40, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    os.makedirs(folder, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    tokenizer = transformers.SiglipTokenizer(vocab_file=str(folder / "spiece.model"))
    tokenizer.save_pretrained(str(folder))
    return tokenizer


@pytest.fixture
def siglip_with_tokenizer(siglip, tmp_path):
    pytest.importorskip("sentencepiece")
    _, folder = siglip
    source = tmp_path / "source"
    source.mkdir()
    for name in os.listdir(folder):
        os.symlink(os.path.join(folder, name), source / name)
    return source, _sentencepiece_tokenizer(source)


def test_tokenizer_files_travel_with_the_converted_siglip(siglip_with_tokenizer, tmp_path, capsys):
    source, _ = siglip_with_tokenizer
    outdir = tmp_path / "out"
    assert run_cli(capsys, "convert", "--from", "hf", str(source), "--to", str(outdir))[0] == 0
    assert {"spiece.model", "tokenizer_config.json"} <= set(os.listdir(outdir / "tokenizer"))
    from vlretrieval.config import load_config
    assert load_config(str(outdir / "config.py")).data.tokenizer == str(outdir / "tokenizer")
    record_ = json.load(open(outdir / "conversion.json"))
    assert record_["architecture"] == "SiglipModel"


def test_our_tokenizer_gives_siglip_tokenizer_ids(siglip_with_tokenizer):
    source, reference = siglip_with_tokenizer
    from vlretrieval.data.tokenizer import load_tokenizer
    texts = ["a photo of a cat", "two dogs", "A Photo, of  TWO... cats!", "a much longer caption that is cut at twelve"]
    ids, mask = load_tokenizer(str(source)).encode(texts, 12)
    want = reference(texts, padding="max_length", max_length=12, truncation=True)
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])


def test_unsupported_siglip_variants_fail_with_one_line(siglip, siglip_vision, tmp_path, capsys):
    _, folder = siglip_vision
    no_head = tmp_path / "no_head"
    no_head.mkdir()
    config = json.load(open(os.path.join(folder, "config.json")))
    (no_head / "config.json").write_text(json.dumps(dict(config, vision_use_head=False)))
    os.symlink(os.path.join(folder, "model.safetensors"), no_head / "model.safetensors")
    naflex = tmp_path / "naflex"
    naflex.mkdir()
    (naflex / "config.json").write_text(json.dumps(dict(config, architectures=["Siglip2Model"])))
    for source, fragment in ((no_head, "vision_use_head false"), (naflex, "Siglip2Model")):
        code, _, err = run_cli(capsys, "convert", "--from", "hf", str(source), "--to", str(tmp_path / "out"))
        assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    # A CLIP-style tower cannot be exported as SigLIP: the first option that differs is named.
    ours = tmp_path / "ours"
    assert run_cli(capsys, "convert", "--from", "hf", siglip[1], "--to", str(ours))[0] == 0
    code, _, err = run_cli(capsys, "convert", "--from", "vlretrieval", str(ours), "--to-hf",
                           str(tmp_path / "clip"), "--arch", "clip")
    assert code == 2 and "text_transformer.causal" in err and not (tmp_path / "clip").exists()
