"""JSON annotation files read with the position of the first error: a malformed file is named
with its line and column (`path:line:col`), never a bare JSONDecodeError."""
from __future__ import annotations

import json


class AnnotationError(ValueError):
    """An annotation file that cannot be read: the message names the file and the position
    (line:column) or the record at fault."""


def loads_at(text: str, path: str, line: int = 1):
    """json.loads(text) of the part of `path` that starts at `line`; AnnotationError naming
    path:line:col on a syntax error."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}:{line + e.lineno - 1}:{e.colno}: not valid JSON: {e.msg}") from None


def load_json(path: str):
    """The JSON document in `path` (UTF-8); AnnotationError naming path:line:col when it is not
    valid JSON or not UTF-8 text."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None
    return loads_at(text, path)


def load_json_or_lines(path: str):
    """A JSON document, or JSON Lines (one value a line) when the file does not parse as one
    document.  The error reported is the JSON document's when the file reads as one (it starts
    with '[', or its first line is not a value by itself), else the first bad line's."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None
    try:
        return loads_at(text, path)
    except AnnotationError as doc_error:
        lines = text.splitlines()
        first = next((n for n, l in enumerate(lines) if l.strip()), None)
        if first is None or text.lstrip().startswith("["):
            raise doc_error from None
        try:
            json.loads(lines[first])
        except json.JSONDecodeError:
            raise doc_error from None
        return [loads_at(l, path, n) for n, l in enumerate(lines, 1) if l.strip()]
