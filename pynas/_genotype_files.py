"""Reading a genotype given by the user: a published cell's name, or a JSON file (both search spaces)."""
from __future__ import annotations

import json
from typing import Callable, Dict, TypeVar

G = TypeVar("G")


def load_named_or_file(source: str, published: Dict[str, G], parse: Callable[[str], G]) -> G:
    """``published[source]``, else ``parse`` of the file ``source``; every failure a ValueError naming ``genotype``."""
    names = ", ".join(published)
    if not isinstance(source, str) or not source:
        raise ValueError(f"genotype: expected a file name or one of {names}, got {source!r}")
    if source in published:
        return published[source]
    try:
        with open(source, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ValueError(f"genotype: {source} is neither a file nor one of {names}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"genotype: cannot read {source} ({type(exc).__name__}: {exc})") from None
    try:
        return parse(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"genotype: {source} is not JSON ({exc})") from None
    except ValueError as exc:
        raise ValueError(f"genotype: {source}: {exc}") from None
