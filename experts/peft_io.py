"""PEFT's directory format in and out: `adapter_config.json` + `adapter_model.safetensors`.

This is loraplex's exchange format: `read_peft_dir` accepts what `peft`'s `save_pretrained` writes (and
what `write_peft_dir` writes), and `write_peft_dir` writes what `peft.PeftModel.from_pretrained` loads.
Neither imports peft (it costs seconds); the format is plain JSON and safetensors:

- tensor keys are `base_model.model.<module>.lora_A.weight` (r, d_in) and `...lora_B.weight` (d_out, r),
  possibly with an adapter name before `.weight` in older files;
- the config's `r`, `lora_alpha`, `rank_pattern`, `alpha_pattern`, `use_rslora`, `target_modules`,
  `lora_dropout` map onto LoraSpec; features loraplex does not implement (DoRA, trained biases,
  modules_to_save heads, embedding LoRA, layer replication, QA-LoRA, target_parameters, trainable
  tokens, exclude_modules, base-changing initialisations such as PiSSA) are refused by name rather
  than silently dropped, and so is a target_modules entry that matches no adapted module.

Only safetensors are ever read. A directory holding only `adapter_model.bin` (a pickle) is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import ValidationError

from loraplex.errors import InvalidAdapter
from loraplex.experts.spec import Adapter, LoraSpec, bounded_match, check_regex, format_validation_error, matches_target
from loraplex.fsio import atomic_write, missing_dirs, read_json_file, remove_if_empty, user_path, write_tensors

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"
PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1 << 20


def read_peft_dir(path: str | os.PathLike) -> tuple[Adapter, dict[str, Any]]:
    """Read a PEFT LoRA directory. Returns the adapter (module names without PEFT's prefix) and the raw config."""
    d = user_path(path)  # "~/peft" is the home folder, as every other path loraplex reads
    if not _exists(d):
        raise InvalidAdapter(f"{d}: no such file or directory")
    if not d.is_dir():
        raise InvalidAdapter(f"{d}: not a directory (expected a PEFT adapter directory with {CONFIG} and {WEIGHTS})")
    cfg_path = d / CONFIG
    if not _exists(cfg_path):
        raise InvalidAdapter(f"{d}: no {CONFIG}; not a PEFT adapter directory")
    cfg = read_json_file(cfg_path, error=InvalidAdapter, max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(cfg, dict):
        raise InvalidAdapter(f"{cfg_path}: expected a JSON object")
    spec = spec_from_peft_config(cfg, where=str(cfg_path))
    w_path = d / WEIGHTS
    if _exists(w_path) and not w_path.is_file():
        raise InvalidAdapter(f"{w_path}: {'a directory' if w_path.is_dir() else 'not a regular file'}, not a safetensors file")
    if not w_path.is_file():
        if _exists(d / PICKLE):
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
        if k in stripped:  # `base_model.model.X...` and `X...` both present
            raise InvalidAdapter(f"{w_path}: tensor {k!r} is stored twice (with and without {PREFIX!r})")
        stripped[k] = t
    adapter = Adapter.from_state_dict(spec, stripped, where=str(w_path))
    check_targets_used(adapter, cfg, where=str(cfg_path))
    return Adapter(resolved_patterns(adapter.spec, adapter.modules), adapter.weights), cfg


def _exists(p: Path) -> bool:
    """Whether a path of the adapter directory exists; a path that cannot be looked up (a loop of symbolic
    links, a name too long, a path through a file) is refused naming why: `Path.exists()` reads a link loop
    as missing, and "no adapter_config.json" named the wrong problem for a file `ls` shows (sweep 64)."""
    try:
        os.stat(p)
        return True
    except FileNotFoundError:
        if os.path.islink(p):  # a link whose target is gone: said as such, not as no file (sweep 66)
            raise InvalidAdapter(f"{p}: a symbolic link to {os.readlink(p)!r}, which does not exist") from None
        return False
    except OSError as exc:
        shown = str(p) if len(str(p)) <= 120 else str(p)[:117] + "..."
        raise InvalidAdapter(f"{shown}: {exc.strerror or exc}") from None


MAX_HEADER_BYTES = 100 << 20
"""safetensors' own bound on a file's JSON header."""


def _checked_header(path: Path) -> None:
    """The 8-byte length and the JSON header of a safetensors file read first, and the file refused unless
    its tensors' byte ranges end exactly at its end: the whole file was read into memory before its first
    bytes were looked at (a 3 GB file of zeros took 3.4 GB and 40 s to be called corrupt, and a larger one
    would have had the process killed for memory: sweep 64)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = f.read(n) if 0 < n <= min(MAX_HEADER_BYTES, size - 8) else b""
    except OSError as exc:
        raise InvalidAdapter(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(head) < 8:
        raise InvalidAdapter(f"{path}: truncated safetensors file ({size} bytes)")
    if not raw:
        raise InvalidAdapter(f"{path}: corrupt or truncated safetensors file (its header claims {n:,} bytes of a "
                             f"{size:,}-byte file)")
    try:
        header = json.loads(raw)
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if not all(type(e) is int and e >= 0 for e in ends):  # Infinity, 1e400, "12": no byte offset
            raise ValueError("data_offsets")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError):
        raise InvalidAdapter(f"{path}: corrupt or truncated safetensors file (its header is not a safetensors "
                             "header)") from None
    if 8 + n + max(ends, default=0) != size:
        raise InvalidAdapter(f"{path}: corrupt or truncated safetensors file ({size:,} bytes, where its header "
                             f"accounts for {8 + n + max(ends, default=0):,})")


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load

    _checked_header(path)
    data = path.read_bytes()
    try:
        return load(data)
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        raise InvalidAdapter(f"{path}: corrupt or truncated safetensors file ({msg[0][:160] if msg else type(exc).__name__})") from None


# PEFT LoraConfig keys that change what the adapter computes and that loraplex does not implement: an
# adapter using them is refused by name, never imported with the feature silently dropped.
UNSUPPORTED = {
    "layer_replication": "layer replication (layer_replication)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "exclude_modules": "excluded modules (exclude_modules)",
}
# LoraConfig keys whose value is read above or below, or that never change what the saved weights compute
# (bookkeeping, how a fresh LoRA starts, training-only memory savers, which layers got tensors). Any other key
# holding a value (not null, false, empty) is refused by name: a newer PEFT's variant (aLoRA's invocation tokens,
# KaSA, Arrow, MonteCLoRA, BD-LoRA, Megatron layers...) is never imported with its mechanism dropped.
KNOWN_KEYS = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "bias",
    "lora_bias", "use_dora", "modules_to_save", "init_lora_weights", "fan_in_fan_out", "layers_to_transform",
    "layers_pattern", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "velora_config",
    "megatron_core", "qalora_group_size", "runtime_config", "ensure_weight_tying", *UNSUPPORTED,
})
# init_lora_weights values that only set how a fresh LoRA starts (the saved weights are all there is; PEFT's
# docs: "orthogonal" leaves the base weights untouched, MiCA sets B from the base's singular vectors and A to
# zero, and computes a plain LoRA); pissa, olora, loftq and corda also rewrite the base weights, which loraplex
# does not store.
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "mica")
BASE_REWRITING_INITS = ("pissa", "olora", "loftq", "corda")
# What PEFT's LoraConfig takes when a config leaves lora_alpha out (or null): 8, whatever r is. (Not r:
# an adapter read with alpha = r would scale its update differently from the same directory in PEFT.)
PEFT_DEFAULT_ALPHA = 8
# LoraSpec field -> the PEFT key it comes from (for error messages).
PEFT_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


# bookkeeping keys loraplex does not read still have PEFT's types (a string where a flag goes is a broken file)
BOOKKEEPING_TYPES = (
    ("fan_in_fan_out", bool, "true or false"),
    ("inference_mode", bool, "true or false"),
    ("layers_to_transform", (int, list), "a layer index or a list of them"),
    ("layers_pattern", (str, list), "a module name or a list of them"),
    # the base it names is checked against the one it is registered on: a number here was refused as an unknown
    # base by the CLI and passed unread by the server's load endpoint (sweep 64 F7)
    ("base_model_name_or_path", str, "a model name or directory (a string)"),
    ("revision", str, "a string"),
)


def _unset(v: Any) -> bool:
    """A config value that asks for nothing: null, false, or an empty list, object or string (0 is a value)."""
    return v is None or v is False or (isinstance(v, (list, dict, str)) and not v)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def spec_from_peft_config(cfg: dict[str, Any], *, where: str = CONFIG) -> LoraSpec:
    """LoraSpec from a PEFT LoraConfig dict, refusing what loraplex does not implement.

    Values are taken as they are (strict types: `r: 4.7` or `use_rslora: "false"` is an error, not
    a truncation or a truthy string); the rules themselves live on LoraSpec."""
    ptype = cfg.get("peft_type", "LORA")
    if not isinstance(ptype, str) or ptype.upper() != "LORA":
        raise InvalidAdapter(f"{where}: peft_type {ptype!r} is not LoRA")
    if cfg.get("use_dora"):
        raise InvalidAdapter(f"{where}: DoRA adapters (use_dora) are not supported")
    if cfg.get("modules_to_save"):
        raise InvalidAdapter(
            f"{where}: modules_to_save {cfg['modules_to_save']} (fully trained layers such as a task head) "
            "are not supported; loraplex stores LoRA weights only"
        )
    if cfg.get("bias") not in ("none", "all", "lora_only", None):  # `false` asks for no bias, but is not PEFT's word
        raise InvalidAdapter(f"{where}: bias: expected one of PEFT's \"none\", \"all\", \"lora_only\", got {_short(cfg['bias'])}")
    if cfg.get("bias", "none") not in ("none", None):
        raise InvalidAdapter(f"{where}: trained biases (bias={cfg.get('bias')!r}) are not supported")
    if not _unset(cfg.get("lora_bias")):
        raise InvalidAdapter(f"{where}: lora_bias: a bias on LoRA's B matrix (lora_bias={_short(cfg['lora_bias'])}) "
                             "is not supported")
    for key, what in UNSUPPORTED.items():
        v = cfg.get(key)
        if not _unset(v):
            raise InvalidAdapter(f"{where}: {key}: {what} is not supported by loraplex (got {v!r})")
    for key, types, expected in BOOKKEEPING_TYPES:
        if cfg.get(key) is not None and not isinstance(cfg[key], types):
            raise InvalidAdapter(f"{where}: {key}: expected {expected}, got {_short(cfg[key])}")
    if isinstance(cfg.get("target_modules"), str):  # a regex names no layer index: PEFT refuses layers_pattern with
        # one, and ignores layers_to_transform (older versions refuse it): a config asking for some layers whose
        # tensors may hold others is refused, not read as every layer (sweep 64)
        for key in ("layers_pattern", "layers_to_transform"):
            if cfg.get(key) is not None:
                raise InvalidAdapter(f"{where}: {key}: cannot be used with a regular-expression target_modules "
                                     "(PEFT refuses or ignores it); list the adapted modules instead")
    if cfg.get("layers_pattern") and cfg.get("layers_to_transform") is None:
        raise InvalidAdapter(f"{where}: layers_pattern: {_short(cfg['layers_pattern'])} is set without "
                             "layers_to_transform (PEFT refuses this config)")
    layers = cfg.get("layers_to_transform")
    if layers is not None and not all(type(i) is int and i >= 0 for i in (layers if isinstance(layers, list) else [layers])):
        raise InvalidAdapter(f"{where}: layers_to_transform: expected layer indices (integers >= 0), got {_short(layers)}")
    for key in sorted(set(cfg) - KNOWN_KEYS):
        if not _unset(cfg[key]):
            raise InvalidAdapter(f"{where}: {key}: a PEFT setting loraplex does not implement (got {_short(cfg[key])}); "
                                 "it is refused rather than dropped, since it may change what the adapter computes")
    init = cfg.get("init_lora_weights", True)
    if not any(init is p or (isinstance(p, str) and init == p) for p in PLAIN_INITS):
        rewrites = isinstance(init, str) and init.startswith(BASE_REWRITING_INITS)
        raise InvalidAdapter(
            f"{where}: init_lora_weights: {init!r} is not supported ("
            + ("it changes the base model's weights, which loraplex does not store" if rewrites else
               "an initialisation loraplex does not know to leave the base model's weights as they are")
            + "); true, false, \"gaussian\", \"orthogonal\" and \"mica\" are"
        )
    targets = cfg.get("target_modules")
    if targets is None:  # PEFT fills in its default for the model type (BERT: query, value) and loads only those
        raise InvalidAdapter(f"{where}: target_modules: not set; PEFT would then adapt its default modules for the "
                             "model type and load only their tensors, which loraplex does not guess: list the "
                             "adapted modules in target_modules")
    if isinstance(targets, str):
        try:
            check_regex(targets)
        except (re.error, ValueError) as exc:
            raise InvalidAdapter(f"{where}: target_modules: {targets!r} is not a valid regular expression ({exc})") from None
        targets = ()  # a regex: the tensors themselves say which modules are adapted
    elif isinstance(targets, list) and all(isinstance(t, str) and t for t in targets):
        targets = tuple(targets)
    elif isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        raise InvalidAdapter(f"{where}: target_modules: entry {targets.index('')} is an empty module name")
    else:
        raise InvalidAdapter(f"{where}: target_modules: expected a list of module names or a regex string, "
                             f"got {type(targets).__name__}")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise InvalidAdapter(f"{where}: {key}: expected an object of pattern -> value, got {type(cfg[key]).__name__}")
    r = cfg.get("r", 8)
    fields = {
        "r": r,
        "alpha": cfg["lora_alpha"] if cfg.get("lora_alpha") is not None else PEFT_DEFAULT_ALPHA,
        "dropout": cfg["lora_dropout"] if cfg.get("lora_dropout") is not None else 0.0,
        "target_modules": targets,
        "rank_pattern": cfg.get("rank_pattern") or {},
        "alpha_pattern": cfg.get("alpha_pattern") or {},
        "use_rslora": cfg["use_rslora"] if cfg.get("use_rslora") is not None else False,
    }
    try:
        return LoraSpec(**fields)
    except ValidationError as exc:
        raise InvalidAdapter(f"{where}: invalid LoRA settings: {format_validation_error(exc, PEFT_NAMES)}") from None


def check_targets_used(adapter: Adapter, cfg: dict[str, Any], *, where: str = CONFIG) -> None:
    """target_modules and the tensors must agree both ways. Every entry of a list must select at least
    one of the adapter's modules (PEFT creates tensors for every module a target matches: a target
    without tensors matched nothing), and every module with tensors must be selected by an entry (or by
    the regex, matched whole): PEFT builds LoRA layers only where target_modules says and leaves other
    tensors unloaded, so importing them would make an adapter that computes something else than the
    same directory does in PEFT."""
    targets = cfg.get("target_modules")
    _check_layers(adapter, cfg, where)
    if isinstance(targets, list):
        unused = [t for t in targets if not any(matches_target(m, t) for m in adapter.modules)]
        if unused:
            raise InvalidAdapter(f"{where}: target_modules: {unused[0]!r} matches no module of the adapter "
                                 f"(adapted modules: {', '.join(adapter.modules[:4])}{', ...' if len(adapter.modules) > 4 else ''})")
        selects = lambda m: any(matches_target(m, t) for t in targets)  # noqa: E731
    elif isinstance(targets, str):
        selects = lambda m: bounded_match(targets, m, full=True, what="target_modules") is not None  # noqa: E731
    else:
        return
    extra = [m for m in adapter.modules if not selects(m)]
    if extra:
        raise InvalidAdapter(f"{where}: target_modules {_short(targets)} does not select {extra[0]!r}, which has LoRA "
                             f"tensors{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}: PEFT would not load "
                             "them; name every adapted module in target_modules, or remove their tensors")


def _check_layers(adapter: Adapter, cfg: dict[str, Any], where: str) -> None:
    """With layers_to_transform and a target_modules list, PEFT adapts a module only in those layers: the
    layer index is the number after a layers_pattern name in the module's path (without a pattern, the
    first `<name>.<number>.` in it), and a module named in full in target_modules is exempt. Tensors of
    any other module would not be loaded by PEFT, so they are refused here."""
    layers, targets = cfg.get("layers_to_transform"), cfg.get("target_modules")
    if layers is None or layers == [] or not isinstance(targets, list):
        return
    wanted = {layers} if isinstance(layers, int) else set(layers)
    pattern = cfg.get("layers_pattern")
    pattern = [pattern] if isinstance(pattern, str) and pattern else (pattern or [])
    try:
        # as PEFT reads a module's layer: the first numbered segment, after the pattern at the start or after a dot
        # the layer's digits in a named group, as PEFT names them: a pattern's own group is not the index (sweep 66)
        finders = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in pattern] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
        for f in finders:
            check_regex(f)
    except (re.error, ValueError) as exc:
        raise InvalidAdapter(f"{where}: layers_pattern: {_short(cfg['layers_pattern'])} is not a valid regular "
                             f"expression ({exc})") from None
    for m in adapter.modules:
        if m in targets:
            continue
        hit = next((h for h in (bounded_match(f, m, what="layers_pattern") for f in finders) if h is not None), None)
        if hit is None or int(hit.group("idx")) not in wanted:
            raise InvalidAdapter(f"{where}: layers_to_transform {_short(layers)} does not include {m!r}, which has "
                                 "LoRA tensors: PEFT would not load them; list its layer, or remove its tensors")


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


STAGING = ".loraplex-export-"
"""The prefix of an export's staging directory inside the target (then the process id and a random part)."""


STALE_STAGING_S = 3600
"""A staging directory without a process id in its name (an older loraplex's) is stale after this long."""


def _remove_stale_staging(out: Path) -> None:
    """Remove the staging directories of exports into `out` that were killed (SIGKILL, a lost machine) before
    they could clean up: a later export left a hidden half-written file in the adapter's directory for ever
    (sweep 67). One is stale when the process its name records no longer runs on this machine (a target
    shared with other machines: one of theirs still running could be taken for stale); one of another export
    still running here is left alone."""
    for d in out.glob(STAGING + "*"):
        if not d.is_dir() or d.is_symlink():
            continue
        head, _, rest = d.name[len(STAGING):].partition("-")
        if not (head.isdigit() and rest):  # named before the process id was (a random part only): stale once no
            try:                           # export could still be writing it, an hour on (sweep 70)
                if time.time() - d.stat().st_mtime > STALE_STAGING_S:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass
            continue
        try:
            os.kill(int(head), 0)
            continue  # a running process (possibly another export into this directory)
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, ValueError):
            continue  # another user's process, or not a process id
        shutil.rmtree(d, ignore_errors=True)


def write_peft_dir(adapter: Adapter, out_dir: str | os.PathLike, config: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` atomically (a temp dir, then renames); on a
    failure (a full disk) the directory is left as it was, and removed again if this call made it."""
    if not str(out_dir).strip():
        raise InvalidAdapter("the export directory is empty: name a directory")
    out = user_path(out_dir)  # "~/out" is the home folder, not a folder named "~"
    if out.exists() and not out.is_dir():
        raise InvalidAdapter(f"{out}: exists and is not a directory")
    for name in (CONFIG, WEIGHTS):  # replaced by a rename, which cannot replace a directory: refuse before writing
        if (out / name).is_dir() or ((out / name).exists() and not (out / name).is_file()):
            raise InvalidAdapter(f"{out / name}: is not a regular file; move it away first")
    if out.is_dir() and ((out / CONFIG).exists() or (out / WEIGHTS).exists()) and not overwrite:
        raise InvalidAdapter(f"{out}: already holds an adapter (pass --overwrite to replace it)")
    made = missing_dirs(out)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-", dir=out))
    done = False
    try:
        sd = {PREFIX + k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
        write_tensors(tmp / WEIGHTS, sd, metadata={"format": "pt"})
        atomic_write(tmp / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in (WEIGHTS, CONFIG):  # written with the mode a plain open() gives (fsio.atomic_file)
            os.replace(tmp / name, out / name)
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done:  # an export that failed leaves no empty directory behind
            remove_if_empty(made)
    return out


def resolved_patterns(spec: LoraSpec, names: Sequence[str], rename: Callable[[str], str] = lambda n: n) -> LoraSpec:
    """`spec` with its rank_pattern and alpha_pattern replaced by each module's own value (where it is not r or
    lora_alpha), keyed by its exact (escaped) name, `rename`d. PEFT takes the first key that matches a module,
    in the file's order; the registry stores a spec with sorted keys, so overlapping keys (`query` and
    `layer\.0\..*`) gave a module another alpha than PEFT's (sweep 28). Resolved when the directory is read,
    nothing depends on the keys' order or on the names they were written for."""
    if not (spec.rank_pattern or spec.alpha_pattern):
        return spec
    return spec.model_copy(update={
        "rank_pattern": {re.escape(rename(n)): spec.rank_for(n) for n in names if spec.rank_for(n) != spec.r},
        "alpha_pattern": {re.escape(rename(n)): spec.alpha_for(n) for n in names if spec.alpha_for(n) != spec.alpha},
    })


def align_modules(adapter: Adapter, base_modules) -> Adapter:
    """Map an adapter's module names onto the base's when they differ by a leading component.

    PEFT names modules relative to the model it wrapped: an adapter trained on `BertForSequenceClassification`
    says `bert.encoder...` where the bare `BertModel` has `encoder...`, and one trained on `LlamaModel`
    lacks the `model.` that `LlamaForCausalLM` has. Exact names win; otherwise one leading component is
    dropped or the base's common first component is added, if that makes every name fit.
    `base_modules`: the base's module names (`Fingerprint.modules`). Returns the adapter renamed, or
    unchanged when no mapping fits every name (`Adapter.check_fits` then says which one does not).
    """
    names = adapter.modules
    if all(n in base_modules for n in names):
        return adapter
    candidates = []
    firsts = {n.split(".", 1)[0] for n in names if "." in n}
    if len(firsts) == 1:
        p = firsts.pop() + "."
        candidates.append(lambda n, p=p: n[len(p):] if n.startswith(p) else n)
    base_firsts = {n.split(".", 1)[0] for n in base_modules if "." in n}
    for p in sorted(base_firsts):
        candidates.append(lambda n, p=p: f"{p}.{n}")
    for f in candidates:
        mapped = {f(n): w for n, w in adapter.weights.items()}
        if len(mapped) == len(names) and all(m in base_modules for m in mapped):
            # each module's rank and alpha resolved under the names the patterns were written for, kept under its
            # new name (a regex key such as `bert\.encoder\.layer\.0\..*` matched nothing once renamed: sweep 28)
            return Adapter(resolved_patterns(adapter.spec, names, f), mapped)
    return adapter
