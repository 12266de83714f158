"""Local dataset loading shared by the tasks: JSONL (and parquet through a lazy pyarrow import).

Rows are validated as they are read; a bad row raises ``DataError`` (a ``ValueError``) that names the
file, the 1-based line (JSONL) or row (parquet) and what is wrong, so a broken dataset fails before
training starts rather than as a silent zero reward later.

Field names are configurable: ``fields`` maps the name the task uses to the column in the file, e.g.
``{"problem": "question", "answer": "final_answer"}``; a plain sequence means "same name in the file".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from megatron_rspo.errors import UserError

FieldSpec = Union[Mapping[str, str], Sequence[str]]
TypeSpec = Union[type, tuple[type, ...]]


class DataError(UserError, ValueError):
    """A malformed dataset row: ``<file>:<line>: <problem>`` (``row N`` for parquet)."""

    def __init__(self, path: str | Path, where: int | None, problem: str, unit: str = "line"):
        self.path, self.where, self.problem = str(path), where, problem
        loc = str(path) if where is None else (f"{path}:{where}" if unit == "line" else f"{path}: {unit} {where}")
        super().__init__(f"{loc}: {problem}")


def _as_mapping(fields: FieldSpec | None) -> dict[str, str]:
    if fields is None:
        return {}
    if isinstance(fields, str):  # a lone string is a common slip for a one-element list
        return {fields: fields}
    if isinstance(fields, Mapping):
        return dict(fields)
    return {name: name for name in fields}


def _type_name(t: TypeSpec) -> str:
    return " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))


def _type_ok(value: Any, expected: TypeSpec) -> bool:
    allowed = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in allowed:  # JSON true is not an int answer
        return False
    return isinstance(value, allowed)


def iter_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line/row number, raw record) for each record; blank JSONL lines are skipped.
    ``.parquet`` files are read with pyarrow (imported only then); everything else is JSONL."""
    path = Path(path)
    if path.suffix == ".parquet":
        yield from _iter_parquet(path)
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(path, lineno, f"expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading {path} needs pyarrow (pip install pyarrow), or convert it to JSONL first, e.g. "
            f"python -c \"import pandas as pd; pd.read_parquet('{path}').to_json('out.jsonl', orient='records', "
            f'lines=True)"'
        ) from None
    yield from enumerate(pq.read_table(path).to_pylist(), 1)


def load_rows(
    path: str | Path,
    fields: FieldSpec,
    *,
    optional: FieldSpec | None = None,
    types: Mapping[str, TypeSpec] | None = None,
    limit: int | None = None,
    convert: Callable[[dict[str, Any]], Any] | None = None,
) -> list[Any]:
    """Load records keeping only ``fields`` (required) and ``optional`` fields, renamed to the task's
    names. ``types`` maps a task name to the allowed type(s); unlisted fields must be ``str``.
    Missing optional fields (or JSON null) are absent from the returned dicts. Raises ``DataError``
    on the first bad row and on a file without rows; ``limit`` stops after that many rows.
    ``convert`` turns each checked row into the task's object; a ``ValueError`` it raises is reported
    with the row's file and line like any other bad row."""
    required, opt = _as_mapping(fields), _as_mapping(optional)
    types = dict(types or {})
    unit = "row" if Path(path).suffix == ".parquet" else "line"
    out: list[Any] = []
    for where, rec in iter_records(path):
        if limit is not None and len(out) >= limit:
            break
        row: dict[str, Any] = {}
        for name, column in (*required.items(), *opt.items()):
            value = rec.get(column)
            if value is None:
                if name in required:
                    have = ", ".join(sorted(map(str, rec))) or "none"
                    why = "is null" if column in rec else f"is missing (fields present: {have})"
                    raise DataError(path, where, f"field {column!r} {why}", unit)
                continue
            expected = types.get(name, str)
            if not _type_ok(value, expected):
                got = type(value).__name__
                raise DataError(path, where, f"field {column!r} must be {_type_name(expected)}, got {got}", unit)
            row[name] = value
        if convert is not None:
            try:
                row = convert(row)
            except ValueError as e:
                raise DataError(path, where, str(e), unit) from None
        out.append(row)
    if not out:
        raise DataError(path, None, "no rows (the file is empty)" if limit != 0 else "limit=0 selects no rows")
    return out
