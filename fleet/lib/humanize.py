"""Numbers as operators read them: bytes in IEC units, durations, rates and plurals. No Django here."""

from __future__ import annotations

_IEC = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
# Words whose plural is not the word plus "s".
_IRREGULAR = {"alias": "aliases", "class": "classes", "process": "processes", "is": "are", "was": "were"}


def plural(count: int | float, word: str, many: str | None = None) -> str:
    """``plural(1, "device")`` is "1 device", ``plural(3, "device")`` "3 devices"."""
    return f"{count:,} {word if count == 1 else many or _IRREGULAR.get(word, word + 's')}"


def size(n: int | float | None) -> str:
    """Bytes in binary units: 262606848 is "250.4 MiB"."""
    if n is None:
        return "—"
    value = float(n)
    for unit in _IEC:
        if abs(value) < 1024 or unit == _IEC[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float | None) -> str:
    """A span as "45 s", "12 min 5 s", "3 h 20 min" or "2 d 4 h"."""
    if seconds is None:
        return "—"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    minutes, s = divmod(s, 60)
    if minutes < 60:
        return f"{minutes} min {s} s" if s else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def ms(value: float | None) -> str:
    """A latency: "0.42 ms", "15.7 ms", "1,204 ms"."""
    if value is None:
        return "—"
    if value < 1:
        return f"{value:.2f} ms"
    return f"{value:.1f} ms" if value < 100 else f"{value:,.0f} ms"


def percent(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}%"
