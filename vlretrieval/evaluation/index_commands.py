"""The `index` and `search` commands: embed a gallery once into a saved index, query it later.

`index` embeds the images of `config.eval.split` (the first `config.eval.max_images`) with the
checkpoint's image tower, sharded over every device of every host, and writes a safetensors
index (`index.py`). `search` embeds text queries with the checkpoint's text tower, which may be a
newer one than the index's, and prints each query's top k by the chunked on-device search.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import ml_collections

from vlretrieval import parallel
from vlretrieval.data import pipeline
from vlretrieval.errors import UserError
from vlretrieval.evaluation import codes, evaluate, index, search
from vlretrieval.evaluation.checkpoints import evaluation_split, restore_for_evaluation
from vlretrieval.files import check_writable


def _item_id(record, position: int) -> str:
    value = record.get("image_id", position) if isinstance(record, dict) else position
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def build_index(config: ml_collections.ConfigDict, workdir: str, output: str, *, binary: bool = False) -> dict:
    """Embed the evaluation split's images and write them as an index at `output`; with `binary`,
    as packed binary codes (`codes.model_code_encoders`: a hashing head's, else the signs)."""
    check_writable(output, "--output")  # before minutes of embedding, not after
    model, params, data, step = restore_for_evaluation(config, workdir)
    source = data.split(config.eval.split)
    split = evaluation_split(config, data)
    count = len(split["images"])
    mesh = parallel.make_mesh(config.train.num_devices or None)
    params = parallel.replicate(params, mesh)
    bits, code_source = 0, ""
    if binary:
        encode, _, bits, code_source = codes.model_code_encoders(model, params)
    else:
        jitted = jax.jit(lambda p, images: model.apply({"params": p}, images, method=model.encode_image))
        encode = lambda batch: jitted(params, batch)
    embeddings = evaluate.embed_in_batches(
        encode, [pipeline.NormalizedImages(split["images"])], config.eval.batch_size, mesh,
    )
    if binary:
        embeddings = codes.pack_codes(embeddings)
    ids = [_item_id(source[position], position) for position in range(count)]
    if jax.process_index() == 0:
        index.write_index(output, embeddings, ids, step=step, config_hash=index.config_hash(config.model),
                          code_bits=bits, code_source=code_source)
    summary = {"index": output, "items": count, "step": step,
               "bytes_per_item": int(embeddings.shape[1] * embeddings.itemsize)}
    if binary:
        return {**summary, "code_bits": bits, "code_source": code_source}
    return {**summary, "dim": int(embeddings.shape[1]), "normalized": index.is_normalized(embeddings)}


def search_index(
    config: ml_collections.ConfigDict, workdir: str, index_path: str, queries: Sequence[str], k: int
) -> list[dict]:
    """Each text query's top k items of the index: [{query, results: [{id, score}]}]. A code index
    is searched with the model's text codes by Hamming distance (the score is minus the distance)."""
    if not queries:
        raise UserError("no queries: pass --query TEXT (repeatable) or --queries_file FILE")
    saved = index.read_index(index_path)
    model, params, data, _ = restore_for_evaluation(config, workdir)
    mesh = parallel.make_mesh(config.train.num_devices or None)
    params = parallel.replicate(params, mesh)
    if saved.is_codes:
        _, encode, bits, code_source = codes.model_code_encoders(model, params)
        index.check_code_queries(saved, index_path, bits, code_source)
    else:
        jitted = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask, method=model.encode_text))
        encode = lambda ids, mask: jitted(params, ids, mask)
    token_ids, text_mask = data.tokenizer.encode(list(queries), config.data.max_text_length)
    embeddings = evaluate.embed_in_batches(encode, [token_ids, text_mask], config.eval.batch_size, mesh)
    if saved.is_codes:
        embeddings = codes.pack_codes(embeddings)
    else:
        index.query_checker(saved, index_path)(embeddings)
    scores, found = search.top_k(
        embeddings, saved.embeddings, k, query_chunk=config.eval.query_chunk,
        gallery_chunk=config.eval.gallery_chunk, score_dtype=config.eval.score_dtype,
    )
    return [
        {"query": query,
         "results": [{"id": saved.item_ids[i], "score": float(s)} for i, s in zip(row, row_scores)]}
        for query, row, row_scores in zip(queries, found, scores)
    ]


def read_queries(queries: Sequence[str] | None, queries_file: str | None) -> list[str]:
    texts = list(queries or [])
    if queries_file:
        try:
            with open(queries_file, encoding="utf-8") as handle:
                texts += [line.strip() for line in handle if line.strip()]
        except OSError as error:
            raise UserError(f"--queries_file {queries_file}: {error.strerror}") from None
        except UnicodeDecodeError as error:
            raise UserError(
                f"--queries_file {queries_file} is not UTF-8 text (byte {error.start}: {error.reason})"
            ) from None
    return texts


def print_results(results: list[dict]) -> None:
    """One JSON line per query: easy to read and to pipe."""
    for result in results:
        print(json.dumps(result, ensure_ascii=False))
