"""Every Hugging Face Flax architecture of transformers 4.x (tests/support/hf_zoo.py), from a
tiny config, wrapped as a user writes it, without a wrapper function:

    model = FlaxBertModel(config, seed=0)
    layer = FlaxLayer(model.module, variables=model.params)

and, on every backend:
1. the layer constructs;
2. `predict` through a Keras model with dict inputs equals the transformers model's own call
   (every output field);
3. `fit` on one output trains: the loss is finite and weights move;
4. `model.module.apply(layer.flax_variables, **inputs)` (pure Flax) gives the trained
   predictions;
5. the `.keras` file loads in a fresh process that imports keras, flaxlayer and transformers
   only (one child per backend for the whole zoo), with equal predictions.
T5, mT5 and LongT5 need `hf_zoo.t5_clip_workaround` (their code calls a `jnp.clip` signature
JAX removed); a test checks that without it they still fail in pure Flax with JAX's TypeError,
so the suite notices when transformers or JAX change.

BigBird's and RoFormer's modules take a required `head_mask` that may be None: their dict of
inputs holds it as None (`Arch.none_inputs`). `make test` runs a
fifth of the zoo (DEFAULT, one of every kind of model); the others carry the `zoo_full` marker, and
`make test-zoo` runs the whole zoo on the three backends.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("transformers")

import hf_zoo as zoo  # after the skip: it imports transformers
from flaxlayer import FlaxLayer
from helpers import run_python_json, selected_names

ATOL = 1e-5

# `make test` runs these (every kind of model: a BERT-style encoder, RoFormer's `head_mask`
# given as None, causal LMs with and without positions that must be arrays, an encoder-decoder,
# mT5 with the JAX workaround and its sibling config class, vision, audio with a tuple output);
# the others carry the `zoo_full` marker (`make test-zoo`), to keep `make test` in its budget.
DEFAULT = {
    "bert", "roformer", "gpt2", "llama", "bart", "mt5", "vit", "wav2vec2",
}  # fmt: skip


# Every architecture, marked `zoo_full` outside DEFAULT.
NAMES = [
    pytest.param(name, marks=[] if name in DEFAULT else [pytest.mark.zoo_full]) for name in zoo.ZOO
]


def wrap(hf_model, arch):
    """flaxlayer's way: the module and `model.params`, as transformers gives them."""
    return FlaxLayer(hf_model.module, variables=hf_model.params)


class Zoo:
    """Runs each architecture's checks once per pytest process, in order, on first use; a
    failure is kept and raised again to every later check of that architecture."""

    def __init__(self):
        self._done: dict[tuple[str, str], object] = {}

    def get(self, name: str, stage: str):
        key = (name, stage)
        if key not in self._done:
            try:
                self._done[key] = self._run(name, stage)
            except Exception as error:  # kept: raised to each later test of this model
                self._done[key] = error
        result = self._done[key]
        if isinstance(result, BaseException):
            raise result
        return result

    def _run(self, name, stage):
        """The stages in order: construct, predict, fit, pure_flax (each needs the ones before
        it: predict builds the Keras model and the reference, fit trains the layer)."""
        if stage == "construct":
            return zoo.construct(zoo.ZOO[name], wrap)
        run = self.get(name, "construct")
        if stage == "predict":
            return zoo.check_predict(run)
        self.get(name, "predict")
        if stage == "fit":
            zoo.check_fit(run)
            return run
        self.get(name, "fit")
        return zoo.check_pure_flax(run, run.layer.flax_variables)


@pytest.fixture(scope="module")
def hf():
    zoo.t5_clip_workaround()  # what a user's script does first (T5, mT5, LongT5)
    return Zoo()


@pytest.mark.parametrize("name", NAMES)
def test_layer_constructs_from_the_module_and_model_params(hf, name):
    run = hf.get(name, "construct")
    assert run.layer.module is run.hf_model.module


@pytest.mark.parametrize("name", NAMES)
def test_predict_with_dict_inputs_equals_the_transformers_model(hf, name):
    assert hf.get(name, "predict") <= ATOL


@pytest.mark.parametrize("name", NAMES)
def test_fit_on_one_output_trains(hf, name):
    run = hf.get(name, "fit")
    assert len(run.history) == 1 and np.all(np.isfinite(run.history)), run.history
    assert run.changed, f"fit moved no weight: {run.unchanged}"


@pytest.mark.parametrize("name", NAMES)
def test_pure_flax_apply_on_flax_variables_gives_the_trained_predictions(hf, name):
    assert hf.get(name, "pure_flax") <= ATOL


def _selected_names(session):
    """The architectures whose fresh-process test this run selected."""
    return selected_names(session, "test_keras_file_loads_in_fresh_process")


@pytest.fixture(scope="module")
def fresh_loads(hf, tmp_path_factory, request):
    """Saves every selected architecture (trained), then loads them all in ONE fresh process.

    Returns name -> the exception saving (or what it needs) raised here, or the child's
    report: {"max_abs_diff": ...} or {"error": ..., "traceback": ...}.
    """
    folder = tmp_path_factory.mktemp("hf_zoo")
    files, outcome = {}, {}
    for name in zoo.ZOO:
        if name not in _selected_names(request.session):
            continue
        try:
            hf.get(name, "pure_flax")
            files[name] = zoo.save(hf.get(name, "fit"), str(folder), name)
        except Exception as error:
            outcome[name] = error
    if files:
        clip = any(zoo.ZOO[name].needs_clip_workaround for name in files)
        source = zoo.load_all_source(files, clip_workaround=clip)
        outcome.update(run_python_json(source, timeout=600, cwd=os.fspath(folder)))
    return outcome


@pytest.mark.parametrize("name", NAMES)
def test_keras_file_loads_in_fresh_process(fresh_loads, name):
    result = fresh_loads[name]
    if isinstance(result, BaseException):
        raise result
    assert "error" not in result, f"{result['error']}\n{result['traceback']}"
    assert result["max_abs_diff"] <= ATOL, result


T5_FAMILY = [p for p in NAMES if zoo.ZOO[p.values[0]].needs_clip_workaround]


@pytest.mark.parametrize("name", T5_FAMILY)
def test_t5_family_fails_in_pure_flax_without_the_clip_workaround(hf, name, monkeypatch):
    """transformers' T5 code calls `jnp.clip(x, a_max=...)`, which JAX removed: without
    `t5_clip_workaround` the model fails in pure Flax, with JAX's TypeError. When this test
    fails, transformers or JAX changed: the workaround may be obsolete."""
    import jax.numpy as jnp
    import transformers.models.longt5.modeling_flax_longt5 as longt5
    import transformers.models.t5.modeling_flax_t5 as t5

    run = hf.get(name, "construct")
    monkeypatch.setattr(t5, "jnp", jnp)
    monkeypatch.setattr(longt5, "jnp", jnp)
    x = zoo.ZOO[name].sample(zoo.PREDICT_SEED)
    with pytest.raises(TypeError, match="a_max"):
        run.hf_model.module.apply(zoo.variables_of(run.hf_model), **x)
