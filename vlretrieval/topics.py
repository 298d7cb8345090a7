"""TextTopicNet's targets (Gomez et al., CVPR 2017): an LDA topic model of the training texts.

Each training image's *document* is its captions in the training languages (`config.data.languages`)
joined (for Wikipedia, the article). A `CountVectorizer` builds the vocabulary and scikit-learn's
`LatentDirichletAllocation` (batch variational Bayes, `random_state = config.seed`) fits
`config.model.head.num_topics` topics on them; the LDA's inferred document-topic distribution of
each training document (rows sum to 1) is the target the image tower's topic head learns to
predict (`objectives.topic_prediction`). In topic space a text is the distribution the same LDA
infers for it (`TopicModel.distributions`), which `eval.mode=topics` compares with the image's
predicted one.

Fitted once per run into `<workdir>/topics/` and reused on resume and by evaluation: the LDA's
arrays in `lda.safetensors`, the vocabulary, settings and a fingerprint of the documents in
`topics.json` (no pickle, as for checkpoints). A resumed run whose topic settings or training texts
differ from the saved model's is refused rather than silently trained against other targets.
Inference is deterministic (sklearn starts every document's E-step from the same point).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from vlretrieval.errors import UserError, first_line

log = logging.getLogger(__name__)

TOPICS_DIR = "topics"
STOP_WORDS = ("", "english")  # "": none; "english": scikit-learn's list
_ARRAYS = "lda.safetensors"
_INFO = "topics.json"
TOP_WORDS = 8  # per topic in topics.json, for people reading it


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def documents(source: Sequence[dict[str, Any]], languages: Sequence[str]) -> list[str]:
    """Each record's document: its captions in `languages`, in that order, one a line."""
    return ["\n".join(_text(caption) for language in languages for caption in source[i]["captions"][language])
            for i in range(len(source))]


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What the topic model of a run depends on besides its documents: the number of topics, the
    vocabulary and LDA options of `config.topics`, and the seed."""
    section = config.get("topics")
    if section is None:
        raise UserError("the config has no topics section (configs/demo.py has the defaults): add config.topics")
    return {"num_topics": int(config.model.head.get("num_topics", 0)), "random_state": int(config.seed),
            **{key: section[key] for key in sorted(section.keys())}}


def fingerprint(texts: Sequence[str]) -> str:
    digest = hashlib.sha1()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


class TopicModel:
    """A fitted vocabulary and LDA: `distributions(texts)` -> [texts, topics] float32, rows sum to 1."""

    def __init__(self, vectorizer, lda, info: dict[str, Any]):
        self.vectorizer, self.lda, self.info = vectorizer, lda, info

    @property
    def num_topics(self) -> int:
        return int(self.lda.components_.shape[0])

    def distributions(self, texts: Sequence[str]) -> np.ndarray:
        counts = self.vectorizer.transform(list(texts))
        return self.lda.transform(counts).astype(np.float32)

    def top_words(self, count: int = TOP_WORDS) -> list[list[str]]:
        vocabulary = self.vectorizer.get_feature_names_out()
        return [[str(vocabulary[i]) for i in np.argsort(-row, kind="stable")[:count]]
                for row in self.lda.components_]


def _lda(options: dict[str, Any]):
    from sklearn.decomposition import LatentDirichletAllocation

    return LatentDirichletAllocation(
        n_components=options["num_topics"], max_iter=options["max_iter"], learning_method="batch",
        doc_topic_prior=options["doc_topic_prior"] or None, topic_word_prior=options["topic_word_prior"] or None,
        random_state=options["random_state"],
    )


def fit(texts: Sequence[str], options: dict[str, Any]) -> TopicModel:
    """A vocabulary (`CountVectorizer`) and an LDA fitted on `texts` with `settings(config)`."""
    from sklearn.feature_extraction.text import CountVectorizer

    vectorizer = CountVectorizer(
        max_features=options["max_features"] or None, min_df=options["min_df"], max_df=float(options["max_df"]),
        stop_words=options["stop_words"] or None,
    )
    try:
        counts = vectorizer.fit_transform(list(texts))
    except ValueError as error:  # "empty vocabulary; perhaps the documents only contain stop words"
        raise UserError(f"config.topics: no vocabulary is left for the topic model ({first_line(error)}): "
                        "lower config.topics.min_df or raise config.topics.max_df") from None
    lda = _lda(options).fit(counts)
    model = _fixed_vocabulary(vectorizer.get_feature_names_out().tolist(), lda)
    model.info = {"settings": options, "documents": len(texts), "fingerprint": fingerprint(texts)}
    return model


def _fixed_vocabulary(vocabulary: list[str], lda) -> TopicModel:
    """The model with a vectorizer over exactly `vocabulary` (what fit and load both give)."""
    from sklearn.feature_extraction.text import CountVectorizer

    return TopicModel(CountVectorizer(vocabulary={word: i for i, word in enumerate(vocabulary)}), lda, {})


def save(model: TopicModel, workdir: str) -> str:
    """Writes `<workdir>/topics/` whole or not at all (a folder renamed into place)."""
    from safetensors.numpy import save_file

    directory = os.path.join(workdir, TOPICS_DIR)
    temporary = f"{directory}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    try:
        save_file({"components": np.asarray(model.lda.components_, np.float64),
                   "exp_dirichlet_component": np.asarray(model.lda.exp_dirichlet_component_, np.float64)},
                  os.path.join(temporary, _ARRAYS))
        import sklearn

        info = {**model.info, "doc_topic_prior": float(model.lda.doc_topic_prior_),
                "topic_word_prior": float(model.lda.topic_word_prior_), "scikit_learn": sklearn.__version__,
                "vocabulary": model.vectorizer.get_feature_names_out().tolist(), "top_words": model.top_words()}
        with open(os.path.join(temporary, _INFO), "w") as handle:
            json.dump(info, handle, indent=1)
        os.replace(temporary, directory)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return directory


def load(workdir: str) -> TopicModel:
    """The topic model a run saved in `<workdir>/topics/`; one line if there is none or it cannot be read."""
    from safetensors.numpy import load_file

    directory = os.path.join(workdir, TOPICS_DIR)
    if not os.path.isfile(os.path.join(directory, _INFO)):
        raise UserError(f"no topic model in {directory}: a run fits one when trained with "
                        "config.objectives.topic_prediction > 0")
    try:
        with open(os.path.join(directory, _INFO)) as handle:
            info = json.load(handle)
        arrays = load_file(os.path.join(directory, _ARRAYS))
        lda = _lda(info["settings"])
        lda.components_ = arrays["components"]
        lda.exp_dirichlet_component_ = arrays["exp_dirichlet_component"]
        lda.doc_topic_prior_, lda.topic_word_prior_ = info["doc_topic_prior"], info["topic_word_prior"]
        lda.n_features_in_ = lda.components_.shape[1]
        if len(info["vocabulary"]) != lda.n_features_in_:
            raise ValueError(f"{len(info['vocabulary'])} words for {lda.n_features_in_} columns")
    except Exception as error:  # a damaged file: one line
        raise UserError(f"the topic model in {directory} cannot be read: {first_line(error)}") from None
    model = _fixed_vocabulary(info["vocabulary"], lda)
    model.info = {key: info[key] for key in ("settings", "documents", "fingerprint")}
    return model


def run_topic_model(config: ml_collections.ConfigDict, texts: Sequence[str], workdir: str) -> TopicModel:
    """The run's topic model: the one saved in `workdir` (refused if fitted with other settings
    or on other texts), else fitted now and saved there by process 0. Every host fits the same
    model (the fit is deterministic), so hosts need no shared folder to agree."""
    options = settings(config)
    if os.path.isfile(os.path.join(workdir, TOPICS_DIR, _INFO)):
        model = load(workdir)
        where = os.path.join(workdir, TOPICS_DIR)
        if model.info["settings"] != options:
            changed = sorted(key for key in options.keys() | model.info["settings"].keys()
                             if options.get(key) != model.info["settings"].get(key))
            raise UserError(f"the topic model in {where} was fitted with other settings ({', '.join(changed)}): "
                            "use a new workdir, or delete that folder to fit again")
        if model.info["fingerprint"] != fingerprint(texts):
            raise UserError(f"the topic model in {where} was fitted on other training texts: "
                            "use a new workdir, or delete that folder to fit again")
        log.info(f"topic model: {model.num_topics} topics, reused from {where}")
        return model
    started = time.perf_counter()
    model = fit(texts, options)
    if jax.process_index() == 0:
        save(model, workdir)
    log.info(f"topic model: fitted {model.num_topics} topics on {len(texts)} documents "
             f"({len(model.vectorizer.vocabulary_)} words) in {time.perf_counter() - started:.1f} s; "
             f"saved in {os.path.join(workdir, TOPICS_DIR)}")
    return model


def training_targets(config: ml_collections.ConfigDict, data, workdir: str) -> np.ndarray:
    """[len(train split), topics] float32: each training document's topic distribution under the
    run's topic model (fitted now, or reused), the targets of `objectives.topic_prediction`."""
    texts = documents(data.split("train"), config.data.languages)
    return run_topic_model(config, texts, workdir).distributions(texts)


def load_for_head(workdir: str, num_topics: int) -> TopicModel:
    """The run's saved topic model, refused (one line) unless it has the topic head's `num_topics`."""
    model = load(workdir)
    if model.num_topics != num_topics:
        raise UserError(f"the topic model in {os.path.join(workdir, TOPICS_DIR)} has {model.num_topics} topics but "
                        f"config.model.head.num_topics is {num_topics}: evaluate with the run's own model config")
    return model
