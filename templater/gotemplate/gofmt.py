"""Go's fmt as templates see it: %v of every value, Sprint, Sprintln and Sprintf's verbs. Pure."""

from __future__ import annotations

import dataclasses
import decimal
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any


class _Missing:
    """Go's invalid reflect.Value: a missing map key or a field of nothing. Prints <no value>."""

    def __repr__(self) -> str:
        return "<no value>"


MISSING: Any = _Missing()


def go_type(value: Any) -> str:
    """The Go type a value stands for, as fmt names it in %!verb(type=value)."""
    if value is None or value is MISSING:
        return "<nil>"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "map[string]interface {}"
    if isinstance(value, (list, tuple)):
        return "[]interface {}"
    return type(value).__name__


def fmt_float(value: float, verb: str = "g", precision: int = -1) -> str:
    """strconv.FormatFloat(value, verb, precision, 64)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if verb == "f":
        return f"{value:.{6 if precision < 0 else precision}f}" if precision >= 0 else _shortest_f(value)
    if verb == "e":
        text = f"{value:.{precision}e}" if precision >= 0 else _shortest_e(value)
        return _go_exponent(text)
    # 'g': shortest (or precision digits), %e when the exponent is < -4 or >= the precision (6 when shortest)
    if value == 0:
        return "-0" if math.copysign(1, value) < 0 else "0"
    if precision < 0:
        digits, exp = _shortest_digits(value)
        eprec = 6
    else:
        rounded = f"{abs(value):.{max(precision, 1) - 1}e}"
        mantissa, _, e = rounded.partition("e")
        digits, exp = mantissa.replace(".", "").rstrip("0") or "0", int(e)
        eprec = max(precision, 1)
        if eprec > len(digits) and len(digits) >= exp + 1:
            eprec = len(digits)
    sign = "-" if value < 0 else ""
    if exp < -4 or exp >= eprec:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if exp < 0:
        return f"{sign}0.{'0' * (-exp - 1)}{digits}"
    whole, frac = digits[: exp + 1].ljust(exp + 1, "0"), digits[exp + 1 :]
    return f"{sign}{whole}{'.' + frac if frac else ''}"


def _shortest_digits(value: float) -> tuple[str, int]:
    """The shortest decimal digits that read back as value, and the exponent of the first."""
    _sign, digits, exponent = decimal.Decimal(repr(abs(value))).normalize().as_tuple()
    text = "".join(map(str, digits))
    return text, len(text) - 1 + int(exponent)


def _shortest_f(value: float) -> str:
    digits, exp = _shortest_digits(value)
    sign = "-" if value < 0 else ""
    if exp < 0:
        return f"{sign}0.{'0' * (-exp - 1)}{digits}"
    whole, frac = digits[: exp + 1].ljust(exp + 1, "0"), digits[exp + 1 :]
    return f"{sign}{whole}{'.' + frac if frac else ''}"


def _shortest_e(value: float) -> str:
    digits, exp = _shortest_digits(value)
    sign = "-" if value < 0 else ""
    return f"{sign}{digits[0]}{'.' + digits[1:] if len(digits) > 1 else ''}e{exp:+03d}"


def _go_exponent(text: str) -> str:
    mantissa, _, exp = text.partition("e")
    number = int(exp)
    return f"{mantissa}e{'-' if number < 0 else '+'}{abs(number):02d}"


def value(v: Any, top: bool = True) -> str:
    """fmt's %v."""
    if v is MISSING or v is None:  # at the top Go has dug nil out of its interface: no value
        return "<no value>" if top else "<nil>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return fmt_float(v)
    if isinstance(v, str):
        return v
    if isinstance(v, bytes):
        return "[" + " ".join(str(b) for b in v) + "]"
    if isinstance(v, Mapping):
        items = sorted(v.items(), key=lambda kv: sort_key(kv[0]))
        return "map[" + " ".join(f"{value(k, False)}:{value(x, False)}" for k, x in items) + "]"
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(value(x, False) for x in v) + "]"
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return "{" + " ".join(value(getattr(v, f.name), False) for f in dataclasses.fields(v)) + "}"
    if hasattr(v, "go_string"):
        return str(v.go_string())
    return str(v)


def sort_key(key: Any) -> tuple[int, Any]:
    """Map keys in the order Go's fmt and range take them: booleans, numbers, then text."""
    if isinstance(key, bool):
        return (0, key)
    if isinstance(key, (int, float)):
        return (1, key)
    return (2, str(key))


def sprint(args: Sequence[Any]) -> str:
    """fmt.Sprint: a space between operands when neither is a string."""
    out = []
    for i, arg in enumerate(args):
        if i > 0 and not isinstance(arg, str) and not isinstance(args[i - 1], str):
            out.append(" ")
        out.append(value(arg, False))
    return "".join(out)


def sprintln(args: Sequence[Any]) -> str:
    return " ".join(value(a, False) for a in args) + "\n"


_VERB = re.compile(r"%([-+# 0]*)(\*|\d+)?(?:\.(\*|\d*))?([a-zA-Z%])")


def quote(text: str) -> str:
    """strconv.Quote."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\a\b\f\n\r\t\v":
            out.append({"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif not ch.isprintable():
            out.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def sprintf(fmt: str, args: Sequence[Any]) -> str:
    """fmt.Sprintf for the verbs templates use: v d s q x X o b c t f e g %, widths, precisions
    and the flags - + # 0 space; a wrong type or a missing argument as Go writes them."""
    out: list[str] = []
    pos = 0
    used = 0
    for match in _VERB.finditer(fmt):
        out.append(fmt[pos : match.start()])
        pos = match.end()
        flags, width_text, precision_text, verb = match.groups()
        if verb == "%":
            out.append("%")
            continue
        width = precision = -1
        if width_text == "*":
            width, used = _star(args, used)
        elif width_text:
            width = int(width_text)
        if precision_text == "*":
            precision, used = _star(args, used)
        elif precision_text is not None:
            precision = int(precision_text or 0)
        if used >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        arg = args[used]
        used += 1
        out.append(_pad(_verb(verb, flags, precision, arg), width, flags, verb, arg))
    out.append(fmt[pos:])
    if used < len(args):
        extra = ", ".join(f"{go_type(a)}={value(a, False)}" for a in args[used:])
        out.append(f"%!(EXTRA {extra})")
    return "".join(out)


def _star(args: Sequence[Any], used: int) -> tuple[int, int]:
    """A width or precision given as *: the next argument."""
    if used < len(args) and isinstance(args[used], int):
        return int(args[used]), used + 1
    return -1, used + 1


def _pad(text: str, width: int, flags: str, verb: str, arg: Any) -> str:
    if width < 0 or len(text) >= width:
        return text
    if "-" in flags:
        return text.ljust(width)
    if "0" in flags and verb in "dxXobeEfFgG" and isinstance(arg, (int, float)) and not isinstance(arg, bool):
        sign = text[0] if text[:1] in "+- " else ""
        return sign + text[len(sign) :].rjust(width - len(sign), "0")
    return text.rjust(width)


def _bad(verb: str, arg: Any) -> str:
    return f"%!{verb}({go_type(arg)}={value(arg, False)})"


def _verb(verb: str, flags: str, precision: int, arg: Any) -> str:
    is_int = isinstance(arg, int) and not isinstance(arg, bool)
    if verb == "v":
        if "#" in flags and isinstance(arg, str):
            return quote(arg)
        return value(arg, False) if arg is MISSING else value(arg)
    if verb == "t":
        return ("true" if arg else "false") if isinstance(arg, bool) else _bad(verb, arg)
    if verb in "dboxXc" and is_int:
        if verb == "c":
            return chr(arg)
        base = {"d": "d", "b": "b", "o": "o", "x": "x", "X": "X"}[verb]
        text = format(abs(arg), base)
        if "#" in flags and verb in "xX":
            text = ("0x" if verb == "x" else "0X") + text
        elif "#" in flags and verb == "o":
            text = "0" + text
        sign = "-" if arg < 0 else ("+" if "+" in flags else (" " if " " in flags else ""))
        return sign + text
    if verb in "xX" and isinstance(arg, str):
        text = arg.encode().hex()
        return text.upper() if verb == "X" else text
    if verb in "feEgG" and isinstance(arg, float):
        base = verb.lower()
        text = fmt_float(arg, base, precision if precision >= 0 else (6 if base in "fe" else -1))
        if "+" in flags and not text.startswith("-"):
            text = "+" + text
        return text.upper() if verb in "EG" else text
    if verb == "s":
        if isinstance(arg, str):
            return arg if precision < 0 else arg[:precision]
        if isinstance(arg, (list, tuple)) and all(isinstance(x, str) for x in arg):
            return "[" + " ".join(arg) + "]"
        if isinstance(arg, (Mapping, list, tuple)) or arg is None or arg is MISSING or hasattr(arg, "go_string"):
            return value(arg, False)
        return _bad(verb, arg)
    if verb == "q":
        if isinstance(arg, str):
            return quote(arg)
        if is_int:
            return "'" + chr(arg) + "'"
        return _bad(verb, arg)
    return _bad(verb, arg)
