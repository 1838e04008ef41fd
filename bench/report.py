"""Figures, and the part of docs/benchmarks.md that ``make bench`` owns.

The generator rewrites only what lies between ``BEGIN`` and ``END``; every other
section of the file (e.g. the agent's own) is kept as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

BEGIN = "<!-- bench:begin (written by `make bench`; edit bench/, not this block) -->"
END = "<!-- bench:end -->"


@dataclass
class Figure:
    """One measured number beside its ceiling from the same run."""

    section: str
    name: str
    value: float | None
    unit: str
    ceiling: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""


@dataclass
class Section:
    title: str
    command: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: str = ""


def number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "not measured"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}" if abs(value) < 10 else f"{value:,.1f}"
    return f"{text} {unit}".strip()


def render(header: list[str], sections: list[Section]) -> str:
    lines = [BEGIN, "", *header, ""]
    for section in sections:
        lines += [f"### {section.title}", ""]
        lines += [f"Command: `{section.command}`", ""] if section.command else []
        if section.failed:
            lines += [f"**This benchmark did not complete:** {section.failed}", ""]
        if section.figures:
            lines += ["| figure | measured | ceiling in the same run | target | met |", "|---|---|---|---|---|"]
            for f in section.figures:
                met = "" if f.met is None else ("yes" if f.met else "**no**")
                name = f"{f.name} ({f.note})" if f.note else f.name
                lines.append(f"| {name} | {number(f.value, f.unit)} | {f.ceiling} | {f.target} | {met} |")
            lines.append("")
        for note in section.notes:
            lines += [note, ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write(path: Path, block: str) -> None:
    """Put ``block`` between the markers of ``path``, keeping everything outside them."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN.split(" (")[0] in text and END in text:
        head = text[: text.index(BEGIN.split(" (")[0])]
        tail = text[text.index(END) + len(END) :]
        text = head + block.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
