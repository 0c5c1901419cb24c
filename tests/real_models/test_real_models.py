"""A corpus of real-world-style Flax models (tests/support/corpus_models.py) trains, predicts
as pure Flax does and loads in a fresh process.

Each model is wrapped as users write it (no wrapper, except the Hugging Face model whose call
signature needs one) and, on every backend:
- `fit` runs a few steps: the loss is finite and the weights move;
- `model.predict` equals pure Flax on `layer.flax_variables` (Linen: `module.apply`; NNX:
  `nnx.update` into a module built the same way, called in eval mode);
- the `.keras` file loads in a fresh process that imports nothing but keras, flaxlayer and
  corpus_models (no custom_objects), with equal predictions. One child process per backend loads
  every file, to keep the suite fast.
Plus, on the language model, Flax's decode pattern (a cache initialised for the
full length, one token per call) in eager calls and in `predict`, token for token against a
pure-Flax decode loop; and the VAE's own rng stream and sown KL loss.

Models are trained once per pytest process, on first use (`corpus` fixture), so that the three
checks of one model share one training run.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx

import corpus_models as cm
from flaxlayer import FlaxLayer
from helpers import run_python_json, save_load, selected_names, to_numpy

BATCH = 8
N = 16  # two steps per epoch
EPOCHS = 2
ATOL = 1e-5

HAVE_TRANSFORMERS = cm.FlaxBertForSequenceClassification is not None  # the `hf` extra

MODELS = ["resnet", "transformer_lm", "vae", "bilstm", "nnx_gpt", "nnx_scan", "hf_bert"]


def _token_ids(n, length, vocab, seed, pad=False):
    """Token ids in [1, vocab); with `pad`, each row ends in 0-padding after a random length."""
    g = np.random.default_rng(seed)
    ids = g.integers(1, vocab, size=(n, length))
    if pad:
        lengths = g.integers(length // 3, length + 1, size=(n,))
        ids = np.where(np.arange(length)[None] < lengths[:, None], ids, 0)
    return ids.astype("int32")


@dataclasses.dataclass
class Case:
    """One corpus model, wrapped and ready to train."""

    layer: FlaxLayer
    model: keras.Model
    x: np.ndarray
    y: np.ndarray
    loss: Any
    # The trained values in pure Flax: (layer, x) -> predictions in inference mode.
    pure_flax: Callable[[FlaxLayer, np.ndarray], Any]
    # The model that `predict` checks and the .keras file holds; by default the trained one.
    # (The lm1b-style LM switches dropout off in its config: an eval copy of the config.)
    inference_model: Callable[[Case], keras.Model] | None = None


# ------------------------------------------------------------------------------- the cases
# Pure-Flax references are jitted: one compilation instead of one per op (much faster here).


def _linen_eval(module, method=None, **flags):
    """Pure Linen on the trained values: `module.apply(layer.flax_variables, x, **flags)`."""
    apply = jax.jit(lambda variables, x: module.apply(variables, x, method=method, **flags))
    return lambda layer, x: apply(layer.flax_variables, x)


def _resnet():
    module = cm.ResNetTiny(num_classes=4)
    layer = FlaxLayer(module)
    g = np.random.default_rng(0)
    return Case(
        layer=layer,
        model=keras.Sequential([keras.Input((16, 16, 3)), layer]),
        x=g.random((N, 16, 16, 3), dtype="float32"),
        y=g.integers(0, 4, size=(N,)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        pure_flax=_linen_eval(module, train=False),
    )


LM_CONFIG = cm.TransformerConfig(vocab_size=32, max_len=16)
LM_LENGTH = 8


def _lm_inference_model(case):
    # As lm1b evaluates: the same module class with `deterministic=True` in its config, given
    # the trained params.
    eval_lm = cm.TransformerLM(dataclasses.replace(LM_CONFIG, deterministic=True))
    params = case.layer.flax_variables["params"]
    layer = FlaxLayer(eval_lm, variables={"params": params})
    return keras.Sequential([keras.Input((LM_LENGTH,), dtype="int32"), layer])


def _transformer_lm():
    layer = FlaxLayer(cm.TransformerLM(LM_CONFIG))  # dropout on: config.deterministic=False
    x = _token_ids(N, LM_LENGTH, LM_CONFIG.vocab_size, seed=1)
    eval_lm = cm.TransformerLM(dataclasses.replace(LM_CONFIG, deterministic=True))
    return Case(
        layer=layer,
        model=keras.Sequential([keras.Input((LM_LENGTH,), dtype="int32"), layer]),
        x=x,
        y=x,  # the model shifts its inputs right: logits[t] predicts inputs[t]
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        pure_flax=lambda layer, x: jax.jit(eval_lm.apply)(
            {"params": layer.flax_variables["params"]}, x
        ),
        inference_model=_lm_inference_model,
    )


def _vae():
    module = cm.VAE(features=16)
    layer = FlaxLayer(module)
    x = np.random.default_rng(2).random((N, 16), dtype="float32")
    return Case(
        layer=layer,
        model=keras.Sequential([keras.Input((16,)), layer]),
        x=x,
        y=x,
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        pure_flax=_linen_eval(module, training=False),
    )


def _bilstm():
    module = cm.TextClassifier(vocab_size=50, num_classes=3)
    layer = FlaxLayer(module)
    return Case(
        layer=layer,
        model=keras.Sequential([keras.Input((10,), dtype="int32"), layer]),
        x=_token_ids(N, 10, 50, seed=3, pad=True),
        y=np.random.default_rng(3).integers(0, 3, size=(N,)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        pure_flax=_linen_eval(module, deterministic=True),
    )


def _nnx_eval(make):
    """Pure NNX on the trained values: a module built the same way, updated, in eval mode."""

    def pure(layer, x, **kwargs):
        module = make()
        nnx.update(module, layer.flax_variables)
        module.eval()
        return nnx.jit(lambda module, x: module(x, **kwargs))(module, x)

    return pure


def _nnx_gpt():
    def make():
        return cm.MiniGPT(cm.GPTConfig(vocab_size=50), rngs=nnx.Rngs(0))

    layer = FlaxLayer(make())
    tokens = _token_ids(N, 11, 50, seed=4)
    pure = _nnx_eval(make)
    return Case(
        layer=layer,
        model=keras.Sequential([keras.Input((10,), dtype="int32"), layer]),
        x=tokens[:, :-1],
        y=tokens[:, 1:],
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        pure_flax=lambda layer, x: pure(layer, x, deterministic=True),
    )


def _nnx_scan():
    def make():
        return cm.ScannedMLP(6, 16, 2, num_layers=3, rngs=nnx.Rngs(0))

    layer = FlaxLayer(make())
    g = np.random.default_rng(5)
    return Case(
        layer=layer,
        model=keras.Sequential([keras.Input((6,)), layer]),
        x=g.normal(size=(N, 6)).astype("float32"),
        y=g.normal(size=(N, 2)).astype("float32"),
        loss="mse",
        pure_flax=_nnx_eval(make),
    )


def _hf_bert():
    hf_model = cm.FlaxBertForSequenceClassification(cm.tiny_bert_config(), seed=0)
    module = hf_model.module  # a Linen module; its field `config` is a BertConfig
    layer = FlaxLayer(
        module, method=cm.bert_classifier_logits, variables={"params": hf_model.params}
    )
    return Case(
        layer=layer,
        model=keras.Sequential([keras.Input((12,), dtype="int32"), layer]),
        x=_token_ids(N, 12, 100, seed=6, pad=True),
        y=np.random.default_rng(6).integers(0, 2, size=(N,)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        pure_flax=_linen_eval(module, training=False, method=cm.bert_classifier_logits),
    )


BUILDERS = {
    "resnet": _resnet,
    "transformer_lm": _transformer_lm,
    "vae": _vae,
    "bilstm": _bilstm,
    "nnx_gpt": _nnx_gpt,
    "nnx_scan": _nnx_scan,
    "hf_bert": _hf_bert,
}


def _skip_unavailable(name):
    if name == "hf_bert":
        pytest.importorskip("transformers")


# ------------------------------------------------------------------ training, once per model


@dataclasses.dataclass
class Trained:
    case: Case
    history: dict
    before: dict  # weight path -> value before fit (trainable and non-trainable)
    after: dict
    _inference: keras.Model | None = None
    _pred: np.ndarray | None = None

    @property
    def inference_model(self) -> keras.Model:
        if self._inference is None:
            make = self.case.inference_model
            self._inference = make(self.case) if make else self.case.model
        return self._inference

    @property
    def pred(self) -> np.ndarray:
        if self._pred is None:
            self._pred = to_numpy(
                self.inference_model.predict(self.case.x, batch_size=BATCH, verbose=0)
            )
        return self._pred


def _train(name) -> Trained:
    keras.utils.set_random_seed(0)
    case = BUILDERS[name]()
    case.model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=case.loss)
    weights = case.layer.weights
    before = {w.path: to_numpy(w).copy() for w in weights}
    history = case.model.fit(case.x, case.y, batch_size=BATCH, epochs=EPOCHS, verbose=0)
    after = {w.path: to_numpy(w).copy() for w in weights}
    return Trained(case, history.history, before, after)


class Corpus:
    """Trains each model on first use; a failure is kept and raised again to every test of it."""

    def __init__(self):
        self._done: dict[str, Trained | BaseException] = {}

    def get(self, name) -> Trained:
        if name not in self._done:
            try:
                self._done[name] = _train(name)
            except Exception as error:  # kept: raised to each test of this model
                self._done[name] = error
        result = self._done[name]
        if isinstance(result, BaseException):
            raise result
        return result


@pytest.fixture(scope="module")
def corpus():
    return Corpus()


# --------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", MODELS)
def test_fit_trains(corpus, name):
    _skip_unavailable(name)
    trained = corpus.get(name)
    losses = trained.history["loss"]
    assert len(losses) == EPOCHS and np.all(np.isfinite(losses)), losses
    layer = trained.case.layer
    # Every trainable weight moves, and so do BatchNorm's statistics (ResNet, NNX scan stack).
    moving = [w.path for w in layer.trainable_weights]
    moving += [w.path for w in layer.non_trainable_weights if _is_batch_stat(w.path)]
    assert layer.trainable_weights
    unchanged = [p for p in moving if np.array_equal(trained.before[p], trained.after[p])]
    assert not unchanged, f"weights that fit left unchanged: {unchanged}"


def _is_batch_stat(path):
    return "/batch_stats/" in path or path.endswith(("/bn/mean", "/bn/var"))


@pytest.mark.parametrize("name", MODELS)
def test_predict_equals_pure_flax(corpus, name):
    _skip_unavailable(name)
    trained = corpus.get(name)
    expected = to_numpy(trained.case.pure_flax(trained.case.layer, trained.case.x))
    np.testing.assert_allclose(trained.pred, expected, atol=ATOL, rtol=ATOL)


def test_vae_draws_fresh_noise_and_adds_its_sown_kl_loss(corpus):
    """The VAE's own "noise" stream is fresh on every training call; the KL it sows into
    "losses" is the layer's loss, equal to pure Flax's."""
    trained = corpus.get("vae")
    layer, module, x = trained.case.layer, cm.VAE(features=16), trained.case.x[:4]
    first = to_numpy(layer(x, training=True))
    assert len(layer.losses) == 1
    kl = to_numpy(layer.losses[0])
    second = to_numpy(layer(x, training=True))
    assert not np.allclose(first, second), "the same noise twice"
    _, sown = module.apply(layer.flax_variables, x, training=False, mutable=["losses"])
    np.testing.assert_allclose(kl, np.asarray(sown["losses"]["kl"][0]), atol=ATOL, rtol=ATOL)


LOAD_ALL = """
import os
import traceback

# Faster XLA compilation (LLVM without its optimization passes; results equal up to float
# rounding): this process only checks that every file loads and predicts as it did.
os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
import numpy as np
import keras
import flaxlayer  # noqa: F401
import corpus_models  # noqa: F401 - the user's model file, nothing else

results = {}
for name, (path, data) in FILES.items():
    try:
        model = keras.saving.load_model(path)
        data = np.load(data)
        pred = keras.ops.convert_to_numpy(model.predict(data["x"], batch_size=8, verbose=0))
        results[name] = {"max_abs_diff": float(np.max(np.abs(np.asarray(pred) - data["pred"])))}
    except Exception as error:
        results[name] = {"error": f"{type(error).__name__}: {error}"[:3000],
                         "traceback": traceback.format_exc()[-4000:]}
report(results)
"""


def _selected_names(session):
    """The models whose fresh-process test this pytest run selected (all of them by default)."""
    return selected_names(session, "test_keras_file_loads_in_fresh_process")


@pytest.fixture(scope="module")
def fresh_loads(corpus, tmp_path_factory, request):
    """Saves every selected model, then loads them all in ONE fresh process.

    Returns name -> ("save", exception) when saving (or what it needs) failed here, or
    name -> the child's report: {"max_abs_diff": ...} or {"error": ..., "traceback": ...}.
    """
    folder = tmp_path_factory.mktemp("corpus")
    files, outcome = {}, {}
    selected = _selected_names(request.session)
    for name in MODELS:
        if name not in selected or (name == "hf_bert" and not HAVE_TRANSFORMERS):
            continue
        try:
            trained = corpus.get(name)
            pred = trained.pred
            path = str(folder / f"{name}.keras")
            trained.inference_model.save(path)
            data = str(folder / f"{name}.npz")
            np.savez(data, x=trained.case.x, pred=pred)
            files[name] = (path, data)
        except Exception as error:
            outcome[name] = ("save", error)
    if files:
        source = f"FILES = {files!r}\n" + LOAD_ALL
        outcome.update(run_python_json(source, timeout=400, cwd=os.fspath(folder)))
    return outcome


@pytest.mark.parametrize("name", MODELS)
def test_keras_file_loads_in_fresh_process(fresh_loads, name):
    _skip_unavailable(name)
    result = fresh_loads[name]
    if isinstance(result, tuple):
        raise result[1]
    assert "error" not in result, f"{result['error']}\n{result['traceback']}"
    assert result["max_abs_diff"] <= ATOL, result


def test_lm_decode_cache_one_token_per_call_matches_pure_flax(corpus, tmp_path):
    """lm1b's decoding set-up through FlaxLayer, eagerly and in `predict`; saved half-way,
    the loaded model (its cache sized by the variables given, not by an init on one token)
    decodes the rest."""
    params = corpus.get("transformer_lm").case.layer.flax_variables["params"]
    batch, length = 4, LM_LENGTH
    decode_lm = cm.TransformerLM(dataclasses.replace(LM_CONFIG, decode=True, deterministic=True))
    cache = decode_lm.init(jax.random.key(0), jnp.ones((batch, length), jnp.int32))["cache"]
    # Teacher forcing: BOS (0), then the sequence; step t sees the token at t.
    sequence = _token_ids(batch, length, LM_CONFIG.vocab_size, seed=7)
    steps = np.asarray(cm.right_shift(jnp.asarray(sequence)))

    decode_step = jax.jit(functools.partial(decode_lm.apply, mutable=["cache"]))
    expected, flax_cache = [], cache
    for t in range(length):
        logits, mutated = decode_step({"params": params, "cache": flax_cache}, steps[:, t : t + 1])
        flax_cache = mutated["cache"]
        expected.append(np.asarray(logits))
    # The decode loop itself is right: it matches the full-sequence model.
    full = cm.TransformerLM(dataclasses.replace(LM_CONFIG, deterministic=True))
    full_logits = np.asarray(jax.jit(full.apply)({"params": params}, sequence))
    np.testing.assert_allclose(np.concatenate(expected, axis=1), full_logits, atol=ATOL)

    eager = FlaxLayer(decode_lm, variables={"params": params, "cache": cache})
    for t in range(length):
        out = to_numpy(eager(steps[:, t : t + 1]))
        np.testing.assert_allclose(out, expected[t], atol=ATOL, err_msg=f"eager, step {t}")

    layer = FlaxLayer(decode_lm, variables={"params": params, "cache": cache})
    model = keras.Sequential([keras.Input((1,), batch_size=batch, dtype="int32"), layer])
    half = length // 2
    for t in range(length):
        if t == half:
            model = save_load(model, tmp_path)
        out = to_numpy(model.predict(steps[:, t : t + 1], batch_size=batch, verbose=0))
        np.testing.assert_allclose(out, expected[t], atol=ATOL, err_msg=f"predict, step {t}")


@pytest.mark.parametrize("name", ["resnet", "nnx_gpt", "hf_bert"])
def test_lora_on_a_model_written_as_its_library_writes_it(name):
    """LoRA with the default selection on unchanged real-world code (a Flax-example ResNet, an
    NNX GPT, Hugging Face's Flax BERT): outputs unchanged at first, only the adapters (and the
    non-kernel params) train, and pure Flax reproduces the result from `flax_variables`."""
    _skip_unavailable(name)
    case = BUILDERS[name]()
    layer = case.layer

    def predict():
        return to_numpy(case.model.predict(case.x, batch_size=BATCH, verbose=0))

    before = predict()
    layer.enable_lora(2)
    kernels = {w.path: to_numpy(w).copy() for w in layer.weights if w.path.endswith("kernel")}
    adapters = [w for w in layer.trainable_weights if "/lora/" in w.path]
    assert adapters and not set(kernels) & {w.path for w in layer.trainable_weights}
    np.testing.assert_array_equal(
        to_numpy(case.model.predict(case.x, batch_size=BATCH, verbose=0)), before
    )
    case.model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=case.loss)
    case.model.fit(case.x, case.y, batch_size=BATCH, epochs=1, verbose=0)
    for w in layer.weights:
        if w.path in kernels:
            np.testing.assert_array_equal(to_numpy(w), kernels[w.path], err_msg=w.path)
    assert any(not np.allclose(to_numpy(w), 0) for w in adapters if w.path.endswith("/b"))
    tuned = predict()
    np.testing.assert_allclose(to_numpy(case.pure_flax(layer, case.x)), tuned, atol=ATOL, rtol=ATOL)
