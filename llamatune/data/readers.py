"""Readers: files in their original formats → records (plain dicts), each tagged with where it came from.

One function per format and a dict to dispatch; every reader names file and line (or key, or byte
offset) for anything it cannot read, so bad data is never a traceback or a silent skip.
"""

from __future__ import annotations

import csv
import difflib
import glob
import json
from pathlib import Path
from typing import Callable, Iterator

from llamatune.data.fields import lookup
from llamatune.data.records import MAX_LISTED, BadRows, Record, SourceKeyError, kind, no_constant, short, text_of
from llamatune.errors import RecipeError
from llamatune.schema import SourceSpec

_BY_SUFFIX = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
              ".txt": "text", ".md": "text", ".xml": "xml"}
_COMPRESSED = {".gz": "gunzip", ".bz2": "bunzip2", ".xz": "unxz", ".zst": "unzstd", ".zip": "unzip", ".7z": "7z x"}
_OFFICE = {".xlsx", ".xls", ".ods", ".docx", ".doc", ".odt", ".pdf", ".numbers"}


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
    elif path.is_symlink():
        raise RecipeError([f"{spec.path}: a symbolic link that leads to no file or folder (a loop, or its target is gone)"])
    elif path.exists():
        raise RecipeError([f"{spec.path}: not a regular file or folder (a device, pipe or socket); copy the data to a file"])
    else:
        raise RecipeError([f"{spec.path}: no such file or folder (relative paths resolve against data.root "
                           "or the recipe's folder)"])
    if not files:
        raise RecipeError([f"{spec.path}: matches no data files ({', '.join(_BY_SUFFIX)})"])
    packed = [f for f in files if f.suffix.lower() in _COMPRESSED]
    if packed:
        tool = _COMPRESSED[packed[0].suffix.lower()]
        raise RecipeError([f"{packed[0]}: a compressed file; llamatune reads data files as they are, uncompressed: "
                           f"{tool} it first, and point the source at the result"])
    if spec.reader == "auto":
        unknown = [f for f in files if f.suffix.lower() not in _BY_SUFFIX]
        if unknown:
            office = " (a spreadsheet or document: export it as CSV or text first)" if unknown[0].suffix.lower() in _OFFICE else ""
            raise RecipeError([f"{unknown[0]}: no reader for '{unknown[0].suffix or '(no extension)'}'{office}; set reader: "
                               "to one of jsonl, json, csv, tsv, parquet, text, xml"])
    return files


def read_source(spec: SourceSpec, notes: list[str] | None = None) -> Iterator[Record]:
    """Yields the records of a source in a stable order, exploded and capped as the spec says.

    Args:
        notes: Receives one line per thing worth telling about how a file was read (the JSON shape
            found, a byte-order mark stripped), for `data check` and the manifest.

    Raises:
        RecipeError: For a file that cannot be read, naming file and line, or a file with no records.
    """
    count = seen = unexploded = 0
    fields: set[str] = set()
    for record in _raw_records(spec, notes if notes is not None else []):
        seen += 1
        if spec.explode and lookup(record.fields, tuple(spec.explode.split("."))) is None:
            unexploded += 1
            fields.update(record.fields)
        for item in _explode(record, spec.explode):
            if spec.max_records is not None and count >= spec.max_records:
                return
            count += 1
            yield item
    if spec.explode and seen and unexploded == seen:
        close = difflib.get_close_matches(spec.explode.split(".")[0], sorted(fields), n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise SourceKeyError("explode", f"field {spec.explode!r} is in none of the {seen} records of {spec.path}; they "
                             f"have: {', '.join(sorted(fields)[:20])}.{hint}")


def _raw_records(spec: SourceSpec, notes: list[str]) -> Iterator[Record]:
    if spec.reader == "hub":
        yield from _read_hub(spec)
        return
    for path in source_files(spec):
        kind = spec.reader if spec.reader != "auto" else _BY_SUFFIX[path.suffix.lower()]
        count = 0
        for record in _READERS[kind](path, spec, notes):
            count += 1
            yield record
        if count == 0:
            raise RecipeError([f"{path}: no records in this file ({_why_empty(path, kind)}); fill it, or leave it "
                               "out of the source's path"])


def _why_empty(path: Path, kind: str) -> str:
    try:
        size = path.stat().st_size
    except OSError:
        size = -1
    if size == 0:
        return "it is empty, 0 bytes"
    return {"csv": "a header row and no rows under it", "tsv": "a header row and no rows under it",
            "jsonl": "only blank lines", "json": "an empty list or mapping"}.get(kind, f"{size} bytes, nothing read")


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
        raise SourceKeyError("explode", f"{record.origin}: field {field!r} is {kind(items)}, not a list to make one "
                             "record per item of; point explode at a list field")
    for i, item in enumerate(items):
        yield Record(fields=_replace(record.fields, keys, item), origin=f"{record.origin}.{field}[{i}]",
                     document=record.document)


def _replace(obj: dict, keys: tuple[str, ...], value) -> dict:
    out = dict(obj)
    out[keys[0]] = value if len(keys) == 1 else _replace(obj[keys[0]], keys[1:], value)
    return out


def _read_jsonl(path: Path, spec: SourceSpec, notes: list[str]) -> Iterator[Record]:
    bad = BadRows(path)
    # "\n" only: str.splitlines would also split at \u2028 and other separators that JSON allows inside strings.
    # A raw carriage return cannot be inside a JSON string, so old-Mac and Windows line ends are safe to fold.
    text = text_of(path, spec, notes).replace("\r\n", "\n").replace("\r", "\n")
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_constant=no_constant)
        except json.JSONDecodeError as exc:
            bad.add(lineno, f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        except ValueError as exc:  # NaN / Infinity: Python's json reads them, JSON does not have them
            bad.add(lineno, str(exc))
            continue
        except RecursionError:
            bad.add(lineno, "nested too deeply to read (thousands of levels)")
            continue
        if not isinstance(obj, dict):
            bad.add(lineno, f"expected a JSON object per line, got {kind(obj)}")
            continue
        if not bad:
            yield Record(fields=obj, origin=f"{path}:{lineno}", document=f"{path}:{lineno}")
    bad.check("a JSON object per line, each on one line")


def _read_json(path: Path, spec: SourceSpec, notes: list[str]) -> Iterator[Record]:
    try:
        doc = json.loads(text_of(path, spec, notes), parse_constant=no_constant)
    except json.JSONDecodeError as exc:
        hint = "; one JSON object per line is JSON Lines: name the file .jsonl" if exc.msg == "Extra data" else ""
        raise RecipeError([f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}){hint}"]) from None
    except ValueError as exc:
        raise RecipeError([f"{path}: {exc}"]) from None
    except RecursionError:
        raise RecipeError([f"{path}: nested too deeply to read (thousands of levels)"]) from None
    top = doc
    if spec.records:
        doc = lookup(doc, tuple(spec.records.split(".")))
        if doc is None:
            keys = "keys: " + ", ".join(list(top)[:12]) if isinstance(top, dict) else f"the top level is {kind(top)}"
            raise SourceKeyError("records", f"no {spec.records!r} in {path} ({keys})")
    where = f"the list at records: {spec.records!r}" if spec.records else "a list"
    if isinstance(doc, dict):
        # A mapping id -> record (PubMedQA's layout): each value is a record, its key becomes `id`.
        if not all(isinstance(v, dict) for v in doc.values()):
            lists = [k for k, v in doc.items() if isinstance(v, list)]
            hint = f"records: {lists[0]}" if lists else "records: data"
            raise RecipeError([f"{path}: a JSON mapping was found where a list of records was expected, and its values "
                               f"are not all objects (keys: {', '.join(list(doc)[:8])}); set records: to the path of "
                               f"the list (e.g. {hint})"])
        notes.append(f"{path}: a JSON mapping id → record: read {len(doc)} records, each key as field `id` (if you meant "
                     "a list inside it, set records: to its path)")
        for key, value in doc.items():
            yield Record(fields={"id": key, **value}, origin=f"{path}[{key}]", document=f"{path}[{key}]")
    elif isinstance(doc, list):
        bad = [f"{path}[{i}]: expected an object, got {kind(v)}" for i, v in enumerate(doc) if not isinstance(v, dict)]
        if bad:
            raise RecipeError(bad[:MAX_LISTED] + [f"{path}: {len(bad)} of {len(doc)} items of {where} are not objects"])
        notes.append(f"{path}: {where} of {len(doc)} records")
        for i, value in enumerate(doc):
            yield Record(fields=value, origin=f"{path}[{i}]", document=f"{path}[{i}]")
    else:
        raise RecipeError([f"{path}: expected a list of records or a mapping id -> record, got {kind(doc)} {short(doc)}"])


def _read_delimited(path: Path, spec: SourceSpec, notes: list[str], delimiter: str) -> Iterator[Record]:
    # Python's csv refuses fields over 128 KiB; a long contract or abstract is data, and huge records are
    # bounded later by characters (pipeline), so the limit is raised rather than a traceback shown.
    csv.field_size_limit(2**31 - 1)
    text = text_of(path, spec, notes)
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise RecipeError([f"{path}:{line}: a NUL byte: this is a binary file, or UTF-16 text read as "
                           f"{spec.encoding} (then set encoding: utf-16 on the source)"])
    # csv handles quoting (doubled quotes, delimiters and newlines inside quotes); line.split would not.
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    bad = BadRows(path)
    try:
        header = next(reader, None)
        if not header:
            return
        if len(set(header)) != len(header):
            twice = sorted({h for h in header if header.count(h) > 1})
            raise RecipeError([f"{path}:1: the header names column(s) {', '.join(map(repr, twice))} twice; rename one"])
        start = reader.line_num + 1
        for row in reader:
            first, start = start, reader.line_num + 1  # a quoted field may span lines: name the row's first
            if not row:
                continue
            if len(row) != len(header):
                span = f" (a row from line {first} to {reader.line_num}: an unclosed quote?)" if reader.line_num > first else ""
                bad.add(first, f"{len(row)} columns, the header has {len(header)}{span}")
            elif not bad:
                yield Record(fields=dict(zip(header, row)), origin=f"{path}:{reader.line_num}",
                             document=f"{path}:{reader.line_num}")
    except csv.Error as exc:
        raise RecipeError([f"{path}:{reader.line_num}: not readable as {'TSV' if delimiter == chr(9) else 'CSV'} ({exc})"]) from None
    bad.check(f"{len(header)} columns in every row; check quoting (a quote inside a field must be doubled) or the "
              "delimiter (.csv: comma, .tsv: tab)")


def _read_parquet(path: Path, spec: SourceSpec, notes: list[str]) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as exc:
        raise RecipeError([f"{path}: not a readable Parquet file ({exc}); is it truncated, or another format?"]) from None
    for i, row in enumerate(rows):
        yield Record(fields=row, origin=f"{path}[row {i}]", document=f"{path}[row {i}]")


def _read_text(path: Path, spec: SourceSpec, notes: list[str]) -> Iterator[Record]:
    yield Record(fields={"text": text_of(path, spec, notes), "path": str(path), "name": path.stem},
                 origin=str(path), document=str(path))


def _read_xml(path: Path, spec: SourceSpec, notes: list[str]) -> Iterator[Record]:
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(text_of(path, spec, notes).encode("utf-8"))
    except ET.ParseError as exc:
        raise RecipeError([f"{path}:{exc.position[0]}: not well-formed XML ({exc})"]) from None
    doc = {_local(root.tag): _xml_to_dict(root)}
    target = lookup(doc, tuple(spec.records.split("."))) if spec.records else doc[_local(root.tag)]
    items = target if isinstance(target, list) else [target] if target is not None else []
    if not items:
        raise SourceKeyError("records", f"no {spec.records!r} element path in {path} (its root is <{_local(root.tag)}>; a "
                             f"path starts with it, e.g. {_local(root.tag)}.item)")
    for i, item in enumerate(items):
        yield Record(fields=item if isinstance(item, dict) else {"text": item}, origin=f"{path}[{i}]", document=str(path))


def _xml_to_dict(el) -> dict | str:
    """Element → dict: attributes as '@name', children by tag (lists when repeated), text as 'text'."""
    children = list(el)
    if not children and not el.attrib:
        return (el.text or "").strip()
    out: dict = {f"@{_local(k)}": v for k, v in el.attrib.items()}
    for child in children:
        value, tag = _xml_to_dict(child), _local(child.tag)
        if tag in out:
            out[tag] = (out[tag] if isinstance(out[tag], list) else [out[tag]]) + [value]
        else:
            out[tag] = value
    if (el.text or "").strip():
        out["text"] = el.text.strip()
    return out


def _local(tag: str) -> str:
    """A tag without its XML namespace ('{http://...}Document' → 'Document'): templates can name it."""
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else str(tag)


def _read_hub(spec: SourceSpec) -> Iterator[Record]:
    import datasets

    try:
        folder = Path(spec.path)
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            saved = datasets.load_from_disk(str(folder))  # written by save_to_disk, which load_dataset cannot read
            dataset = saved[spec.split] if isinstance(saved, datasets.DatasetDict) else saved
        else:
            dataset = datasets.load_dataset(spec.path, split=spec.split)
    except Exception as exc:  # datasets raises many types; all mean "could not load this id/folder"
        raise RecipeError([f"data source {spec.path} (reader: hub, split {spec.split!r}): could not load: {exc}"]) from None
    for i, row in enumerate(dataset):
        yield Record(fields=dict(row), origin=f"{spec.path}[{spec.split} {i}]", document=f"{spec.path}[{spec.split} {i}]")


_READERS: dict[str, Callable[[Path, SourceSpec, list[str]], Iterator[Record]]] = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": lambda path, spec, notes: _read_delimited(path, spec, notes, ","),
    "tsv": lambda path, spec, notes: _read_delimited(path, spec, notes, "\t"),
    "parquet": _read_parquet,
    "text": _read_text,
    "xml": _read_xml,
}
