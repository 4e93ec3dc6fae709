"""The README's configuration table names every key of the schema (and nothing that is not one)."""

from __future__ import annotations

import re
from pathlib import Path

from pipelines.config import load_config, to_flat_dict

README = Path(__file__).parents[2] / "README.md"


def _documented() -> tuple[set[str], set[str]]:
    """Keys named in the table's first column ('`a.b`, `.c`' is a.b and a.c) and its wildcards ('`a.b.*`')."""
    text = README.read_text()
    table = text[text.index("| key | default | meaning |"):]
    table = table[: table.index("\n\n")]
    keys, wildcards = set(), set()
    for row in table.splitlines()[2:]:
        prefix = ""
        for token in re.findall(r"`([^`]+)`", row.split("|")[1]):
            if token.endswith(".*"):
                wildcards.add(token[:-1])
                continue
            if token.startswith("."):
                token = prefix + token[1:]
            keys.add(token)
            prefix = token.rsplit(".", 1)[0] + "." if "." in token else ""
    return keys, wildcards


def test_every_config_key_is_documented():
    keys, wildcards = _documented()
    flat = to_flat_dict(load_config(None, []))
    missing = [k for k in flat if k not in keys and not any(k.startswith(w) for w in wildcards)
               and not any(k.startswith(d + ".") for d in keys)]
    assert not missing, f"README's configuration table lacks {missing}"
    sections = {k.split(".")[0] for k in flat} | {"task"}
    unknown = [k for k in keys if k.split(".")[0] not in sections]
    assert not unknown, f"README's configuration table names keys that do not exist: {unknown}"
