"""The LM-head contract: what the fused loss needs from a loaded mlx-lm model.

`head_inputs(model, tokens)` returns the final hidden states and a `Head`: the head weight
wherever the architecture keeps it (tied embedding or separate head, under a multimodal wrapper's
`language_model`, dense or quantized with its mode) and the logits transform the architecture's
`__call__` applies after `hidden @ W.T` (final softcap, logit scale, hidden scale, bias, ids
forced to -inf). The trainer's whole use of it:

    hidden, head = head_inputs(model, tokens)
    head.loss(hidden, targets, ...)  # distill_loss with the head's weight, transform, adapter

A LoRA-adapted head (student.train: lora with the head among the adapter keys) stays its frozen
base weight (dense or quantized) plus the adapter's low-rank term, which the loss adds chunk by
chunk: the adapted (V, d) matrix is never formed, nor a quantized base dequantized.

Any mlx-lm architecture is accepted once the contract is proven on it (`prove`, run once per
model instance when it is loaded or built): on a probe of a few tokens the head's logits, from
the hidden states and under the best of the known transforms (`TRANSFORMS`), must match the
model's own `model(tokens)` within `TOLERANCE`. The hidden states come from the backbone called
alone or, where there is none to call (Gemma 3n), from the model's own forward stopped where it
calls its head. Anything else is refused with one line saying what did not match.
tests/test_architectures.py checks dense, mixture-of-experts and hybrid (SSM, linear attention)
architectures: losses and gradients through the contract against their own logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_distill.errors import BadInput
from mlx_distill.kernels.loss import distill_loss
from mlx_distill.kernels.targets import LogitTransform, LowRank, QuantizedWeight
from mlx_distill.models import adapters

EMBED_NAMES = (
    "embed_tokens",
    "wte",
    "tok_embeddings",
    "embeddings",
    "word_embeddings",
    "embedding",
)
HEAD_NAMES = ("lm_head", "output")
BACKBONE_NAMES = ("model", "backbone", "transformer")
PROBE_TOKENS = 8
# What the head path may differ from the model's own logits on the probe: the largest absolute
# difference over the largest |logit|. fp32 agrees to rounding (at most 3e-7 on the tiny models
# of tests/test_architectures.py); 16-bit logits carry the model's own rounding of its head and
# transform (measured on tiny llama, gemma2 and gemma4_text with logits up to 90: bf16 5.1e-3,
# fp16 7.0e-4), about 4x below these.
TOLERANCE = {"float32": 1e-4, "float16": 3e-3, "bfloat16": 2e-2}


def _scalar(lm: nn.Module, name: str) -> float | None:
    """A nonzero number `name` on the text model, its args or config, or its backbone's."""
    inner = backbone(lm)
    owners = (lm, getattr(lm, "args", None), getattr(lm, "config", None), inner)
    owners += (getattr(inner, "args", None),) if inner is not None else ()
    for owner in owners:
        value = getattr(owner, name, None) if owner is not None else None
        if isinstance(value, int | float) and not isinstance(value, bool) and value:
            return float(value)
    return None


def _read(name: str, over: str | None = None, invert: bool = False) -> Callable:
    def read(lm: nn.Module) -> float | None:
        value = _scalar(lm, name)
        below = _scalar(lm, over) if over else 1.0
        if value is None or below is None:
            return None
        return 1.0 / value if invert else value / below

    return read


# The logits transforms mlx-lm's architectures apply after `hidden @ W.T`, and where each reads
# its value: (LogitTransform field, reader; the architectures read in mlx-lm's source). Every
# one a model has a value for is tried on the probe, alone and combined, beside the identity;
# a head bias is read off the head itself.
TRANSFORMS: tuple[tuple[str, Callable[[nn.Module], float | None]], ...] = (
    ("softcap", _read("final_logit_softcapping")),  # gemma2, gemma3n, gemma4_text, muse
    ("softcap", _read("logits_soft_cap")),  # recurrent_gemma
    ("logit_scale", _read("logit_scale")),  # cohere, cohere2
    ("logit_scale", _read("logits_scaling", invert=True)),  # granite, granitemoe(hybrid)
    ("logit_scale", _read("mup_width_multiplier", invert=True)),  # phi3small
    ("logit_scale", _read("output_multiplier")),  # muse_glimmer
    ("logit_scale", _read("lm_head_multiplier", "embedding_multiplier")),  # falcon_h1, tied
    ("hidden_scale", _read("dim_model_base", "hidden_size")),  # minicpm, untied
)


@dataclass
class HeadAdapter:
    """A LoRA head's adapter: logits += scale * (hidden @ down) @ up.T.

    down: (d, r); up: (V, r). For mlx-lm's LoRALinear down = lora_a, up = lora_b.T; for its
    LoRAEmbedding (a tied head) down = lora_b.T, up = lora_a.
    """

    down: mx.array
    up: mx.array
    scale: float


@dataclass
class Head:
    """What `distill_loss` needs besides the hidden states.

    weight: (V, d) array (a trainable parameter when the model's is), or a QuantizedWeight;
        with an adapter, the frozen base.
    transform: the architecture's LogitTransform, or None when logits are `hidden @ W.T`.
    adapter: a LoRA head's low-rank term (`HeadAdapter`), or None.
    """

    weight: mx.array | QuantizedWeight
    transform: LogitTransform | None
    adapter: HeadAdapter | None = None

    def low_rank(self, hidden: mx.array) -> LowRank | None:
        """The adapter's term for `distill_loss(..., low_rank=)`: u (..., r), b (V, r)."""
        if self.adapter is None:
            return None
        a = self.adapter
        return LowRank(a.scale * (hidden @ a.down), a.up)

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def loss(self, hidden: mx.array, targets, **kwargs) -> tuple[mx.array, dict[str, mx.array]]:
        """`distill_loss(hidden (B, L, d), self.weight, targets, **kwargs)` through this head:
        its logits transform and its adapter's low-rank term. Returns (loss, metrics)."""
        return distill_loss(
            hidden,
            self.weight,
            targets,
            transform=self.transform,
            low_rank=self.low_rank(hidden),
            **kwargs,
        )

    def logits(self, hidden: mx.array) -> mx.array:
        """Materialized logits (..., V) in float32 for a few rows (evaluation, teacher scoring)."""
        x = hidden.astype(mx.float32)
        if isinstance(self.weight, QuantizedWeight):
            q = self.weight
            floating = mx.issubdtype(q.scales.dtype, mx.floating)
            scales = q.scales.astype(mx.float32) if floating else q.scales
            biases = None if q.biases is None else q.biases.astype(mx.float32)
            raw = mx.quantized_matmul(
                x,
                q.weight,
                scales,
                biases,
                transpose=True,
                group_size=q.group_size,
                bits=q.bits,
                mode=q.mode,
            )
        else:
            raw = x @ self.weight.astype(mx.float32).T
        lr = self.low_rank(x)
        if lr is not None:
            raw = raw + lr.u.astype(mx.float32) @ lr.b.astype(mx.float32).T
        return raw if self.transform is None else self.transform.apply(raw)


def architecture(model: nn.Module) -> str:
    """The model's mlx-lm `model_type` (e.g. 'qwen2', 'gemma3')."""
    return str(getattr(model, "model_type", type(model).__module__.rsplit(".", 1)[-1]))


def text_model(model: nn.Module) -> nn.Module:
    """The language model inside a multimodal wrapper (`language_model`, also one level down as
    in Gemma 3n), else the model."""
    for owner in (model, model.get("model")):
        if isinstance(owner, nn.Module) and "language_model" in owner:
            return owner["language_model"]
    return model


def backbone(lm: nn.Module) -> nn.Module | None:
    """The text model's backbone (`model`, `backbone`, `transformer`), None when it has none."""
    return next((lm[n] for n in BACKBONE_NAMES if isinstance(lm.get(n), nn.Module)), None)


def head_site(model: nn.Module) -> tuple[nn.Module, str, bool]:
    """(owner, name, tied): the head module is `owner[name]`; tied when it is the embedding."""
    lm = text_model(model)
    for name in HEAD_NAMES:
        if isinstance(lm.get(name), nn.Module):
            return lm, name, False
    for owner in (backbone(lm), lm):
        for name in EMBED_NAMES:
            if owner is not None and isinstance(owner.get(name), nn.Module):
                return owner, name, True
    raise BadInput(
        f"architecture {architecture(model)!r}: no LM head ({', '.join(HEAD_NAMES)}) and no "
        f"token embedding ({', '.join(EMBED_NAMES)}) found"
    )


# -- the hidden states: how the head's input is read --------------------------------------------


class _HeadReached(Exception):
    def __init__(self, hidden: mx.array):
        super().__init__("the LM head was reached")
        self.hidden = hidden


class _Stop(nn.Module):
    def __call__(self, hidden: mx.array) -> mx.array:
        raise _HeadReached(hidden)


def _stop(hidden: mx.array) -> mx.array:
    raise _HeadReached(hidden)


def _hidden_from_backbone(model: nn.Module, tokens: mx.array) -> mx.array:
    inner = backbone(text_model(model))
    if inner is None:
        raise ValueError(f"no backbone ({', '.join(BACKBONE_NAMES)})")
    # cache passed positionally: some backbones (phi, stablelm) have no default for it
    return inner(tokens, None)


def _hidden_at_head(model: nn.Module, tokens: mx.array) -> mx.array:
    """The model's own forward, stopped where the head is called: what its head receives."""
    owner, name, tied = head_site(model)
    head = owner[name]
    if tied:
        head.as_linear = _stop  # the instance attribute shadows the method for this call
    else:
        owner[name] = _Stop()
    try:
        model(tokens)
    except _HeadReached as reached:
        return reached.hidden
    finally:
        if tied:
            object.__delattr__(head, "as_linear")
        else:
            owner[name] = head
    via = f"{name}.as_linear" if tied else name
    raise ValueError(f"model(tokens) returned without calling {via}")


# Two ways to the head's input, tried in this order: the backbone called alone (its output is
# the final normalized hidden states), or the model's own forward stopped at its head (for
# models whose backbone is not separate, e.g. Gemma 3n's per-layer inputs).
HIDDEN_PATHS = {"backbone": _hidden_from_backbone, "forward": _hidden_at_head}


def hidden_states(model: nn.Module, tokens: mx.array) -> mx.array:
    """Final hidden states (B, L, d): the input to the LM head, read the way the probe proved."""
    return HIDDEN_PATHS[contract(model).hidden](model, tokens)


# -- the contract, proven on a probe ------------------------------------------------------------


@dataclass(frozen=True)
class Contract:
    """How the fused loss reproduces a model's logits, as measured on a probe.

    hidden: the key in HIDDEN_PATHS; fields: the LogitTransform's scalar fields (name, value);
    error: the largest |difference| over the largest |logit| on the probe.
    """

    hidden: str
    fields: tuple[tuple[str, float], ...]
    masked_ids: tuple[int, ...]
    error: float


def _candidates(lm: nn.Module) -> list[dict]:
    """Every combination of the table's transforms this model has values for (identity first)."""
    options: dict[str, list] = {}
    for field, read in TRANSFORMS:
        value = read(lm)
        if value is not None and value not in options.setdefault(field, []):
            options[field].append(value)
    out = [{}]
    for field, values in options.items():
        out += [dict(c, **{field: v}) for c in out for v in values]
    return out


def _describe(fields: dict, bias: bool) -> str:
    parts = [f"{k} {v:g}" for k, v in fields.items()] + (["bias"] if bias else [])
    return ", ".join(parts) or "no transform"


def _error(ours: mx.array, want: mx.array) -> float:
    """max |ours - want| / max |want| over the finite logits; inf where only one is -inf."""
    finite = mx.isfinite(want)
    if not mx.array_equal(finite, mx.isfinite(ours)).item():
        return float("inf")
    diff = mx.where(finite, mx.abs(ours - want), 0.0).max().item()
    peak = mx.where(finite, mx.abs(want), 0.0).max().item()
    return diff / max(peak, 1e-30)


def probe_tokens(vocab: int) -> mx.array:
    """(1, PROBE_TOKENS) fixed ids below min(vocab, 1000) (every embedding has those rows)."""
    ids = (np.arange(PROBE_TOKENS) * 7919 + 11) % min(vocab, 1000)
    return mx.array(ids[None], dtype=mx.int32)


def prove(model: nn.Module) -> Contract:
    """Measure the head contract on a probe: the first hidden-state path whose head logits,
    under the best transform of the table, match `model(probe)` within tolerance. BadInput
    (one line saying what did not match) when none does."""
    arch = architecture(model)
    lm = text_model(model)
    owner, name, tied = head_site(model)
    head = _plain_head(owner[name])
    tokens = probe_tokens(head.vocab)
    try:
        want = model(tokens)
        mx.eval(want)
    except Exception as e:
        raise BadInput(
            f"architecture {arch!r}: model(tokens) fails on a probe: {_brief(e)}"
        ) from None
    if not isinstance(want, mx.array) or want.shape[:2] != tokens.shape:
        got = want.shape if isinstance(want, mx.array) else type(want).__name__
        raise BadInput(f"architecture {arch!r}: model(tokens) returns {got}, not (B, L, V) logits")
    tol = TOLERANCE.get(str(want.dtype).rsplit(".", 1)[-1], max(TOLERANCE.values()))
    want = want.astype(mx.float32)
    masked = tuple(np.flatnonzero(np.all(np.isneginf(np.array(want[0])), axis=0)).tolist())
    bias = head.transform.bias if head.transform is not None else None
    failures, best = [], None
    for path, read in HIDDEN_PATHS.items():
        try:
            hidden = read(model, tokens)
            if not isinstance(hidden, mx.array) or hidden.shape[-1] != _in_dim(head):
                got = hidden.shape if isinstance(hidden, mx.array) else type(hidden).__name__
                raise ValueError(f"gives {got}, the head takes {_in_dim(head)} features")
            raw = Head(head.weight, None, head.adapter).logits(hidden)
        except Exception as e:
            failures.append(f"{path}: {_brief(e)}")
            continue
        for fields in _candidates(lm):
            transform = LogitTransform(**fields, bias=bias, masked_ids=masked)
            err = _error(transform.apply(raw), want)
            if best is None or err < best[0]:
                best = (err, path, fields)
        if best is not None and best[0] <= tol:
            err, path, fields = best
            return Contract(path, tuple(fields.items()), masked, err)
    if best is None:
        raise BadInput(
            f"architecture {arch!r}: no way to its LM head's input ({'; '.join(failures)})"
        )
    err, path, fields = best
    tried = len(_candidates(lm))
    raise BadInput(
        f"architecture {arch!r}: the fused LM head does not reproduce its own logits on a probe: "
        f"max error {err:.2g} of the largest logit (tolerance {tol:g}), best with hidden states "
        f"from its {path} and {_describe(fields, bias is not None)} ({tried} transform(s) tried"
        + (f"; {'; '.join(failures)}" if failures else "")
        + ")"
    )


def _brief(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def contract(model: nn.Module) -> Contract:
    """The model's proven contract, measured once per model instance (`prove`)."""
    found = getattr(model, "_head_contract", None)
    if found is None:
        try:
            found = prove(model)
        except ValueError as e:  # the probe evaluates, which mx.compile's tracing forbids
            if "transformations" not in str(e):
                raise
            raise RuntimeError(
                "the head contract of a model is proven before a compiled step traces it: call "
                "models.contract(model) after building it (load_model and build_model do)"
            ) from None
        model._head_contract = found  # a plain attribute: not a parameter, not saved
    return found


def _in_dim(head: Head) -> int:
    w = head.weight
    return w.weight.shape[1] * 32 // w.bits if isinstance(w, QuantizedWeight) else w.shape[1]


def _weight_of(module: nn.Module, where: str) -> mx.array | QuantizedWeight:
    if "scales" not in module:
        return module["weight"]
    if "global_scale" in module:
        raise BadInput(f"{where}: quantization mode {module.mode!r} (global scale) not supported")
    return QuantizedWeight(
        module["weight"],
        module["scales"],
        module.get("biases"),
        module.group_size,
        module.bits,
        getattr(module, "mode", "affine"),
    )


def _plain_head(head_module: nn.Module, fields: dict | None = None, masked=()) -> Head:
    """The Head of `head_module` with `fields` (the transform's scalars) and its own bias."""
    base = adapters.base_layer(head_module)
    bias = base["bias"] if "bias" in base else None
    transform = LogitTransform(**(fields or {}), bias=bias, masked_ids=tuple(masked))
    transform = None if transform.is_identity else transform
    where = type(head_module).__name__
    # A LoRA head: its frozen base and the low-rank term, applied chunk by chunk in the loss.
    adapter = adapters.head_low_rank(head_module)
    if adapter is not None:
        return Head(_weight_of(base, where), transform, HeadAdapter(*adapter))
    # A DoRA head: its adapted (V, d) matrix, through which the adapter's gradients flow (its
    # row norms need the whole matrix; a quantized base is dequantized for it).
    adapted = adapters.head_weight(head_module)
    weight = adapted if adapted is not None else _weight_of(head_module, where)
    return Head(weight, transform)


def lm_head(model: nn.Module) -> Head:
    """The head weight and logits transform of a model, as its proven contract says."""
    found = contract(model)
    owner, name, _ = head_site(model)
    return _plain_head(owner[name], dict(found.fields), found.masked_ids)


def head_inputs(model: nn.Module, tokens: mx.array) -> tuple[mx.array, Head]:
    """(hidden (B, L, d), Head) for `distill_loss(hidden, head.weight, ..., transform=...)`."""
    head = lm_head(model)
    return hidden_states(model, tokens), head


def lm_head_weight(model: nn.Module) -> mx.array:
    """The head as a dense (V, d) matrix (dequantized whole, adapter folded in). Prefer
    `lm_head(model)`."""
    head = lm_head(model)
    weight = head.weight
    weight = weight.dequantize() if isinstance(weight, QuantizedWeight) else weight
    if head.adapter is not None:
        a = head.adapter
        weight = weight + (a.scale * a.up @ a.down.T).astype(weight.dtype)
    return weight
