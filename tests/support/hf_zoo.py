"""A zoo of every Hugging Face Flax architecture transformers 4.x ships, from tiny configs.

Each entry (`ZOO[name]`, an `Arch`) builds the model class a user would pick for that
architecture (`...ForCausalLM`, `...ForConditionalGeneration`, `...ForImageClassification`,
`...Model`) from a tiny config with random weights (nothing is downloaded), and says which
inputs its module's `__call__` takes (names, shapes, dtypes), which output key a Keras model
trains on, and with which loss. The tests (tests/real_models/test_hf_zoo.py) and the benchmark
(benchmarks/hf_zoo.py) wrap each one as a user would, without a wrapper function:

    model = FlaxBertModel(config, seed=0)
    layer = FlaxLayer(model.module, variables=model.params)
    outputs = layer({"input_ids": ..., "attention_mask": ..., ...})

`t5_clip_workaround` is the user's fix for T5, mT5 and LongT5 on JAX >= 0.9 (see there).

Sizes: hidden 16, 1 layer (2 where an architecture needs two), 2 heads, vocabulary 64, 8
tokens, 16x16 images with 4x4 patches, 400 audio samples, batch 2.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any

import numpy as np

try:  # the optional `hf` extra: transformers 4.x (5.x dropped its Flax models)
    import transformers
except ImportError:  # pragma: no cover - the tests skip
    transformers = None

BATCH = 2
LENGTH = 8  # tokens (encoder and decoder)
VOCAB = 64
HIDDEN = 16
IMAGE = 16  # pixels per side
AUDIO = 400  # samples
CLASSES = 4


# ------------------------------------------------------------------------------ the workaround


def t5_clip_workaround():
    """Lets transformers' Flax T5, mT5 and LongT5 run on JAX >= 0.9.

    transformers 4.57's T5 relative-position buckets call `jnp.clip(x, a_max=...)`
    (t5/modeling_flax_t5.py, `FlaxT5Attention._relative_position_bucket`, and the same code
    three times in longt5/modeling_flax_longt5.py); JAX removed the `a_min`/`a_max` keywords
    (`min`/`max` now), so these models fail in pure Flax too, with a TypeError. The fix: give
    those two modules a `jnp` whose `clip` takes the old keywords (mT5 uses T5's modules).
    Run it once in every process that builds, calls or loads such a model, before it does.
    The function is self-contained so that a script can copy it as it stands.
    """
    import jax.numpy as jnp
    import transformers.models.longt5.modeling_flax_longt5 as longt5
    import transformers.models.t5.modeling_flax_t5 as t5

    def clip(x, a_min=None, a_max=None, **kwargs):
        kwargs.setdefault("min", a_min)
        kwargs.setdefault("max", a_max)
        return jnp.clip(x, **kwargs)

    for module in (t5, longt5):
        module.jnp = types.SimpleNamespace(**{**vars(jnp), "clip": clip})


# ------------------------------------------------------------------------------ the inputs


@dataclasses.dataclass(frozen=True)
class Input:
    """One input of a module: its shape without the batch axis, dtype, and how to fill it."""

    shape: tuple[int, ...]
    dtype: str
    fill: str  # "ids", "ones", "zeros", "positions", "normal"
    offset: int = 0  # added to "positions"

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        shape = (n, *self.shape)
        if self.fill == "ids":
            return rng.integers(1, VOCAB, size=shape).astype(self.dtype)
        if self.fill == "ones":
            return np.ones(shape, self.dtype)
        if self.fill == "zeros":
            return np.zeros(shape, self.dtype)
        if self.fill == "positions":
            positions = np.arange(self.shape[-1]) + self.offset
            return np.broadcast_to(positions, shape).astype(self.dtype).copy()
        return rng.normal(size=shape).astype(self.dtype)


IDS = Input((LENGTH,), "int32", "ids")
MASK = Input((LENGTH,), "int32", "ones")
TYPES = Input((LENGTH,), "int32", "zeros")
POSITIONS = Input((LENGTH,), "int32", "positions")
# Channels last: what the modules take (the models' own `__call__` takes channels first and
# transposes; `Arch.model_inputs` does that for the reference call).
PIXELS = Input((IMAGE, IMAGE, 3), "float32", "normal")
AUDIO_VALUES = Input((AUDIO,), "float32", "normal")
AUDIO_MASK = Input((AUDIO,), "int32", "ones")

TEXT = {"input_ids": IDS, "attention_mask": MASK}
BERT_LIKE = {**TEXT, "token_type_ids": TYPES, "position_ids": POSITIONS}
CAUSAL = {**TEXT, "position_ids": POSITIONS}
DECODER = {"decoder_input_ids": IDS, "decoder_attention_mask": MASK}
SEQ2SEQ = {**TEXT, **DECODER, "position_ids": POSITIONS, "decoder_position_ids": POSITIONS}
T5_INPUTS = {**TEXT, **DECODER}


# ------------------------------------------------------------------------------ the catalogue


@dataclasses.dataclass(frozen=True)
class Arch:
    """One architecture of the zoo."""

    name: str
    build: Callable[[], Any]  # () -> the transformers Flax model (FlaxPreTrainedModel)
    inputs: dict[str, Input]  # the module's `__call__` arguments, by name
    output: str  # the output a Keras model trains on
    loss: str  # "sparse_ce" (integer targets over the output's last axis) or "mse"
    needs_clip_workaround: bool = False  # T5, mT5, LongT5: see t5_clip_workaround
    # The module returns `(output,)`, not a ModelOutput, unless `return_dict=True` is passed
    # (Wav2Vec2ForCTC's `return_dict=None` default is falsy; the model's own call passes the
    # config's True): Keras gets the output array alone.
    returns_tuple: bool = False
    # Arguments without a default that the module takes as None (BigBird's and RoFormer's
    # `head_mask`): given as None in the dict of inputs.
    none_inputs: tuple[str, ...] = ()

    def sample(self, seed: int, n: int = BATCH) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {key: spec.sample(rng, n) for key, spec in self.inputs.items()}

    def model_inputs(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`inputs` (the module's) as the transformers model's own `__call__` takes them:
        images channels first."""
        if "pixel_values" in inputs:
            inputs = {**inputs, "pixel_values": inputs["pixel_values"].transpose(0, 3, 1, 2)}
        return inputs


def _text(**overrides):
    """The common tiny sizes, under the names BERT-style configs use."""
    return (
        dict(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        )
        | overrides
    )


def _bart_like(**overrides):
    """The tiny sizes under BART-style (encoder-decoder) config names."""
    return (
        dict(
            vocab_size=VOCAB,
            d_model=HIDDEN,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=32,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        )
        | overrides
    )


def _t5_like(**overrides):
    return (
        dict(
            vocab_size=VOCAB,
            d_model=HIDDEN,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
        )
        | overrides
    )


def _vit(**overrides):
    return _text(image_size=IMAGE, patch_size=4, num_channels=3) | overrides


def _wav2vec2(**overrides):
    """A two-layer feature extractor (400 samples -> 39 frames)."""
    return (
        _text(
            conv_dim=(8, 8),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2,
            do_stable_layer_norm=True,  # the Flax model's only option
            feat_extract_norm="layer",
        )
        | overrides
    )


def _gpt2(**overrides):
    return dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=2, n_positions=32) | overrides


def _t(name):
    return getattr(transformers, name)


def _model(model_class, config_class, **config):
    return lambda: _t(model_class)(_t(config_class)(**config), seed=0)


def _clip_text():
    return dict(_text(), projection_dim=8, max_position_embeddings=LENGTH)


def _clip_vision():
    return dict(_vit(), projection_dim=8)


def _encoder_decoder():
    config = _t("EncoderDecoderConfig").from_encoder_decoder_configs(
        _t("BertConfig")(**_text()), _t("GPT2Config")(**_gpt2())
    )
    return _t("FlaxEncoderDecoderModel")(config, seed=0)


def _speech_encoder_decoder():
    config = _t("SpeechEncoderDecoderConfig").from_encoder_decoder_configs(
        _t("Wav2Vec2Config")(**_wav2vec2()), _t("GPT2Config")(**_gpt2())
    )
    # Its default init input (1024 samples, as many decoder tokens as encoder frames) is longer
    # than the tiny GPT-2's 32 positions.
    return _t("FlaxSpeechEncoderDecoderModel")(
        config, input_shape=((1, AUDIO), (1, LENGTH)), seed=0
    )


def _vision_encoder_decoder():
    config = _t("VisionEncoderDecoderConfig").from_encoder_decoder_configs(
        _t("ViTConfig")(**_vit()), _t("GPT2Config")(**_gpt2())
    )
    return _t("FlaxVisionEncoderDecoderModel")(config, seed=0)


def _vision_text_dual_encoder():
    config = _t("VisionTextDualEncoderConfig").from_vision_text_configs(
        _t("ViTConfig")(**_vit()), _t("BertConfig")(**_text()), projection_dim=8
    )
    return _t("FlaxVisionTextDualEncoderModel")(config, seed=0)


def _clip():
    config = _t("CLIPConfig").from_text_vision_configs(
        _t("CLIPTextConfig")(**_clip_text()),
        _t("CLIPVisionConfig")(**_clip_vision()),
        projection_dim=8,
    )
    return _t("FlaxCLIPModel")(config, seed=0)


def _arch(name, build, inputs, output="logits", loss="sparse_ce", **kwargs):
    return name, Arch(name, build, inputs, output, loss, **kwargs)


ENCODER = dict(output="last_hidden_state", loss="mse")
IMAGE_CLASSIFIER = dict(_vit(), num_labels=CLASSES)

ZOO: dict[str, Arch] = dict(
    [
        _arch(
            "albert",
            _model("FlaxAlbertModel", "AlbertConfig", **_text(embedding_size=8)),
            BERT_LIKE,
            **ENCODER,
        ),
        _arch(
            "bart",
            _model("FlaxBartForConditionalGeneration", "BartConfig", **_bart_like()),
            SEQ2SEQ,
        ),
        _arch(
            "beit",
            _model("FlaxBeitForImageClassification", "BeitConfig", **IMAGE_CLASSIFIER),
            {"pixel_values": PIXELS},
        ),
        _arch("bert", _model("FlaxBertModel", "BertConfig", **_text()), BERT_LIKE, **ENCODER),
        _arch(
            "big_bird",
            _model("FlaxBigBirdModel", "BigBirdConfig", **_text(attention_type="original_full")),
            BERT_LIKE,
            **ENCODER,
            none_inputs=("head_mask",),
        ),
        _arch(
            "blenderbot",
            _model("FlaxBlenderbotForConditionalGeneration", "BlenderbotConfig", **_bart_like()),
            SEQ2SEQ,
        ),
        _arch(
            "blenderbot_small",
            _model(
                "FlaxBlenderbotSmallForConditionalGeneration",
                "BlenderbotSmallConfig",
                **_bart_like(),
            ),
            SEQ2SEQ,
        ),
        _arch(
            "bloom",
            _model(
                "FlaxBloomForCausalLM",
                "BloomConfig",
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                n_layer=1,
                n_head=2,
            ),
            TEXT,
        ),
        _arch(
            "clip",
            _clip,
            {**TEXT, "position_ids": POSITIONS, "pixel_values": PIXELS},
            output="text_embeds",
            loss="mse",
        ),
        _arch(
            "clip_text",
            _model("FlaxCLIPTextModel", "CLIPTextConfig", **_clip_text()),
            CAUSAL,
            output="pooler_output",
            loss="mse",
        ),
        _arch(
            "clip_vision",
            _model("FlaxCLIPVisionModel", "CLIPVisionConfig", **_clip_vision()),
            {"pixel_values": PIXELS},
            output="pooler_output",
            loss="mse",
        ),
        _arch(
            "dinov2",
            _model("FlaxDinov2Model", "Dinov2Config", **_vit()),
            {"pixel_values": PIXELS},
            output="pooler_output",
            loss="mse",
        ),
        _arch(
            "distilbert",
            _model(
                "FlaxDistilBertModel",
                "DistilBertConfig",
                vocab_size=VOCAB,
                dim=HIDDEN,
                n_layers=1,
                n_heads=2,
                hidden_dim=32,
                max_position_embeddings=32,
            ),
            TEXT,
            **ENCODER,
        ),
        _arch(
            "electra",
            _model("FlaxElectraModel", "ElectraConfig", **_text(embedding_size=8)),
            BERT_LIKE,
            **ENCODER,
        ),
        _arch(
            "encoder_decoder",
            _encoder_decoder,
            {**SEQ2SEQ},
        ),
        _arch(
            "gemma",
            _model(
                "FlaxGemmaForCausalLM",
                "GemmaConfig",
                **_text(num_key_value_heads=1, head_dim=8),
            ),
            CAUSAL,
        ),
        _arch("gpt2", _model("FlaxGPT2LMHeadModel", "GPT2Config", **_gpt2()), CAUSAL),
        _arch(
            "gpt_neo",
            _model(
                "FlaxGPTNeoForCausalLM",
                "GPTNeoConfig",
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                num_layers=2,
                num_heads=2,
                attention_types=[[["global", "local"], 1]],
                window_size=4,
                max_position_embeddings=32,
            ),
            CAUSAL,
        ),
        _arch(
            "gptj",
            _model("FlaxGPTJForCausalLM", "GPTJConfig", **_gpt2(rotary_dim=4)),
            CAUSAL,
        ),
        _arch(
            "llama",
            _model("FlaxLlamaForCausalLM", "LlamaConfig", **_text(num_key_value_heads=1)),
            CAUSAL,
        ),
        _arch(
            "longt5",
            _model(
                "FlaxLongT5ForConditionalGeneration",
                "LongT5Config",
                **_t5_like(local_radius=2, global_block_size=4),
            ),
            T5_INPUTS,
            needs_clip_workaround=True,
        ),
        _arch(
            "marian",
            _model("FlaxMarianMTModel", "MarianConfig", **_bart_like(decoder_start_token_id=1)),
            SEQ2SEQ,
        ),
        _arch(
            "mbart",
            _model("FlaxMBartForConditionalGeneration", "MBartConfig", **_bart_like()),
            SEQ2SEQ,
        ),
        _arch(
            "mistral",
            _model(
                "FlaxMistralForCausalLM",
                "MistralConfig",
                **_text(num_key_value_heads=1, sliding_window=4),
            ),
            CAUSAL,
        ),
        _arch(
            "mt5",
            _model("FlaxMT5ForConditionalGeneration", "MT5Config", **_t5_like()),
            T5_INPUTS,
            needs_clip_workaround=True,
        ),
        _arch(
            "opt",
            _model(
                "FlaxOPTForCausalLM",
                "OPTConfig",
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                num_hidden_layers=1,
                num_attention_heads=2,
                ffn_dim=32,
                word_embed_proj_dim=HIDDEN,
                max_position_embeddings=32,
            ),
            CAUSAL,
        ),
        _arch(
            "pegasus",
            _model("FlaxPegasusForConditionalGeneration", "PegasusConfig", **_bart_like()),
            SEQ2SEQ,
        ),
        _arch(
            "regnet",
            _model(
                "FlaxRegNetForImageClassification",
                "RegNetConfig",
                num_channels=3,
                embedding_size=8,
                hidden_sizes=[8, 16],
                depths=[1, 1],
                groups_width=8,
                num_labels=CLASSES,
            ),
            {"pixel_values": PIXELS},
        ),
        _arch(
            "resnet",
            _model(
                "FlaxResNetForImageClassification",
                "ResNetConfig",
                num_channels=3,
                embedding_size=8,
                hidden_sizes=[8, 16],
                depths=[1, 1],
                layer_type="basic",
                num_labels=CLASSES,
            ),
            {"pixel_values": PIXELS},
        ),
        _arch(
            "roberta",
            _model("FlaxRobertaModel", "RobertaConfig", **_text()),
            {**BERT_LIKE, "position_ids": Input((LENGTH,), "int32", "positions", offset=2)},
            **ENCODER,
        ),
        _arch(
            "roberta_prelayernorm",
            _model("FlaxRobertaPreLayerNormModel", "RobertaPreLayerNormConfig", **_text()),
            {**BERT_LIKE, "position_ids": Input((LENGTH,), "int32", "positions", offset=2)},
            **ENCODER,
        ),
        _arch(
            "roformer",
            _model("FlaxRoFormerModel", "RoFormerConfig", **_text()),
            {**TEXT, "token_type_ids": TYPES},
            **ENCODER,
            none_inputs=("head_mask",),
        ),
        _arch(
            "speech_encoder_decoder",
            _speech_encoder_decoder,
            {
                "inputs": AUDIO_VALUES,
                "attention_mask": AUDIO_MASK,
                **DECODER,
                "decoder_position_ids": POSITIONS,
            },
        ),
        _arch(
            "t5",
            _model("FlaxT5ForConditionalGeneration", "T5Config", **_t5_like()),
            T5_INPUTS,
            needs_clip_workaround=True,
        ),
        _arch(
            "vision_encoder_decoder",
            _vision_encoder_decoder,
            {"pixel_values": PIXELS, **DECODER, "decoder_position_ids": POSITIONS},
        ),
        _arch(
            "vision_text_dual_encoder",
            _vision_text_dual_encoder,
            {**BERT_LIKE, "pixel_values": PIXELS},
            output="text_embeds",
            loss="mse",
        ),
        _arch(
            "vit",
            _model("FlaxViTForImageClassification", "ViTConfig", **IMAGE_CLASSIFIER),
            {"pixel_values": PIXELS},
        ),
        _arch(
            "wav2vec2",
            _model("FlaxWav2Vec2ForCTC", "Wav2Vec2Config", **_wav2vec2()),
            {"input_values": AUDIO_VALUES, "attention_mask": AUDIO_MASK},
            returns_tuple=True,
        ),
        _arch(
            "whisper",
            _model(
                "FlaxWhisperForConditionalGeneration",
                "WhisperConfig",
                **_bart_like(
                    num_mel_bins=8,
                    max_source_positions=8,
                    max_target_positions=32,
                    decoder_start_token_id=1,
                ),
            ),
            {
                "input_features": Input((8, 16), "float32", "normal"),
                **DECODER,
                "decoder_position_ids": POSITIONS,
            },
        ),
        _arch(
            "xglm",
            _model(
                "FlaxXGLMForCausalLM",
                "XGLMConfig",
                vocab_size=VOCAB,
                d_model=HIDDEN,
                num_layers=1,
                attention_heads=2,
                ffn_dim=32,
                max_position_embeddings=32,
            ),
            CAUSAL,
        ),
        _arch(
            "xlm_roberta",
            _model("FlaxXLMRobertaModel", "XLMRobertaConfig", **_text()),
            {**BERT_LIKE, "position_ids": Input((LENGTH,), "int32", "positions", offset=2)},
            **ENCODER,
        ),
    ]
)


def fit_targets(arch: Arch, output: np.ndarray, seed: int) -> np.ndarray:
    """Random targets for `arch.output`, given one such output (its shape): class ids over its
    last axis for "sparse_ce", normal values of its shape for "mse"."""
    rng = np.random.default_rng(seed)
    if arch.loss == "sparse_ce":
        return rng.integers(0, output.shape[-1], size=output.shape[:-1]).astype("int32")
    return rng.normal(size=output.shape).astype("float32")


# ------------------------------------------------------------------------------ the checks
# Shared by the tests and benchmarks/hf_zoo.py: `wrap` says how a library wraps the model.

TRAIN_SAMPLES = 4  # two steps of batch 2
PREDICT_SEED, TRAIN_SEED = 0, 1


def to_plain(outputs) -> Any:
    """A model's outputs as nested dicts of NumPy arrays: a `ModelOutput` (or any mapping) by
    its non-None fields, tuples and lists as lists."""
    if isinstance(outputs, dict) or hasattr(outputs, "items"):
        return {k: to_plain(v) for k, v in outputs.items() if v is not None}
    if isinstance(outputs, list | tuple):
        return [to_plain(v) for v in outputs]
    if outputs is None:
        return None
    import keras

    return np.asarray(keras.ops.convert_to_numpy(outputs))


def flatten(tree, prefix="") -> dict[str, np.ndarray]:
    """{"a/b": array} for nested dicts and lists of arrays."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return {prefix: np.asarray(tree)}
    flat = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
    return flat


def max_abs_diff(actual, expected) -> float:
    """The largest difference between two output trees; an AssertionError when their keys or
    shapes differ."""
    a, e = flatten(to_plain(actual)), flatten(to_plain(expected))
    if sorted(a) != sorted(e):
        raise AssertionError(f"outputs {sorted(a)} != expected {sorted(e)}")
    diffs = []
    for key, value in e.items():
        if a[key].shape != value.shape:
            raise AssertionError(f"{key}: shape {a[key].shape} != expected {value.shape}")
        diffs.append(float(np.max(np.abs(a[key].astype("float64") - value), initial=0.0)))
    return max(diffs)


def keras_inputs(arch: Arch) -> dict:
    import keras

    return {
        key: keras.Input(spec.shape, dtype=spec.dtype, name=key)
        for key, spec in arch.inputs.items()
    }


def variables_of(hf_model) -> dict:
    """`model.params` as Flax variables: ResNet's and RegNet's already name their collections
    ("params", "batch_stats"); the others are the "params" collection itself."""
    params = hf_model.params
    return dict(params) if "params" in params else {"params": params}


@dataclasses.dataclass
class Run:
    """One architecture wrapped by one library, through the checks."""

    arch: Arch
    hf_model: Any
    layer: Any
    model: Any = None  # inputs -> the layer's outputs (every field)
    x: dict | None = None
    reference: Any = None  # the transformers model's own call on x
    pred: Any = None  # model.predict(x), after fit once fit ran
    history: list | None = None
    changed: list | None = None  # trainable weights fit moved
    unchanged: list | None = None
    # Whether the layer's dict holds the arch's `none_inputs` (flaxlayer's; a wrapper
    # function supplies them for keras.layers.FlaxLayer).
    nones_in_dict: bool = True

    def layer_inputs(self, inputs: dict) -> dict:
        if not self.nones_in_dict:
            return inputs
        return {**inputs, **dict.fromkeys(self.arch.none_inputs)}


def construct(arch: Arch, wrap: Callable, nones_in_dict: bool = True) -> Run:
    """Check 1: `wrap(hf_model, arch)` returns the Keras layer (e.g. FlaxLayer(model.module,
    variables=model.params))."""
    hf_model = arch.build()
    return Run(arch, hf_model, wrap(hf_model, arch), nones_in_dict=nones_in_dict)


def check_predict(run: Run) -> float:
    """Check 2: `predict` through a Keras model with dict inputs equals the transformers
    model's own call; returns the largest difference."""
    import keras

    inputs = keras_inputs(run.arch)
    run.model = keras.Model(inputs, run.layer(run.layer_inputs(inputs)))
    run.x = run.arch.sample(PREDICT_SEED)
    run.reference = to_plain(
        run.hf_model(**run.arch.model_inputs(run.x), params=run.hf_model.params)
    )
    run.pred = run.model.predict(run.x, batch_size=BATCH, verbose=0)
    return max_abs_diff(run.pred, expected_outputs(run.arch, run.reference))


def expected_outputs(arch: Arch, outputs):
    """What the wrapped module gives for the model's outputs (plain dicts): the output alone
    where the module returns a tuple of it (see `Arch.returns_tuple`)."""
    return outputs[arch.output] if arch.returns_tuple else outputs


def check_fit(run: Run) -> None:
    """Check 3: a Keras model on one output trains two steps (Adam): the loss stays finite and
    trainable weights move. Then predicts x again (the trained predictions)."""
    import keras

    arch = run.arch
    inputs = keras_inputs(arch)
    outputs = run.layer(run.layer_inputs(inputs))
    trained = keras.Model(inputs, outputs[0] if arch.returns_tuple else outputs[arch.output])
    loss = (
        keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if arch.loss == "sparse_ce"
        else "mse"
    )
    trained.compile(keras.optimizers.Adam(1e-2), loss)
    x = arch.sample(TRAIN_SEED, TRAIN_SAMPLES)
    shape = (TRAIN_SAMPLES, *np.shape(flatten(run.reference)[arch.output])[1:])
    y = fit_targets(arch, np.zeros(shape), TRAIN_SEED)
    weights = run.layer.trainable_weights
    before = [np.array(keras.ops.convert_to_numpy(w)) for w in weights]
    run.history = trained.fit(x, y, batch_size=BATCH, epochs=1, verbose=0).history["loss"]
    moved = [
        not np.array_equal(b, keras.ops.convert_to_numpy(w))
        for b, w in zip(before, weights, strict=True)
    ]
    run.changed = [w.path for w, m in zip(weights, moved, strict=True) if m]
    run.unchanged = [w.path for w, m in zip(weights, moved, strict=True) if not m]
    run.pred = run.model.predict(run.x, batch_size=BATCH, verbose=0)


def check_pure_flax(run: Run, flax_variables: dict) -> float:
    """Check 4: `model.module.apply(flax_variables, **x)` (the trained values back in pure
    Flax) equals the trained predictions; returns the largest difference."""
    module = run.hf_model.module
    out = module.apply(flax_variables, **run.x, **dict.fromkeys(run.arch.none_inputs))
    return max_abs_diff(run.pred, out[0] if run.arch.returns_tuple else out)


def save(run: Run, folder, name: str) -> dict:
    """Check 5, this side: the `.keras` file and the inputs and predictions it must give."""
    import os

    path = os.path.join(folder, f"{name}.keras")
    # The loading process imports the model class as its user does (`from transformers import
    # FlaxBertModel`): safe loading reads classes only from imported modules.
    run.model.save(path)
    data = os.path.join(folder, f"{name}.npz")
    flat = flatten(to_plain(run.pred))
    np.savez(
        data,
        **{f"x:{k}": v for k, v in run.x.items()},
        **{f"y:{k}": v for k, v in flat.items()},
    )
    return {"keras": path, "data": data, "import": type(run.hf_model).__name__}


def load_all_source(files: dict[str, dict], clip_workaround: bool) -> str:
    """Check 5, the fresh process: the source of a script that imports keras, flaxlayer and
    transformers only (and applies `t5_clip_workaround`, copied, where asked), loads every file,
    predicts and reports {name: {"max_abs_diff": ...} or {"error": ..., "traceback": ...}}
    through `report` (see helpers.run_python_json)."""
    import inspect
    import textwrap

    workaround = textwrap.dedent(inspect.getsource(t5_clip_workaround))
    return (
        "import os, traceback, types\n"
        'os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0"\n'
        "import numpy as np\nimport keras\nimport flaxlayer  # noqa: F401\n"
        "import transformers\n"
        f"{workaround}\n"
        + ("t5_clip_workaround()\n" if clip_workaround else "")
        + f"FILES = {files!r}\n"
        + textwrap.dedent(
            """
            def flatten(tree, prefix=""):
                if isinstance(tree, dict):
                    items = tree.items()
                elif isinstance(tree, (list, tuple)):
                    items = enumerate(tree)
                else:
                    return {prefix: np.asarray(keras.ops.convert_to_numpy(tree))}
                flat = {}
                for key, value in items:
                    flat.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
                return flat

            results = {}
            for name, paths in FILES.items():
                try:
                    getattr(transformers, paths["import"])
                    model = keras.saving.load_model(paths["keras"])
                    data = np.load(paths["data"])
                    x = {k[2:]: data[k] for k in data.files if k.startswith("x:")}
                    expected = {k[2:]: data[k] for k in data.files if k.startswith("y:")}
                    pred = flatten(model.predict(x, batch_size=len(next(iter(x.values()))),
                                                 verbose=0))
                    if sorted(pred) != sorted(expected):
                        raise AssertionError(f"outputs {sorted(pred)} != {sorted(expected)}")
                    diff = max(float(np.max(np.abs(pred[k] - v))) for k, v in expected.items())
                    results[name] = {"max_abs_diff": diff}
                except Exception as error:
                    results[name] = {"error": f"{type(error).__name__}: {error}"[:3000],
                                     "traceback": traceback.format_exc()[-4000:]}
            report(results)
            """
        )
    )
