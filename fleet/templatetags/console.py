"""Template filters of the console and the admin: the units of fleet.lib.humanize."""

from django import template
from django.utils import timezone

from fleet.lib import humanize

register = template.Library()


@register.filter
def bytes_iec(value):
    return humanize.size(value)


@register.filter
def seconds(value):
    return humanize.duration(value)


@register.filter
def ms(value):
    return humanize.ms(value)


@register.filter
def pct(value):
    return humanize.percent(value)


@register.filter
def count_of(value, word):
    """``{{ n|count_of:"device" }}`` is "1 device" or "3 devices"; "word,words" for irregular ones."""
    one, _, many = str(word).partition(",")
    return humanize.plural(value or 0, one, many or None)


@register.filter
def words(value):
    """A state name as words: "held_past_deadline" is "held past deadline"."""
    return str(value).replace("_", " ")


@register.filter
def ago(value):
    """A past moment as "just now", "12 min ago", "3 h 5 min ago"."""
    if value is None:
        return "never"
    seconds = (timezone.now() - value).total_seconds()
    return "just now" if seconds < 60 else f"{humanize.duration(seconds)} ago"


@register.filter
def downloaded(deployment):
    """ "12.0 MiB of 22.9 MiB", or "not started" before the device reports any bytes."""
    if not deployment.bytes_total:
        return "not started"
    return f"{humanize.size(deployment.bytes_done)} of {humanize.size(deployment.bytes_total)}"
