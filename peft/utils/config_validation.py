"""What each config field accepts: `Rule`s, and the small constructors the config classes build their tables from.

A config class lists `field_rules: ClassVar[dict[str, Rule]]` (subclasses add or override entries), and
`PeftConfig.__setattr__` passes every assignment of a listed field through its rule. So one table checks the
values of the constructor, of `adapter_config.json` (which goes through the constructor) and of later assignments
(`config.r = 8`, TRL's `config.trainable_token_indices = [...]`). A rule returns the value to store (e.g. a list
of module names becomes a set) or raises `ValueError("Invalid <field>=<value!r>: expected <what>.")`.

Numbers must be finite, bools must be real bools (a JSON `"false"` is a string, not False), and the strings that
the matcher uses as regular expressions must compile.
"""

from __future__ import annotations

import enum
import math
import numbers
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

_UNSET = object()


class Refused(Exception):
    """Raised inside a rule's `convert`; `Rule.check` turns it into the ValueError that names the field.

    `where` / `value` / `expected` point at one entry of a container (e.g. `rank_pattern['q']`)."""

    def __init__(self, detail: str = "", where: str = "", value: Any = _UNSET, expected: Optional[str] = None):
        super().__init__(detail)
        self.detail, self.where, self.value, self.expected = detail, where, value, expected


@dataclass(frozen=True)
class Rule:
    """`expected` says in words what the field accepts; `convert(value)` returns the stored form or raises
    `Refused`."""

    expected: str
    convert: Callable[[Any], Any]
    # Optional sentence put before the message for a refused value, `lead(value) -> str`, where callers match on
    # fixed words (upstream's "Invalid task type: ..."); the message proper names the field, the value and `expected`.
    lead: Optional[Callable[[Any], str]] = None

    def check(self, name: str, value: Any) -> Any:
        try:
            return self.convert(value)
        except Refused as refused:
            shown = value if refused.value is _UNSET else refused.value
            detail = f" ({refused.detail})" if refused.detail else ""
            expected = refused.expected or self.expected
            message = f"Invalid {name}{refused.where}={shown!r}: expected {expected}{detail}."
            raise ValueError(message if self.lead is None else f"{self.lead(value)} ({message})") from None


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _refuse_unless(ok: bool, detail: str = "") -> None:
    if not ok:
        raise Refused(detail)


# --- scalars --------------------------------------------------------------------------------------------------------
def integer(minimum: int = 1) -> Rule:
    """An int (not a bool, not a float) >= `minimum`, stored as a plain int."""
    def convert(value):
        _refuse_unless(not isinstance(value, bool), "a bool is not a number here")
        _refuse_unless(is_int(value) and value >= minimum)
        return int(value)

    return Rule("a positive int" if minimum == 1 else f"an int >= {minimum}", convert)


def number(low: float, high: float = math.inf, low_open: bool = True, high_open: bool = True) -> Rule:
    """A finite real number (not a bool) in the interval; ints stay ints, other reals become floats."""
    def convert(value):
        _refuse_unless(not isinstance(value, bool), "a bool is not a number here")
        _refuse_unless(is_real(value) and math.isfinite(value))
        _refuse_unless((value > low if low_open else value >= low) and (value < high if high_open else value <= high))
        return int(value) if is_int(value) else float(value)

    if high == math.inf:
        words = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        words = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Rule(words, convert)


def boolean() -> Rule:
    def convert(value):
        _refuse_unless(isinstance(value, bool))
        return value

    return Rule("a bool (True or False; in JSON true or false, not a string or a number)", convert)


def one_of(options: Iterable[Any], aliases: Optional[dict] = None) -> Rule:
    """One of `options`, compared by type as well as value (so 1 is not True); `aliases` map other spellings."""
    options, aliases = tuple(options), dict(aliases or {})

    def convert(value):
        value = next((new for old, new in aliases.items() if _same(value, old)), value)
        _refuse_unless(any(_same(value, option) for option in options))
        return value

    return Rule(f"one of {options}", convert)


def _same(value: Any, option: Any) -> bool:
    return isinstance(value, type(option)) and value == option


def member_of(enum_cls: type[enum.Enum]) -> Rule:
    """A member of `enum_cls` or its value, stored as the member."""
    def convert(value):
        try:
            return enum_cls(value.value if isinstance(value, enum.Enum) else value)
        except (ValueError, TypeError):
            raise Refused() from None

    return Rule(f"one of {[m.value for m in enum_cls]}", convert)


def text(paths: bool = False) -> Rule:
    """A string (with `paths`, also an `os.PathLike`, stored as a string)."""
    def convert(value):
        if paths and isinstance(value, os.PathLike):
            value = os.fspath(value)
        _refuse_unless(isinstance(value, str))
        return value

    return Rule("a path string" if paths else "a string", convert)


def mapping() -> Rule:
    def convert(value):
        _refuse_unless(isinstance(value, dict))
        return value

    return Rule("a dict", convert)


def optional(rule: Rule) -> Rule:
    return Rule(f"None or {rule.expected}", lambda value: None if value is None else rule.convert(value))


def either(*rules: Rule) -> Rule:
    """The first of `rules` that accepts the value."""
    def convert(value):
        details = []
        for rule in rules:
            try:
                return rule.convert(value)
            except Refused as refused:
                details.append(refused.detail)
        raise Refused(next((d for d in details if d), ""))

    return Rule(", or ".join(r.expected for r in rules), convert)


# --- containers and names -------------------------------------------------------------------------------------------
_SEQUENCES = (list, tuple, set, frozenset)


def compiles(pattern: str) -> Optional[str]:
    """None when `pattern` is a valid regular expression, else why not."""
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"not a valid regular expression: {exc}"
    return None


def regex() -> Rule:
    def convert(value):
        _refuse_unless(isinstance(value, str))
        problem = compiles(value)
        _refuse_unless(problem is None, problem or "")
        return value

    return Rule("a regular expression string", convert)


def sequence_of(item: Rule, items: str, into: type = list) -> Rule:
    """A list, tuple or set whose entries `item` accepts (a lone string is not a list of names), stored as `into`;
    `items` names the entries in the message (e.g. "module name strings")."""
    def convert(value):
        if isinstance(value, str):
            raise Refused(f"a single entry is written as a list: [{value!r}]" if _accepts(item, value) else "")
        _refuse_unless(isinstance(value, _SEQUENCES))
        entries = []
        for entry in value:
            try:
                entries.append(item.convert(entry))
            except Refused:
                raise Refused(f"entry {entry!r} is not {item.expected}") from None
        return into(entries)

    return Rule(f"a list (or tuple, set) of {items}", convert)


def _accepts(rule: Rule, value: Any) -> bool:
    try:
        rule.convert(value)
    except Refused:
        return False
    return True


def pattern_dict(value_rule: Rule) -> Rule:
    """A dict from regular expression (matched against a module name's dotted suffix) to a value `value_rule`
    accepts; an entry with a bad value is named, e.g. `rank_pattern['q_proj']`."""
    expected = f"a dict from regular expression to {value_rule.expected}"

    def convert(value):
        _refuse_unless(isinstance(value, dict))
        result = {}
        for key, entry in value.items():
            _refuse_unless(isinstance(key, str), f"key {key!r} is not a string")
            problem = compiles(key)
            _refuse_unless(problem is None, f"key {key!r} is {problem}")
            try:
                result[key] = value_rule.convert(entry)
            except Refused:
                raise Refused(where=f"[{key!r}]", value=entry, expected=value_rule.expected) from None
        return result

    return Rule(expected, convert)
