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

Numbers and booleans under secret-looking names are kept: ``key_dim=64`` is not a secret.
Redaction errs towards removing too much; it cannot know every secret format.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "<redacted>"
_MIN_KNOWN_LEN = 8  # shorter env values ("1", "true") would cut holes in every text

# Whole words (split at _ - . and camelCase) that mark a name as secret ...
_SECRET_PARTS = frozenset({
    "token", "key", "auth", "authorization", "pass", "password", "passwd", "passphrase",
    "secret", "secrets", "credential", "credentials", "creds", "cookie", "dsn", "sas",
    "apikey", "signature", "pat", "otp",
})
# ... and fragments that do anywhere in it (DBPASSWORD, MYAPIKEY, AZURE_..._CONNECTION_STRING)
_SECRET_FRAGMENTS = re.compile(
    r"secret|password|passwd|passphrase|credential|apikey|api_key|access_key|private_key"
    r"|connection_string|client_secret",
    re.IGNORECASE,
)
_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
# In free text, only names that clearly hold a secret ("key", "auth" alone are code words).
_STRONG_NAME = re.compile(
    r"secret|password|passwd|passphrase|credential|api[-_]?key|access[-_]?key|private[-_]?key"
    r"|auth[-_]?token|connection[-_]?string",
    re.IGNORECASE,
)
_STRONG_PARTS = frozenset({"token", "creds", "pat"})
_ADDRESS = re.compile(r" at 0x[0-9A-Fa-f]+")
_BARE_SECRET = re.compile(r"(?=.*[A-Za-z])(?=.*[0-9])[A-Za-z0-9_\-+/=.~:@!#%^*&$]{8,}")

_SHAPES = [
    # scheme://user:password@host -> scheme://<redacted>@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@'\"]+:[^/\s@'\"]+@"), rf"\1{REDACTED}@"),
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


def is_secret_name(name: str) -> bool:
    """Does ``name`` (an environment variable, a config key, a command-line flag) look
    like it holds a secret? ``HF_TOKEN``, ``apiKey``, ``db-password``: yes;
    ``max_tokens``, ``tokenizer``, ``author``: no."""
    if _SECRET_FRAGMENTS.search(name):
        return True
    return any(part.lower() in _SECRET_PARTS for part in _SPLIT.split(name) if part)


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


def _redact_assignment(match: re.Match[str]) -> str:
    value, name = match["value"], match["name"]
    quoted = value[:1] in "\"'" and len(value) > 1
    bare = value.strip("\"'")
    strong = _STRONG_NAME.search(name) is not None or any(
        part.lower() in _STRONG_PARTS for part in _SPLIT.split(name) if part)
    looks_secret = len(bare) >= 6 if quoted else _BARE_SECRET.fullmatch(bare) is not None
    if not strong or not looks_secret or REDACTED in value or _harmless(bare):
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

    Mappings (and dataclasses, argparse Namespaces, pydantic models, named tuples) become
    dicts with str keys; sequences and sets become lists; numbers, booleans and None stay;
    anything else becomes its ``str`` (without `` at 0x...`` addresses). ``known`` defaults to
    the secret values of the environment (``known_secrets()``).
    """
    known = known_secrets() if known is None else set(known)
    return _walk(value, known, secret=False, depth=0)


def _walk(value: Any, known: set[str], *, secret: bool, depth: int) -> Any:
    if depth > 64:
        return "<nested too deep>"
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        return REDACTED if secret else redact_text(value, known)
    items = as_mapping(value)
    if items is not None:
        return {
            str(k): _walk(v, known, secret=secret or is_secret_name(str(k)), depth=depth + 1)
            for k, v in items.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        values = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [_walk(v, known, secret=secret, depth=depth + 1) for v in values]
    # without its memory address, an object reads the same in every process
    text = _ADDRESS.sub("", str(value))
    return _walk(text, known, secret=secret, depth=depth + 1)


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
