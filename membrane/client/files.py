"""Reading what the user hands over: a file or stdin, then its YAML documents."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from shared import kube_yaml
from shared.errors import InvalidArgument


def load_file(path: str) -> tuple[str, str]:
    """The text of ``path`` (``-``: stdin) and the name to use for it in messages."""
    if path == "-":
        return sys.stdin.read(), "-"
    try:
        return Path(path).read_text(), path
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}", field="file") from None


def load_documents(path: str) -> tuple[list[dict[str, Any]], str]:
    """The non-empty YAML documents of ``path``, each a mapping, and the source name."""
    text, source = load_file(path)
    # kubectl's reading (timestamps stay strings): the documents travel to the service as JSON
    docs = [d for d in kube_yaml.load_all(text, source) if d is not None]
    for index, doc in enumerate(docs, start=1):
        if not isinstance(doc, dict):
            raise InvalidArgument(f"{source}: document {index} is not a mapping", field="file")
    return docs, source
