"""Hugging Face <-> vlretrieval conversion, checked against the transformers (PyTorch) forward.

Every reference model is random-initialised offline from a tiny config, saved with
`save_pretrained`, converted through the CLI or the library, and run on the same inputs.
"""

import json
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
from vlretrieval import cli  # noqa: E402
from vlretrieval.convert import architectures, hf_in, native  # noqa: E402
from vlretrieval.models import build_model  # noqa: E402

TOLERANCE = 1e-4
VOCAB, TEXT_POSITIONS, IMAGE, PATCH = 60, 16, 32, 8
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _save(model, folder):
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """arch -> (PyTorch model in eval mode, its saved folder)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    text = dict(vocab_size=VOCAB, max_position_embeddings=TEXT_POSITIONS, **SIZES)
    vision = dict(image_size=IMAGE, patch_size=PATCH, **SIZES)
    models = {
        "bert": transformers.BertModel(transformers.BertConfig(**text)),
        "xlmr": transformers.XLMRobertaModel(transformers.XLMRobertaConfig(
            **dict(text, max_position_embeddings=TEXT_POSITIONS + 2), type_vocab_size=1,
            pad_token_id=1)),
        "vit": transformers.ViTModel(transformers.ViTConfig(**vision)),
        "clip": transformers.CLIPModel(transformers.CLIPConfig(
            text_config=dict(text, eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 2, pad_token_id=1),
            vision_config=vision, projection_dim=16)),
        "vilt": transformers.ViltModel(transformers.ViltConfig(**{**text, **vision})),
    }
    # Randomise LayerNorm and bias parameters too: at their init (ones, zeros) a swapped or
    # missing one would go unnoticed.
    with torch.no_grad():
        for model in models.values():
            for name, parameter in model.named_parameters():
                if parameter.ndim == 1 or "logit_scale" in name:
                    parameter.add_(0.1 * torch.randn_like(parameter))
    return {arch: (model.eval(), _save(model, root / arch)) for arch, model in models.items()}


def zeros(converted):
    """Zero arrays for every parameter of the converted model (shapes only, no init run)."""
    shapes = hf_in.expected_shapes(converted.model, converted.vocab_size or 1)
    return {path: np.zeros(shape, np.float32) for path, shape in shapes.items()}


def base_model(kind="dual"):
    config = get_config()
    config.model.kind = kind
    return architectures.complete_section(config.model.to_dict())


def our_model(folder, **sizes):
    converted = hf_in.convert_folder(folder, base_model(), **sizes)
    model = build_model(ml_collections.ConfigDict(converted.model), converted.vocab_size or 1)
    return model, {"params": native.nest(converted.params)}, converted


def text_inputs(batch=3, length=10, low=3, pad_id=0):
    rng = np.random.RandomState(0)
    ids = rng.randint(low, VOCAB - 2, (batch, length))
    mask = np.ones_like(ids)
    for row, real in enumerate([length, 7, 4][:batch]):
        mask[row, real:] = 0
        ids[row, real:] = pad_id
    return ids, mask


def images(batch=2, size=IMAGE):
    pixels = np.random.RandomState(1).randn(batch, 3, size, size).astype(np.float32)
    return pixels, jnp.asarray(pixels.transpose(0, 2, 3, 1))  # PyTorch NCHW, ours NHWC


def record(name, got, want, where=None):
    got, want = np.asarray(got), np.asarray(want)
    if where is not None:
        got, want = got[where], want[where]
    difference = float(np.max(np.abs(got - want)))
    assert difference < TOLERANCE, f"{name}: max abs difference {difference:.3g}"


def text_outputs(model, variables, ids, mask):
    def run(module, ids, mask):
        sequence = module.text_sequence(ids, mask)
        return sequence, module.pool_text(sequence, mask)
    return model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), method=run)


def image_outputs(model, variables, pixels):
    def run(module, pixels):
        sequence = module.image_sequence(pixels)
        return sequence, module.pool_image(sequence)
    return model.apply(variables, pixels, method=run)


@pytest.mark.parametrize("arch", ["bert", "xlmr"])
def test_text_encoders_match_transformers(hf_folders, arch):
    reference, folder = hf_folders[arch]
    pad_id = 1 if arch == "xlmr" else 0
    ids, mask = text_inputs(pad_id=pad_id)
    with torch.no_grad():
        want = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    model, variables, converted = our_model(folder)
    assert converted.parts == ("text",)
    sequence, pooled = text_outputs(model, variables, ids, mask)
    # Padding positions are compared too for BERT; XLM-R gives padding its own position id, so
    # only real tokens are defined the same way there.
    where = mask.astype(bool) if arch == "xlmr" else None
    record(f"{arch} last_hidden_state", sequence, want.last_hidden_state, where)
    record(f"{arch} pooler_output", pooled, want.pooler_output)


def test_vit_matches_transformers(hf_folders):
    reference, folder = hf_folders["vit"]
    pixels, ours = images()
    with torch.no_grad():
        want = reference(pixel_values=torch.tensor(pixels))
    model, variables, _ = our_model(folder)
    sequence, pooled = image_outputs(model, variables, ours)
    record("vit last_hidden_state", sequence, want.last_hidden_state)
    record("vit pooler_output", pooled, want.pooler_output)


def test_clip_matches_transformers(hf_folders):
    reference, folder = hf_folders["clip"]
    ids, mask = text_inputs()
    ids[np.arange(3), mask.sum(1) - 1] = VOCAB - 1  # end-of-text token last, as CLIP's tokenizer does
    pixels, ours = images(3)
    with torch.no_grad():
        want = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         pixel_values=torch.tensor(pixels))
        want_text = reference.text_model(input_ids=torch.tensor(ids),
                                         attention_mask=torch.tensor(mask))
        want_vision = reference.vision_model(pixel_values=torch.tensor(pixels))
    model, variables, _ = our_model(folder)
    outputs = model.apply(variables, ours, jnp.asarray(ids), jnp.asarray(mask))
    record("clip image_embeds", outputs["image_embeddings"], want.image_embeds)
    record("clip text_embeds", outputs["text_embeddings"], want.text_embeds)
    logits = outputs["logit_scale"] * outputs["image_embeddings"] @ outputs["text_embeddings"].T
    record("clip logits_per_image", logits, want.logits_per_image)
    sequence, pooled = text_outputs(model, variables, ids, mask)
    record("clip text last_hidden_state", sequence, want_text.last_hidden_state, mask.astype(bool))
    record("clip text pooler_output", pooled, want_text.pooler_output)
    # HF's vision last_hidden_state precedes post_layernorm, which it applies to the pooled token
    # only; ours normalises every token (the same for the class token), so compare the pooled one.
    _, pooled = image_outputs(model, variables, ours)
    record("clip vision pooler_output", pooled, want_vision.pooler_output)


def test_vilt_joint_and_towers_match_transformers(hf_folders):
    reference, folder = hf_folders["vilt"]
    ids, mask = text_inputs(2)
    pixels, ours = images(2)
    converted = hf_in.convert_folder(folder, base_model("decomposed"))
    model = build_model(ml_collections.ConfigDict(converted.model), converted.vocab_size)
    # The joint pass computes the ITM and MLM heads too, which ViltModel has not: zeros.
    variables = {"params": native.nest({**zeros(converted), **converted.params})}
    with torch.no_grad():
        want = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         pixel_values=torch.tensor(pixels))
    joint = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), ours,
                        method=lambda m, *a: m.joint_forward(*a))
    record("vilt pair pooler_output", joint["pooled"], want.pooler_output)
    # ViLT shuffles the image patches (with their positions); the text part is order-free.
    record("vilt pair text last_hidden_state", joint["sequence"][:, : ids.shape[1]],
           want.last_hidden_state[:, : ids.shape[1]], mask.astype(bool))

    # The decomposed towers = ViLT's own modules run on one modality alone.
    embeddings = reference.embeddings
    with torch.no_grad():
        text = embeddings.text_embeddings(input_ids=torch.tensor(ids))
        text = text + embeddings.token_type_embeddings(torch.zeros_like(torch.tensor(ids)))
        # ViLT's encoder adds its mask to the attention scores.
        extended = (1.0 - torch.tensor(mask, dtype=torch.float32))[:, None, None, :] * -1e9
        text = reference.layernorm(reference.encoder(text, attention_mask=extended)[0])
        image, image_mask, (patch_index, _) = embeddings.visual_embed(
            torch.tensor(pixels), torch.ones(2, IMAGE, IMAGE, dtype=torch.long),
            max_image_length=-1,
        )
        image = image + embeddings.token_type_embeddings(torch.ones_like(image_mask))
        image = reference.layernorm(reference.encoder(image)[0])
    text_sequence, _ = text_outputs(model, variables, ids, mask)
    record("vilt text tower sequence", text_sequence, text, mask.astype(bool))
    image_sequence, _ = image_outputs(model, variables, ours)
    # Undo ViLT's patch shuffle: patch_index holds each token's (row, column) in the grid.
    grid = IMAGE // PATCH
    order = (patch_index[..., 0] * grid + patch_index[..., 1]).numpy()
    restored = np.asarray(image_sequence)
    restored = np.concatenate(
        [restored[:, :1], np.take_along_axis(restored[:, 1:], order[..., None], axis=1)], axis=1
    )
    record("vilt image tower sequence", restored, image)


def run_cli(capsys, *args):
    """(exit code, stdout, stderr) of `vlretrieval ...` run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def hf_state(folder):
    return {k: v for k, v in load_file(os.path.join(folder, "model.safetensors")).items()
            if not k.endswith(hf_in.IGNORED_SUFFIXES)}


@pytest.mark.parametrize("arch", ["bert", "vit", "clip"])
def test_round_trip_gives_the_original_state_dict(hf_folders, tmp_path, capsys, arch):
    _, folder = hf_folders[arch]
    code, out, err = run_cli(capsys, "convert", "--from", "hf", folder, "--to", str(tmp_path / "ours"))
    assert code == 0, err
    code, out, err = run_cli(capsys, "convert", "--from", "vlretrieval", str(tmp_path / "ours"),
                             "--to-hf", str(tmp_path / "back"), "--arch", arch)
    assert code == 0, err
    original, back = hf_state(folder), hf_state(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for name in original:
        np.testing.assert_array_equal(back[name], original[name], err_msg=name)
    model_class = {"bert": transformers.BertModel, "vit": transformers.ViTModel,
                   "clip": transformers.CLIPModel}[arch]
    _, info = model_class.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_buffers_are_ignored_and_pytorch_bin_files_read(hf_folders, tmp_path):
    reference, folder = hf_folders["bert"]
    state = load_file(os.path.join(folder, "model.safetensors"))
    with_buffers = tmp_path / "with_buffers"
    with_buffers.mkdir()
    (with_buffers / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    save_file(dict(state, **{"embeddings.position_ids": np.arange(TEXT_POSITIONS)[None],
                             "embeddings.token_type_ids": np.zeros((1, TEXT_POSITIONS), np.int64)}),
              str(with_buffers / "model.safetensors"), metadata={"format": "pt"})
    as_bin = tmp_path / "as_bin"
    as_bin.mkdir()
    (as_bin / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    torch.save({**{k: torch.tensor(v) for k, v in state.items()},
                "embeddings.position_ids": torch.arange(TEXT_POSITIONS)[None]},
               str(as_bin / "pytorch_model.bin"))
    plain = hf_in.convert_folder(folder, base_model()).params
    for source in (with_buffers, as_bin):
        converted = hf_in.convert_folder(str(source), base_model()).params
        assert sorted(converted) == sorted(plain)
        for name in plain:
            np.testing.assert_array_equal(converted[name], plain[name])


def test_converted_folder_reads_back_and_initialises_a_run(hf_folders, tmp_path, capsys):
    _, folder = hf_folders["clip"]
    # Tokenizer files travel with the weights.
    source = tmp_path / "source"
    source.mkdir()
    for name in os.listdir(folder):
        os.symlink(os.path.join(folder, name), source / name)
    (source / "vocab.json").write_text('{"a": 0}')
    outdir = tmp_path / "runs" / "clip"
    code, out, err = run_cli(capsys, "convert", "--from", "hf", str(source), "--to", str(outdir),
                             "--config", "configs/demo.py:tiny")
    assert code == 0, err
    assert sorted(os.listdir(outdir)) == [
        "checkpoints", "config.py", "conversion.json", "model.json", "tokenizer"]
    assert sorted(os.listdir(tmp_path / "runs")) == ["clip"]  # no temporary folder left
    assert (outdir / "tokenizer" / "vocab.json").read_text() == '{"a": 0}'
    from vlretrieval.config import load_config
    config = load_config(str(outdir / "config.py"))
    assert config.model.head.text_pooling == "last" and config.train.num_steps == 6  # :tiny base
    assert config.data.tokenizer == str(outdir / "tokenizer")
    # eval reads it as a training workdir: the whole train state restores against the template.
    from vlretrieval.checkpoint import Checkpointer
    from vlretrieval.state import create_train_state, make_optimizer
    model = build_model(config.model, VOCAB)
    tx, _ = make_optimizer(config.optimizer, config.train.num_steps)
    checkpointer = Checkpointer(str(outdir))
    _, state = checkpointer.restore_latest(jax.eval_shape(lambda: create_train_state(model, tx, config.seed)))
    checkpointer.close()
    converted = hf_in.convert_folder(folder, base_model()).params
    restored = native.flatten(jax.device_get(state.params))
    for name in converted:
        np.testing.assert_array_equal(restored[name], converted[name])
    # --init_from the converted folder gives the same parameters as the HF folder itself.
    from vlretrieval.convert.initialise import initial_params
    from_folder = native.flatten(initial_params(str(outdir), state.params, config.model))
    from_hf = native.flatten(initial_params(f"hf:{folder}", state.params, config.model))
    for name in converted:
        np.testing.assert_array_equal(from_folder[name], converted[name])
        np.testing.assert_array_equal(from_hf[name], converted[name])


def test_clip_loads_into_a_scanned_model_matches_transformers_and_exports_back(
    hf_folders, tmp_path, capsys
):
    """Converted weights are in the unrolled layout; a scanned model stacks them on load (and a
    converted folder restores into it), and its checkpoint unstacks again on export."""
    from vlretrieval.checkpoint import Checkpointer
    from vlretrieval.config import load_config
    from vlretrieval.convert.initialise import initial_params
    from vlretrieval.models import layout
    from vlretrieval.state import create_train_state, make_optimizer

    reference, folder = hf_folders["clip"]
    outdir = tmp_path / "clip"
    code, _, err = run_cli(capsys, "convert", "--from", "hf", folder, "--to", str(outdir),
                           "--config", "configs/demo.py:tiny")
    assert code == 0, err
    config = load_config(str(outdir / "config.py"), ["model.scan_layers=true"])
    model = build_model(config.model, VOCAB)
    tx, _ = make_optimizer(config.optimizer, config.train.num_steps)
    template = jax.eval_shape(lambda: create_train_state(model, tx, config.seed))
    assert layout.is_scanned(template.params)
    params = initial_params(f"hf:{folder}", template.params, config.model)
    checkpointer = Checkpointer(str(outdir))
    _, restored = checkpointer.restore_latest(template)  # the unrolled converted checkpoint, stacked
    checkpointer.close()
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    ids, mask = text_inputs()
    ids[np.arange(3), mask.sum(1) - 1] = VOCAB - 1
    pixels, ours = images(3)
    with torch.no_grad():
        want = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         pixel_values=torch.tensor(pixels))
    outputs = model.apply({"params": params}, ours, jnp.asarray(ids), jnp.asarray(mask))
    record("clip scanned image_embeds", outputs["image_embeddings"], want.image_embeds)
    record("clip scanned text_embeds", outputs["text_embeddings"], want.text_embeds)
    # A checkpoint of the scanned model exports to the original state dict.
    scanned_run = tmp_path / "scanned_run"
    checkpointer = Checkpointer(str(scanned_run))
    checkpointer.save(0, restored, config)
    checkpointer.wait()
    checkpointer.close()
    code, _, err = run_cli(capsys, "convert", "--from", "vlretrieval", str(scanned_run),
                           "--to-hf", str(tmp_path / "back"), "--arch", "clip")
    assert code == 0, err
    original, back = hf_state(folder), hf_state(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for name in original:
        np.testing.assert_array_equal(back[name], original[name], err_msg=name)


def _copy_folder(folder, destination, config_edit=None, weights=True):
    destination.mkdir()
    config = json.load(open(os.path.join(folder, "config.json")))
    if config_edit:
        config.update(config_edit)
    (destination / "config.json").write_text(json.dumps(config))
    if weights:
        os.symlink(os.path.join(folder, "model.safetensors"), destination / "model.safetensors")
    return destination


class MakesADirectory:
    """A pickle that would create a directory when unpickled without weights_only."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_bad_inputs_fail_with_one_line_and_write_nothing(hf_folders, tmp_path, capsys):
    _, bert = hf_folders["bert"]
    outdir = tmp_path / "out"
    unsupported = _copy_folder(bert, tmp_path / "gpt2", {"architectures": ["GPT2Model"]})
    wrong_shape = _copy_folder(bert, tmp_path / "wrong", {"intermediate_size": 48})
    no_weights = _copy_folder(bert, tmp_path / "empty", weights=False)
    pickled = _copy_folder(bert, tmp_path / "pickled", weights=False)
    marker = tmp_path / "pickle-ran"
    torch.save({"weight": MakesADirectory(str(marker))}, str(pickled / "pytorch_model.bin"))
    cases = [
        (unsupported, ["GPT2Model", "BertModel, XLMRobertaModel, ViTModel, CLIPModel, ViltModel"]),
        (wrong_shape, ["encoder.layer.0.intermediate.dense.weight", "(64, 32)", "(48, 32)"]),
        (no_weights, [str(no_weights), "model.safetensors", "pytorch_model.bin"]),
        (pickled, [str(pickled / "pytorch_model.bin"), "refused"]),
    ]
    for folder, fragments in cases:
        code, out, err = run_cli(capsys, "convert", "--from", "hf", str(folder), "--to", str(outdir))
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        for fragment in fragments:
            assert fragment in lines[0], (fragment, lines[0])
        assert not outdir.exists()
    assert not marker.exists()  # the pickle was never run
    assert sorted(os.listdir(tmp_path)) == ["empty", "gpt2", "pickled", "wrong"]  # no temp folders

    # Export: a tower that HF's architecture would compute differently is refused.
    ours = tmp_path / "ours"
    assert run_cli(capsys, "convert", "--from", "hf", bert, "--to", str(ours))[0] == 0
    code, _, err = run_cli(capsys, "convert", "--from", "vlretrieval", str(ours), "--to-hf",
                           str(outdir), "--arch", "clip")
    assert code == 2 and "text_transformer.pre_norm" in err and not outdir.exists()
    code, _, err = run_cli(capsys, "convert", "--from", "vlretrieval", str(ours), "--to-hf",
                           str(outdir), "--arch", "vit")
    assert code == 2 and "image_encoder" in err and not outdir.exists()
    # An existing output folder is never overwritten.
    code, _, err = run_cli(capsys, "convert", "--from", "hf", bert, "--to", str(ours))
    assert code == 2 and "already exists" in err


def test_a_bert_text_tower_and_a_vit_image_tower_make_one_dual_encoder(hf_folders):
    bert, bert_folder = hf_folders["bert"]
    vit, vit_folder = hf_folders["vit"]
    # The model section: BERT's text tower over ViT's image tower (what converting BERT with the
    # ViT conversion's config.py as --config gives).
    vit_model = hf_in.convert_folder(vit_folder, base_model()).model
    section = hf_in.convert_folder(bert_folder, vit_model).model
    section["head"]["embed_dim"] = 8
    config = ml_collections.ConfigDict(section)
    model = build_model(config, VOCAB)
    template = native.nest({path: np.full(shape, 0.5, np.float32) for path, shape in
                            hf_in.expected_shapes(section, VOCAB).items()})
    from vlretrieval.convert.initialise import initial_params
    params = initial_params(f"hf:{bert_folder}, hf:{vit_folder}", template, config)
    flat, fresh = native.flatten(params), native.flatten(jax.device_get(template))
    np.testing.assert_array_equal(flat["text_projection/kernel"], fresh["text_projection/kernel"])
    ids, mask = text_inputs()
    pixels, ours = images()
    with torch.no_grad():
        want_text = bert(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        want_image = vit(pixel_values=torch.tensor(pixels))
    _, pooled_text = text_outputs(model, {"params": params}, ids, mask)
    _, pooled_image = image_outputs(model, {"params": params}, ours)
    record("bert+vit dual: text pooler_output", pooled_text, want_text.pooler_output)
    record("bert+vit dual: image pooler_output", pooled_image, want_image.pooler_output)

    # A config whose text tower computes differently (pre-LN) is refused, naming the option.
    wrong = ml_collections.ConfigDict(section)
    wrong.text_transformer.pre_norm = True
    from vlretrieval.errors import UserError
    with pytest.raises(UserError, match=r"config.model.text_transformer.pre_norm is True"):
        initial_params(f"hf:{bert_folder}", template, wrong)
    with pytest.raises(UserError, match="comes from both"):
        initial_params(f"hf:{bert_folder},hf:{bert_folder}", template, config)


def test_positions_are_cut_and_interpolated_by_option(hf_folders):
    _, folder = hf_folders["vit"]
    plain = hf_in.convert_folder(folder, base_model())
    same = hf_in.convert_folder(folder, base_model(), image_size=IMAGE)
    larger = hf_in.convert_folder(folder, base_model(), image_size=2 * IMAGE)
    path = "image_encoder/embeddings/position"
    np.testing.assert_array_equal(same.params[path], plain.params[path])
    grid = IMAGE // PATCH
    assert larger.params[path].shape == (1 + (2 * grid) ** 2, 32)
    assert larger.model["image_size"] == 2 * IMAGE and larger.notes
    np.testing.assert_array_equal(larger.params[path][0], plain.params[path][0])  # class token
    # A linear ramp over the grid stays a ramp (inside the border) after interpolation.
    ramp = np.concatenate([np.zeros((1, 1)), np.arange(grid * grid, dtype=np.float32)[:, None]
                           % grid])
    from vlretrieval.convert.positions import interpolate_grid
    resized = interpolate_grid(np.repeat(ramp, 2, axis=1), 2 * grid)[1:, 0].reshape(8, 8)
    np.testing.assert_allclose(np.diff(resized[:, 1:-1], axis=1), 0.5, atol=1e-5)
    text = hf_in.convert_folder(hf_folders["bert"][1], base_model(), max_text_length=8)
    assert text.params["text_encoder/embeddings/position"].shape == (8, 32)
    from vlretrieval.errors import UserError
    with pytest.raises(UserError, match="16 text positions"):
        hf_in.convert_folder(hf_folders["bert"][1], base_model(), max_text_length=32)
    model, variables, _ = our_model(folder, image_size=2 * IMAGE)
    sequence, _ = image_outputs(model, variables, images(1, 2 * IMAGE)[1])
    assert sequence.shape == (1, 1 + (2 * grid) ** 2, 32)
