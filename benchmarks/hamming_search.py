"""Packed-bit Hamming search against float32 search over the same items, both through search.top_k.

The items: float32 embeddings ([gallery, dim], unit length) and their binary codes, the signs of
a fixed random projection to `--bits` (what a hashing head writes at inference), packed 32 bits
to a uint32 word (`codes.pack_codes`). Queries likewise. One process, the same chunk options for
both, repeats interleaved (codes, floats, codes, ...) so both see the same machine load; figures
are medians over repeats, the ratio the median of the per-repeat float time / code time.
Prints JSON lines: the setup, then one line per search, then the comparison.

  .venv/bin/python benchmarks/hamming_search.py                  # 1,000 queries over 1M items
  .venv/bin/python benchmarks/hamming_search.py --queries 200    # quicker
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlretrieval import arguments  # noqa: E402


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def random_unit(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((rows, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def signs_packed(embeddings: np.ndarray, projection: np.ndarray, piece: int = 100_000) -> np.ndarray:
    """Codes of `embeddings`: the signs of a projection, packed; in pieces (no [N, bits] floats)."""
    from vlretrieval.evaluation import codes

    return np.concatenate([codes.pack_codes(embeddings[start : start + piece] @ projection)
                           for start in range(0, len(embeddings), piece)])


def main() -> None:
    parser = arguments.OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=arguments.positive_int, default=1000)
    parser.add_argument("--gallery", type=arguments.positive_int, default=1_000_000)
    parser.add_argument("--dim", type=arguments.positive_int, default=256)
    parser.add_argument("--bits", type=arguments.positive_int, default=64)
    parser.add_argument("--k", type=arguments.positive_int, default=10)
    parser.add_argument("--query_chunk", type=arguments.positive_int, default=512)
    parser.add_argument("--gallery_chunk", type=arguments.positive_int, default=32768)
    parser.add_argument("--slab_rows", type=arguments.positive_int, default=131072)
    parser.add_argument("--repeats", type=arguments.positive_int, default=5)
    parser.add_argument("--output", help="also write every record to this JSON file")
    args = parser.parse_args()

    import jax

    from vlretrieval.evaluation import codes, search

    codes.check_code_bits(args.bits)
    records = [{
        "benchmark": "hamming_search", "device": jax.devices()[0].device_kind, "devices": jax.local_device_count(),
        "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "command": " ".join(sys.argv), "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_version": jax.__version__,
        "queries": args.queries, "gallery": args.gallery, "dim": args.dim, "bits": args.bits, "k": args.k,
        "query_chunk": args.query_chunk, "gallery_chunk": args.gallery_chunk, "slab_rows": args.slab_rows,
        "repeats": args.repeats,
    }]
    emit(records[0])
    rng = np.random.default_rng(0)
    queries, gallery = random_unit(rng, args.queries, args.dim), random_unit(rng, args.gallery, args.dim)
    projection = rng.standard_normal((args.dim, args.bits), dtype=np.float32)
    query_codes, gallery_codes = signs_packed(queries, projection), signs_packed(gallery, projection)
    options = dict(query_chunk=args.query_chunk, gallery_chunk=args.gallery_chunk, slab_rows=args.slab_rows)
    searches = {
        "hamming": lambda: search.top_k(query_codes, gallery_codes, args.k, **options),
        "float32": lambda: search.top_k(queries, gallery, args.k, **options),
    }
    first_call, times, found = {}, {name: [] for name in searches}, {}
    for name, run in searches.items():
        started = time.perf_counter()
        found[name] = run()
        first_call[name] = time.perf_counter() - started
    for _ in range(args.repeats):
        for name, run in searches.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    stored = {"hamming": gallery_codes, "float32": gallery}
    for name in searches:
        median = statistics.median(times[name])
        records.append({
            "search": name, "seconds_median": median, "seconds": times[name],
            "first_call_seconds_incl_compile": first_call[name],
            "queries_per_second_median": args.queries / median,
            "gallery_bytes": int(stored[name].nbytes), "bytes_per_item": stored[name].nbytes // args.gallery,
        })
        emit(records[-1])
    ratios = [f / h for f, h in zip(times["float32"], times["hamming"])]
    # Exactness, on a few queries: numpy's popcount over the whole gallery, stable order.
    distance = np.bitwise_count(query_codes[:3, None, :] ^ gallery_codes[None]).sum(axis=2, dtype=np.int64)
    expected = np.argsort(distance, axis=1, kind="stable")[:, : args.k]
    records.append({
        "speedup_hamming_over_float32_median": statistics.median(ratios), "speedup_per_repeat": ratios,
        "memory_ratio_float32_over_hamming": stored["float32"].nbytes / stored["hamming"].nbytes,
        "hamming_bytes_per_item": codes.bytes_per_item(args.bits), "float32_bytes_per_item": 4 * args.dim,
        "hamming_top_k_equals_numpy_on_first_queries": bool((found["hamming"][1][:3] == expected).all()),
    })
    emit(records[-1])
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(records, handle, indent=2)


if __name__ == "__main__":
    arguments.run(main)
