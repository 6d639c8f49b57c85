"""LoraSpec (the hyper-parameters of one LoRA) and Adapter (a spec plus its A/B matrices).

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685) adds to a frozen
linear map W (d_out, d_in) a low-rank update:

    h = W x + scaling * B (A x),   A: (r, d_in),  B: (d_out, r),  scaling = alpha / r
    (rsLoRA, arXiv 2312.03732: scaling = alpha / sqrt(r))

An `Adapter` holds one (A, B) pair per adapted module, keyed by the module's dotted name in the base
model (`encoder.layer.0.attention.self.query`). Its serialised form is a safetensors file with keys
`<module>.lora_A.weight` / `<module>.lora_B.weight` (PEFT's keys without the `base_model.model.`
prefix), so a blob, a PEFT directory and a model in memory map onto each other by name alone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

from loraplex.errors import IncompatibleAdapter, InvalidAdapter

if TYPE_CHECKING:
    import torch

    from loraplex.models import Fingerprint

# Modules adapted by default, by `config.model_type`: the attention projections (query, key, value and
# output), matched as name suffixes. The continual forgetting method targets the feed-forward layers
# and says so in its own spec.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "key", "value", "attention.output.dense"),
    "roberta": ("query", "key", "value", "attention.output.dense"),
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin"),
    "mpnet": ("attn.q", "attn.k", "attn.v", "attn.o"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt2": ("c_attn", "attn.c_proj"),
}

# The feed-forward projections, by model type (GS-LoRA puts its LoRA there).
FFN_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("intermediate.dense", "output.dense"),
    "roberta": ("intermediate.dense", "output.dense"),
    "llama": ("gate_proj", "up_proj", "down_proj"),
    "mistral": ("gate_proj", "up_proj", "down_proj"),
    "qwen2": ("gate_proj", "up_proj", "down_proj"),
    "gpt2": ("mlp.c_fc", "mlp.c_proj"),
}


def matches_target(module: str, target: str) -> bool:
    """PEFT's rule for a list entry: the module's name is the target or ends with '.' + target."""
    return module == target or module.endswith("." + target)


def check_regex(pattern: str) -> None:
    """A user's pattern must compile under `re` (PEFT's engine) and `regex` (the one `bounded_match` runs): a
    pattern only `re` compiles (`[[:foo:]]`) was an internal error when matched (sweep 66). re.error or ValueError.
    (`regex` reads a POSIX class such as `[[:alpha:]]` as a class where `re` reads a set and a `]`: such a
    pattern compiles under both and matches other names than PEFT's; none of PEFT's own examples is one.)"""
    import regex

    re.compile(pattern)
    try:
        regex.compile(pattern)
    except regex.error as exc:
        raise ValueError(f"{exc}; loraplex reads patterns as Python's re module does") from None


def check_pattern_key(key: str) -> str:
    """A rank_pattern / alpha_pattern key must make a valid regex in PEFT's `(.*\\.)?(<key>)$` form."""
    try:
        check_regex(key)
        check_regex(rf"(.*\.)?({key})$")
    except (re.error, ValueError) as exc:
        raise ValueError(f"key {key!r} is not a valid regular expression ({exc})") from None
    return key


PATTERN_TIMEOUT_S = 0.5
"""How long one user pattern may take to match one module name: a pattern that backtracks without end
(`(.*.*)*x` against a 36-character name) hung `adapters register`, and would have held a server's worker (sweep 64)."""


def bounded_match(pattern: str, text: str, *, full: bool = False, what: str = "pattern", shown: str | None = None):
    """The match (or None) of a user's regular expression on `text` (at its start, or whole with `full`), with the
    `regex` engine (re's syntax; it avoids most exponential backtracking) under PATTERN_TIMEOUT_S: a pattern
    that takes longer is refused by name (InvalidAdapter), not matched for ever."""
    import regex

    try:
        return (regex.fullmatch if full else regex.match)(pattern, text, timeout=PATTERN_TIMEOUT_S)
    except TimeoutError:
        raise InvalidAdapter(f"{what} {(shown or pattern)!r} takes too long to match the module name {text!r} (a pattern "
                             "that backtracks without end); write it more simply") from None


def match_pattern(pattern: Mapping[str, object], module: str, what: str = "pattern") -> object | None:
    """PEFT's rule for rank_pattern / alpha_pattern keys: `(.*\\.)?<key>$` matched against the name."""
    for key, value in pattern.items():
        # PEFT's form, the key in a group: `q_proj|v_proj` is either module, not `...q_proj` or `v_proj` (sweep 66)
        if bounded_match(rf"(.*\.)?({key})$", module, what=f"{what} key", shown=key) is not None:
            return value
    return None


MAX_RANK = 4096
MAX_ALPHA = 1e6
MAX_ABS_WEIGHT = 1e6
"""Largest |value| accepted in a LoRA A or B matrix (real adapters stay many orders of magnitude below)."""
MAX_ABS_UPDATE = 1e4
"""Largest |value| accepted in a module's update scaling * B @ A. Each A and B value can be within MAX_ABS_WEIGHT
while their product, summed over the rank and scaled, overflows the forward (60,000 in every fp16 value gave
updates of ~3e10 and a hidden state of NaN: sweep 64); a trained update stays below 1 by orders of magnitude."""
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

# Strict types: a string "false" is not a bool, 4.7 is not an int, "16" is not a float (ints are floats).
Rank = Annotated[int, Strict(), Field(ge=1, le=MAX_RANK)]
Alpha = Annotated[float, Strict(), Field(gt=0, le=MAX_ALPHA, allow_inf_nan=False)]


class LoraSpec(BaseModel):
    """Hyper-parameters of a LoRA adapter (the subset of PEFT's LoraConfig that loraplex supports).

    The rules every adapter obeys, whichever way it arrives (PEFT import, training, a stored record
    read back by `registry check`): 1 <= r <= 4096, 0 < alpha <= 1e6 and finite, 0 <= dropout < 1,
    per-module patterns with valid regex keys and values under the same rules, strict types."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    r: Rank = 8
    """Rank of the update (modules may override it through rank_pattern)."""
    alpha: Alpha = 16.0
    """Scaling numerator: scaling = alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: Annotated[float, Strict(), Field(ge=0.0, lt=1.0, allow_inf_nan=False)] = 0.0
    """Dropout on the adapter's input during training."""
    target_modules: tuple[str, ...] = ()
    """Module name suffixes to adapt; empty means the base model's default (attention projections)."""
    rank_pattern: dict[str, Rank] = Field(default_factory=dict)
    """Per-module ranks, PEFT's pattern syntax."""
    alpha_pattern: dict[str, Alpha] = Field(default_factory=dict)
    """Per-module alphas, PEFT's pattern syntax."""
    use_rslora: Annotated[bool, Strict()] = False
    """Rank-stabilised scaling, alpha / sqrt(r)."""

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _regex_keys(cls, v: dict) -> dict:
        for key in v:
            check_pattern_key(key)
        return v

    def rank_for(self, module: str) -> int:
        r = match_pattern(self.rank_pattern, module, "rank_pattern")
        return int(r) if r is not None else self.r

    def alpha_for(self, module: str) -> float:
        a = match_pattern(self.alpha_pattern, module, "alpha_pattern")
        return float(a) if a is not None else self.alpha

    def scaling_for(self, module: str, rank: int | None = None) -> float:
        r = rank if rank is not None else self.rank_for(module)
        return self.alpha_for(module) / (r**0.5 if self.use_rslora else r)

    def resolve_targets(self, module_names: Iterable[str], model_type: str) -> list[str]:
        """The modules of a base model this spec adapts (its targets, or the model type's default)."""
        targets = self.target_modules or DEFAULT_TARGETS.get(model_type, ())
        if not targets:
            raise IncompatibleAdapter(
                f"no default target modules for model type {model_type!r}; name them (e.g. --targets q_proj,v_proj)"
            )
        module_names = list(module_names)
        names = [n for n in module_names if any(matches_target(n, t) for t in targets) and not unread_module(n)]
        if self.target_modules:  # named by the user: each one must adapt something (a typo was dropped silently)
            for t in targets:
                hits = [n for n in module_names if matches_target(n, t)]
                if hits and all(unread_module(n) for n in hits):
                    raise IncompatibleAdapter(
                        f"target module {t!r} matches only {', '.join(hits[:3])}, which no loraplex head reads (the "
                        "encoder head mean-pools the last hidden state; the pooler is never on the loss path)")
                if not hits and names:
                    raise IncompatibleAdapter(f"target module {t!r} matches no linear layer of this {model_type} model "
                                              f"(the others match {len(names)} modules)")
        if not names:
            raise IncompatibleAdapter(
                f"target modules {list(targets)} match no linear layer of this {model_type} model"
            )
        return names


UNREAD_MODULES = ("pooler.",)
"""Prefixes of the modules no loraplex head reads: the encoder head mean-pools the last hidden state, so
BERT's pooler is never on the loss path (a LoRA there gets no gradient; alone, training fails)."""


def unread_module(name: str) -> bool:
    return name.startswith(UNREAD_MODULES) or any(f".{p}" in name for p in UNREAD_MODULES)


@dataclass
class Adapter:
    """A LoRA adapter in memory: its spec and, per module, A (r, d_in) and B (d_out, r)."""

    spec: LoraSpec
    weights: dict[str, tuple["torch.Tensor", "torch.Tensor"]] = field(default_factory=dict)

    # ---- shape facts -------------------------------------------------------------------------
    @property
    def modules(self) -> list[str]:
        return sorted(self.weights)

    def rank(self, module: str) -> int:
        return int(self.weights[module][0].shape[0])

    def scaling(self, module: str) -> float:
        return self.spec.scaling_for(module, self.rank(module))

    @property
    def n_params(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.weights.values())

    # ---- (de)serialisation -------------------------------------------------------------------
    def state_dict(self) -> dict[str, "torch.Tensor"]:
        out = {}
        for m, (a, b) in self.weights.items():
            out[f"{m}.lora_A.weight"] = a
            out[f"{m}.lora_B.weight"] = b
        return out

    @classmethod
    def from_state_dict(cls, spec: LoraSpec, sd: Mapping[str, "torch.Tensor"], *, where: str = "adapter") -> "Adapter":
        """Pair `<module>.lora_A.weight` / `<module>.lora_B.weight` keys and check their shapes."""
        a_s: dict[str, torch.Tensor] = {}
        b_s: dict[str, torch.Tensor] = {}
        keys: dict[tuple[str, str], str] = {}  # (module, "A" | "B") -> the key it came from
        named: dict[tuple[str, str], str | None] = {}  # (module, "A" | "B") -> the adapter name in the key, if any
        for key, t in sd.items():
            m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.([^.]+))?\.weight", key)
            if m is None:
                raise InvalidAdapter(f"{where}: unsupported tensor {key!r} (loraplex stores LoRA A/B weights only)")
            mod, side = m.group(1), m.group(2)
            if (mod, side) in keys:  # `X.lora_A.weight` and `X.lora_A.default.weight`: which one is the adapter?
                raise InvalidAdapter(f"{where}: module {mod!r} has two lora_{side} tensors ({keys[mod, side]!r}, {key!r})")
            keys[mod, side], named[mod, side] = key, m.group(3)
            (a_s if side == "A" else b_s)[mod] = t
        if not a_s:
            raise InvalidAdapter(f"{where}: no LoRA weights found")
        if set(a_s) != set(b_s):
            odd = sorted(set(a_s) ^ set(b_s))[0]
            raise InvalidAdapter(f"{where}: module {odd!r} has only one of lora_A / lora_B")
        weights = {}
        for mod in sorted(a_s):
            a, b = a_s[mod], b_s[mod]
            if named[mod, "A"] != named[mod, "B"]:  # halves of two adapters (sweep 64 F5), after every key is seen:
                # a tensor given twice is named as such first, whatever the file's order
                raise InvalidAdapter(f"{where}: module {mod!r}: its lora_A and lora_B are stored under different "
                                     f"adapter names ({keys[mod, 'A']!r}, {keys[mod, 'B']!r})")
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise InvalidAdapter(
                    f"{where}: module {mod!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                    "which are not (r, d_in) and (d_out, r)"
                )
            if a.shape[0] != spec.rank_for(mod):
                raise InvalidAdapter(
                    f"{where}: the config gives module {mod!r} rank {spec.rank_for(mod)} but its tensors have rank {a.shape[0]}"
                )
            weights[mod] = (a, b)
        out = cls(spec, weights)
        out.check_weights(where=where)
        return out

    def to_bytes(self) -> bytes:
        """Deterministic safetensors bytes (the blob whose sha256 names it in the registry)."""
        from safetensors.torch import save

        sd = {k: v.detach().contiguous().cpu() for k, v in sorted(self.state_dict().items())}
        return save(sd, metadata={"format": "pt"})

    @classmethod
    def from_bytes(cls, spec: LoraSpec, data: bytes, *, where: str = "blob") -> "Adapter":
        from safetensors.torch import load

        try:
            sd = load(data)
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise InvalidAdapter(f"{where}: corrupt safetensors data ({_short(exc)})") from None
        return cls.from_state_dict(spec, sd, where=where)

    # ---- checks ------------------------------------------------------------------------------
    def check_weights(self, *, where: str = "adapter") -> None:
        """Raise InvalidAdapter unless every A/B matrix is floating point, finite and of sane magnitude."""
        import torch

        for mod in sorted(self.weights):
            for which, t in zip("AB", self.weights[mod]):
                name = f"module {mod!r} lora_{which}"
                if str(t.dtype).removeprefix("torch.") not in FLOAT_DTYPES:
                    raise InvalidAdapter(f"{where}: {name} has dtype {str(t.dtype).removeprefix('torch.')}; "
                                         f"LoRA weights must be floating point ({', '.join(FLOAT_DTYPES)})")
                if t.numel() == 0:
                    continue
                x = t.detach().float()
                if not bool(torch.isfinite(x).all()):
                    bad = "NaN" if bool(torch.isnan(x).any()) else "Inf"
                    raise InvalidAdapter(f"{where}: {name} contains {bad} values")
                peak = float(x.abs().max())
                if peak > MAX_ABS_WEIGHT:
                    raise InvalidAdapter(f"{where}: {name} holds a value of magnitude {peak:.3g}, above the "
                                         f"{MAX_ABS_WEIGHT:.0e} limit for LoRA weights")
            peak = self._update_peak(mod)
            if peak > MAX_ABS_UPDATE:
                raise InvalidAdapter(f"{where}: module {mod!r}: its update (scaling x lora_B @ lora_A) reaches magnitude "
                                     f"{peak:.3g}, above the {MAX_ABS_UPDATE:.0e} limit (it would overflow the forward)")

    def _update_peak(self, mod: str) -> float:
        """max |scaling * B @ A| of a module: bounded first by the largest row norm of B times column norm of A
        (Cauchy-Schwarz, no product formed), and only where that bound passes the limit computed exactly, a
        column block at a time (a 4096 x 4096 module is not one float64 matrix)."""
        a, b = (t.detach().double() for t in self.weights[mod])
        if a.numel() == 0 or b.numel() == 0:
            return 0.0
        s = abs(self.scaling(mod))
        bound = s * float(b.norm(dim=1).max()) * float(a.norm(dim=0).max())
        if bound <= MAX_ABS_UPDATE:
            return bound
        step = max(1, (1 << 22) // max(1, b.shape[0]))
        return s * max(float((b @ a[:, i:i + step]).abs().max()) for i in range(0, a.shape[1], step))

    def check_fits(self, fp: "Fingerprint", *, name: str = "adapter") -> None:
        """Raise IncompatibleAdapter unless every module exists in the base with matching shapes."""
        for mod, (a, b) in self.weights.items():
            shape = fp.modules.get(mod)
            if shape is None:
                raise IncompatibleAdapter(
                    f"{name}: target module {mod!r} does not exist in base {fp.label} ({fp.architecture})"
                )
            d_in, d_out = shape[0], shape[1]
            if a.shape[1] != d_in or b.shape[0] != d_out:
                raise IncompatibleAdapter(
                    f"{name}: module {mod!r} maps {a.shape[1]} -> {b.shape[0]} features but the base's "
                    f"layer maps {d_in} -> {d_out}"
                )

    def to(self, dtype=None, device=None) -> "Adapter":
        return Adapter(self.spec, {m: (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
                                   for m, (a, b) in self.weights.items()})

    def spec_json(self) -> str:
        return json.dumps(self.spec.model_dump(mode="json"), sort_keys=True)


def format_validation_error(exc: ValidationError, names: Mapping[str, str] | None = None) -> str:
    """Pydantic errors as `field: message; field: message` (no URL), fields renamed through `names`."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        if loc:
            loc[0] = (names or {}).get(loc[0], loc[0])
        where = ".".join(loc) or "value"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown setting"
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            msg = f"{msg} (got {err['input']!r})"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
