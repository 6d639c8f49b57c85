"""Catalog[T]: name -> (config class, factory). Every pluggable method registers here.

Components are named by string (in the CLI, in stream specs, in stored records) and resolved through a
Catalog, never by if/elif on names. A catalog knows the modules that register into it and imports them
on first lookup, so importing a catalog costs nothing and the CLI stays fast:

    ROUTERS = Catalog("router", modules=["loraplex.router.token_gate", ...])

    @ROUTERS.register("token-gate", TokenGateConfig, summary="MeteoRA token gating")
    class TokenGateRouter: ...

    router = ROUTERS.build("token-gate", {"top_k": 2}, d_model=384, n_experts=8)
"""

from __future__ import annotations

import importlib
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from pydantic import BaseModel, field_validator

from loraplex.errors import IntegrityError, InvalidSpec, UnknownComponent

T = TypeVar("T")

# Upper bounds of the integer options (a count past int32 or a step count past these is a typo, and a Python
# int past sys.maxsize used to reach islice or torch and end in a traceback). Every `int` option field with
# a lower bound takes one of these as its upper bound.
MAX_COUNT = 2**31 - 1  # rows, examples, candidates, top-k, lengths, budgets
MAX_STEPS = 10_000_000  # optimisation steps (weeks of training on a CPU at 0.5 s a step)
MAX_BATCH = 65_536  # rows per batch
MAX_LR = 10.0  # learning rates: Adam past this only diverges (1e300 overflowed float32 in the first step)
MIN_TEMPERATURE = 1e-3  # softmax temperatures: scores (cosines, logits) divided by less overflowed float32
# (1e-45 gave NaN gates, answered as if routed; sweep 22) and a softmax that sharp is an argmax anyway
MAX_TEMPERATURE = 1e3
MAX_WEIGHT = 1e6  # loss weights and ratios: 1e300 overflowed a loss to inf at the first step (a stream diverged)
MAX_SCALE = 1e3  # multipliers of a sampled or generated quantity (1e308 stored a generator whose every adapter was NaN)
MAX_CHARS_PER_TOKEN = 64
"""A text is cut to `tokens * MAX_CHARS_PER_TOKEN` characters before a tokenizer that keeps only its first
`tokens` tokens sees it (`clip_text`): fast tokenizers read the whole text before truncating, so one 60 MB
row was tokenized again at every batch holding it (a stream ran past 5 minutes; sweep 18). Ordinary text
averages a few characters a token, so what the model reads is unchanged; a row whose first tokens average
more than 64 characters (long URLs or hashes, each one WordPiece [UNK]; long runs of whitespace) may now
be read as fewer tokens."""


def clip_text(text: str, tokens: int) -> str:
    """`text` cut to what a tokenizer keeping `tokens` tokens could read of it (MAX_CHARS_PER_TOKEN)."""
    limit = max(1, int(tokens)) * MAX_CHARS_PER_TOKEN
    return text if len(text) <= limit else text[:limit]


def bounded_ids(encode: Callable[[str], list[int]], text: str, limit: int) -> tuple[list[int] | None, int]:
    """(encode(text), its length) where that is at most `limit` tokens, else (None, a count over `limit` that
    the text has at least), without tokenizing the whole of a long text: a fast tokenizer takes about 0.7 KB a
    token, so one 32 MB prompt (16M tokens, 11 GB) took a server down before its length was checked (sweep 27).

    A text of more than 4 characters a token's worth is counted in consecutive pieces of that size, each
    tokenized alone (so no more than one piece's tokens exist at once), until their sum is over the limit;
    a text that stays within it is then tokenized whole, for its exact ids. A piece ends before the last
    character that is not a letter or digit in its last 256 characters (tokenizers split words there, so the
    pieces' tokens are the text's, give or take one a piece, which the sum takes off), or else after the word it
    ends in where that word ends within 256 characters; a piece of a word longer than that on both sides is
    cut inside it and its count taken 8 lower. No character count alone refuses a text (a short
    text padded with 40,000 spaces is 5 tokens), and a word cut short is not counted as its pieces (WordPiece
    reads a word over 100 characters as one [UNK], its first 99 as dozens of pieces: sweep 29). A piece it reads
    nothing of is not tokenized again: it stands as what the tokenizer says its characters do between two words
    (a word break: a space; nothing: nothing; else the piece itself)."""
    limit = max(0, int(limit))
    size = (limit + 1) * 4
    if len(text) > size:
        special = len(encode(""))  # what encode adds to every piece ([CLS] and [SEP], a BOS)
        total, start, kept = special, 0, []
        stand_in: dict[frozenset, str] = {}  # a silent piece's characters -> what stands for it (see below)
        while start < len(text):
            end, slack = min(len(text), start + size), 0
            if end < len(text):
                back = next((k for k in range(end - 1, max(start, end - 256), -1) if not text[k].isalnum()), None)
                ahead = next((k for k in range(end, min(len(text), end + 256)) if not text[k].isalnum()),
                             len(text) if len(text) - end < 256 else None)
                # at a word's end: before it (back), or after it (ahead) where the piece ends inside a long word
                # whose rest is short; else inside a word long on both sides of the cut (a WordPiece [UNK] both)
                end, slack = (back, 1) if back is not None else (ahead, 1) if ahead is not None else (end, 8)
            piece = text[start:end]
            n = len(encode(piece)) - special
            total += max(0, n - slack)
            if total > limit:
                return None, total
            # a piece the tokenizer reads nothing of (whitespace, control characters: WordPiece drops them) is
            # kept as what it does to its neighbours, a word break or nothing, as the tokenizer says for its set of
            # characters (Python's isspace is not WordPiece's: \x1c or \x85 are dropped, not breaks; sweep 34);
            # else whole: 30 MB of spaces fit a context and were tokenized whole again (14 s; sweep 29)
            if n > 0:
                kept.append(piece)
            else:
                chars = frozenset(piece)
                if chars not in stand_in:
                    probe = encode("a" + "".join(sorted(chars)) + "b")
                    stand_in[chars] = (" " if probe == encode("a b") else "" if probe == encode("ab") else None)
                kept.append(piece if stand_in[chars] is None else stand_in[chars])
            start = end
        text = "".join(kept)
    ids = encode(text)
    return (ids, len(ids)) if len(ids) <= limit else (None, len(ids))


def options(**extra: Any) -> dict[str, Any]:
    """The pydantic `model_config` of every catalog entry's options (and of the other configs a user sets):
    frozen, unknown keys refused, and no NaN or infinity where a number is asked for (`inf` passes a
    `gt=0` bound, NaN passes every bound). `extra` adds settings such as use_attribute_docstrings."""
    return {"frozen": True, "extra": "forbid", "allow_inf_nan": False, **extra}


def _kinds(annotation: Any) -> set:
    """The plain types an annotation admits (`int | None` -> {int, NoneType}); empty when it admits anything
    else too (a model, a Literal, a list: their own rules apply)."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    plain = {a for a in args if a in (int, float, bool, str, type(None))}
    return plain if len(plain) == len(args) else set()


class Options(BaseModel):
    """The base of every options class: `options()` as its config, and no quiet change of kind between a
    yes/no and a number (pydantic's lax mode reads `true` as 1 for a count, and "yes", "1" or 1 as true
    for a switch; `--set shared=yes` and `steps: true` passed). Numbers written as text (YAML reads `1e-3`
    as text) still read as numbers."""

    model_config = options()

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_number_confusion(cls, v: Any, info: Any) -> Any:
        kinds = _kinds(cls.model_fields[info.field_name].annotation)
        if isinstance(v, bool) and kinds & {int, float} and bool not in kinds:
            raise ValueError(f"expected a number, got {str(v).lower()}")
        if kinds and kinds <= {bool, type(None)} and v is not None and not isinstance(v, bool):
            raise ValueError(f"expected true or false, got {v!r}")
        return v


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    config_cls: type | None
    factory: Callable[..., T]
    summary: str

    def make_config(self, config: Any = None) -> Any:
        """Validate `config` (a dict, an instance, or None for defaults) into the entry's config class."""
        if self.config_cls is None:
            if config:
                raise InvalidSpec(f"{self.name} takes no configuration, got {config!r}")
            return None
        if isinstance(config, self.config_cls):
            return config
        from pydantic import ValidationError

        try:
            return self.config_cls(**dict(config or {}))
        except ValidationError as exc:
            raise InvalidSpec(f"invalid configuration for {self.name}: {first_error(exc)}") from None
        except TypeError as exc:
            raise InvalidSpec(f"invalid configuration for {self.name}: {exc}") from None


def first_error(exc: Any) -> str:
    """A pydantic ValidationError's first error as `field: message` (one line); an error of the whole
    config (a model validator's, which names its fields itself) as the message alone."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown key"
    return f"{where}: {msg}" if where else msg


class Catalog(Generic[T]):
    """A named registry of components of one kind (routers, regularizers, generators, ...)."""

    def __init__(self, kind: str, modules: list[str] | tuple[str, ...] = ()):
        self.kind = kind
        self._modules = tuple(modules)
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = False

    def register(
        self, name: str, config_cls: type | None = None, *, summary: str = ""
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries and self._entries[name].factory is not factory:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            doc = (factory.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, config_cls, factory, summary or (doc[0] if doc else ""))
            return factory

        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for mod in self._modules:
                importlib.import_module(mod)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def get(self, name: str) -> Entry[T]:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise UnknownComponent(f"unknown {self.kind} {name!r} (known: {known})") from None

    def stored_config(self, name: str, config: Any, owner: str) -> tuple[Entry[T], Any]:
        """(entry, validated config) of a stored component's record (`owner` names it, e.g. "router 'r'"). A
        stored configuration that no longer validates is the record's damage, not the user's input: an
        IntegrityError naming the component (it read as "invalid configuration ... top_k" with exit 2, and a
        400 from the server; sweep 35). An unknown method stays UnknownComponent."""
        entry = self.get(name)
        try:
            return entry, entry.make_config(config)
        except InvalidSpec as exc:
            raise IntegrityError(f"{owner}: its stored configuration is damaged ({exc}); remove it and fit it "
                                 "again") from None

    def build(self, name: str, config: Any = None, /, **kwargs: Any) -> T:
        entry = self.get(name)
        cfg = entry.make_config(config)
        return entry.factory(cfg, **kwargs) if entry.config_cls is not None else entry.factory(**kwargs)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        self._load()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def summaries(self) -> Mapping[str, str]:
        return {e.name: e.summary for e in self}
