"""Keeping secrets out of everything hardtrain writes: run metadata, events, log lines and
error messages.

Three nets, applied together by ``redact``:
- names: a value under a name that looks secret (``HF_TOKEN``, ``db_password``,
  ``apiKey``: see ``is_secret_name``) is replaced by ``REDACTED``;
- known values: the values of environment variables with such names (8 characters or
  more) are cut out of any text, wherever they turn up (a diff, a command line, a path);
- shapes: URLs with ``user:password@``, common token formats (AWS, GitHub, GitLab, Slack,
  Hugging Face, OpenAI/Anthropic, Stripe, Google, JWT, ``Bearer ...``, PEM private keys)
  and assignments in free text (``PASSWORD=hunter22``, ``api_key = "..."``), where the
  name must clearly hold a secret and the value look like one: ``key=len`` and
  ``token_ids = tok(x)`` are code, and a diff must still apply.

Names are strong (``password``, ``api_key``: every value cut) or weak (``token``,
``key``: in a config only values that look like credentials are cut, so ``pad_token:
"<pad>"`` and ``key_dim: 64`` stay). Redaction errs towards removing too much; it cannot
know every secret format.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "<redacted>"
_MIN_KNOWN_LEN = 8  # shorter env values ("1", "true") would cut holes in every text

# Names: strong ones always hold a secret (DB_PASSWORD, MYAPIKEY, client_secret) ...
_STRONG = re.compile(
    r"secret|password|passwd|passphrase|credential|creds|api[-_]?key|access[-_]?key"
    r"|private[-_]?key|auth[-_]?token|connection[-_]?string",
    re.IGNORECASE,
)
# ... weak ones (whole words, split at _ - . and camelCase) often do: HF_TOKEN, SLACK_KEY,
# but also pad_token, sort_key. A weak name's value is cut only where it looks like a
# secret, except in the environment and on the command line, where it always is.
_WEAK_PARTS = frozenset({
    "token", "key", "auth", "authorization", "pass", "cookie", "dsn", "sas",
    "signature", "pat", "otp",
})
_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
NOT_SECRET, WEAK, STRONG = 0, 1, 2
_ADDRESS = re.compile(r" at 0x[0-9A-Fa-f]+")
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-+/=.~:@!#%^*&$]{8,}")

_SHAPES = [
    # scheme://user:password@host, scheme://:password@host -> scheme://<redacted>@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@'\"]*:[^/\s'\"]+@"), rf"\1{REDACTED}@"),
    # https://<long token>@host (tokens used as the user name)
    (re.compile(r"(?i)\b((?:https?|ftp|git)://)[^/\s:@'\"]{20,}@"), rf"\1{REDACTED}@"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)",
                re.DOTALL), REDACTED),
    (re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b"), REDACTED),
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"), REDACTED),
    (re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}"), REDACTED),
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), REDACTED),
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}"), REDACTED),
    (re.compile(r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}"), REDACTED),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"), REDACTED),
    (re.compile(r"\bAIza[0-9A-Za-z_-]{35}"), REDACTED),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), REDACTED),
    (re.compile(r"(?i)\b(bearer|basic|token)(\s+)[A-Za-z0-9._~+/=-]{16,}"), rf"\1\2{REDACTED}"),
]
# name = value, name: "value", --name=value in free text (diffs, command lines, messages)
_ASSIGNMENT = re.compile(
    r"""(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)(?P<sep>["']?\s*[:=]\s*)"""
    r"""(?P<value>"[^"\n]*"|'[^'\n]*'|[^\s"',;)}\]]+)"""
)


def secrecy(name: str) -> int:
    """How surely ``name`` (an environment variable, a config key, a flag) holds a secret:
    STRONG (``db-password``, ``MYAPIKEY``), WEAK (``HF_TOKEN``, ``sort_key``) or
    NOT_SECRET (``max_tokens``, ``tokenizer``, ``author``)."""
    if _STRONG.search(name):
        return STRONG
    parts = {part.lower() for part in _SPLIT.split(name) if part}
    return WEAK if parts & _WEAK_PARTS else NOT_SECRET


def is_secret_name(name: str) -> bool:
    """Strong or weak: in the environment and on the command line, its value is cut."""
    return secrecy(name) != NOT_SECRET


def looks_secret(value: str) -> bool:
    """A value that could be a credential: 8+ characters without spaces, with letters and
    digits, or 20+ of them. ``<pad>``, ``input_ids``, ``text``: no."""
    if len(value) < 8 or any(c.isspace() for c in value) or _harmless(value):
        return False
    mixed = any(c.isalpha() for c in value) and any(c.isdigit() for c in value)
    return mixed or len(value) >= 20


def known_secrets(environ: Mapping[str, str] | None = None) -> set[str]:
    """The values of secret-looking environment variables, long enough to search for."""
    env = os.environ if environ is None else environ
    return {v for k, v in env.items() if len(v) >= _MIN_KNOWN_LEN and is_secret_name(k)}


def redact_text(text: str, known: Iterable[str] = ()) -> str:
    """``text`` with known secret values, credential shapes and secret assignments cut."""
    for value in sorted(known, key=len, reverse=True):  # longest first: no partial leftovers
        if value in text:
            text = text.replace(value, REDACTED)
    for pattern, replacement in _SHAPES:
        text = pattern.sub(replacement, text)
    return _ASSIGNMENT.sub(_redact_assignment, text)


def scrub(text: str) -> str:
    """``redact_text`` with the environment's secret values: for log lines and messages."""
    return redact_text(text, known_secrets())


def redact_argv(argv: Iterable[str], known: Iterable[str] = ()) -> list[str]:
    """A command line with the value of every secret-looking flag cut (``--token X``,
    ``--db-password=X``; after a weak flag numbers and booleans stay: ``--key-dim 64``),
    then each argument as ``redact_text`` does."""
    out: list[str] = []
    previous = ""
    for arg in argv:
        name, eq, value = arg.partition("=")
        if arg.startswith("-") and eq and _flag_value_is_secret(name, value):
            arg = f"{name}={REDACTED}"
        elif (previous.startswith("-") and "=" not in previous and not arg.startswith("-")
              and _flag_value_is_secret(previous, arg)):
            arg = REDACTED
        previous = arg
        out.append(redact_text(arg, known))
    return out


def _flag_value_is_secret(flag: str, value: str) -> bool:
    """A strong flag's value always is (``--db-password 123456``); a weak one's unless it
    is a number or a boolean (``--key-dim 64``)."""
    level = secrecy(flag)
    return level == STRONG or (level == WEAK and not _harmless(value))


def _redact_assignment(match: re.Match[str]) -> str:
    value, name = match["value"], match["name"]
    quoted = value[:1] in "\"'" and len(value) > 1
    bare = value.strip("\"'")
    level = secrecy(name)
    if level == STRONG:  # password = "..." / PASSWORD=hunter22: any value that is not code
        cut = len(bare) >= 6 if quoted else _TOKEN_CHARS.fullmatch(bare) is not None
    else:  # token_ids = tok(x), key=len: code; only credential-looking values
        cut = level == WEAK and looks_secret(bare) and _TOKEN_CHARS.fullmatch(bare) is not None
    if not cut or REDACTED in value or _harmless(bare):
        return match[0]
    quote = value[0] if quoted else ""
    return f"{match['name']}{match['sep']}{quote}{REDACTED}{quote}"


def _harmless(value: str) -> bool:
    """Values that are not secrets even under a secret-looking name: numbers, booleans,
    None, empty, and references to where the secret comes from (``os.environ[...]``)."""
    lowered = value.lower()
    return (not value or lowered in ("true", "false", "none", "null")
            or re.fullmatch(r"[-+0-9.e_]+", lowered) is not None
            or lowered.startswith(("os.environ", "os.getenv", "${", "$")))


def redact(value: Any, known: Iterable[str] | None = None) -> Any:
    """A JSON-safe copy of ``value`` with every secret cut (see the module docstring).

    Under a strong name every string (and int) is cut; under a weak one, strings that
    look like secrets. Mappings (and dataclasses, argparse Namespaces, pydantic models,
    named tuples) become dicts with str keys; sequences and sets become lists; numbers,
    booleans and None stay; anything else becomes its ``str`` (without `` at 0x...``
    addresses). ``known`` defaults to the secret values of the environment.
    """
    known = known_secrets() if known is None else set(known)
    return _walk(value, known, NOT_SECRET, 0)


def _walk(value: Any, known: set[str], level: int, depth: int) -> Any:
    if depth > 64:
        return "<nested too deep>"
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return REDACTED if level == STRONG else value
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        return REDACTED if _cut_under(level, value) else redact_text(value, known)
    items = as_mapping(value)
    if items is not None:
        return {str(k): _walk(v, known, max(level, secrecy(str(k))), depth + 1)
                for k, v in items.items()}
    if isinstance(value, list | tuple | set | frozenset):
        values = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [_walk(v, known, level, depth + 1) for v in values]
    # without its memory address, an object reads the same in every process
    return _walk(_ADDRESS.sub("", str(value)), known, level, depth + 1)


def _cut_under(level: int, text: str) -> bool:
    """Is a string under a name of this secrecy cut? Strong: always; weak: if it looks
    like a credential."""
    return level == STRONG or (level == WEAK and looks_secret(text))


def secret_values(value: Any) -> set[str]:
    """The strings in ``value`` (a config) that ``redact`` would cut for their key: to be
    cut wherever else they turn up (a config file's diff, the command line)."""
    found: set[str] = set()

    def collect(node: Any, level: int, depth: int) -> None:
        if depth > 64:
            return
        items = as_mapping(node)
        if items is not None:
            for key, item in items.items():
                collect(item, max(level, secrecy(str(key))), depth + 1)
        elif isinstance(node, list | tuple | set | frozenset):
            for item in node:
                collect(item, level, depth + 1)
        elif isinstance(node, str) and len(node) >= _MIN_KNOWN_LEN and _cut_under(level, node):
            found.add(node)

    collect(value, NOT_SECRET, 0)
    return found


def as_mapping(value: Any) -> Mapping[Any, Any] | None:
    if isinstance(value, Mapping):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):  # a named tuple
        fields: Mapping[Any, Any] = value._asdict()
        return fields
    dump = getattr(value, "model_dump", None)  # pydantic v2
    if callable(dump) and not isinstance(value, type):
        dumped: Any = dump()
        return dumped if isinstance(dumped, Mapping) else None
    if type(value).__name__ == "Namespace" and hasattr(value, "__dict__"):  # argparse
        attributes: Mapping[Any, Any] = vars(value)
        return attributes
    return None
