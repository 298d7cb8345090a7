"""A vlretrieval checkpoint -> a Hugging Face folder (`convert --from vlretrieval CKPT --to-hf`).

The tower is checked against what the HF architecture computes (post-LN BERT, pre-LN ViT, CLIP's
causal text attention...) before anything is written: an export that `transformers` would load
but compute differently is refused. Weights are written as `model.safetensors` with numpy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from vlretrieval.convert import architectures, native
from vlretrieval.convert.rules import to_hf
from vlretrieval.errors import UserError
from vlretrieval.files import check_writable

POOLERS = {"bert": ("text_pooler", "text_transformer"), "vit": ("image_pooler", "image_transformer")}


def export(checkpoint: str, outdir: str, arch: str) -> list[str]:
    """Writes the checkpoint's tower(s) as an HF `arch` folder; returns notes for the user."""
    if arch not in architectures.EXPORTS:
        raise UserError(f"--arch {arch} is not supported; supported: "
                        f"{', '.join(architectures.EXPORTS)}")
    outdir = os.path.abspath(outdir)
    if os.path.exists(outdir):
        raise UserError(f"--to-hf {outdir} already exists; choose a new folder")
    check_writable(outdir, "--to-hf", directory=True)
    params, config = native.read_checkpoint(checkpoint)
    model = architectures.complete_section(config["model"])
    architectures.check_exportable(arch, model, checkpoint)
    architecture = architectures.EXPORTS[arch]
    record = native.conversion_record(checkpoint)
    original = record["hf_config"] if record and record["architecture"] == architecture else None
    rules = architectures.rules_for(architecture, model, original or {})
    notes, extra = [], {}
    if arch in POOLERS and not model["head"][POOLERS[arch][0]]:
        # BertModel and ViTModel always have a pooler; this tower never trained one.
        width = model[POOLERS[arch][1]]["width"]
        weights = np.random.default_rng(0).normal(0, 0.02, (width, width)).astype(np.float32)
        extra = {"pooler.dense.weight": weights, "pooler.dense.bias": np.zeros(width, np.float32)}
        notes.append("pooler.dense: the checkpoint has no pooler; written freshly initialised "
                     "(normal, std 0.02), so pooler_output is untrained")
    state = {}
    for rule in rules:
        if rule.ours not in params:
            raise UserError(f"{checkpoint}: parameter {rule.ours} is not in the checkpoint "
                            f"(exporting as {arch} needs it)")
        state[rule.hf] = to_hf(rule, params[rule.ours]).astype(np.float32)
    state.update(extra)
    vocab = params.get("text_encoder/embeddings/token/embedding")
    hf_config = architectures.hf_config_for(
        arch, model, None if vocab is None else int(vocab.shape[0]), original
    )
    _write(outdir, state, hf_config, native.run_folder(checkpoint))
    return notes


def _write(outdir: str, state: dict[str, np.ndarray], hf_config: dict, run_folder: str) -> None:
    from safetensors.numpy import save_file

    parent = os.path.dirname(outdir)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(outdir)}.", dir=parent)
    try:
        save_file(state, os.path.join(temporary, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(temporary, "config.json"), "w") as handle:
            json.dump(hf_config, handle, indent=2)
        tokenizer = os.path.join(run_folder, "tokenizer")
        if os.path.isdir(tokenizer):
            for name in os.listdir(tokenizer):
                shutil.copy2(os.path.join(tokenizer, name), os.path.join(temporary, name))
        os.rename(temporary, outdir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise

