"""The task type: a name, a description, a label set and fixed splits of `Example(text, label)`.

`loraplex.data` finds tasks (embedded, the task library, user files); this module is what they are,
and how rows are cut into deterministic splits: ordered by a hash of (seed, text, label) and cut 80/10/10.
It imports nothing of the package but its errors, so every part may use it.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple, Sequence

from loraplex.errors import TaskNotFound, UserInputError


def changed_from_card(card: dict | None, task: "Task") -> tuple[str, str] | None:
    """How `task`, as its file reads now, differs from `card`, what an adapter recorded of it when trained:
    ("labels", "neg, pos -> bad, good"), ("label texts", "label 'good': 'good' -> 'great'"), or None (the
    same, or a card with no label set). One rule for answering (`Registry.answering_task`), the refusals
    of eval and router fit (`Registry.check_learned_labels`) and icm-lora's examples."""
    if not isinstance(card, dict):
        return None
    learned = [str(x) for x in card.get("labels") or ()]
    if len(learned) >= 2 and set(learned) != set(task.labels):
        return "labels", f"{', '.join(sorted(learned))} -> {', '.join(sorted(task.labels))}"
    texts = card.get("label_texts")
    if isinstance(texts, dict):  # an encoder answers by the label texts' anchors
        odd = next((lab for lab in task.labels if texts.get(lab, lab) != task.label_text(lab)), None)
        if odd is not None:
            return "label texts", f"label {odd!r}: {texts.get(odd, odd)[:60]!r} -> {task.label_text(odd)[:60]!r}"
    return None


class Example(NamedTuple):
    text: str
    label: str


class FrozenMap(dict):
    """A dict that cannot be changed: a Task's `label_texts` and `spelled`. Tasks are cached and shared (the
    embedded ones per process, a registry's per record), so a change made through one returned model reached
    every later call and was recorded by the next training (sweep 26). Make another Task instead
    (`dataclasses.replace(task, label_texts={...})`)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a task's label texts cannot be changed in place: make another Task "
                        "(dataclasses.replace(task, label_texts={...}))")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):
        return FrozenMap, (dict(self),)


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    labels: tuple[str, ...]
    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]
    label_texts: dict[str, str] = field(default_factory=dict)
    source: str = "embedded"
    """`embedded` or the absolute path of the task file: `ref` reloads the task from it."""
    family: str = "user"
    """The task library family an embedded task belongs to (`loraplex.library.FAMILIES`); `user` for files."""
    no_rows: str = field(default="", compare=False)
    """Why a task made from a record's card has no rows (`data.card_task`), said when its rows are asked for."""
    spelled: dict[str, str] = field(default_factory=dict, compare=False)
    """A query's own spelling of labels it named in another case than this task's (`router.model.labels_task`):
    the model reads the task's labels, the answer gives the query's (`answer_label`)."""

    def __post_init__(self):
        for name in ("label_texts", "spelled"):
            if not isinstance(getattr(self, name), FrozenMap):
                object.__setattr__(self, name, FrozenMap(getattr(self, name)))

    def answer_label(self, label: str) -> str:
        """How `label` is answered: in the query's spelling where it named the label in another case."""
        return self.spelled.get(label, label)

    @property
    def ref(self) -> str:
        """What `load_task` takes to load this task again (stored in adapter records)."""
        return self.name if self.source == "embedded" else self.source

    def label_text(self, label: str) -> str:
        return self.label_texts.get(label, label)

    def label_index(self, label: str) -> int:
        return self.labels.index(label)

    def split(self, name: str) -> tuple[Example, ...]:
        if name not in ("train", "validation", "test"):
            raise ValueError(f"unknown split {name!r}")
        if not (self.train or self.validation or self.test):
            why = self.no_rows or ("the task file is gone or no longer loads, or there never was one (its labels "
                                   "and description are still on record)")
            raise TaskNotFound(f"{self.source}: task {self.name!r} has no {name} rows: {why}")
        return getattr(self, name)

    def conflicts(self) -> dict[str, tuple[str, ...]]:
        """Texts that appear with more than one label (across the splits), and their labels: no model can
        answer both, and one may be trained on while the other is tested."""
        seen: dict[str, set[str]] = {}
        for e in (*self.train, *self.validation, *self.test):
            seen.setdefault(e.text, set()).add(e.label)
        return {t: tuple(sorted(ls)) for t, ls in seen.items() if len(ls) > 1}

    def card(self) -> dict:
        """What an adapter record keeps of its task so the task can be used again without the file's
        sidecar or the `--description` it was trained with: name, description, labels, label texts."""
        return {"name": self.name, "description": self.description, "labels": list(self.labels),
                "label_texts": dict(self.label_texts)}

    def summary(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "labels": list(self.labels),
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test),
            "source": self.source,
            "family": self.family,
        }


# ---------------------------------------------------------------------------------------------
# splitting


def _order_key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\x00{text}".encode("utf-8", "surrogatepass")).hexdigest()


def split_examples(
    examples: Iterable[Example], *, seed: int = 0, max_val: int | None = None, max_test: int | None = None
) -> tuple[tuple[Example, ...], tuple[Example, ...], tuple[Example, ...]]:
    rows = sorted(examples, key=lambda e: _order_key(seed, e.text + "\x00" + e.label))
    n = len(rows)
    n_test = max(1, n // 10) if n >= 3 else 0
    n_val = max(1, n // 10) if n >= 3 else 0
    if max_test is not None:
        n_test = min(n_test, max_test)
    if max_val is not None:
        n_val = min(n_val, max_val)
    test = tuple(rows[:n_test])
    val = tuple(rows[n_test : n_test + n_val])
    train = tuple(rows[n_test + n_val :])
    return train, val, test


# ---------------------------------------------------------------------------------------------
# descriptions

MAX_DESCRIPTION = 10_000


BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
"""Unicode's embeddings, overrides and isolates: invisible, and they reorder the text shown after them."""


_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))}
_ESCAPES.update({ord(c): f"\\u{ord(c):04x}" for c in BIDI_CONTROLS})
_ESCAPES.update({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"})


def printable(text: str) -> str:
    """`text` with every control character (C0, DEL, C1) and bidirectional override or isolate written
    as an escape (`\\x1b`, `\\u202e`), so user text shown on a terminal or quoted in an error message
    cannot move the cursor, recolour, retitle or reorder what follows it."""
    return text.translate(_ESCAPES)


def validate_description(text: str | None, what: str = "description") -> str:
    """A task description as stored: non-empty UTF-8 text (no undecodable bytes), at most 10,000 characters."""
    if text is None or not visible(str(text)):  # "\u200b" is as empty as "" to whoever reads or embeds it
        raise UserInputError(f"the {what} is empty{' (no visible character)' if text and str(text).strip() else ''}: "
                             "it is how the adapter is found and routed to")
    try:
        str(text).encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: an undecodable byte (U+DC80-DCFF) or a JSON "\\ud800"
        ch = str(text)[exc.start]
        bad = f"undecodable byte {ch.encode('utf-8', 'surrogateescape')!r}" if "\udc80" <= ch <= "\udcff" else f"lone surrogate {ch!r}"
        raise UserInputError(f"the {what} is not valid UTF-8 text ({bad} at character {exc.start})") from None
    if len(text) > MAX_DESCRIPTION:
        raise UserInputError(f"the {what} is {len(text):,} characters long; at most {MAX_DESCRIPTION:,} are allowed")
    bad = next((i for i, ch in enumerate(str(text)) if ch not in "\t\n\r" and unicodedata.category(ch) == "Cc"), None)
    if bad is not None:
        raise UserInputError(f"the {what} holds a control character ({str(text)[bad]!r} at character {bad})")
    bad = next((i for i, ch in enumerate(str(text)) if ch in BIDI_CONTROLS), None)
    if bad is not None:  # they reorder what follows them wherever the description is shown (listings, logs)
        raise UserInputError(f"the {what} holds a bidirectional override or isolate ({str(text)[bad]!r} at "
                             f"character {bad}); write the text in its reading order")
    return str(text).strip()


SEED_MAX = 2**32 - 1
"""The largest seed (NumPy's and Lightning's bound: seeds are 0 to 2**32 - 1)."""


def checked_seed(seed: int, what: str = "seed") -> int:
    """A seed every random generator loraplex seeds accepts (0 to SEED_MAX), else UserInputError naming it."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise UserInputError(f"{what}: must be a whole number from 0 to {SEED_MAX:,}, got {seed!r}")
    return seed


def checked_limit(limit: int | None, what: str = "--eval-limit") -> int | None:
    """A row limit (None: every row), a whole number of at least 1, else UserInputError naming it (0 used to
    mean every row and -1 every row but the last)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 2**31 - 1):
        raise UserInputError(f"{what} must be a whole number from 1 to 2,147,483,647, not {limit!r}")
    return limit


MAX_LABELS = 256
"""The most labels a query may ask to be answered with (each is embedded or scored per query)."""
MAX_LABEL_CHARS = 1_000
"""The longest label name a query may ask for (a name, not a description)."""


MAX_NESTING = 64  # levels of lists and dicts an argument may hold (`lone_surrogate`, api: deeper is refused, not a
# RecursionError; no option of loraplex nests a tenth as deep)


def lone_surrogate(x: Any, at: tuple = ()) -> tuple | None:
    """Where in a value (a string, or strings inside lists, tuples and dicts, keys included) a string holds a
    lone UTF-16 surrogate (`"\\ud800"` in JSON, `"\\udcff"` for a byte that is not UTF-8 read with
    surrogateescape), which is no Unicode text: a tokenizer, sqlite and every file write fail on it. The
    path to it (() for `x` itself), or None when there is none. A path (`pathlib.Path`) is read as its string:
    a file name that is not UTF-8 cannot be recorded either (sweep 42)."""
    if isinstance(x, os.PathLike):
        x = os.fspath(x)
    if len(at) >= MAX_NESTING and isinstance(x, (dict, list, tuple)):
        raise UserInputError(f"a value nested more than {MAX_NESTING} levels deep (lists and dicts inside each other)")
    if isinstance(x, str):
        try:
            x.encode("utf-8")
        except UnicodeEncodeError:
            return at
    elif isinstance(x, dict):
        for k, v in x.items():
            hit = lone_surrogate(k, at) if isinstance(k, str) else None
            hit = hit if hit is not None else lone_surrogate(v, (*at, k))
            if hit is not None:
                return hit
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            hit = lone_surrogate(v, (*at, i))
            if hit is not None:
                return hit
    return None


def visible(text: str) -> bool:
    """Whether `text` has a character that shows (not only spaces, control or zero-width characters)."""
    return any(ch.isprintable() and not ch.isspace() for ch in text)


def label_key(text: str) -> str:
    """What a label reads as: NFC without format characters ("é" and "e\u0301", "ab" and "a\u200db" alike)."""
    return "".join(ch for ch in unicodedata.normalize("NFC", text) if unicodedata.category(ch) != "Cf")


def as_task_labels(names: Sequence[str], labels: Sequence[str]) -> tuple[list[str], str | None]:
    """Each of `names` in the task's own spelling of it (`label_key`: an NFD "café" names the task's "café",
    as a task file's rows and sidecar are matched), and the first name that is none of `labels` (else None)."""
    own = {label_key(lab): lab for lab in labels}
    out = [own.get(label_key(str(n)), n) for n in names]
    return out, next((n for n in out if n not in labels), None)


def label_fold(text: str) -> str:
    """A label as a request may name one of an adapter's: `label_key`, case folded ("Negative", an NFD
    "café" and "negative", "café" are the adapter's own labels, answered in the request's spelling)."""
    return label_key(text).casefold()


def folded_labels(labels: Sequence[str] | None) -> frozenset[str]:
    """A label set as label sets are compared (a request's against an adapter's, two adapters'): each label
    stripped and `label_fold`ed."""
    return frozenset(label_fold(str(x).strip()) for x in labels or ())


def read_alike(texts: Sequence[str]) -> tuple[str, str] | None:
    """The first two of `texts` that read the same (`label_key`), or None: as labels, or a label's texts,
    one answer would hide the other."""
    seen: dict[str, str] = {}
    for x in texts:
        key = label_key(x)
        if key in seen:
            return seen[key], x
        seen[key] = x
    return None


def text_lines(text: str) -> list[str]:
    """The lines of a JSON Lines file or a file of queries: split at "\n", "\r\n" and a lone "\r" only.
    str.splitlines also splits at U+2028, U+2029, U+0085, \v, \f and \x1c-\x1e, which JSON writers leave
    raw inside strings (`ensure_ascii=False`): a valid row came apart into two invalid ones. (A raw "\r" is
    never inside a JSON string: it must be escaped there.)"""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def label_problem(label: str) -> str | None:
    """What makes `label` (stripped) unusable as a label name, or None: the one rule for every label a user
    gives (a task file's rows, its sidecar, `query --labels`, the server's `labels`)."""
    if not visible(label):
        return "has no visible character"
    if len(label) > MAX_LABEL_CHARS:
        return f"is {len(label):,} characters long; at most {MAX_LABEL_CHARS:,} are allowed"
    if any(unicodedata.category(ch) == "Cc" for ch in label):
        return "holds a control character"
    if any(ch in BIDI_CONTROLS for ch in label):  # it reorders what is printed after the label
        return "holds a bidirectional control character"
    return None


def checked_texts(texts: Sequence[str]) -> list[str]:
    """The texts a query answers (`query`, `answer_each`, a RoutedModel's `answer` and `answer_each`), stripped:
    a list of at least one string, each with a visible character (a str is one text, not a list of characters)."""
    if isinstance(texts, (str, bytes)):
        raise UserInputError("texts must be a list of strings, got one string (wrap it in a list)")
    try:
        out = list(texts)
    except TypeError:
        raise UserInputError(f"texts must be a list of strings, got {type(texts).__name__}") from None
    if not out:
        raise UserInputError("the query is empty: no texts given")
    odd = next((i for i, t in enumerate(out, 1) if not isinstance(t, str)), None)
    if odd is not None:
        raise UserInputError(f"text {odd} is {type(out[odd - 1]).__name__}, not a string")
    at = lone_surrogate(out)
    if at is not None:  # no tokenizer takes it (a TypeError from deep inside; sweep 40)
        raise UserInputError(f"text {at[0] + 1} is not valid UTF-8 text (it holds a lone surrogate)")
    empty = next((i for i, t in enumerate(out, 1) if not visible(t)), None)
    if empty is not None:
        what = "the query is empty" if len(out) == 1 else f"text {empty} is empty"
        raise UserInputError(what + (" (no visible character)" if out[empty - 1].strip() else ""))
    return [t.strip() for t in out]


def checked_labels(labels: Sequence[str]) -> tuple[str, ...]:
    """The label set a query asks to be answered with (CLI `query --labels`, the server's `labels`): at
    least two and at most MAX_LABELS distinct, non-empty names."""
    if isinstance(labels, (str, bytes)):
        raise UserInputError("labels must be a list of strings, got one string")
    try:  # an iterator or generator is read once, as texts are (checking it consumed it: sweep 40)
        given = list(itertools.islice(labels, MAX_LABELS + 1))
    except TypeError:
        raise UserInputError(f"labels must be a list of strings, got {type(labels).__name__}") from None
    if not all(isinstance(x, str) for x in given):
        raise UserInputError("labels must be a list of strings")
    if len(given) > MAX_LABELS:
        raise UserInputError(f"labels: more than {MAX_LABELS} names given; at most {MAX_LABELS} are allowed")
    at = lone_surrogate(given)
    if at is not None:
        raise UserInputError(f"labels: label {at[0] + 1} is not valid UTF-8 text (it holds a lone surrogate)")
    out = tuple(x.strip() for x in given)
    if any(not visible(x) for x in out):
        raise UserInputError("labels: an empty label name (or one with no visible character)")
    long = next((x for x in out if len(x) > MAX_LABEL_CHARS), None)
    if long is not None:
        raise UserInputError(f"labels: a label of {len(long):,} characters; at most {MAX_LABEL_CHARS:,} are allowed")
    odd = next((x for x in out if label_problem(x)), None)
    if odd is not None:
        raise UserInputError(f"labels: the label {odd[:60]!r} {label_problem(odd)}")
    pair = read_alike(out)
    if pair is not None:
        a, b = pair
        raise UserInputError(f"labels: {a!r} is named twice" if a == b else
                             f"labels: {a!r} and {b!r} read the same (they differ only in invisible characters or "
                             "Unicode normalisation)")
    if len(out) < 2:
        raise UserInputError(f"labels: at least 2 labels are needed to choose between, got {len(out)}")
    return out


def data_notes(t: Task, train_limit: int | None = None) -> list[str]:
    """What the task's data holds that training cannot do much with, accepted (real data is noisy) but said:
    texts with more than one label, labels with no training row (the split is by hash, not stratified; a
    file of a few rows may keep one label in train, and is still trained, as the README's 3-row minimum says),
    or none in the first `train_limit` training rows, those trained on (`--train-limit`, `trainer.train_limit`)."""
    out = []
    conflicts = t.conflicts()
    if conflicts:
        text, labels = next(iter(conflicts.items()))
        shown = text if len(text) <= 60 else text[:57] + "..."
        out.append(f"task {t.name!r}: {len(conflicts):,} text(s) appear with more than one label (e.g. {shown!r}: "
                   f"{', '.join(labels)}); no model can answer both, and accuracy on them is a coin toss")
    trained = {e.label for e in t.train}
    unseen = [lab for lab in t.labels if lab not in trained]
    if unseen:
        out.append(f"task {t.name!r}: {len(unseen):,} of its {len(t.labels)} labels have no training row (e.g. "
                   f"{unseen[0][:40]!r}; the split is 80/10/10 by a hash of each row, or the file's `split` column): "
                   "the adapter cannot learn them")
    if train_limit is not None and train_limit < len(t.train):
        cut = {e.label for e in t.train[:train_limit]}
        gone = [lab for lab in t.labels if lab in trained and lab not in cut]
        if gone:
            out.append(f"task {t.name!r}: {len(gone):,} of its {len(t.labels)} labels have no row among the first "
                       f"{train_limit:,} training rows, those the train limit keeps (e.g. {gone[0][:40]!r}): the "
                       "adapter cannot learn them")
    return out
