"""FLOP and MFU accounting: XLA's count of the compiled step agrees with a hand count of the
model's matmuls, and a CPU run logs a finite MFU when told the chip's peak."""

import json
import math
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs.demo import get_config, transformer
from vlretrieval import throughput
from vlretrieval.config import load_config
from vlretrieval.models import build_model
from vlretrieval.objectives import make_objective
from vlretrieval.state import create_train_state, make_optimizer
from vlretrieval.train import make_train_step, train

BATCH, IMAGE, PATCH, TEXT, WIDTH, DEPTH, MLP, EMBED, VOCAB = 32, 64, 16, 77, 256, 4, 1024, 128, 1000


def _dual_config():
    config = ml_collections.ConfigDict()
    config.kind = "dual"
    config.image_size, config.patch_size, config.max_text_length = IMAGE, PATCH, TEXT
    config.dtype, config.attention, config.scan_layers = "float32", "xla", False
    for name in ("transformer", "image_transformer", "text_transformer"):
        config[name] = transformer(WIDTH, DEPTH, 4)
        config[name].mlp_dim = MLP
    config.head = ml_collections.ConfigDict(dict(
        embed_dim=EMBED, text_pooling="mean", image_pooling="cls",
        initial_temperature=0.07, max_logit_scale=100.0,
    ))
    return config


def hand_counted_training_flops() -> float:
    """2 x multiply-adds of every matmul. Weight matmuls run 3x (forward, and the gradients with
    respect to inputs and weights), the patch projection 2x (images need no gradient), and the
    attention products 4x (forward, its recomputation in the backward pass, two gradients)."""
    patches = (IMAGE // PATCH) ** 2
    image_tokens, text_tokens = BATCH * (patches + 1), BATCH * TEXT
    per_token_layer = 2 * (4 * WIDTH * WIDTH + 2 * WIDTH * MLP)  # q, k, v, out; fc1, fc2
    dense = (image_tokens + text_tokens) * DEPTH * per_token_layer
    attention = BATCH * DEPTH * 2 * 2 * WIDTH * ((patches + 1) ** 2 + TEXT ** 2)
    patch_projection = BATCH * patches * 2 * (PATCH * PATCH * 3) * WIDTH
    heads = 2 * BATCH * 2 * WIDTH * EMBED + 2 * 2 * BATCH * BATCH * EMBED  # projections, logits
    return 3 * (dense + heads) + 2 * patch_projection + 4 * attention


def test_xla_flop_count_of_the_step_matches_a_hand_count_of_the_matmuls():
    model = build_model(_dual_config(), VOCAB)
    tx, schedule = make_optimizer(get_config().optimizer, 10)
    state = create_train_state(model, tx, seed=0)
    objective = make_objective(model, get_config().objectives, patch_size=PATCH, mask_id=4,
                               vocab_size=VOCAB)
    rng = np.random.default_rng(0)
    batch = {
        "images": rng.normal(size=(BATCH, IMAGE, IMAGE, 3)).astype(np.float32),
        "token_ids": rng.integers(5, VOCAB, size=(BATCH, TEXT)).astype(np.int32),
        "text_mask": np.ones((BATCH, TEXT), np.int32),
    }
    compiled = jax.jit(make_train_step(objective, tx, schedule)).lower(state, batch).compile()
    counted, expected = throughput.compiled_flops(compiled), hand_counted_training_flops()
    assert abs(counted - expected) / expected < 0.10, (counted, expected)


def test_peaks_are_known_for_the_accelerators_and_overridable():
    assert throughput.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989.4)
    assert throughput.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == pytest.approx(756.0)
    assert throughput.peak_tflops("NVIDIA H200", "float32") == pytest.approx(494.7)
    assert throughput.peak_tflops("TPU v5 lite", "bfloat16") == pytest.approx(197.0)
    assert throughput.peak_tflops("TPU v4", "float32") is None
    assert throughput.peak_tflops("cpu", "float32") is None
    assert throughput.peak_tflops("cpu", "float32", override=0.5) == 0.5


def test_a_cpu_run_logs_finite_tflops_and_mfu_given_the_peak(tmp_path, capsys):
    data_dir = str(tmp_path / "data")
    config = load_config("configs/demo.py:tiny", [f"data.data_dir={data_dir}",
                                                  "train.peak_tflops=0.05"])
    workdir = str(tmp_path / "run")
    train(config, workdir, progress=False)
    assert "GFLOP per device (XLA cost analysis); MFU against 0.05 TFLOP/s" in capsys.readouterr().out
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    assert records and all(math.isfinite(r["mfu"]) and r["mfu"] > 0 for r in records)
    assert all(r["tflops_per_second_per_device"] == pytest.approx(r["mfu"] * 0.05) for r in records)


def test_the_accelerator_script_runs_its_whole_path_on_the_cpu(tmp_path):
    """`benchmarks/accelerator.sh --smoke`: the B/16 largest-batch throughput, the residual memory
    and the search benchmark, at toy sizes, each printing its JSON figures."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as on a single-chip machine
    result = subprocess.run(["bash", "benchmarks/accelerator.sh", "--smoke"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(tmp_path / "accelerator.jsonl") as handle:
        records = [json.loads(line) for line in handle if line.startswith("{")]
    by_name = {record.get("benchmark", "search"): record for record in records}
    fitted = by_name["b16_bf16"]
    assert fitted["fits"] and fitted["tflops_per_second_per_device"] > 0
    assert 0 < by_name["activation_memory"]["bfloat16_full_remat_over_float32"] < 1
    assert "search" in by_name
