#!/usr/bin/env bash
# The accelerator figures in one prepared run: on a GPU or TPU machine, the ViT-B/16 bf16 train
# step at the largest batch that fits (TFLOP/s, MFU), its activation memory, and the search
# benchmark on the device. Prints JSON lines; copies them to $OUT (or ./accelerator_results) too.
#
#   bash benchmarks/accelerator.sh            # on the accelerator machine
#   bash benchmarks/accelerator.sh --smoke    # the same path on the CPU in under a minute (tests)
#
# Installs the project (and what it lacks) with pip where the machine can reach a registry;
# offline, it uses what is installed and says what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=false
if [ "${1:-}" = "--smoke" ]; then smoke=true; fi
python=${PYTHON:-python3}
out=${OUT:-accelerator_results}
mkdir -p "$out"
results="$out/accelerator.jsonl"
: > "$results"
export PYTHONUNBUFFERED=1

if ! $smoke; then
  # The package itself never needs the network; its dependencies may be installed already.
  $python -m pip install -q --no-deps -e . 2>/dev/null || echo "note: pip install -e . failed; running from the checkout"
  missing=$($python - <<'EOF'
import importlib.util
names = ["jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "tokenizers", "tqdm", "absl"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
)
  if [ -n "$missing" ]; then
    echo "installing what is missing: $missing"
    $python -m pip install -q ml_collections tokenizers tqdm absl-py 2>/dev/null \
      || echo "warning: could not install $missing (offline?); the runs below may fail"
  fi
  $python -c "import jax; print('backend:', jax.default_backend(), jax.devices())"
  PYTHONPATH=. $python benchmarks/train_throughput.py --suite accelerator --output "$results"
  PYTHONPATH=. $python benchmarks/search_speed.py --repeats 5 --only speed | tee -a "$results"
else
  PYTHONPATH=. JAX_PLATFORMS=cpu $python benchmarks/train_throughput.py --suite smoke \
    --skip versus_torch --output "$results"
  PYTHONPATH=. JAX_PLATFORMS=cpu $python benchmarks/search_speed.py --queries 64 --gallery 2048 \
    --dim 32 --query_chunk 32 --gallery_chunk 1024 --slab_rows 2048 --repeats 1 --only speed \
    | tee -a "$results"
fi
echo "results in $results"
