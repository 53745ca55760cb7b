"""The one formatter of user-facing sentences: every refusal, hint and redaction is worded here.

A refusal names the full key (or file), what is wrong, and what to do, in one sentence:

    KEY=VALUE must be REQUIREMENT.                          `must_be`
    KEY=VALUE is not known; use a, b or c.                  `not_known` (with "did you mean" when one is near)
    KEY is not a key of PARENT; did you mean KEY2?          `not_a_key`

`did_you_mean` is the one nearest-match rule, `first_line` the one way an exception becomes a clause, and
`redact` the one way a URL or DSN loses its password before it is printed, logged or written.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Any

# how close a word must be to be offered as "did you mean": 0.6 is difflib's own default; options and keys are
# short words, where one wrong letter in five (0.8) and transpositions still pass at 0.6
NEAR_CUTOFF = 0.6


def did_you_mean(word: str, candidates: Iterable[Any], cutoff: float = NEAR_CUTOFF) -> str | None:
    """The candidate nearest to `word`, or None when none is near enough to be a likely typo."""
    options = [str(c) for c in candidates]
    near = difflib.get_close_matches(str(word), options, n=1, cutoff=cutoff)
    return near[0] if near else None


def show(value: Any) -> str:
    """A config value as a user would type it on the command line (true/false/null, lists in brackets)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, list | tuple):
        return "[" + ",".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def choices(options: Sequence[Any], conjunction: str = "or") -> str:
    """`a, b or c`."""
    shown = [show(o) for o in options]
    if len(shown) <= 1:
        return "".join(shown)
    return f"{', '.join(shown[:-1])} {conjunction} {shown[-1]}"


def sentence(text: str) -> str:
    """One sentence: no line breaks, one final full stop."""
    text = " ".join(text.split())
    return text if text.endswith((".", "?", "!")) else text + "."


def must_be(key: str, value: Any, requirement: str, hint: str | None = None) -> str:
    """`KEY=VALUE must be REQUIREMENT` (`; HINT`)."""
    return sentence(f"{key}={show(value)} must be {requirement}" + (f"; {hint}" if hint else ""))


def not_known(key: str, value: Any, options: Sequence[Any], hint: str | None = None) -> str:
    """`KEY=VALUE is not known; use a, b or c` (with the nearest option first when one is near)."""
    near = did_you_mean(str(value), [show(o) for o in options]) if options else None
    text = f"{key}={show(value)} is not known"
    if near is not None:
        text += f"; did you mean {key}={near}? (the options: {choices(options)})"
    elif options:
        text += f"; use {choices(options)}"
    return sentence(text + (f"; {hint}" if hint else ""))


def not_a_key(key: str, parent: str, candidates: Iterable[str], hint: str | None = None) -> str:
    """`KEY is not a key of PARENT; did you mean PARENT.NEAR?` (or the keys it has when none is near)."""
    keys = sorted(str(c) for c in candidates)
    wrong = key.rsplit(".", 1)[-1]
    near = did_you_mean(wrong, keys)
    prefix = f"{parent}." if parent else ""
    text = f"{key} is not a key of {parent or 'the config'}"
    if near is not None:
        text += f"; did you mean {prefix}{near}?"
    elif keys:
        text += f"; its keys are {choices(keys)}"
    return sentence(text + (f" ({hint})" if hint else ""))


def first_line(err: BaseException | str) -> str:
    """The first line of an exception's message (its type's name when it has none): a clause for a sentence."""
    text = str(err).strip()
    if not text:
        return type(err).__name__ if isinstance(err, BaseException) else ""
    return text.splitlines()[0].rstrip(".")


# `scheme://user:password@host...`: done on the text (not by a URL parser) so that a malformed URL, or a password
# holding an unescaped `@`, `/` or `:`, is hidden too: everything between the user's `:` and the last `@` before
# the path. Several URLs in one text (a message quoting two) are each redacted.
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:@/\s]*):(?P<password>[^\s]*)@"
                          r"(?P<host>[^@\s/]*(?=[/?#\s]|$))")
# libpq key/value DSNs: `host=db user=u password=secret dbname=x`
_DSN_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the password of every URL (`scheme://user:pass@host`) or key/value DSN (`password=...`)
    replaced by `***`: for logs, files and messages. Text without a password comes back unchanged."""
    text = _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@{m['host']}", str(text))
    return _DSN_PASSWORD.sub(lambda m: f"{m.group(1)}***", text)
