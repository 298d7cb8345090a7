"""Train-step speed, compile time and activation memory, printed as JSON lines.

  python benchmarks/train_throughput.py                        # CPU suite (a few minutes)
  python benchmarks/train_throughput.py --suite accelerator    # GPU/TPU: ViT-B/16 bf16, MFU
  python benchmarks/train_throughput.py --suite smoke          # seconds, on the CPU (tests)

CPU suite:
- `tiny_clip`: our train step against transformers' PyTorch `CLIPModel` with the same dims (both
  towers 4 layers of width 256, 4 heads, 64 px images, patch 16, 77 tokens, vocab 49,408, embed
  128, batch 32, float32), the same symmetric InfoNCE, global-norm clipping and AdamW; torch on 2
  threads. Repeats interleave (ours, torch, ours, ...) so both see the same machine load; the
  figure is the ratio of median step times. Also our FLOP/s against the measured float32 matmul
  peak of this machine (a jitted 2,048^3 product).
- `compile_time`: lowering + compiling the train step at depth 4, 12 and 24 (width 128), with
  and without `scan_layers`.
- `residuals`: bytes the forward pass keeps for the backward pass of the ViT-B/16 (224 px) +
  12-layer width-512 text step at batch 64, float32 / bfloat16 / bfloat16 + full remat, counted
  from the traced program (hardware independent; parameters and inputs excluded), and XLA's
  compiled temporary memory on this backend (the CPU backend may run bf16 dots in float32).
Accelerator suite: the B/16 step in bfloat16 at the largest batch that fits (halving from
`--max_batch`), median step time, TFLOP/s and MFU; the same residual figures.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax._src.ad_checkpoint import saved_residuals  # noqa: E402  (print_saved_residuals' data)

from configs.demo import get_config, transformer  # noqa: E402
from vlretrieval import (  # noqa: E402
    arguments,  # noqa: E402
    parallel,
    throughput,
)
from vlretrieval.models import build_model  # noqa: E402
from vlretrieval.objectives import make_objective  # noqa: E402
from vlretrieval.state import create_train_state, make_optimizer  # noqa: E402
from vlretrieval.train import make_train_step  # noqa: E402

LEARNING_RATE, WEIGHT_DECAY, CLIP_NORM = 1e-4, 0.05, 1.0


def emit(record: dict, output) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if output:
        output.write(line + "\n")
        output.flush()


def clip_model_config(*, image_size, patch, image_width, image_depth, image_heads, text_width,
                      text_depth, text_heads, embed, text_length=77, dtype="float32",
                      remat="none", scan_layers=False, attention="auto"):
    """A CLIP-shaped dual encoder: pre-LN, quick GELU, causal text with last-token pooling."""
    model = get_config().model
    model.kind, model.image_size, model.patch_size = "dual", image_size, patch
    model.max_text_length = text_length
    model.dtype, model.attention, model.scan_layers = dtype, attention, scan_layers
    for name, width, depth, heads in (("image_transformer", image_width, image_depth, image_heads),
                                      ("text_transformer", text_width, text_depth, text_heads)):
        section = transformer(width, depth, heads)
        section.activation, section.layer_norm_eps, section.remat = "quick_gelu", 1e-5, remat
        model[name] = section
    model.text_transformer.causal = True
    model.head.embed_dim, model.head.text_pooling, model.head.image_pooling = embed, "last", "cls"
    model.text_embeddings = ml_collections.ConfigDict(
        dict(type_vocab_size=0, layer_norm=False, layer_norm_eps=1e-5))
    model.image_embeddings = ml_collections.ConfigDict(
        dict(patch_bias=False, layer_norm=True, layer_norm_eps=1e-5))
    return model


TINY = dict(image_size=64, patch=16, image_width=256, image_depth=4, image_heads=4,
            text_width=256, text_depth=4, text_heads=4, embed=128)
B16 = dict(image_size=224, patch=16, image_width=768, image_depth=12, image_heads=12,
           text_width=512, text_depth=12, text_heads=8, embed=512)
SMOKE = dict(image_size=32, patch=16, image_width=32, image_depth=1, image_heads=2,
             text_width=32, text_depth=1, text_heads=2, embed=16, text_length=8)


def random_batch(model_config, batch_size: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    size, length = model_config.image_size, model_config.max_text_length
    return {
        "images": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
        "token_ids": rng.integers(1, vocab, size=(batch_size, length)).astype(np.int32),
        "text_mask": np.ones((batch_size, length), np.int32),
    }


def _optimizer_config(steps: int):
    optimizer = get_config().optimizer
    optimizer.learning_rate, optimizer.weight_decay = LEARNING_RATE, WEIGHT_DECAY
    optimizer.gradient_clip_norm, optimizer.warmup_steps = CLIP_NORM, 0
    return make_optimizer(optimizer, steps)


class OurStep:
    """The trainer's own step (train.make_train_step, jitted with its shardings) on one batch."""

    def __init__(self, model_config, batch_size: int, vocab: int, devices: int = 1):
        self.mesh = parallel.make_mesh(devices)
        model = build_model(model_config, vocab)
        tx, schedule = _optimizer_config(1000)
        objective = make_objective(model, get_config().objectives, patch_size=model_config.patch_size,
                                   mask_id=0, vocab_size=vocab,
                                   tower_losses=parallel.CrossDeviceLosses(self.mesh))
        self.state_shapes = jax.eval_shape(lambda: create_train_state(model, tx, 0))
        shardings = parallel.state_shardings(self.state_shapes, self.mesh, False)
        self.jitted = jax.jit(make_train_step(objective, tx, schedule),
                              in_shardings=(shardings, parallel.batch_sharding(self.mesh)),
                              out_shardings=(shardings, parallel.replicated(self.mesh)),
                              donate_argnums=0)
        self.batch = parallel.global_batch(random_batch(model_config, batch_size, vocab), self.mesh)
        self.make_state = lambda: jax.device_put(create_train_state(model, tx, 0), shardings)
        self.compiled = None

    def compile(self) -> float:
        started = time.perf_counter()
        self.compiled = self.jitted.lower(self.state_shapes, self.batch).compile()
        return time.perf_counter() - started

    def flops(self) -> float:
        return throughput.compiled_flops(self.compiled)

    def memory(self) -> dict:
        analysis = self.compiled.memory_analysis()
        return {"temp_bytes": int(analysis.temp_size_in_bytes),
                "argument_bytes": int(analysis.argument_size_in_bytes)} if analysis else {}

    def start(self) -> None:
        self.state = self.make_state()
        self.run(2)  # warm-up

    def run(self, steps: int) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(metrics["loss"])
        return (time.perf_counter() - started) / steps


class TorchClipStep:
    """transformers' CLIPModel with the same dims: its own contrastive loss, clipping, AdamW."""

    def __init__(self, dims: dict, batch_size: int, vocab: int, threads: int):
        import torch
        import transformers

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.torch = torch
        config = transformers.CLIPConfig(
            text_config=dict(vocab_size=vocab, hidden_size=dims["text_width"],
                             num_hidden_layers=dims["text_depth"],
                             num_attention_heads=dims["text_heads"],
                             intermediate_size=4 * dims["text_width"],
                             max_position_embeddings=dims.get("text_length", 77)),
            vision_config=dict(hidden_size=dims["image_width"], num_hidden_layers=dims["image_depth"],
                               num_attention_heads=dims["image_heads"],
                               intermediate_size=4 * dims["image_width"],
                               image_size=dims["image_size"], patch_size=dims["patch"]),
            projection_dim=dims["embed"],
        )
        self.model = transformers.CLIPModel(config).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE,
                                           weight_decay=WEIGHT_DECAY)
        rng = np.random.default_rng(0)
        length, size = dims.get("text_length", 77), dims["image_size"]
        self.inputs = dict(
            input_ids=torch.tensor(rng.integers(1, vocab, size=(batch_size, length))),
            attention_mask=torch.ones(batch_size, length, dtype=torch.long),
            pixel_values=torch.tensor(rng.normal(size=(batch_size, 3, size, size)).astype(np.float32)),
        )

    def start(self) -> None:
        self.run(2)

    def run(self, steps: int) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.model(**self.inputs, return_loss=True).loss
            loss.backward()
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP_NORM)
            self.optimizer.step()
        return (time.perf_counter() - started) / steps


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """float32 matmul FLOP/s of this backend on one device (the best of `repeats`)."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)).astype(np.float32))
    product = jax.jit(lambda x: x @ x)
    product(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        product(a).block_until_ready()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def versus_torch(dims, batch_size, vocab, repeats, steps, threads, output) -> None:
    ours = OurStep(clip_model_config(**dims), batch_size, vocab)
    compile_seconds = ours.compile()
    ours.start()
    reference = TorchClipStep(dims, batch_size, vocab, threads)
    reference.start()
    our_times, torch_times = [], []
    for _ in range(repeats):
        our_times.append(ours.run(steps))
        torch_times.append(reference.run(steps))
    ours_median, torch_median = statistics.median(our_times), statistics.median(torch_times)
    peak = matmul_peak_flops()
    emit({"benchmark": "tiny_clip_vs_transformers", "batch": batch_size, "repeats": repeats,
          "steps_per_repeat": steps, "torch_threads": threads,
          "ours_step_seconds_median": ours_median, "torch_step_seconds_median": torch_median,
          "speed_ratio_torch_over_ours": torch_median / ours_median,
          "ours_step_seconds": our_times, "torch_step_seconds": torch_times,
          "ours_gflop_per_step": ours.flops() / 1e9, "compile_seconds": compile_seconds,
          "ours_gflops_per_second": ours.flops() / ours_median / 1e9,
          "matmul_peak_gflops_per_second": peak / 1e9,
          "fraction_of_matmul_peak": ours.flops() / ours_median / peak}, output)


def compile_times(depths, width, output) -> None:
    dims = dict(TINY, image_width=width, text_width=width, image_heads=4, text_heads=4)
    for scan in (False, True):
        for depth in depths:
            config = clip_model_config(**dict(dims, image_depth=depth, text_depth=depth),
                                       scan_layers=scan)
            seconds = OurStep(config, 8, 1000).compile()
            emit({"benchmark": "compile_time", "depth": depth, "width": width,
                  "scan_layers": scan, "compile_seconds": seconds}, output)


def residual_bytes(model_config, batch_size: int, vocab: int) -> dict:
    """Bytes of what the forward pass keeps for the backward pass, by dtype; parameters and
    inputs (which exist anyway) are left out."""
    model = build_model(model_config, vocab)
    batch = random_batch(model_config, batch_size, vocab)
    objective = make_objective(model, get_config().objectives, patch_size=model_config.patch_size,
                               mask_id=0, vocab_size=vocab)
    params = jax.eval_shape(lambda: create_train_state(model, _optimizer_config(10)[0], 0).params)
    loss = lambda p: objective.loss(p, batch, jax.random.PRNGKey(0))[0]
    by_dtype: dict[str, int] = {}
    for aval, source in saved_residuals(loss, params):
        if "from the argument" in source:
            continue
        size = int(np.prod(aval.shape)) * aval.dtype.itemsize
        by_dtype[str(aval.dtype)] = by_dtype.get(str(aval.dtype), 0) + size
    return {"residual_bytes": sum(by_dtype.values()), "residual_bytes_by_dtype": by_dtype}


def memory(dims, batch_size, vocab, output, compiled_memory: bool) -> None:
    figures = {}
    for name, dtype, remat in (("float32", "float32", "none"), ("bfloat16", "bfloat16", "none"),
                               ("bfloat16_full_remat", "bfloat16", "full")):
        # The library's XLA attention (what TPUs run): "auto" on the CPU keeps the probabilities.
        config = clip_model_config(**dims, dtype=dtype, remat=remat, attention="xla")
        figures[name] = residual_bytes(config, batch_size, vocab)
        if compiled_memory:
            step = OurStep(config, batch_size, vocab)
            step.compile()
            figures[name]["xla_memory_analysis"] = step.memory()
    base = figures["float32"]["residual_bytes"]
    emit({"benchmark": "activation_memory", "batch": batch_size, "backend": jax.default_backend(),
          "figures": figures,
          "bfloat16_over_float32": figures["bfloat16"]["residual_bytes"] / base,
          "bfloat16_full_remat_over_float32": figures["bfloat16_full_remat"]["residual_bytes"] / base},
         output)


def largest_batch_throughput(dims, vocab, max_batch, steps, repeats, output) -> None:
    """The B/16 step in bfloat16 at the largest batch (halving from max_batch) that fits."""
    device_kind = jax.devices()[0].device_kind
    peak = throughput.peak_tflops(device_kind, "bfloat16")
    batch = max_batch
    while batch >= min(8, max_batch):
        config = clip_model_config(**dims, dtype="bfloat16", attention="auto")
        try:
            step = OurStep(config, batch, vocab)
            step.compile()
            step.start()
            times = [step.run(steps) for _ in range(repeats)]
        except Exception as error:  # out of memory at compile or run time: halve the batch
            if "RESOURCE_EXHAUSTED" not in str(error) and "out of memory" not in str(error).lower():
                raise
            emit({"benchmark": "b16_bf16", "batch": batch, "fits": False}, output)
            batch //= 2
            continue
        median = statistics.median(times)
        tflops = step.flops() / median / 1e12
        emit({"benchmark": "b16_bf16", "batch": batch, "fits": True, "device_kind": device_kind,
              "step_seconds_median": median, "examples_per_second": batch / median,
              "tflops_per_second_per_device": tflops, "peak_tflops": peak,
              "mfu": tflops / peak if peak else None, "memory": step.memory()}, output)
        return


def main(argv=None) -> None:
    parser = arguments.OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("cpu", "accelerator", "smoke"), default="cpu")
    parser.add_argument("--repeats", type=arguments.positive_int, default=7)
    parser.add_argument("--steps", type=arguments.positive_int, default=5, help="steps per timed repeat")
    parser.add_argument("--torch_threads", type=arguments.positive_int, default=2)
    parser.add_argument("--max_batch", type=arguments.positive_int, default=1024, help="accelerator suite")
    parser.add_argument("--skip", nargs="*", default=(),
                        choices=("versus_torch", "compile_time", "memory"))
    parser.add_argument("--output", default="", help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    output = open(args.output, "a") if args.output else None
    emit({"benchmark": "machine", "backend": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(),
          "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "suite": args.suite}, output)
    vocab = 49408
    if args.suite == "smoke":  # every function of both suites, at toy sizes
        vocab = 100
        if "versus_torch" not in args.skip:
            versus_torch(SMOKE, 4, vocab, 2, 1, 1, output)
        if "compile_time" not in args.skip:
            compile_times((1, 2), 32, output)
        largest_batch_throughput(SMOKE, vocab, 8, 1, 1, output)
        memory(SMOKE, 2, vocab, output, compiled_memory=False)
    elif args.suite == "cpu":
        if "versus_torch" not in args.skip:
            versus_torch(TINY, 32, vocab, args.repeats, args.steps, args.torch_threads, output)
        if "compile_time" not in args.skip:
            compile_times((4, 12, 24), 128, output)
        if "memory" not in args.skip:
            memory(B16, 64, vocab, output, compiled_memory=True)
    else:
        largest_batch_throughput(B16, vocab, args.max_batch, args.steps, args.repeats, output)
        if "memory" not in args.skip:
            memory(B16, 64, vocab, output, compiled_memory=True)
    if output:
        output.close()


if __name__ == "__main__":
    arguments.run(main)
