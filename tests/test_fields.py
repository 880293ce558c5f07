"""The field template language: nested paths, optional fields, joins, tables, literal braces, errors."""

import pytest

from llamatune.data.fields import MissingField, parse_template

RECORD = {
    "QUESTION": "Is it safe?",
    "CONTEXTS": ["First part.", "Second part."],
    "table": {"table": [["", "2019", "2018"], ["Revenue", "1,452.4", "1,146.2"]]},
    "questions": [{"question": "What was revenue?", "answer": ["1,452.4"]}],
    "scale": "",
    "n": 3,
    "flag": True,
    "missing_value": None,
}


def test_nested_paths_indexes_and_joins():
    t = parse_template("{QUESTION}\n{CONTEXTS|\\n\\n}\n{questions.0.question} ({questions.0.answer|, }) n={n} {flag}")
    assert t.render(RECORD) == "Is it safe?\nFirst part.\n\nSecond part.\nWhat was revenue? (1,452.4) n=3 yes"
    assert t.fields == ["QUESTION", "CONTEXTS", "questions.0.question", "questions.0.answer", "n", "flag"]


def test_name_over_a_list_maps_over_its_items():
    record = {"paragraphs": [{"text": "One."}, {"order": 2}, {"text": "Three."}]}
    assert parse_template("{paragraphs.text| }").render(record) == "One. Three."
    with pytest.raises(MissingField):
        parse_template("{paragraphs.nothing}").render(record)


def test_tables_render_row_per_line():
    assert parse_template("{table.table}").render(RECORD) == " | 2019 | 2018\nRevenue | 1,452.4 | 1,146.2"


def test_optional_and_missing_fields():
    assert parse_template("a{missing_value?}b{nope?}c{scale}").render(RECORD) == "abc"
    with pytest.raises(MissingField) as info:
        parse_template("{QUESTON}").render(RECORD)
    assert info.value.path == "QUESTON" and "QUESTION" in info.value.available
    with pytest.raises(MissingField):
        parse_template("{missing_value}").render(RECORD)


def test_literal_braces_and_malformed_templates():
    assert parse_template('{{"q": "{QUESTION}"}}').render(RECORD) == '{"q": "Is it safe?"}'
    for bad in ("{QUESTION", "QUESTION}", "{}", "{a..b}", "{import os}x{"):
        with pytest.raises(ValueError):
            parse_template(bad)
