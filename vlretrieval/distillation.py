"""`config.distill`: the frozen teacher a student learns the similarity structure of (docs/hashing.md).

The teacher is one of our run folders (or one of its checkpoints/<step>), or a folder written by
`vlretrieval convert` (CLIP, SigLIP, ViLT, BERT, ViT, sentence-transformers). It is read and
checked before anything is built or written: which towers it has, whether their embeddings share
one space (a converted single tower or ViLT's untrained projections do not: such a teacher gives
its pooled outputs, for its own modality's matrix only), and whether it reads the student's
tokens and images. The trainer then steps a `models.TeacherStudent` whose `params["teacher"]`
holds these weights, frozen (`FROZEN`: no update, no optimizer state).
"""

from __future__ import annotations

import dataclasses
import os
import types
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from vlretrieval.checkpoint import read_saved_params
from vlretrieval.convert import native
from vlretrieval.errors import UserError
from vlretrieval.models import build_model, layout
from vlretrieval.models.teacher_student import TeacherStudent

# The optimizer's freeze patterns for the teacher: `state.make_optimizer(frozen=FROZEN)`.
FROZEN = ("teacher/.*",)
# The terms that read the teacher's similarities, and the matrices they may compare.
TEACHER_TERMS = ("distillation", "hash_similarity")
MATRICES = {"similarity_image_text": ("image", "text"), "similarity_image_image": ("image",),
            "similarity_text_text": ("text",)}


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A teacher read from `path`: its module, its parameters (nested numpy, the module's layout)
    and what it can give."""

    path: str
    description: str  # "the run ...", "a converted BertModel (text tower only)"
    model: Any
    params: Any
    complete: bool  # every parameter of `model` is in the checkpoint (not a single converted tower)
    towers: tuple[str, ...]  # the towers it has weights for: "image", "text"
    cross_modal: bool  # its image and text embeddings share one space (trained projections)
    section: dict  # its model config section
    tokenizer: str | None  # config.data.tokenizer it was trained or converted with (None: unknown)
    seed: int | None

    @property
    def embeddings(self) -> str:
        return "projected" if self.cross_modal else "pooled"


def _setting(config: ml_collections.ConfigDict, key: str, default):
    section = config.get("distill")
    return default if section is None else section.get(key, default)


def teacher_path(config: ml_collections.ConfigDict) -> str:
    """`config.distill.teacher` ("" when the config has no distill section)."""
    return _setting(config, "teacher", "")


def _vocab_size(flat: dict[str, Any]) -> int | None:
    tables = [array.shape[0] for path, array in flat.items() if path.endswith("token/embedding") and "text" in path]
    return tables[0] if tables else None


def _towers(record: dict | None) -> tuple[tuple[str, ...], bool, str]:
    """(towers, cross_modal, description) of a run (record None) or a converted folder."""
    if record is None:
        return ("image", "text"), True, "the run"
    parts = set(record["parts"])
    towers = ("image", "text") if "joint" in parts else tuple(t for t in ("image", "text") if t in parts)
    untrained = [p for p in record.get("initialised", ()) if p.split("/")[0] in ("image_projection", "text_projection")]
    cross_modal = len(towers) == 2 and ("projections" in parts or "joint" in parts) and not untrained
    only = f" ({towers[0]} tower only)" if len(towers) == 1 else ""
    kind = " sentence-transformers" if any("sentence-transformers" in n for n in record.get("notes", ())) else ""
    return towers, cross_modal, f"a converted{kind} {record['architecture']}{only}"


def open_teacher(config: ml_collections.ConfigDict, vocab_size: int) -> Teacher | None:
    """The teacher `config.distill.teacher` names (None when empty), checked against `config`
    (the terms that read it, the student's tokens and images); one `UserError` line if it cannot
    serve."""
    path = teacher_path(config)
    if not path:
        if _setting(config, "joint_teaching", False):
            raise UserError("config.distill.joint_teaching refines a teacher's similarities: "
                            "set config.distill.teacher")
        return None
    where = f"config.distill.teacher {path}"
    if not os.path.exists(path):
        raise UserError(f"{where} does not exist; give a run folder, one of its checkpoints/<step>, or a folder "
                        "written by `vlretrieval convert`")
    if not used_towers(config):  # before reading a large checkpoint for nothing
        raise UserError(f"{where} is set but no term reads it: set config.objectives.distillation or "
                        "config.objectives.hash_similarity (and a similarity_* matrix weight)")
    try:
        record = native.conversion_record(path)
        params, saved = read_saved_params(path, with_config=True)
    except UserError as error:
        raise UserError(f"config.distill.teacher: {error}") from None
    if saved is None or "model" not in saved:
        raise UserError(f"{where}: the checkpoint has no saved config, so its architecture is unknown")
    if isinstance(params, dict) and "student" in params and "teacher" in params:
        params = params["student"]  # a distilled run teaches with its student
    section = dict(saved["model"])
    # How to compute is the student's choice (the same chips); what to compute is the teacher's.
    for key in ("dtype", "attention"):
        if key in config.model:
            section[key] = config.model[key]
    flat = traverse_util.flatten_dict(layout.to_layout(params, scanned=False), sep="/")
    teacher_vocab = (record or {}).get("vocab_size") or _vocab_size(flat) or vocab_size
    model = build_model(ml_collections.ConfigDict(section), teacher_vocab)
    params = layout.to_layout(params, scanned=bool(section.get("scan_layers", False)))
    towers, cross_modal, description = _towers(record)
    data = saved.get("data", {})
    complete = record is None or native.is_complete(types.SimpleNamespace(parts=record["parts"]))
    teacher = Teacher(os.path.abspath(path), description, model, params, complete, towers, cross_modal, section,
                      data.get("tokenizer"), saved.get("seed"))
    check_teacher(teacher, config, vocab_size, teacher_vocab)
    return teacher


def used_towers(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The teacher towers the config's terms read: those of every matrix with a weight."""
    objectives = config.objectives
    if not any(objectives.get(term, 0) > 0 for term in TEACHER_TERMS):
        return ()
    used = {tower for key, towers in MATRICES.items() if objectives.get(key, 0) > 0 for tower in towers}
    return tuple(tower for tower in ("image", "text") if tower in used)


def check_teacher(teacher: Teacher, config: ml_collections.ConfigDict, vocab_size: int, teacher_vocab: int) -> None:
    """Refuses a teacher whose embedding space the terms cannot compare with the student's."""
    where = f"config.distill.teacher {teacher.path}"
    objectives = config.objectives
    for key, towers in MATRICES.items():
        if objectives.get(key, 0) <= 0:
            continue
        missing = [tower for tower in towers if tower not in teacher.towers]
        if missing:
            raise UserError(f"{where}: {teacher.description} has no {missing[0]} tower, which "
                            f"config.objectives.{key} compares; set it to 0 or choose a teacher with that tower")
        if len(towers) == 2 and not teacher.cross_modal:
            raise UserError(f"{where}: {teacher.description} has no trained projections into one image-text "
                            f"space, so its image and text embeddings cannot be compared "
                            f"(config.objectives.{key}); set it to 0 to distil the intra-modal matrices only")
    used = used_towers(config)
    student = config.model
    if "text" in used:
        if teacher_vocab != vocab_size:
            raise UserError(f"{where} reads tokens of a vocabulary of {teacher_vocab}, the student's tokenizer has "
                            f"{vocab_size}: set config.data.tokenizer to the teacher's tokenizer")
        theirs, ours = teacher.tokenizer, config.data.get("tokenizer", "")
        if theirs is not None and _tokenizer(theirs) != _tokenizer(ours):
            raise UserError(f"{where} was trained with config.data.tokenizer={theirs!r}, the student reads "
                            f"{ours!r}: the same text must give the same tokens to both")
        if not theirs and teacher.seed is not None and teacher.seed != config.seed:
            raise UserError(f"{where} was trained with the demo tokenizer of seed {teacher.seed}, the student's "
                            f"is seed {config.seed}'s: set config.seed={teacher.seed}")
        teacher_length = teacher.section.get("max_text_length", 0)
        if teacher_length < config.data.max_text_length:
            raise UserError(f"{where} reads at most {teacher_length} tokens; the student's texts are "
                            f"{config.data.max_text_length} (set config.data.max_text_length={teacher_length})")
    if "image" in used:
        theirs = teacher.section.get("image_input", "patches")
        ours = student.get("image_input", "patches")
        if theirs != ours:
            raise UserError(f"{where} reads {theirs} as images, the student {ours}: the batch holds one kind")
        if ours == "regions":
            for key in ("num_regions", "feature_dim"):
                if teacher.section.get("regions", {}).get(key) != student.regions.get(key):
                    raise UserError(f"{where} reads regions with model.regions.{key}="
                                    f"{teacher.section.get('regions', {}).get(key)}, the student "
                                    f"{student.regions.get(key)}")


def _tokenizer(path: str) -> str:
    return os.path.abspath(path) if path else ""


def teacher_image_size(teacher: Teacher, config: ml_collections.ConfigDict) -> int:
    """The pixel size the teacher's images are resized to (0: the student's own)."""
    size = teacher.section.get("image_size", config.model.image_size)
    patches = teacher.section.get("image_input", "patches") == "patches"
    return size if patches and size != config.model.image_size else 0


def training_model(config: ml_collections.ConfigDict, student, vocab_size: int, teacher: Teacher | None):
    """The module the trainer steps: the student, or with a teacher a `TeacherStudent` (and a peer
    student of the student's architecture with `config.distill.joint_teaching`)."""
    if teacher is None:
        return student
    peer = None
    if _setting(config, "joint_teaching", False):
        if not config.model.head.get("hash_bits", 0) or config.objectives.get("hash_similarity", 0) <= 0:
            raise UserError("config.distill.joint_teaching trains a peer student's codes: it needs "
                            "config.model.head.hash_bits and config.objectives.hash_similarity")
        peer = build_model(config.model, vocab_size)
    return TeacherStudent(student, teacher.model, peer, teacher_towers=used_towers(config),
                          teacher_embeddings=teacher.embeddings, teacher_image_size=teacher_image_size(teacher, config))


def with_teacher_params(params: Any, teacher: Teacher) -> Any:
    """`params` (a TeacherStudent's) with the teacher's own weights in params["teacher"]. A complete
    teacher must cover every parameter; a single converted tower covers its tower's (the rest
    stay initialised and are never read)."""
    template = traverse_util.flatten_dict(params["teacher"], sep="/")
    saved = traverse_util.flatten_dict(teacher.params, sep="/")
    where = f"config.distill.teacher {teacher.path}"
    for name, array in saved.items():
        if name not in template:
            raise UserError(f"{where}: parameter {name} is not in the teacher model its config describes")
        if tuple(np.shape(array)) != tuple(template[name].shape):
            raise UserError(f"{where}: parameter {name} has shape {tuple(np.shape(array))} but its config "
                            f"implies {tuple(template[name].shape)}")
    if teacher.complete and (missing := sorted(set(template) - set(saved))):
        raise UserError(f"{where}: parameter {missing[0]} of the teacher model is not in the checkpoint")
    merged = {name: np.asarray(saved.get(name, leaf), leaf.dtype) for name, leaf in template.items()}
    return {**params, "teacher": traverse_util.unflatten_dict(merged, sep="/")}
