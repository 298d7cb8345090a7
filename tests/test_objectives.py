"""The table of objective terms: one declaration plus its math adds a term, and every term is checked.

Numbers are checked elsewhere (test_parallel_losses.py: every term on 1-8 devices; test_sharded_step.py:
through the model); here the table's wiring: a new term's weight, metric, inputs and checks, the
one `TowerLosses` protocol both layouts satisfy, and the refusals of objectives that cannot run.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.demo import get_config
from tests.helpers import tiny_model_config
from vlretrieval import losses, parallel
from vlretrieval.errors import UserError
from vlretrieval.models import build_model
from vlretrieval.objectives import TERMS, Term, check_objectives, make_objective


def _outputs(batch=8, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    images = unit(rng.normal(size=(batch, dim)))
    return {
        "image_embeddings": jnp.asarray(images, jnp.float32),
        "text_embeddings": jnp.asarray(unit(images + rng.normal(size=(batch, dim))), jnp.float32),
        "logit_scale": jnp.float32(10.0),
    }


def _alignment(inputs):
    """A toy term: mean squared distance of each image to its own text, read off the towers."""
    images, texts = inputs.embeddings
    distance = jnp.mean(jnp.sum((images - texts) ** 2, axis=1))
    return inputs.config.alignment_power * distance, {"alignment_distance": distance}


ALIGNMENT = Term("alignment", _alignment, "towers", hyperparameters=("alignment_power",))


def test_a_new_term_is_one_declaration_plus_its_math():
    config = get_config().objectives
    config.alignment, config.alignment_power = 0.5, 2.0
    terms = TERMS + (ALIGNMENT,)
    model = build_model(tiny_model_config(), 40)
    check_objectives(config, model, mask_id=4, has_content_words=True, terms=terms)  # its keys are known
    outputs = _outputs()
    with_term = make_objective(None, config, patch_size=8, mask_id=None, vocab_size=0, terms=terms)
    without = make_objective(None, config, patch_size=8, mask_id=None, vocab_size=0)
    total, metrics = with_term.tower_loss(outputs, {})
    reference, _ = without.tower_loss(outputs, {})
    distance = float(metrics["alignment_distance"])
    assert distance > 0
    assert float(metrics["alignment_loss"]) == pytest.approx(2.0 * distance)
    assert float(total) == pytest.approx(float(reference) + 0.5 * 2.0 * distance, rel=1e-6)
    # Its weight switches it off like any other term's.
    config.alignment = 0.0
    off, metrics = make_objective(None, config, patch_size=8, mask_id=None, vocab_size=0,
                                  terms=terms).tower_loss(outputs, {})
    assert "alignment_loss" not in metrics and float(off) == pytest.approx(float(reference))


def test_unknown_keys_and_bad_weights_are_refused_naming_the_key():
    model = build_model(tiny_model_config(), 40)
    config = get_config().objectives
    config.contrastiv = 1.0  # a typo of a term's name
    with pytest.raises(UserError, match="config.objectives.contrastiv is not an objective term"):
        check_objectives(config, model, mask_id=4, has_content_words=True)
    config = get_config().objectives
    config.hardest_negative_hinge = -0.5  # (the config's types are fixed: a weight is a float)
    with pytest.raises(UserError, match="config.objectives.hardest_negative_hinge is a weight"):
        check_objectives(config, model, mask_id=4, has_content_words=True)
    config = get_config().objectives
    config.contrastive = 0.0
    with pytest.raises(UserError, match="nothing to train"):
        check_objectives(config, model, mask_id=4, has_content_words=True)
    config = get_config().objectives
    config.masked_language_model = 1.0  # a dual encoder has no joint pass
    dual_encoder = build_model(tiny_model_config("dual"), 40)
    with pytest.raises(UserError, match="masked_language_model needs the joint model"):
        check_objectives(config, dual_encoder, mask_id=4, has_content_words=True)
    check_objectives(config, model, mask_id=4, has_content_words=True)  # the decomposed one has
    config.masked_language_model, config.mlm_probability = 0.0, 1.5  # checked even while off
    with pytest.raises(UserError, match="mlm_probability must be in"):
        check_objectives(config, model, mask_id=4, has_content_words=True)


def test_both_layouts_satisfy_one_tower_losses_protocol_with_the_same_signatures():
    cross_device = parallel.CrossDeviceLosses(parallel.make_mesh(1))
    assert isinstance(losses, losses.TowerLosses)
    assert isinstance(cross_device, losses.TowerLosses)
    members = [name for name, _ in inspect.getmembers(losses.TowerLosses, inspect.isfunction)
               if not name.startswith("_")]
    assert len(members) == 9
    for name in members:
        declared = list(inspect.signature(getattr(losses.TowerLosses, name)).parameters.values())[1:]
        for implementation in (losses, cross_device):
            got = list(inspect.signature(getattr(implementation, name)).parameters.values())
            assert [(p.name, p.default) for p in got] == [(p.name, p.default) for p in declared], (
                f"{type(implementation).__name__}.{name} differs from TowerLosses.{name}"
            )
    # And the same numbers through the table (every term on 1-8 devices: test_parallel_losses.py).
    config = get_config().objectives
    config.reweighted_contrastive, config.hardest_negative_hinge = 0.5, 0.25
    outputs = _outputs(batch=8)
    values = [  # jitted: run eagerly, the cross-device rings take seconds op by op
        jax.jit(lambda o, implementation=implementation: make_objective(
            None, config, patch_size=8, mask_id=None, vocab_size=0, tower_losses=implementation
        ).tower_loss(o, {})[0])(outputs)
        for implementation in (losses, parallel.CrossDeviceLosses(parallel.make_mesh(1)))
    ]
    assert float(values[1]) == pytest.approx(float(values[0]), rel=1e-6)
    assert jax.tree.structure(values[0]) == jax.tree.structure(values[1])
