"""The model registry: one place that names every model, its config and its presets.

    from models import MODELS, make_config, build_model
    cfg = make_config("moneta", "tiny")                       # a size preset
    cfg = make_config("yaad", "340m+hybrid", window=1024)     # size + variant presets, then overrides
    model = build_model("memora", "tiny", vocab_size=65)      # or build_model(cfg)

Presets (model_common): sizes SIZE_PRESETS ("tiny", "120m" = Table 5's "170m", "340m", "760m" = "780m",
"1.3b") and variants VARIANTS ("titans_lmm", "ttt_mlp", "ttt_linear", "gated_deltanet_like",
"deltanet_like", "gated_linear_attention_like", "linear_ablation", "no_retention", "hybrid"), joined with
"+" and applied left to right, then the keyword overrides. Variants apply to the Miras models only.
Unknown keys and values of the wrong type raise ValueError naming what is valid. The sizes' peak learning rates
are a training setting: preset_learning_rate(preset). A saved config (a checkpoint's model_config) turns back
into a config through config_from_dict, which also reads checkpoints written before learning_rate left it.
"""
import dataclasses
from typing import Optional

from model_common import (DEFAULT_LEARNING_RATE, PRESET_LEARNING_RATES, SIZE_ALIASES, SIZE_PRESETS, VARIANTS,
                          LMConfig, MirasConfig)
from model_memora import Memora, MemoraConfig
from model_moneta import Moneta, MonetaConfig
from model_transformer import Transformer, TransformerConfig
from model_yaad import Yaad, YaadConfig

MODELS = {
    "moneta": (MonetaConfig, Moneta),
    "yaad": (YaadConfig, Yaad),
    "memora": (MemoraConfig, Memora),
    "transformer": (TransformerConfig, Transformer),
}

_TYPES = {"bool": bool, "int": int, "float": float, "str": str, bool: bool, int: int, float: float, str: str,
          Optional[bool]: (bool, type(None))}  # compile_memory: None follows the device


def _preset_parts(preset):
    """The canonical names of a "+"-joined preset string (or a list of names), aliases resolved."""
    if preset is None or preset == "":
        return []
    parts = preset.split("+") if isinstance(preset, str) else list(preset)
    return [SIZE_ALIASES.get(p.strip().lower(), p.strip().lower()) for p in parts]


def preset_overrides(name, preset):
    """The merged overrides of a "+"-joined preset string (or a list of names) for model `name`."""
    is_miras = issubclass(MODELS[name][0], MirasConfig)
    out = {}
    for part in _preset_parts(preset):
        if part in SIZE_PRESETS:
            out.update(SIZE_PRESETS[part])
        elif part in VARIANTS and is_miras:
            out.update(VARIANTS[part])
        else:
            valid = sorted(SIZE_PRESETS) + sorted(SIZE_ALIASES) + (sorted(VARIANTS) if is_miras else [])
            raise ValueError(f"unknown preset {part!r} for model {name!r}; valid: {', '.join(valid)}")
    return out


def _check_value(cls, key, value):
    ftype = _TYPES[{f.name: f.type for f in dataclasses.fields(cls)}[key]]
    if ftype is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if ftype is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, ftype) or (ftype is int and isinstance(value, bool)):
        what = " or ".join(t.__name__ for t in (ftype if isinstance(ftype, tuple) else (ftype,)))
        raise ValueError(f"{cls.__name__}.{key} must be a {what}, got {value!r} ({type(value).__name__})")
    return value


def make_config(name, preset=None, **overrides):
    """Config of model `name` (a key of MODELS): its defaults, then the presets, then the overrides."""
    name = name.lower()
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    cls = MODELS[name][0]
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for {name!r}; valid keys: {', '.join(valid)}")
    kwargs = {**preset_overrides(name, preset), **overrides}
    kwargs = {k: _check_value(cls, k, v) for k, v in kwargs.items()}
    return cls(**kwargs)


def preset_learning_rate(preset):
    """The peak learning rate of a preset's size (its last size: "340m+hybrid" -> 1.5e-3); DEFAULT_LEARNING_RATE
    (3e-3) when it names none."""
    sizes = [p for p in _preset_parts(preset) if p in PRESET_LEARNING_RATES]
    return PRESET_LEARNING_RATES[sizes[-1]] if sizes else DEFAULT_LEARNING_RATE


# Keys that saved model configs of older versions hold and configs no longer have (dropped on loading)
LEGACY_CONFIG_KEYS = ("learning_rate",)  # the preset's peak lr, now preset_learning_rate (a training setting)


def config_from_dict(name, saved):
    """The config of model `name` from a saved config.to_dict() (a checkpoint's model_config): the one place
    saved configs turn back into configs, so the keys of older versions (LEGACY_CONFIG_KEYS) are dropped here,
    a Miras config saved before eta_gate existed keeps the only step gate it had (softplus), and one saved before
    step_norm existed the only normalized step it had ("gain")."""
    kwargs = {k: v for k, v in saved.items() if k not in LEGACY_CONFIG_KEYS}
    if "eta_base" in kwargs and "eta_gate" not in kwargs:
        kwargs["eta_gate"] = "softplus"
    if "eta_gate" in kwargs and "step_norm" not in kwargs:
        kwargs["step_norm"] = "gain"
    return make_config(name, None, **kwargs)


def function_dict(config):
    """config.to_dict() without the fields that cannot change what the model computes (the inactive step
    gate's settings): the studies' caches compare these, so adding an option whose default keeps the old
    function does not invalidate finished runs."""
    out = config.to_dict()
    out.pop("compile_memory", None)  # how the chunks run, not what they compute
    out.pop("recompute_inputs", None)  # what the backward keeps, not what the model computes
    if out.get("lq_link") == "printed" or out.get("retention", "lq") != "lq":  # the function before the option
        out.pop("lq_link", None)
    if out.get("attention_rope") is True or not set(out.get("layer_pattern", "")) & set("AS"):
        out.pop("attention_rope", None)  # RoPE attention (or none): the function before the option
    if out.get("eta_gate") == "softplus":
        for key in ("eta_gate", "eta_max", "eta_init", "step_norm"):
            out.pop(key, None)
    elif "eta_gate" in out:
        out.pop("eta_base")
    if out.get("step_norm") == "gain":  # the normalized step before the option
        out.pop("step_norm")
    return out


def model_name(config):
    """The registry name of a config instance (for checkpoints: save it beside config.to_dict())."""
    for name, (cls, _) in MODELS.items():
        if type(config) is cls:
            return name
    raise ValueError(f"{type(config).__name__} is not a registered config; registered: {', '.join(MODELS)}")


def build_model(name_or_config, preset=None, **overrides):
    """A model from a registered config instance, or from make_config(name, preset, **overrides)."""
    if isinstance(name_or_config, LMConfig):
        if preset is not None or overrides:
            raise ValueError("pass either a config or a model name with preset / overrides, not both")
        config = name_or_config
    else:
        config = make_config(name_or_config, preset, **overrides)
    return MODELS[model_name(config)][1](config)
