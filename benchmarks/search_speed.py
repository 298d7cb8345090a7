"""Exact top-k search speed: vlretrieval.search (chunked, jitted) against FAISS's IndexFlatIP.

Same arrays, same process, repeats interleaved (JAX, FAISS, JAX, ...) so that both see the same
machine load; the throughput ratio is the median over repeats of FAISS time / JAX time. Then the
peak memory of a top-k against a 1,000,000-vector gallery, in a fresh process: the rise of the
process's peak RSS from just before the gallery is created, against the gallery's own size.

  .venv/bin/python -m pip install -e '.[bench]'      # faiss-cpu
  .venv/bin/python benchmarks/search_speed.py        # writes benchmarks/results_search_speed_cpu.json
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlretrieval import arguments  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def random_unit(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((rows, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def agreement(jax_scores, jax_index, faiss_scores, faiss_index) -> dict:
    """Whether the top-k sets agree; where they differ, whether only by float32 near-ties."""
    same_set = np.array([set(a) == set(b) for a, b in zip(jax_index, faiss_index)])
    # A differing entry is a near-tie when the k-th scores agree to float32 rounding of a dot.
    kth_gap = np.abs(jax_scores[:, -1] - faiss_scores[:, -1])
    return {
        "queries_with_same_top_k_set": int(same_set.sum()),
        "queries": len(same_set),
        "same_order_fraction": float(np.mean(jax_index == faiss_index)),
        "differing_queries_max_kth_score_gap": float(kth_gap[~same_set].max()) if (~same_set).any() else 0.0,
        "max_score_difference": float(np.abs(jax_scores - faiss_scores).max()),
    }


def speed(args) -> dict:
    from vlretrieval.evaluation import search

    rng = np.random.default_rng(0)
    queries = random_unit(rng, args.queries, args.dim)
    gallery = random_unit(rng, args.gallery, args.dim)
    run = lambda: search.top_k(
        queries, gallery, args.k, query_chunk=args.query_chunk,
        gallery_chunk=args.gallery_chunk, slab_rows=args.slab_rows, score_dtype=args.score_dtype,
    )
    started = time.perf_counter()
    jax_scores, jax_index = run()
    first_call = time.perf_counter() - started
    result = {
        "queries": args.queries, "gallery": args.gallery, "dim": args.dim, "k": args.k,
        "query_chunk": args.query_chunk, "gallery_chunk": args.gallery_chunk,
        "slab_rows": args.slab_rows, "score_dtype": args.score_dtype, "jax_first_call_seconds_incl_compile": first_call,
    }
    try:
        import faiss
    except ImportError:
        print("faiss is not installed (pip install -e '.[bench]'): timing vlretrieval alone", flush=True)
        faiss = None
    index = None
    if faiss is not None:
        index = faiss.IndexFlatIP(args.dim)
        index.add(gallery)
        result["faiss_version"] = faiss.__version__
        result["faiss_threads"] = faiss.omp_get_max_threads()
    jax_times, faiss_times = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        jax_scores, jax_index = run()
        jax_times.append(time.perf_counter() - started)
        if index is not None:
            started = time.perf_counter()
            faiss_scores, faiss_index = index.search(queries, args.k)
            faiss_times.append(time.perf_counter() - started)
    result["jax_seconds"] = jax_times
    result["matrix_product_floor"] = matrix_product_floor(queries, gallery, args)
    result["jax_queries_per_second_median"] = args.queries / statistics.median(jax_times)
    if index is not None:
        result["faiss_seconds"] = faiss_times
        result["faiss_queries_per_second_median"] = args.queries / statistics.median(faiss_times)
        ratios = [f / j for f, j in zip(faiss_times, jax_times)]
        result["throughput_ratio_jax_over_faiss_median"] = statistics.median(ratios)
        result["throughput_ratio_per_repeat"] = ratios
        result["top_k_agreement"] = agreement(jax_scores, jax_index, faiss_scores, faiss_index)
    return result


def matrix_product_floor(queries: np.ndarray, gallery: np.ndarray, args) -> dict:
    """Where the time goes: the same [query_chunk, gallery_chunk] score blocks computed by XLA
    (each reduced to every query's maximum, so that nothing is optimised away: one pass over the
    block, the cost of the search's group maxima) and by the BLAS numpy links (OpenBLAS, as in FAISS's
    wheels), with no top-k at all. Exact search cannot go below its matrix product; this shows
    how much of the gap to FAISS is XLA's CPU matrix product rather than the search."""
    import jax
    import jax.numpy as jnp

    block_rows = min(args.gallery_chunk, len(gallery))
    starts = range(0, len(gallery) - block_rows + 1, block_rows)
    query_starts = range(0, len(queries) - args.query_chunk + 1, args.query_chunk)
    # One jitted loop over the blocks per query chunk, slicing the gallery inside, as the search.
    def chunk_loop(block_reduction):
        @jax.jit
        def run(q, g):
            def step(block, best):
                rows = jax.lax.dynamic_slice_in_dim(g, block * block_rows, block_rows, 0)
                return jnp.maximum(best, block_reduction(q, rows))

            return jax.lax.fori_loop(0, len(starts), step, jnp.full((q.shape[0],), -jnp.inf))

        return run

    # The search's layout ([queries, rows] blocks), and the transposed product reduced over the
    # gallery to one value per query: YNNPACK fuses that reduction into the product, so the block
    # is never written out. A top-k needs more than one value per query from a block (the group
    # maxima), which does not fuse and runs at the first figure.
    chunk_max = chunk_loop(lambda q, rows: jnp.max(q @ rows.T, axis=1))
    fused_max = chunk_loop(lambda q, rows: jnp.max(rows @ q.T, axis=0))
    device_gallery = jnp.asarray(gallery)
    device_chunks = [jnp.asarray(queries[q : q + args.query_chunk]) for q in query_starts]
    products = len(query_starts) * len(starts)

    def xla():
        for chunk in device_chunks:
            chunk_max(chunk, device_gallery).block_until_ready()

    def xla_fused():
        for chunk in device_chunks:
            fused_max(chunk, device_gallery).block_until_ready()

    def blas():
        for q in query_starts:
            for g in starts:
                np.max(queries[q : q + args.query_chunk] @ gallery[g : g + block_rows].T)

    xla(), xla_fused()  # compiled
    times = {"xla": [], "xla_fused": [], "blas": []}
    for _ in range(max(3, args.repeats // 2)):
        for name, run in (("xla", xla), ("xla_fused", xla_fused), ("blas", blas)):
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    flops = 2.0 * products * args.query_chunk * block_rows * queries.shape[1]
    return {
        "blocks": products, "block_shape": [args.query_chunk, block_rows],
        "xla_gflops_per_second_median": flops / statistics.median(times["xla"]) / 1e9,
        "xla_fused_row_max_gflops_per_second_median": flops / statistics.median(times["xla_fused"]) / 1e9,
        "numpy_blas_gflops_per_second_median": flops / statistics.median(times["blas"]) / 1e9,
        "xla_over_blas_speed": statistics.median(times["blas"]) / statistics.median(times["xla"]),
    }


def memory(args) -> dict:
    """Run in a fresh process: peak RSS rise over a top-k of `memory_gallery` vectors."""
    import jax

    from vlretrieval import parallel
    from vlretrieval.evaluation import search

    rng = np.random.default_rng(1)
    queries = random_unit(rng, args.memory_queries, args.dim)
    import jax.numpy as jnp

    jnp.zeros(1).block_until_ready()  # the runtime started: its own memory is not the search's
    start_rss = _current_rss()
    _reset_peak_rss()
    # Compile and run once on a slab-sized gallery first (its buffers are freed, maybe not
    # returned to the OS: hence both figures below).
    search.top_k(queries, random_unit(rng, args.slab_rows, args.dim), args.k,
                 query_chunk=args.query_chunk, gallery_chunk=args.gallery_chunk, slab_rows=args.slab_rows)
    before = _current_rss()
    gallery = np.empty((args.memory_gallery, args.dim), np.float32)
    for start in range(0, args.memory_gallery, 100_000):  # filled in pieces: no temporary copy
        gallery[start : start + 100_000] = random_unit(rng, min(100_000, args.memory_gallery - start), args.dim)
    started = time.perf_counter()
    search.top_k(queries, gallery, args.k, query_chunk=args.query_chunk,
                 gallery_chunk=args.gallery_chunk, slab_rows=args.slab_rows)
    seconds = time.perf_counter() - started
    peak = _peak_rss()
    rise = peak - before
    chunk = min(args.query_chunk, args.memory_queries)
    slab = search._Slabs(gallery, args.gallery_chunk, args.slab_rows, parallel.local_mesh())
    compiled = search._top_k_slab.lower(
        jax.ShapeDtypeStruct((1, chunk, args.dim), np.float32),
        jax.ShapeDtypeStruct((slab.rows, args.dim), np.float32),
        np.int32(0), np.int32(0),
        jax.ShapeDtypeStruct((1, chunk, args.k), np.float32), jax.ShapeDtypeStruct((1, chunk, args.k), np.int32),
        gallery_chunk=slab.chunk, score_dtype="float32",
    ).compile()
    analysis = compiled.memory_analysis()
    return {
        "memory_gallery": args.memory_gallery, "memory_queries": args.memory_queries,
        "gallery_bytes": gallery.nbytes,
        # Peak RSS (warm-up, compile and search included) over RSS before the warm-up: the
        # conservative figure.
        "peak_rss_rise_bytes": peak - start_rss,
        "peak_rss_rise_over_gallery_bytes": (peak - start_rss) / gallery.nbytes,
        # The same peak over RSS just before the gallery was made (after the warm-up).
        "peak_rss_rise_after_warmup_bytes": rise,
        "peak_rss_rise_after_warmup_over_gallery_bytes": rise / gallery.nbytes,
        "xla_slab_rows": slab.rows,
        # What one call holds on the device: its slab argument and its scratch (the block scores).
        "xla_argument_bytes_per_call": int(analysis.argument_size_in_bytes),
        "xla_temp_bytes_per_call": int(analysis.temp_size_in_bytes),
        "xla_device_bytes_per_call_over_gallery_bytes":
            (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes) / gallery.nbytes,
        "seconds": seconds,
    }


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so the warm-up's peak does not count."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = arguments.OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=arguments.positive_int, default=5000)
    parser.add_argument("--gallery", type=arguments.positive_int, default=100_000)
    parser.add_argument("--dim", type=arguments.positive_int, default=256)
    parser.add_argument("--k", type=arguments.positive_int, default=10)
    parser.add_argument("--query_chunk", type=arguments.positive_int, default=512)
    parser.add_argument("--gallery_chunk", type=arguments.positive_int, default=32768)
    parser.add_argument("--slab_rows", type=arguments.positive_int, default=131072)
    parser.add_argument("--score_dtype", default="float32")
    parser.add_argument("--repeats", type=arguments.positive_int, default=5)
    parser.add_argument("--memory_gallery", type=arguments.positive_int, default=1_000_000)
    parser.add_argument("--memory_queries", type=int, default=500)
    parser.add_argument("--only", choices=("speed", "memory"))
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results_search_speed_cpu.json"))
    args = parser.parse_args()
    if args.only:
        print(json.dumps(speed(args) if args.only == "speed" else memory(args)), flush=True)
        return
    import jax

    result = {"device": jax.devices()[0].device_kind, "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "command": " ".join(sys.argv),
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_version": jax.__version__}
    result["speed"] = speed(args)
    print(json.dumps(result["speed"]), flush=True)
    # A fresh process, so the speed run's arrays and caches do not blur the peak.
    out = subprocess.run([sys.executable, __file__, "--only", "memory", *sys.argv[1:]],
                         check=True, capture_output=True, text=True).stdout
    result["memory"] = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(result["memory"]), flush=True)
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    arguments.run(main)
