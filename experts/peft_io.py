"""PEFT's directory format in and out: `adapter_config.json` + `adapter_model.safetensors`.

This is loraplex's exchange format: `read_peft_dir` accepts what `peft`'s `save_pretrained` writes (and
what `write_peft_dir` writes), and `write_peft_dir` writes what `peft.PeftModel.from_pretrained` loads.
Neither imports peft (it costs seconds); the format is plain JSON and safetensors:

- tensor keys are `base_model.model.<module>.lora_A.weight` (r, d_in) and `...lora_B.weight` (d_out, r),
  possibly with an adapter name before `.weight` in older files;
- the config's `r`, `lora_alpha`, `rank_pattern`, `alpha_pattern`, `use_rslora`, `target_modules`,
  `lora_dropout` map onto LoraSpec; features loraplex does not implement (DoRA, trained biases,
  modules_to_save heads, embedding LoRA) are refused by name rather than silently dropped.

Only safetensors are ever read. A directory holding only `adapter_model.bin` (a pickle) is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from loraplex.errors import InvalidAdapter
from loraplex.experts.spec import Adapter, LoraSpec

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"
PREFIX = "base_model.model."


def read_peft_dir(path: str | os.PathLike) -> tuple[Adapter, dict[str, Any]]:
    """Read a PEFT LoRA directory. Returns the adapter (module names without PEFT's prefix) and the raw config."""
    d = Path(path)
    if not d.exists():
        raise InvalidAdapter(f"{d}: no such file or directory")
    if not d.is_dir():
        raise InvalidAdapter(f"{d}: not a directory (expected a PEFT adapter directory with {CONFIG} and {WEIGHTS})")
    cfg_path = d / CONFIG
    if not cfg_path.is_file():
        raise InvalidAdapter(f"{d}: no {CONFIG}; not a PEFT adapter directory")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidAdapter(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise InvalidAdapter(f"{cfg_path}: expected a JSON object")
    spec = spec_from_peft_config(cfg, where=str(cfg_path))
    w_path = d / WEIGHTS
    if not w_path.is_file():
        if (d / PICKLE).exists():
            raise InvalidAdapter(
                f"{d}: only {PICKLE} (a pickle) is present; loraplex loads safetensors only "
                f"(re-save it with peft's save_pretrained(..., safe_serialization=True))"
            )
        raise InvalidAdapter(f"{d}: no {WEIGHTS}")
    sd = _load_safetensors(w_path)
    stripped = {}
    for key, t in sd.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if ".lora_embedding_" in k or ".lora_magnitude_vector" in k or k.endswith(".bias"):
            raise InvalidAdapter(f"{w_path}: tensor {key!r} is an unsupported LoRA variant (embedding LoRA, DoRA or bias)")
        stripped[k] = t
    return Adapter.from_state_dict(spec, stripped, where=str(w_path)), cfg


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load

    data = path.read_bytes()
    if len(data) < 8:
        raise InvalidAdapter(f"{path}: truncated safetensors file ({len(data)} bytes)")
    try:
        return load(data)
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        raise InvalidAdapter(f"{path}: corrupt or truncated safetensors file ({msg[0][:160] if msg else type(exc).__name__})") from None


def spec_from_peft_config(cfg: dict[str, Any], *, where: str = CONFIG) -> LoraSpec:
    """LoraSpec from a PEFT LoraConfig dict, refusing what loraplex does not implement."""
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise InvalidAdapter(f"{where}: peft_type {ptype!r} is not LoRA")
    if cfg.get("use_dora"):
        raise InvalidAdapter(f"{where}: DoRA adapters (use_dora) are not supported")
    if cfg.get("modules_to_save"):
        raise InvalidAdapter(
            f"{where}: modules_to_save {cfg['modules_to_save']} (fully trained layers such as a task head) "
            "are not supported; loraplex stores LoRA weights only"
        )
    if cfg.get("bias", "none") not in ("none", None) or cfg.get("lora_bias"):
        raise InvalidAdapter(f"{where}: trained biases (bias={cfg.get('bias')!r}) are not supported")
    targets = cfg.get("target_modules") or ()
    if isinstance(targets, str):
        targets = ()  # a regex: the tensors themselves say which modules are adapted
    try:
        return LoraSpec(
            r=int(cfg.get("r", 8)),
            alpha=float(cfg.get("lora_alpha", cfg.get("r", 8))),
            dropout=float(cfg.get("lora_dropout") or 0.0),
            target_modules=tuple(targets),
            rank_pattern={k: int(v) for k, v in (cfg.get("rank_pattern") or {}).items()},
            alpha_pattern={k: float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()},
            use_rslora=bool(cfg.get("use_rslora", False)),
        )
    except Exception as exc:  # pydantic ValidationError, ValueError, TypeError
        first = str(exc).strip().splitlines()
        raise InvalidAdapter(f"{where}: invalid LoRA settings ({first[-1] if first else exc})") from None


def compact_targets(modules: list[str], all_linear: list[str]) -> list[str]:
    """The shortest PEFT target list that selects exactly `modules` among the base's `all_linear`.

    Each module is named by its shortest name suffix (last component, then two, ...) that selects no
    module outside the set; PEFT matches a list entry as "name == entry or name ends with '.' + entry".
    """
    wanted = set(modules)
    out: set[str] = set()
    for m in modules:
        parts = m.split(".")
        for depth in range(1, len(parts) + 1):
            suffix = ".".join(parts[-depth:])
            if {n for n in all_linear if n == suffix or n.endswith("." + suffix)} <= wanted:
                out.add(suffix)
                break
    return sorted(out)


PEFT_TASK_TYPES = {"causal": "CAUSAL_LM", "encoder": "FEATURE_EXTRACTION"}
"""The PEFT `task_type` of a base family: what makes peft's Auto classes (`AutoPeftModelForCausalLM`,
`AutoPeftModelForFeatureExtraction`) load an export."""


def peft_config(
    adapter: Adapter, *, base_model_name_or_path: str | None, all_linear: list[str], fan_in_fan_out: bool,
    family: str | None = None,
) -> dict[str, Any]:
    """A LoraConfig dict that makes PEFT rebuild exactly this adapter's modules, ranks and scalings;
    `family` (the base's: causal or encoder) sets the `task_type` peft's Auto classes read."""
    modules = adapter.modules
    ranks = {m: adapter.rank(m) for m in modules}
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    alphas = {m: adapter.spec.alpha_for(m) for m in modules}
    alpha = adapter.spec.alpha
    return {
        "peft_type": "LORA",
        "task_type": PEFT_TASK_TYPES.get(family or ""),
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": adapter.spec.dropout,
        "target_modules": compact_targets(modules, all_linear),
        "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha},
        "use_rslora": adapter.spec.use_rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
    }


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_peft_dir(adapter: Adapter, out_dir: str | os.PathLike, config: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` atomically (a temp dir, then renames)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidAdapter(f"{out}: exists and is not a directory")
    if out.is_dir() and ((out / CONFIG).exists() or (out / WEIGHTS).exists()) and not overwrite:
        raise InvalidAdapter(f"{out}: already holds an adapter (pass --overwrite to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".loraplex-export-", dir=out))
    try:
        sd = {PREFIX + k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        mode = 0o666 & ~_umask()  # what a plain open() would give: safetensors writes 0600
        for name in (WEIGHTS, CONFIG):
            os.chmod(tmp / name, mode)
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
