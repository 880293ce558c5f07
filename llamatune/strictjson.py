"""Every JSON file llamatune writes is strict JSON: no NaN or Infinity, which Python's json module
writes by default and strict parsers (jq, JavaScript, Go, Rust's serde) reject.

A figure that is not a finite number becomes `null`, and the object that held it gains a
`null_reasons` entry saying why (e.g. `{"loss": null, "null_reasons": {"loss": "nan"}}`), unless the
writer already gave a reason of its own.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def clean(value: Any) -> Any:
    """A copy of `value` with every non-finite float replaced by None and explained in `null_reasons`."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        out, reasons = {}, dict(value.get("null_reasons") or {})
        for key, item in value.items():
            if key == "null_reasons":
                continue
            if isinstance(item, float) and not math.isfinite(item):
                reasons.setdefault(str(key), "not a finite number: " + ("nan" if math.isnan(item) else str(item)))
            out[key] = clean(item)
        if reasons:
            out["null_reasons"] = reasons
        return out
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    """json.dumps of clean(value); allow_nan=False, so anything that slipped through is a bug, not a file."""
    return json.dumps(clean(value), allow_nan=False, **kwargs)


def write(path: Path, value: Any, indent: int | None = 2) -> None:
    """Writes `value` as strict JSON, atomically (a temporary file renamed into place)."""
    path = Path(path)
    text = dumps(value, indent=indent) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # mkstemp creates 0600; reports and run files are shared (a serving account, a colleague): the mode
        # any other file of the user's gets, i.e. 0666 less the umask
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
