"""Readers: files in their original formats → records (plain dicts), each tagged with where it came from.

One function per format and a dict to dispatch; every reader names file and line (or key, or byte
offset) for anything it cannot read, so bad data is never a traceback or a silent skip.
"""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from llamatune.data.fields import lookup
from llamatune.errors import RecipeError
from llamatune.schema import SourceSpec

_BY_SUFFIX = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
              ".txt": "text", ".md": "text", ".xml": "xml"}


@dataclass(frozen=True)
class Record:
    """One source record: its fields and a human-readable origin ("file:line", "file[key]")."""

    fields: dict
    origin: str
    document: str  # split unit: exploded questions or text windows of one document share it


def source_files(spec: SourceSpec) -> list[Path]:
    """Expands a source path (file, folder, glob) into the data files it names, sorted.

    Raises:
        RecipeError: If nothing matches, or a file has an extension no reader handles.
    """
    if spec.reader == "hub":
        return []
    path = Path(spec.path)
    if any(ch in spec.path for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(spec.path, recursive=True)) if Path(p).is_file()]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _BY_SUFFIX)
    elif path.is_file():
        files = [path]
    else:
        raise RecipeError([f"{spec.path}: no such file or folder (relative paths resolve against data.root "
                           "or the recipe's folder)"])
    if not files:
        raise RecipeError([f"{spec.path}: matches no data files ({', '.join(_BY_SUFFIX)})"])
    if spec.reader == "auto":
        unknown = [f for f in files if f.suffix.lower() not in _BY_SUFFIX]
        if unknown:
            raise RecipeError([f"{unknown[0]}: no reader for '{unknown[0].suffix}'; set reader: to one of "
                               "jsonl, json, csv, tsv, parquet, text, xml"])
    return files


def read_source(spec: SourceSpec) -> Iterator[Record]:
    """Yields the records of a source in a stable order, exploded and capped as the spec says."""
    count = 0
    for record in _raw_records(spec):
        for item in _explode(record, spec.explode):
            if spec.max_records is not None and count >= spec.max_records:
                return
            count += 1
            yield item


def _raw_records(spec: SourceSpec) -> Iterator[Record]:
    if spec.reader == "hub":
        yield from _read_hub(spec)
        return
    for path in source_files(spec):
        kind = spec.reader if spec.reader != "auto" else _BY_SUFFIX[path.suffix.lower()]
        yield from _READERS[kind](path, spec)


def _explode(record: Record, field: str | None) -> Iterator[Record]:
    if field is None:
        yield record
        return
    keys = tuple(field.split("."))
    items = lookup(record.fields, keys)
    if items is None:
        yield record  # nothing to explode: its templates will name the missing field, and it is counted
        return
    if isinstance(items, dict):
        items = [items]  # XML: an element that occurs once is not a list
    if not isinstance(items, list):
        raise RecipeError([f"{record.origin}: explode: {field!r} is {type(items).__name__}, not a list"])
    for i, item in enumerate(items):
        yield Record(fields=_replace(record.fields, keys, item), origin=f"{record.origin}.{field}[{i}]",
                     document=record.document)


def _replace(obj: dict, keys: tuple[str, ...], value) -> dict:
    out = dict(obj)
    out[keys[0]] = value if len(keys) == 1 else _replace(obj[keys[0]], keys[1:], value)
    return out


def _text_of(path: Path, spec: SourceSpec) -> str:
    data = path.read_bytes()
    try:
        return data.decode(spec.encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RecipeError([f"{path}: not valid {spec.encoding} at byte offset {exc.start} (line {line}); "
                           "set the source's encoding: (e.g. latin-1, cp1252) or re-encode the file"]) from None
    except LookupError:
        raise RecipeError([f"{path}: unknown encoding {spec.encoding!r}"]) from None


def _read_jsonl(path: Path, spec: SourceSpec) -> Iterator[Record]:
    for lineno, line in enumerate(_text_of(path, spec).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecipeError([f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})"]) from None
        if not isinstance(obj, dict):
            raise RecipeError([f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}"])
        yield Record(fields=obj, origin=f"{path}:{lineno}", document=f"{path}:{lineno}")


def _read_json(path: Path, spec: SourceSpec) -> Iterator[Record]:
    try:
        doc = json.loads(_text_of(path, spec))
    except json.JSONDecodeError as exc:
        raise RecipeError([f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"]) from None
    if spec.records:
        doc = lookup(doc, tuple(spec.records.split(".")))
        if doc is None:
            raise RecipeError([f"{path}: records: no {spec.records!r} in this file"])
    if isinstance(doc, dict):
        # A mapping id -> record (PubMedQA's layout): each value is a record, its key becomes `id`.
        if not all(isinstance(v, dict) for v in doc.values()):
            raise RecipeError([f"{path}: a JSON mapping was found where a list of records was expected, and its values "
                               "are not all objects; set records: to the path of the list (e.g. records: data)"])
        for key, value in doc.items():
            yield Record(fields={"id": key, **value}, origin=f"{path}[{key}]", document=f"{path}[{key}]")
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            if not isinstance(value, dict):
                raise RecipeError([f"{path}[{i}]: expected an object, got {type(value).__name__}"])
            yield Record(fields=value, origin=f"{path}[{i}]", document=f"{path}[{i}]")
    else:
        raise RecipeError([f"{path}: expected a list of records or a mapping id -> record, got {type(doc).__name__}"])


def _read_delimited(path: Path, spec: SourceSpec, delimiter: str) -> Iterator[Record]:
    # csv handles quoting (doubled quotes, delimiters and newlines inside quotes); line.split would not.
    reader = csv.reader(_text_of(path, spec).splitlines(keepends=True), delimiter=delimiter)
    header = next(reader, None)
    if not header:
        raise RecipeError([f"{path}: empty file (a header row is expected)"])
    for row in reader:
        if not row:
            continue
        if len(row) != len(header):
            raise RecipeError([f"{path}:{reader.line_num}: {len(row)} columns, the header has {len(header)}; "
                               "check quoting (a quote inside a field must be doubled) or the delimiter"])
        yield Record(fields=dict(zip(header, row)), origin=f"{path}:{reader.line_num}", document=f"{path}:{reader.line_num}")


def _read_parquet(path: Path, spec: SourceSpec) -> Iterator[Record]:
    import pyarrow.parquet as pq

    for i, row in enumerate(pq.read_table(path).to_pylist()):
        yield Record(fields=row, origin=f"{path}[row {i}]", document=f"{path}[row {i}]")


def _read_text(path: Path, spec: SourceSpec) -> Iterator[Record]:
    yield Record(fields={"text": _text_of(path, spec), "path": str(path), "name": path.stem},
                 origin=str(path), document=str(path))


def _read_xml(path: Path, spec: SourceSpec) -> Iterator[Record]:
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(_text_of(path, spec).encode("utf-8"))
    except ET.ParseError as exc:
        raise RecipeError([f"{path}:{exc.position[0]}: not well-formed XML ({exc})"]) from None
    doc = {root.tag: _xml_to_dict(root)}
    target = lookup(doc, tuple(spec.records.split("."))) if spec.records else doc[root.tag]
    items = target if isinstance(target, list) else [target] if target is not None else []
    if not items:
        raise RecipeError([f"{path}: records: no {spec.records!r} element path in this file (root is <{root.tag}>)"])
    for i, item in enumerate(items):
        yield Record(fields=item if isinstance(item, dict) else {"text": item}, origin=f"{path}[{i}]", document=str(path))


def _xml_to_dict(el) -> dict | str:
    """Element → dict: attributes as '@name', children by tag (lists when repeated), text as 'text'."""
    children = list(el)
    if not children and not el.attrib:
        return (el.text or "").strip()
    out: dict = {f"@{k}": v for k, v in el.attrib.items()}
    for child in children:
        value = _xml_to_dict(child)
        if child.tag in out:
            out[child.tag] = (out[child.tag] if isinstance(out[child.tag], list) else [out[child.tag]]) + [value]
        else:
            out[child.tag] = value
    if (el.text or "").strip():
        out["text"] = el.text.strip()
    return out


def _read_hub(spec: SourceSpec) -> Iterator[Record]:
    import datasets

    try:
        dataset = datasets.load_dataset(spec.path, split=spec.split)
    except Exception as exc:  # datasets raises many types; all mean "could not load this id/folder"
        raise RecipeError([f"data source {spec.path} (reader: hub, split {spec.split!r}): could not load: {exc}"]) from None
    for i, row in enumerate(dataset):
        yield Record(fields=dict(row), origin=f"{spec.path}[{spec.split} {i}]", document=f"{spec.path}[{spec.split} {i}]")


_READERS: dict[str, Callable[[Path, SourceSpec], Iterator[Record]]] = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": lambda path, spec: _read_delimited(path, spec, ","),
    "tsv": lambda path, spec: _read_delimited(path, spec, "\t"),
    "parquet": _read_parquet,
    "text": _read_text,
    "xml": _read_xml,
}
