"""README.md names what the code names: its benchmark providers table is the bench registry
(kasa_kernels/bench/providers.py, REGISTRY: names, order and forward-only status), and its backends table names
exactly kasa_kernels._backend.NAMES. Adding a provider or a backend without its README row fails here."""
import os
import re
from typing import Dict, List

from kasa_kernels._backend import NAMES as BACKEND_NAMES
from kasa_kernels.bench.providers import REGISTRY

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
ROW = re.compile(r"^\| `([^`]+)` \|(.*)$")  # a table row whose first cell is one code span: "| `name` | ..."


def sections(text: str) -> Dict[str, List[str]]:
    """Level-2 heading ("## Title") -> the lines under it up to the next one, code blocks left out."""
    out: Dict[str, List[str]] = {}
    current, fenced = None, False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        if line.startswith("## "):
            current = line[3:].strip()
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return out


def table_rows(lines: List[str]) -> List[List[str]]:
    """[name, cell, cell, ...] of every "| `name` | ..." row."""
    rows = []
    for line in lines:
        m = ROW.match(line)
        if m:
            rows.append([m.group(1)] + [c.strip() for c in m.group(2).rstrip().rstrip("|").split("|")])
    return rows


def readme_section(title: str) -> List[str]:
    with open(README, encoding="utf-8") as f:
        found = sections(f.read())
    assert title in found, f"README.md has no '## {title}' section (has: {', '.join(found)})"
    return found[title]


def test_benchmark_providers_table_is_the_registry():
    rows = table_rows(readme_section("Benchmarks"))
    assert rows, "README.md, ## Benchmarks: no providers table (rows like '| `name` | yes/no | what |')"
    names = [r[0] for r in rows]
    want = [p.name for p in REGISTRY]
    assert names == want, (f"README.md's providers table lists {names}; the registry (bench/providers.py) has "
                           f"{want}: add, remove or reorder the README rows")
    for row, p in zip(rows, REGISTRY):
        stated = row[1] if len(row) > 1 else ""
        assert stated in ("yes", "no"), f"README.md, provider {p.name}: 'forward only' cell is {stated!r}, not yes/no"
        assert (stated == "yes") == p.forward_only, (
            f"README.md says {p.name} is {'' if stated == 'yes' else 'not '}forward only; the registry says "
            f"forward_only={p.forward_only}")


def test_backends_table_names_the_backends():
    rows = table_rows(readme_section("Backends"))
    names = [r[0] for r in rows]
    assert len(names) == len(set(names)), f"README.md's backends table repeats a row: {names}"
    assert set(names) == set(BACKEND_NAMES), (f"README.md's backends table names {sorted(names)}; "
                                              f"kasa_kernels._backend.NAMES is {sorted(BACKEND_NAMES)}")


def test_memory_model_table_is_generated():
    from kasa_kernels.bench.memory_model import markdown_table

    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert "<!-- memory-model -->\n" + markdown_table() + "\n" in text, (
        "README.md's memory table (after <!-- memory-model -->) is not `python -m kasa_kernels.bench.memory_model`'s "
        "output: paste it again")
