"""Template filters of the console and the admin: the units of fleet.lib.humanize."""

from django import template

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
