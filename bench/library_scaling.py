"""Does a generator written for a family get better with more of the family's tasks to learn from?

The generators' papers fit on hundreds of related tasks (Text-to-LoRA: 479 SNI tasks; LoRALib: 680
LoRAs over 40 tasks); the task library has 4-10 per family, and feed-forward generation there recovers
under half of the oracle's gain (bench/results/library-generators.txt). This study adds related tasks
to two families, trains their adapters with the library's recipe, and holds out each of the family's
library tasks twice, fitting sg-lora and icm-lora on

  - `library`: every other library adapter (as bench/library_generators.py does), and
  - `+extra`:  the same plus the family's extra adapters,

then writes the held-out task's adapter (from its description / 16 of its examples) and scores it on the
task's test split (beside the nearest adapter by description in each set), without refinement and
after 2 and 5 refinement steps on the 16 examples (the points of the speed/quality curve that stay
within ~10x of training's cost). The extra tasks are new label pairs of the same corpora (kaomoji-dataset's emotion categories; chatterbot-corpus's languages); none
repeats a library task's label set, so a held-out task is never in the extra set. Their descriptions
are written here, one per task, shorter than the library's.

The extra tasks are task files written into the bench home (`<home>/scaling-tasks/`) and trained there
as `scale-<task>-lora` (resumable); the study's rows go to `<home>/library-scaling[-dense]-<families>.json`
and the table to stdout (bench/results/library-scaling*.txt are the published ones).

    LORAPLEX_BENCH_HOME=/work/bench-home python bench/library_scaling.py [--families kaomoji-emotion,language-id]
        [--steps 50] [--eval-limit 150] [--refine-steps 5] [--train-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import adapter_name, bench_home, bench_settings  # noqa: E402
from bench.library import count, library_tasks, out_file  # noqa: E402
from bench.library_generators import (METHODS, N_EXAMPLES, generators_for, make_generator, recovered,  # noqa: E402
                                      resumed_rows)

_KAO_EXTRA_TEXTS = {
    "confused": "confused: a puzzled, bewildered face", "dissatisfied": "dissatisfied: a displeased, sulking face",
    "sorry": "sorry: an apologetic face, bowing", "hurt": "hurt: a face in pain, injured",
}

# (family, name, labels, description): label pairs no library task has, of the library's corpora
EXTRA = (
    ("kaomoji-emotion", "kaomoji-happy-vs-angry", ("happy", "angry"), "Is this emoticon smiling and happy, or angry?"),
    ("kaomoji-emotion", "kaomoji-sad-vs-angry", ("sad", "angry"), "Kaomoji faces: crying and sad, or furious and angry?"),
    ("kaomoji-emotion", "kaomoji-happy-vs-love", ("happy", "love"), "Tell a simply happy kaomoji from one that is in love."),
    ("kaomoji-emotion", "kaomoji-shy-vs-love", ("shy", "love"), "Blushing shyness or love and affection: which does the text face show?"),
    ("kaomoji-emotion", "kaomoji-cool-vs-happy", ("cool", "happy"), "Is the kaomoji acting cool, or just happy?"),
    ("kaomoji-emotion", "kaomoji-sleepy-vs-sad", ("sleepy", "sad"), "A drooping kaomoji face: is it sleepy or sad?"),
    ("kaomoji-emotion", "kaomoji-excited-vs-happy", ("excited", "happy"), "Label each emoticon excited or happy."),
    ("kaomoji-emotion", "kaomoji-surprised-vs-confused", ("surprised", "confused"), "Surprised or confused: read the kaomoji's expression."),
    ("kaomoji-emotion", "kaomoji-scared-vs-sad", ("scared", "sad"), "Does the Japanese emoticon look scared or sad?"),
    ("kaomoji-emotion", "kaomoji-doubt-vs-confused", ("doubt", "confused"), "A sceptical, doubtful look or a confused one? Classify the kaomoji."),
    ("kaomoji-emotion", "kaomoji-sympathy-vs-sorry", ("sympathy", "sorry"), "Is the emoticon offering sympathy, or saying sorry?"),
    ("kaomoji-emotion", "kaomoji-dissatisfied-vs-happy", ("dissatisfied", "happy"), "Happy kaomoji or dissatisfied, sulking kaomoji?"),
    ("kaomoji-emotion", "kaomoji-hurt-vs-sad", ("hurt", "sad"), "Is the face in the kaomoji hurt and in pain, or sad?"),
    ("kaomoji-emotion", "kaomoji-angry-vs-dissatisfied", ("angry", "dissatisfied"), "Angry outburst or mild dissatisfaction: which kaomoji is it?"),
    ("kaomoji-emotion", "kaomoji-confused-vs-cool", ("confused", "cool"), "Tell confused emoticons from cool, confident ones."),
    ("kaomoji-emotion", "kaomoji-love-vs-sympathy", ("love", "sympathy"), "Does the kaomoji send love, or sympathy and comfort?"),
    ("language-id", "lang-french-vs-italian", ("french", "italian"), "Is the chat message in French or in Italian?"),
    ("language-id", "lang-spanish-vs-italian", ("spanish", "italian"), "Spanish or Italian? Label each line with its language."),
    ("language-id", "lang-german-vs-dutch", ("german", "dutch"), "Tell German sentences from Dutch ones."),
    ("language-id", "lang-english-vs-dutch", ("english", "dutch"), "Which language is this chatbot line written in, English or Dutch?"),
    ("language-id", "lang-swedish-vs-german", ("swedish", "german"), "Decide whether a message is Swedish or German."),
    ("language-id", "lang-english-vs-german", ("english", "german"), "English or German text? Say which."),
    ("language-id", "lang-japanese-vs-korean", ("japanese", "korean"), "Is this line Japanese or Korean?"),
    ("language-id", "lang-chinese-vs-japanese", ("chinese", "japanese"), "Classify each message as Chinese or Japanese writing."),
    ("language-id", "lang-bengali-vs-hindi", ("bengali", "hindi"), "Bengali or Hindi: which Indian language is the chat line in?"),
    ("language-id", "lang-hebrew-vs-persian", ("hebrew", "persian"), "Is the sentence written in Hebrew or in Persian (Farsi)?"),
    ("language-id", "lang-turkish-vs-indonesian", ("turkish", "indonesian"), "Turkish or Indonesian? Identify the language."),
    ("language-id", "lang-persian-vs-turkish", ("persian", "turkish"), "Tell Persian messages from Turkish ones."),
    ("language-id", "lang-french-vs-portuguese", ("french", "portuguese"), "French or Portuguese: what language is the text?"),
    ("language-id", "lang-italian-vs-portuguese", ("italian", "portuguese"), "Label each chat line Italian or Portuguese."),
    ("language-id", "lang-dutch-vs-swedish", ("dutch", "swedish"), "Dutch or Swedish? Decide for each sentence."),
    ("language-id", "lang-english-vs-indonesian", ("english", "indonesian"), "Is the message in English or in Indonesian?"),
)


EMOTIONS = ("happy", "sad", "angry", "love", "shy", "cool", "sleepy", "excited", "surprised", "scared", "doubt",
            "sympathy", "confused", "dissatisfied", "sorry", "hurt")
LANGUAGES = ("spanish", "portuguese", "french", "italian", "english", "german", "dutch", "swedish", "russian",
             "ukrainian", "hindi", "marathi", "chinese", "traditionalchinese", "japanese", "korean")
FIRST_DENSE = {"language-id": 10}  # the labels the family's dense set had first (the rest were added after)
# family -> (its labels, the task name's prefix, description templates)
DENSE = {
    "kaomoji-emotion": (EMOTIONS, "kaomoji", (
        "Which does the kaomoji express: {a} or {b}?", "Label each kaomoji {a} or {b}.",
        "Tell {a} kaomoji apart from {b} kaomoji.", "Kaomoji faces, {a} versus {b}: pick the one shown.",
        "Is the Japanese text emoticon {a}, or is it {b}?")),
    "language-id": (LANGUAGES, "lang", (
        "Is this message written in {A} or in {B}?", "{A} or {B}: which language is the chat line in?",
        "Label each chat line {A} or {B}.", "Tell {A} text apart from {B} text.",
        "Decide whether the sentence is {A} or {B}.")),
}


def _dense(family: str) -> tuple:
    """With --dense: every other pair of the family's labels in DENSE (kaomoji-emotion: 16 emotion categories,
    98 more tasks, 121 in the family then; language-id: the 16 languages of the family's
    library tasks but lang-twelve's Turkish, Indonesian and Persian, 105 more), each described by one of five
    templates (chosen by the pair, so the same on every run): the study asks what a family of every pair
    gives a generator (Text-to-LoRA's task sets are as dense per skill), not how well these are written."""
    from itertools import combinations

    from loraplex import library

    labels, prefix, templates = DENSE[family]
    taken = {frozenset(sp.labels) for sp in library.SPECS.values()} | {frozenset(e[2]) for e in EXTRA}
    out = []
    # the pairs in the order they were added (language-id's first ten languages first), so that a bench home
    # trained before the family was widened keeps each pair's description
    first = FIRST_DENSE.get(family, len(labels))
    pairs = list(combinations(labels[:first], 2)) + [p for p in combinations(labels, 2) if labels.index(p[1]) >= first]
    for i, (a, b) in enumerate(p for p in pairs if frozenset(p) not in taken):
        text = templates[i % len(templates)].format(a=a, b=b, A=library._LANG_NAMES.get(a, a.capitalize()),
                                                    B=library._LANG_NAMES.get(b, b.capitalize()))
        out.append((family, f"{prefix}-{a}-vs-{b}", (a, b), text))
    return tuple(out)


def extras_of(families: list[str], dense: bool) -> list[tuple]:
    """The extra tasks of `families`, the hand-written first (then, with `dense`, the templated pairs)."""
    more = tuple(e for f in DENSE if f in families for e in _dense(f)) if dense else ()
    return [e for e in EXTRA + more if e[0] in families]


def extra_name(task: str) -> str:
    return f"scale-{task}-lora"


def spec_of(family: str, name: str, labels: tuple[str, ...], description: str):
    """The extra task as a library-style spec (same corpora, same balancing)."""
    from loraplex import library

    if family == "kaomoji-emotion":
        texts = {k: library._KAO_TEXTS.get(k) or _KAO_EXTRA_TEXTS[k] for k in labels}
        return library.Spec(name, family, description, labels, texts, library.kaomoji_rows(labels),
                            per_label=800, source="kaomoji-dataset")
    texts = {k: f"{k}: text written in {library._LANG_NAMES.get(k, k.capitalize())}" for k in labels}
    return library.Spec(name, family, description, labels, texts, library.language_rows(labels),
                        per_label=600, source="chatterbot-corpus")


def write_task_file(spec, folder: Path) -> Path:
    """The spec's balanced examples as a JSONL task file with its sidecar (name, description, labels)."""
    from loraplex import library

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec.name}.jsonl"
    rows = library.spec_examples(spec)
    path.write_text("".join(json.dumps({"text": e.text, "label": e.label}, ensure_ascii=False) + "\n" for e in rows),
                    encoding="utf-8")
    (folder / f"{spec.name}.task.json").write_text(json.dumps(
        {"name": spec.name, "description": spec.description, "labels": list(spec.labels),
         "label_texts": spec.label_texts}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


def train_extras(families: list[str], steps: int, eval_limit: int, dense: bool = False) -> None:
    from tqdm import tqdm

    from loraplex import api

    s = bench_settings()
    reg = api.open_registry(s)
    wanted = extras_of(families, dense)
    todo = [e for e in wanted if not reg.has_adapter(extra_name(e[1]))]
    print(f"{len(todo)} extra adapters to train ({len(wanted)} in these families)")
    t_all = time.perf_counter()
    for fam, name, labels, desc in tqdm(todo, unit="adapter", dynamic_ncols=True):
        path = write_task_file(spec_of(fam, name, labels, desc), bench_home() / "scaling-tasks")
        t0 = time.perf_counter()
        res = api.train(str(path), name=extra_name(name), base="minilm", steps=steps, eval_limit=eval_limit,
                        progress=False, settings=s)
        tqdm.write(f"{name:32s} accuracy {res.metrics['accuracy']:.3f} (base {res.metrics['base_accuracy']:.3f}) "
                   f"in {time.perf_counter() - t0:.0f}s")
    print(f"trained {len(todo)} extra adapters in {time.perf_counter() - t_all:.0f}s")


def study(families: list[str], eval_limit: int, refine_steps: int, out: Path, ap: argparse.ArgumentParser,
          dense: bool = False) -> list[dict]:
    """One row per held-out library task of `families`: accuracies for each fit set and method. The sets:
    `library`, `+extra` (the hand-written extra tasks) and, with `dense`, `+dense` (every emotion pair)."""
    import torch
    from tqdm import tqdm

    from bench.generators import Evaluator
    from loraplex import api
    from loraplex.data import EMBEDDED_TASKS, load_task
    from loraplex.generators.base import OutOfRange, Query
    from loraplex.generators.icm_lora import task_examples
    from loraplex.generators.refine import RefineConfig
    from loraplex.generators.workflow import training_set

    s = bench_settings()
    reg = api.open_registry(s)
    lib = [adapter_name(n) for n in library_tasks() if reg.has_adapter(adapter_name(n))]
    extras = [extra_name(e[1]) for e in extras_of(families, dense) if reg.has_adapter(extra_name(e[1]))]
    written = [extra_name(e[1]) for e in extras_of(families, False)]
    held = [n for n in library_tasks() if EMBEDDED_TASKS[n]["family"] in families and adapter_name(n) in lib]
    full = training_set(reg, lib + extras)
    sets = {"library": full.without(extras), "+extra": full.without([n for n in extras if n not in written])}
    if dense:
        sets["+dense"] = full
    print(f"{len(lib)} library adapters, {len(extras)} extra; holding out {len(held)}")
    gens = generators_for(full, s, reg.embedder_name)  # each member's representation, computed once
    ev = Evaluator(s, eval_limit)
    recipe = {"home": str(bench_home()), "members": len(lib), "extras": len(extras), "eval_limit": eval_limit,
              "refine_steps": refine_steps}
    if dense:
        recipe["sets"] = {k: len(v.members) - len(lib) for k, v in sets.items()}
    rows = resumed_rows(out, recipe, ap)
    for t in tqdm(held, unit="task", dynamic_ncols=True):
        task, me = load_task(t), adapter_name(t)
        examples = task_examples(t, N_EXAMPLES, seed=1)
        row = {"task": t, "family": EMBEDDED_TASKS[t]["family"], "recipe": recipe,
               "base": ev(None, task), "oracle": ev(reg.load_adapter(me)[1], task)}
        mine = full.desc_embeddings[full.members.index(me)].float()
        for set_name, data in sets.items():
            fold = data.without([me])
            assert me not in fold.members and all(src != me for src, _ in fold.sources)
            nearest = fold.members[int(torch.argmax(fold.desc_embeddings.float() @ mine))]  # by description
            row[f"nearest/{set_name}"], row[f"nearest/{set_name}_name"] = ev(reg.load_adapter(nearest)[1], task), nearest
            for m, (entry, cfg, ctx, reps) in gens.items():
                col = f"{m}/{set_name}"
                gen = make_generator(entry, cfg, ctx, reps)
                gen.fit(fold)
                query = Query(task.description, examples if m == "icm-lora" else ())
                try:
                    row[col] = ev(gen.generate(query, seed=0).adapter, task)
                except OutOfRange:
                    row[col] = row["base"]
                    for k in (2, refine_steps):
                        row[f"{col}@{k}"] = row["base"]
                    continue
                kept: dict[int, torch.Tensor] = {}
                ref = gen.generate(Query(task.description, examples, task=task), seed=0,
                                   refine=RefineConfig(steps=refine_steps),
                                   on_refine_step=lambda step, x, kept=kept: kept.__setitem__(step, x))
                if 2 < refine_steps:
                    row[f"{col}@2"] = ev(gen.data.layout.unflatten(kept[2]), task)
                row[f"{col}@{refine_steps}"] = ev(ref.adapter, task)
        rows[t] = row
        tqdm.write(f"{t:30s} base {row['base']:.3f} oracle {row['oracle']:.3f}  " + "  ".join(
            f"{m}: " + " -> ".join(f"{row[f'{m}/{k}']:.3f}" for k in sets) for m in METHODS))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1) + "\n")
    return [rows[t] for t in held]


def report(rows: list[dict], families: list[str], refine_steps: int, min_gain: float = 0.05) -> list[str]:
    gaining = [r for r in rows if r["oracle"] - r["base"] >= min_gain]
    steps = [0, 2, refine_steps] if refine_steps > 2 else [0, refine_steps]
    sets = [k.split("/", 1)[1] for k in rows[0] if k.startswith("nearest/") and not k.endswith("_name")]
    cols = [(f"nearest/{s}", f"nearest {s}") for s in sets]
    cols += [(f"{m}/{s}" + (f"@{k}" if k else ""), f"{m.split('-')[0]}@{k} {s}") for m in METHODS for k in steps
             for s in sets]
    lines = ["== gain recovered, (acc - base) / (oracle - base), over tasks where the oracle gains >= "
             f"{min_gain * 100:.0f} points; @k: after k refinement steps on 16 examples ==",
             f"{'family':<17}{'tasks':>6}{'extras':>7}  " + "  ".join(f"{h:>18}" for _, h in cols)]
    for f in families + ["all"]:
        rs = [r for r in gaining if f in ("all", r["family"])]
        if rs:
            n_extra = len(extras_of(families if f == "all" else [f], "+dense" in sets))
            lines.append(f"{f:<17}{len(rs):>6}{n_extra:>7}  " + "  ".join(
                f"{statistics.mean(recovered(r, c) for r in rs) * 100:>17.1f}%" for c, _ in cols))
    lines += ["", f"== per task: accuracy, fitted on {' -> '.join(sets)} "
              f"(nearest: the adapter it picks in each; @{refine_steps}: refined {refine_steps} steps) =="]
    for r in rows:
        pairs = [("nearest", "nearest"), ("sg-lora", "sg@0"), ("icm-lora", "icm@0"),
                 (f"sg-lora@{refine_steps}", f"sg@{refine_steps}"), (f"icm-lora@{refine_steps}", f"icm@{refine_steps}")]
        cells = []
        for key, short in pairs:
            m, _, k = key.partition("@")
            cells.append(f"{short} " + "->".join(f"{r[f'{m}/{s}' + (f'@{k}' if k else '')]:.3f}" for s in sets))
        lines.append(f"{r['task']:28s} base {r['base']:.3f} oracle {r['oracle']:.3f}  " + "  ".join(cells)
                     + "  (nearest " + " -> ".join(r[f"nearest/{s}_name"] for s in sets) + ")")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="kaomoji-emotion,language-id", help="families given extra tasks (comma-separated)")
    ap.add_argument("--steps", type=count, default=50, help="training steps per extra adapter (the library's recipe)")
    ap.add_argument("--eval-limit", type=count, default=150, help="test rows per held-out task (the library build's)")
    ap.add_argument("--refine-steps", type=lambda t: count(t, 1), default=5, help="refinement steps read (and 2; at most 1,000)")
    ap.add_argument("--train-only", action="store_true", help="train the extra adapters, skip the study")
    ap.add_argument("--dense", action="store_true",
                    help="also every other pair of the family's labels (kaomoji-emotion: 16 emotions, 98 more tasks; "
                         "language-id: 16 languages, 105 more; a third fit set, +dense)")
    ap.add_argument("--out", type=out_file, default=None,
                    help="rows file (default: library-scaling[-dense]-FAMILIES.json in the bench home)")
    args = ap.parse_args(argv)
    from loraplex.generators.refine import RefineConfig

    if args.refine_steps > RefineConfig.model_fields["steps"].metadata[-1].le:  # before anything trains (sweep 43)
        ap.error(f"--refine-steps: at most {RefineConfig.model_fields['steps'].metadata[-1].le:,}")
    if args.train_only and args.out is not None:  # it was dropped without a word (sweep 43)
        ap.error("--out names the study's rows file, and --train-only runs no study")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    known = sorted({e[0] for e in EXTRA})
    bad = [f for f in families if f not in known]
    if bad or not families:
        ap.error(f"--families: {bad[0] if bad else 'none named'}; extra tasks exist for {', '.join(known)}")
    t0 = time.perf_counter()
    train_extras(families, args.steps, args.eval_limit, args.dense)
    if not args.train_only:
        default = f"library-scaling-{'dense-' if args.dense else ''}{'+'.join(families)}.json"  # one file per study
        rows = study(families, args.eval_limit, args.refine_steps, args.out or bench_home() / default, ap, args.dense)
        print("\n".join(report(rows, families, args.refine_steps)))
    print(f"\nbenchmark wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
