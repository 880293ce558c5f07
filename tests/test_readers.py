"""Readers for every supported source format, and a clear error for each kind of bad data."""

import json

import pytest

from llamatune.data.readers import read_source
from llamatune.errors import RecipeError
from llamatune.schema import SourceSpec


def records(path, **kw):
    return [r.fields for r in read_source(SourceSpec(path=str(path), **kw))]


def test_jsonl_json_list_and_json_mapping(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"q": 1}\n\n{"q": 2}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"q": 3}, {"q": 4}]))
    (tmp_path / "c.json").write_text(json.dumps({"111": {"q": 5}, "222": {"q": 6}}))
    (tmp_path / "d.json").write_text(json.dumps({"data": [{"q": 7}]}))
    assert records(tmp_path / "a.jsonl") == [{"q": 1}, {"q": 2}]
    assert records(tmp_path / "b.json") == [{"q": 3}, {"q": 4}]
    assert records(tmp_path / "c.json") == [{"id": "111", "q": 5}, {"id": "222", "q": 6}]  # PubMedQA layout
    assert records(tmp_path / "d.json", records="data") == [{"q": 7}]


def test_tsv_with_csv_quoting_and_csv(tmp_path):
    # LegalBench style: a quoted field with doubled quotes inside, and a tab inside quotes
    (tmp_path / "t.tsv").write_text('label\ttext\nNo\t"an """"ask first"""" case\twith tab"\nYes\tplain\n')
    (tmp_path / "c.csv").write_text('a,b\n"x, y","multi\nline"\n')
    assert records(tmp_path / "t.tsv") == [{"label": "No", "text": 'an ""ask first"" case\twith tab'}, {"label": "Yes", "text": "plain"}]
    assert records(tmp_path / "c.csv") == [{"a": "x, y", "b": "multi\nline"}]


def test_parquet_text_folders_and_globs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"q": ["p1", "p2"]}), tmp_path / "p.parquet")
    assert records(tmp_path / "p.parquet") == [{"q": "p1"}, {"q": "p2"}]
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "b.md").write_text("# Bee")
    (docs / "sub" / "a.txt").write_text("Aye")
    (docs / "skip.bin").write_bytes(b"\0")
    assert [r["text"] for r in records(docs)] == ["# Bee", "Aye"]  # sorted, only data files
    assert [r["name"] for r in records(str(docs) + "/**/*.txt")] == ["a"]


def test_xml_records_and_explode(tmp_path):
    (tmp_path / "d.xml").write_text(
        '<doc id="7"><focus>Topic</focus><pairs><pair pid="1"><question qtype="info">Q1?</question><answer>A1</answer></pair>'
        '<pair pid="2"><question qtype="treat">Q2?</question><answer>A2</answer></pair></pairs></doc>')
    got = records(tmp_path / "d.xml", explode="pairs.pair")
    assert [(r["focus"], r["pairs"]["pair"]["question"]["text"], r["pairs"]["pair"]["answer"]) for r in got] == [
        ("Topic", "Q1?", "A1"), ("Topic", "Q2?", "A2")]
    assert got[0]["@id"] == "7" and got[1]["pairs"]["pair"]["question"]["@qtype"] == "treat"


def test_explode_nested_questions_and_cap(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps([{"table": [["a"]], "questions": [{"question": "q1"}, {"question": "q2"}]},
                                                 {"table": [["b"]], "questions": [{"question": "q3"}]}]))
    got = list(read_source(SourceSpec(path=str(tmp_path / "t.json"), explode="questions", max_records=2)))
    assert [r.fields["questions"]["question"] for r in got] == ["q1", "q2"]
    assert got[0].document == got[1].document  # one document: never split across train/held-out
    assert got[1].origin.endswith("t.json[0].questions[1]")


def test_hub_reader_loads_a_local_dataset_folder(tmp_path):
    folder = tmp_path / "my-dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"q": "h1"}\n{"q": "h2"}\n')
    assert records(folder, reader="hub", split="train") == [{"q": "h1"}, {"q": "h2"}]


@pytest.mark.parametrize("name,content,expected", [
    ("bad.jsonl", b'{"q": 1}\n{"q": \n', r"bad.jsonl:2: not valid JSON"),
    ("latin.jsonl", '{"q": "ok"}\n{"q": "café"}\n'.encode("latin-1"), r"latin.jsonl:2: not valid utf-8 at byte offset 22 \(byte 0xe9\); set the source's encoding"),
    ("cols.tsv", b"a\tb\nx\ty\nonly-one\n", r"cols.tsv:3: 1 columns, the header has 2"),
    ("map.json", b'{"data": [1, 2], "n": 2}', r"map.json: a JSON mapping was found where a list of records was expected"),
    ("arr.jsonl", b'[1, 2]\n', r"arr.jsonl:1: expected a JSON object per line, got a list"),
    ("doc.xml", b"<doc><a></doc>", r"doc.xml:1: not well-formed XML"),
])
def test_bad_data_names_file_and_place(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(RecipeError, match=expected):
        records(tmp_path / name)


def test_encoding_option_reads_latin1(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes('{"q": "café"}\n'.encode("latin-1"))
    assert records(tmp_path / "latin.jsonl", encoding="latin-1") == [{"q": "café"}]


def test_missing_path_and_unknown_extension(tmp_path):
    with pytest.raises(RecipeError, match="no such file or folder"):
        records(tmp_path / "nope.jsonl")
    (tmp_path / "x.dat").write_text("1")
    with pytest.raises(RecipeError, match="no reader for '.dat'"):
        records(tmp_path / "x.dat")


def test_every_malformed_row_is_listed_with_its_line(tmp_path):
    rows = ["a,b", "1,2", "3", "4,5", "6,7,8"] + [f"{i}" for i in range(20)]
    (tmp_path / "bad.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(RecipeError) as info:
        records(tmp_path / "bad.csv")
    problems = info.value.problems
    assert problems[0].endswith("bad.csv:3: 1 columns, the header has 2") and "bad.csv:5: 3 columns" in problems[1]
    assert len([p for p in problems if "columns, the header has" in p]) == 10
    assert any("12 more malformed rows" in p for p in problems) and "22 malformed row(s)" in problems[-1]
    (tmp_path / "bad.jsonl").write_text('{"q": 1}\n{"q": \n{"q": 2}\n[3]\n')
    with pytest.raises(RecipeError) as info:
        records(tmp_path / "bad.jsonl")
    assert [p.split(": ")[0].rsplit("/", 1)[-1] for p in info.value.problems[:2]] == ["bad.jsonl:2", "bad.jsonl:4"]


@pytest.mark.parametrize("name,content,expected", [
    ("empty.jsonl", b"", "empty.jsonl: no records in this file (it is empty, 0 bytes)"),
    ("blank.jsonl", b"\n\n", "blank.jsonl: no records in this file (only blank lines)"),
    ("header.csv", b"question,answer\n", "header.csv: no records in this file (a header row and no rows under it)"),
    ("list.json", b"[]", "list.json: no records in this file (an empty list or mapping)"),
])
def test_a_file_without_records_is_named(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(RecipeError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        records(tmp_path / name)


def test_byte_order_mark_is_stripped_and_said(tmp_path):
    (tmp_path / "bom.csv").write_bytes("\ufeffquestion,answer\nq,a\n".encode("utf-8"))
    notes = []
    got = [r.fields for r in read_source(SourceSpec(path=str(tmp_path / "bom.csv")), notes)]
    assert got == [{"question": "q", "answer": "a"}]
    assert notes == [f"{tmp_path / 'bom.csv'}: starts with a UTF-8 byte-order mark; stripped"]


def test_json_shape_is_said(tmp_path):
    (tmp_path / "m.json").write_text('{"1": {"q": "a"}, "2": {"q": "b"}}')
    (tmp_path / "l.json").write_text('{"data": [{"q": "a"}]}')
    notes = []
    list(read_source(SourceSpec(path=str(tmp_path / "m.json")), notes))
    list(read_source(SourceSpec(path=str(tmp_path / "l.json"), records="data"), notes))
    assert "a JSON mapping id → record: read 2 records" in notes[0]
    assert notes[1].endswith("l.json: the list at records: 'data' of 1 records")


def test_compressed_files_links_and_huge_csv_fields(tmp_path):
    (tmp_path / "d.jsonl.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(RecipeError, match="d.jsonl.gz: a compressed file.*gunzip it first"):
        records(tmp_path / "d.jsonl.gz")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(RecipeError, match="a symbolic link that leads to no file or folder"):
        records(tmp_path / "a")
    (tmp_path / "long.csv").write_text("q,a\n" + "x" * 200_000 + ",y\n")
    assert len(records(tmp_path / "long.csv")[0]["q"]) == 200_000


def test_xml_namespaces_carriage_returns_and_saved_datasets(tmp_path):
    (tmp_path / "ns.xml").write_text('<d:doc xmlns:d="http://example.org/d"><d:qa d:id="1"><d:q>hi</d:q></d:qa>'
                                     '<d:qa d:id="2"><d:q>ho</d:q></d:qa></d:doc>')
    assert records(tmp_path / "ns.xml", records="doc.qa") == [{"@id": "1", "q": "hi"}, {"@id": "2", "q": "ho"}]
    (tmp_path / "mac.jsonl").write_bytes(b'{"q": "a"}\r{"q": "b"}\r\n{"q": "c\\r"}\r')
    assert records(tmp_path / "mac.jsonl") == [{"q": "a"}, {"q": "b"}, {"q": "c\r"}]
    import datasets

    datasets.Dataset.from_list([{"q": "x"}, {"q": "y"}]).save_to_disk(str(tmp_path / "saved"))
    assert records(tmp_path / "saved", reader="hub") == [{"q": "x"}, {"q": "y"}]
    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"q": "z"}])}).save_to_disk(str(tmp_path / "dd"))
    assert records(tmp_path / "dd", reader="hub", split="test") == [{"q": "z"}]
