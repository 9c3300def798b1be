"""The built-in rules: PII, secrets, prompt-injection phrases and a deny list, with the standard library alone.

A text is normalised before the scans (:func:`normalize`): Unicode NFKC (full-width digits and letters, no-break and
other spaces become their plain forms), format characters dropped (zero-width spaces, soft hyphens, bidi controls);
the injection phrases are also matched after mapping the Cyrillic and Greek look-alikes of Latin letters
(:data:`CONFUSABLES`). Every pattern is compiled once per process, by the first :func:`build`. Every repeat in them
is bounded and none can match the same text in many ways, so a scan stays linear on hostile text (a megabyte of
digits, spaces or ``@``). Numbers that look like a card or an IBAN are kept only when their check digits hold (Luhn,
ISO 13616 mod 97). A violation's description names what was found, never the value itself ("card number ending
4242" at most).
docs/guardrail-rules.md has the tables.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lens_core.config import Invalid, KeySpec, choice, const, optional, path_value

from .base import SEVERITIES, VIOLATION_TYPES, BuildContext, CheckConfig, CheckResult, GuardrailError, Violation

RULES = ("email", "phone", "card", "iban", "api_key", "private_key", "injection")

# rule -> (violation type, severity); the deny list's come from deny_type / deny_severity
RULE_VIOLATIONS = {
    "email": ("pii_leakage", "medium"),
    "phone": ("pii_leakage", "medium"),
    "card": ("pii_leakage", "high"),
    "iban": ("pii_leakage", "high"),
    "api_key": ("secret_leakage", "critical"),
    "private_key": ("secret_leakage", "critical"),
    "injection": ("prompt_injection", "high"),
}

# the risk score of a result: the worst severity found (0.0 with no violation)
SEVERITY_RISK = {"low": 0.2, "medium": 0.5, "high": 0.8, "critical": 0.95}

MAX_VIOLATIONS = 32  # per call; every match is still counted in details["matches"]

DEFAULT_STAGES = frozenset({"input", "output"})


def _rule_names(value: object) -> list[str]:
    allowed = ", ".join(RULES)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise Invalid(f"a list of rule names from: {allowed}")
    unknown = [item for item in value if item not in RULES]
    if unknown:
        raise Invalid(f"rule names from: {allowed} ({unknown[0]!r} is not one)")
    return list(dict.fromkeys(value))


def _deny_terms(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
        raise Invalid("a list of non-empty words or phrases")
    return [item.strip() for item in value]


OPTIONS: dict[str, KeySpec] = {
    "rules": KeySpec(_rule_names, const(list(RULES)), "the rules to run; default: all of " + ", ".join(RULES)),
    "deny": KeySpec(_deny_terms, const([]), "words or phrases refused (whole words, any case)"),
    "deny_file": KeySpec(optional(path_value), const(None), "a file of denied words or phrases, one per line"),
    "deny_type": KeySpec(choice(*VIOLATION_TYPES), const("disallowed_topic"), "the violation type of a deny match"),
    "deny_severity": KeySpec(choice(*SEVERITIES), const("high"), "the severity of a deny match"),
}


# --- normalisation ------------------------------------------------------------------------------------------------

# Unicode's format characters (general category Cf, Unicode 14 as in Python 3.11's unicodedata; a test compares it
# with unicodedata): invisible, so "ig\u200bnore" and "4111\u00ad1111…" read as the words and numbers they show
FORMAT_CHARACTERS = (
    "\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064"
    "\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f"
)

# Cyrillic and Greek letters that look like Latin ones, mapped to them before the injection phrases are matched
# ("ignоre" with a Cyrillic о). Only there: the deny list and the other rules see the text as written.
CONFUSABLES = {
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t", "у": "y",
    "х": "x", "ѕ": "s", "і": "i", "ј": "j", "һ": "h", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ӏ": "l", "ү": "y",
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T", "У": "Y",
    "Х": "X", "Ѕ": "S", "І": "I", "Ј": "J", "Һ": "H", "Ԁ": "D", "Ԛ": "Q", "Ԝ": "W", "Ӏ": "I", "Ү": "Y",
    # Greek
    "α": "a", "β": "b", "γ": "y", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "σ": "o", "τ": "t",
    "υ": "u", "χ": "x", "ω": "w",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O", "Ρ": "P",
    "Τ": "T", "Υ": "Y", "Χ": "X",
}  # fmt: skip
_CONFUSABLE_TABLE = str.maketrans(CONFUSABLES)


def normalize(text: str, format_characters: re.Pattern[str]) -> str:
    """NFKC with the format characters dropped; ASCII text as it is (the common case costs one pass)."""
    if text.isascii():
        return text
    return unicodedata.normalize("NFKC", format_characters.sub("", text))


# --- check digits -------------------------------------------------------------------------------------------------


def luhn_ok(digits: str) -> bool:
    """Whether a string of ASCII digits passes the Luhn check (payment card numbers)."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


# ISO 13616 registry: country code -> IBAN length
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25,
    "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18,
    "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33,
    "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip


def iban_ok(iban: str) -> bool:
    """Whether an IBAN (upper case, no spaces) has its country's length and passes the mod-97 check."""
    if IBAN_LENGTHS.get(iban[:2]) != len(iban):
        return False
    rearranged = iban[4:] + iban[:4]
    number = "".join(str(int(char, 36)) for char in rearranged)
    return int(number) % 97 == 1


def shannon_entropy(value: str) -> float:
    """Bits per character of a string's own character distribution."""
    counts = Counter(value)
    size = len(value)
    return -sum(n / size * math.log2(n / size) for n in counts.values())


# --- patterns (sources; compiled once, by the first build) ---------------------------------------------------------

# the local part's lookbehind keeps a long run of letters to one attempt; the scan runs only when the text has an @
EMAIL = (
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}"
    r"(?![A-Za-z0-9-])"
)
EMAIL_AROUND = 16  # @ signs looked at one by one
EMAIL_BEFORE = 65  # characters before an @ an address can start (the local part: at most 64)
EMAIL_AFTER = 8 * 64 + 26  # characters after it an address can end (8 labels and a top-level domain)

# Phones: international (+CC …) with separators between groups, or compact; national: North American
# (1-)(NXX) NXX-XXXX, European trunk-prefix forms (0… with a separator), French pairs. The digit count is checked
# after the match. A number that goes on (a digit right before or after, or one space, dot, slash or dash away) is
# a longer number, not a phone.
PHONE = (
    r"(?<![A-Za-z0-9+.-])(?<![0-9][ /.-])(?:"
    r"\+[1-9][0-9]{7,14}"
    r"|\+[1-9][0-9]{0,2}[ .-]?(?:\([0-9]{1,4}\)[ .-]?)?[0-9]{1,5}(?:[ .-][0-9]{1,5}){1,5}"
    r"|(?:1[ .-])?(?:\([2-9][0-9]{2}\)[ .-]?|[2-9][0-9]{2}[ .-])[2-9][0-9]{2}[ .-][0-9]{4}"
    r"|0[1-9][0-9]{0,4}[ /-][0-9]{3,4}[ -]?[0-9]{3,4}"
    r"|0[1-9](?:[ .][0-9]{2}){4}"
    r")(?![A-Za-z0-9]|[ /.-][0-9])"
)
_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

# The patterns below have no leading lookbehind (the engine can then skip to the characters that start one, which
# measured faster): the character before a match is checked after it (_run_start), and so are the check digits.

# 13-19 digits, issuer digit 2-6 (Mastercard 2-series, Amex/Diners/JCB 3, Visa 4, Mastercard 5, Discover/UnionPay
# 6): either a single space or dash allowed between any two, or written in the groups of a card (4-4-4-4 with 1-3
# more, 4-6-4, 4-6-5) apart by the same one to three of space, dot and dash each time ("4111.1111.1111.1111",
# "4111  1111  1111  1111", "5555 - 5555 - …"; a no-break space is a space by then)
CARD = (
    r"[2-6](?:(?:[ -]?[0-9]){12,18}(?![0-9]|[ -][0-9])"
    r"|[0-9]{3}([ .-]{1,3})(?:[0-9]{4}\1[0-9]{4}\1[0-9]{4}(?:\1[0-9]{1,3})?|[0-9]{6}\1[0-9]{4,5})"
    r"(?![0-9]|[ .-]{1,3}[0-9]))"
)
CARD_BEFORE = frozenset("0123456789-.")
DIGITS = frozenset("0123456789")

# any case ("de89 3704 …"), groups of four apart by up to two spaces; the check digits hold after upper-casing. It
# is tried only where two ASCII letters and two digits start a word, found in the text's shape (each letter an "a",
# each digit a "0", anything else a ".": bytes.translate and bytes.find): a pattern tried at each letter of a text
# would cost about twice the whole scan on prose
IBAN = r"[A-Za-z]{2}[0-9]{2}(?: {0,2}[A-Za-z0-9]{4}){2,7}(?: {0,2}[A-Za-z0-9]{1,4})?(?![A-Za-z0-9])"
_SHAPE = bytes(
    ord("a") if chr(byte).isascii() and chr(byte).isalpha() else ord("0") if chr(byte) in "0123456789" else ord(".")
    for byte in range(256)
)
IBAN_BEFORE = frozenset(_ALNUM)

# (pattern, description): each starts with a literal, so the engine jumps from one occurrence of it to the next
API_KEYS: tuple[tuple[str, str], ...] = (
    (r"AKIA[A-Z0-9]{16}(?![A-Za-z0-9])", "AWS access key id"),
    (r"ASIA[A-Z0-9]{16}(?![A-Za-z0-9])", "AWS access key id"),
    (r"gh[pousr]_[A-Za-z0-9]{36,255}(?![A-Za-z0-9_])", "GitHub token"),
    (r"github_pat_[A-Za-z0-9_]{22,255}", "GitHub fine-grained token"),
    (r"xox[abposr]-[A-Za-z0-9-]{10,250}", "Slack token"),
    (r"sk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,250}", "OpenAI/Anthropic-style API key"),
    (r"AIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])", "Google API key"),
    (r"[rs]k_live_[0-9A-Za-z]{16,247}(?![0-9A-Za-z])", "Stripe live key"),  # secret (sk_) or restricted (rk_)
    (r"hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9_/-]{20,200}", "Slack webhook URL"),
    # a lookbehind here: a failed attempt reads up to 4 KB, so it must not be retried inside a run ("eyJeyJ…")
    (
        r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{5,4096}\.eyJ[A-Za-z0-9_-]{5,8192}\.[A-Za-z0-9_-]{10,4096}",
        "JSON Web Token",
    ),
)
TOKEN_BEFORE = frozenset(_ALNUM + "_-")

# A key-ish name, ':' or '=', and a value kept only when it looks random: 16-256 characters, two of lower case /
# upper case / digits, and at least SECRET_MIN_ENTROPY bits per character. The name is a word of SECRET_NAME with
# any name parts before it (found by walking back: "aws_secret_access_key", "client_secret", "db.password"), an "s"
# and up to three parts after it ("tokenizer" is not a token); the word must start a part of the name ("monkey" is
# not a key; "clientSecret" is). Quoted or not (JSON, YAML, .env, shell). A value that is code (a call, or a dotted
# name without digits: "key = Fernet.generate_key()") is not a secret. Run only when the text (in lower case) has
# one of SECRET_WORDS; the name is matched in the lower-cased text, the value read from the text.
SECRET_NAME = r"api[_-]?key|apikey|secret|token|password|passwd|passphrase|pwd|credentials?|private[_-]?key|key"
SECRET_ASSIGNMENT = (
    r"(" + SECRET_NAME + r")(s?(?:[_.-][a-z0-9]{1,16}){0,3}?)"
    r"[\"']?[ \t]{0,3}[:=][ \t]{0,3}[\"']?([A-Za-z0-9/+_.=~-]{16,256})"
)
SECRET_WORDS = ("key", "secret", "token", "pass", "pwd", "credential")
NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")
# A password in JSON ("password": "…" with both quoted) is a secret whatever it looks like: at least
# PASSWORD_MIN_LENGTH characters that are not a placeholder (PASSWORD_PLACEHOLDERS, all '*', '<…>', '${…}', '{{…}}')
JSON_PASSWORD = (
    r"\"(?:[a-z0-9_.-]{0,32}[_.-])?(?:password|passwd|passphrase|pwd)\"[ \t]{0,3}:[ \t]{0,3}\"([^\"\\\n]{1,256})\""
)
PASSWORD_MIN_LENGTH = 6
PASSWORD_PLACEHOLDERS = frozenset(
    {"password", "passwd", "secret", "changeme", "redacted", "hidden", "none", "null", "string", "example", "xxxxxx"}
)
# "Bearer <token>" (an Authorization header or prose) and "Authorization: Basic <base64>": the token kept when it
# looks random as above (a JSON Web Token is found by its own pattern)
BEARER = r"bearer[ \t]{1,3}([A-Za-z0-9._~+/=-]{16,4096})(?![A-Za-z0-9._~+/=-])"
BASIC = r"authorization[\"']?[ \t]{0,3}[:=][ \t]{0,3}[\"']?basic[ \t]{1,3}([A-Za-z0-9+/=]{12,4096})"
SECRET_BEFORE = frozenset(_ALNUM + "_")
SECRET_MIN_ENTROPY = 3.0  # bits per character

PRIVATE_KEY = r"-----BEGIN (?:[A-Z0-9]{1,16} ){0,3}PRIVATE KEY(?: BLOCK)?-----"

# (name, pattern): matched in the lower-cased text, words apart by any run of whitespace, whole words
INJECTION_PHRASES: tuple[tuple[str, str], ...] = (
    (
        "ignore previous instructions",
        r"ignore (?:all |any )?(?:of )?(?:the |your |my )?(?:previous|prior|above|earlier|preceding) "
        r"(?:instructions|prompts?|directions|rules|messages)",
    ),
    (
        "disregard the system prompt",
        r"disregard (?:all |any )?(?:of )?(?:the |your )?(?:previous |prior |above |system )"
        r"(?:instructions|prompts?|rules|guidelines)",
    ),
    (
        "forget your instructions",
        r"forget (?:all |everything )?(?:about )?(?:your|the|previous|prior) (?:instructions|rules|guidelines)",
    ),
    ("you are now DAN", r"you are now (?:dan|in developer mode|jailbroken|an? unrestricted)"),
    ("do anything now", r"do anything now"),
    ("developer mode", r"(?:enable|activate|enter) developer mode"),
    (
        "reveal your system prompt",
        r"(?:reveal|show|print|repeat|output|tell) (?:me )?(?:your|the) (?:system prompt|initial instructions"
        r"|hidden instructions|original instructions)",
    ),
    ("no restrictions", r"pretend (?:that )?you (?:have|had) no (?:restrictions|rules|filters|guidelines)"),
    (
        "override the safety rules",
        r"override (?:your|the|all) (?:safety|system|content) (?:instructions|settings|guidelines|rules|filters)",
    ),
)
INJECTION_TRIGGERS = ("ignore", "disregard", "forget", "you are", "anything", "developer", "reveal", "show", "print",
                      "repeat", "output", "tell", "pretend", "override")  # fmt: skip


def _literal(pattern: str) -> str:
    """The literal text a key pattern starts with (after its lookbehind or one character class, if any): a quick
    test before the scan."""
    if pattern.startswith("[rs]"):
        pattern = pattern[4:]
    if pattern.startswith("(?<!"):
        pattern = pattern[pattern.index(")") + 1 :]
    return pattern[: len(pattern) - len(pattern.lstrip(_ALNUM + "_-"))][:4]


class _Compiled:
    """Every pattern compiled (once per process: :func:`_compiled`)."""

    def __init__(self) -> None:
        ascii_ = re.ASCII
        self.email = re.compile(EMAIL, ascii_)
        self.phone = re.compile(PHONE, ascii_)
        self.card = re.compile(CARD, ascii_)
        self.iban = re.compile(IBAN, ascii_)
        self.api_keys = [
            (_literal(pattern), re.compile(pattern, ascii_), description) for pattern, description in API_KEYS
        ]
        self.secret_assignment = re.compile(SECRET_ASSIGNMENT, ascii_)
        self.secret_assignment_any_case = re.compile(SECRET_ASSIGNMENT, ascii_ | re.IGNORECASE)
        self.json_password = re.compile(JSON_PASSWORD, ascii_ | re.IGNORECASE)
        self.bearer = re.compile(BEARER, ascii_ | re.IGNORECASE)
        self.basic = re.compile(BASIC, ascii_ | re.IGNORECASE)
        self.format_characters = re.compile(f"[{FORMAT_CHARACTERS}]")
        self.private_key = re.compile(PRIVATE_KEY, ascii_)
        self.injection = [
            (name, re.compile(pattern.replace(" ", r"\s+") + r"(?!\w)")) for name, pattern in INJECTION_PHRASES
        ]


@functools.lru_cache(maxsize=1)
def _compiled() -> _Compiled:
    return _Compiled()


# --- the scans ----------------------------------------------------------------------------------------------------


def _run_start(text: str, start: int, before: frozenset[str]) -> bool:
    """Whether a match starts a run: the character before it (if any) cannot be part of what was matched."""
    return start == 0 or text[start - 1] not in before


def _digits(text: str) -> str:
    return "".join(char for char in text if "0" <= char <= "9")


Scan = Callable[[str], Iterator[str]]  # a text -> the description of each match


def _scans(patterns: _Compiled) -> dict[str, Scan]:
    def emails(text: str) -> Iterator[str]:
        # only the text around each @ (up to EMAIL_AROUND of them), merged where the windows overlap; more: all of it
        ats: list[int] = []
        at = text.find("@")
        while at >= 0 and len(ats) <= EMAIL_AROUND:
            ats.append(at)
            at = text.find("@", at + 1)
        if len(ats) > EMAIL_AROUND:
            windows = [(0, len(text))]
        else:
            windows = []
            for at in ats:
                low, high = max(0, at - EMAIL_BEFORE), min(len(text), at + EMAIL_AFTER)
                if windows and low <= windows[-1][1]:
                    windows[-1] = (windows[-1][0], high)
                else:
                    windows.append((low, high))
        for low, high in windows:
            for _ in patterns.email.finditer(text, low, high):
                yield "e-mail address"

    def phones(text: str) -> Iterator[str]:
        for match in patterns.phone.finditer(text):
            count = len(_digits(match.group()))
            if (8 if match.group().startswith("+") else 9) <= count <= 15:
                yield "phone number"

    def cards(text: str) -> Iterator[str]:
        for match in patterns.card.finditer(text):
            start = match.start()
            # not the tail of a longer number ("1234 4111 1111 1111 1111")
            if _run_start(text, start, CARD_BEFORE) and not (
                start > 1 and text[start - 1] == " " and text[start - 2] in DIGITS
            ):
                digits = _digits(match.group())
                if luhn_ok(digits):
                    yield f"card number ending {digits[-4:]}"

    def ibans(text: str) -> Iterator[str]:
        # one byte per character ("?" for any other than ASCII): the positions are the text's
        shape = text.encode("ascii", "replace").translate(_SHAPE)
        end = 0  # where the last IBAN found ends
        start = shape.find(b"aa00")
        while start >= 0:
            candidate, start = start, shape.find(b"aa00", start + 1)
            if candidate < end or (candidate > 0 and shape[candidate - 1] != 46):  # 46: "." (not a letter or digit)
                continue
            match = patterns.iban.match(text, candidate)
            if match is not None:
                end = match.end()
                iban = _iban_in(match.group())
                if iban is not None:
                    yield f"IBAN ({iban[:2]})"

    def api_keys(text: str) -> Iterator[str]:
        found: list[tuple[int, int]] = []  # the spans of the keys found by their own pattern (reported once)
        starts: list[int] = []
        reach: list[int] = []  # reach[i]: the furthest end of found[0..i] (found sorted by start)

        def known(start: int, end: int) -> bool:
            if len(starts) != len(found):
                found.sort()
                starts[:] = [low for low, _ in found]
                reach[:] = list(itertools.accumulate((high for _, high in found), max))
            before = bisect.bisect_left(starts, end)  # the spans starting before this one ends
            return before > 0 and reach[before - 1] > start

        for literal, pattern, description in patterns.api_keys:
            if literal not in text:
                continue
            for match in pattern.finditer(text):
                if _run_start(text, match.start(), TOKEN_BEFORE):
                    found.append(match.span())
                    yield description
        lowered = text.lower()
        if any(word in lowered for word in SECRET_WORDS):
            # lower() keeps the positions unless the text has one of the few characters it expands
            same = len(lowered) == len(text)
            pattern = patterns.secret_assignment if same else patterns.secret_assignment_any_case
            for match in pattern.finditer(lowered if same else text):
                value = text[match.start(3) : match.end(3)]
                if (
                    _starts_a_name_part(text, match.start())
                    and _looks_random(value)
                    and not _is_code(value, text[match.end(3) : match.end(3) + 1])
                    and not known(match.start(3), match.end(3))
                ):
                    yield f"secret assigned to {_key_name(text, match.start(), match.end(2))}"
            if '"' in text:
                for match in patterns.json_password.finditer(text):
                    if _is_password(match.group(1)):
                        yield "password in JSON"
        if "bearer" in lowered:
            for match in patterns.bearer.finditer(text):
                if (
                    _run_start(text, match.start(), SECRET_BEFORE)
                    and _looks_random(match.group(1))
                    and not known(*match.span(1))
                ):
                    yield "bearer token"
        if "basic" in lowered and "authorization" in lowered:
            for match in patterns.basic.finditer(text):
                if _run_start(text, match.start(), SECRET_BEFORE) and _looks_random(match.group(1)):
                    yield "basic authorization credentials"

    def private_keys(text: str) -> Iterator[str]:
        if "-----BEGIN" in text:
            for _ in patterns.private_key.finditer(text):
                yield "private key block"

    def injections(text: str) -> Iterator[str]:
        lowered = (text if text.isascii() else text.translate(_CONFUSABLE_TABLE)).lower()
        if any(trigger in lowered for trigger in INJECTION_TRIGGERS):
            for name, pattern in patterns.injection:
                for match in pattern.finditer(lowered):
                    start = match.start()
                    if start == 0 or not (lowered[start - 1].isalnum() or lowered[start - 1] == "_"):
                        yield f"prompt-injection phrase ({name})"

    return {
        "email": emails,
        "phone": phones,
        "card": cards,
        "iban": ibans,
        "api_key": api_keys,
        "private_key": private_keys,
        "injection": injections,
    }


def _iban_in(matched: str) -> str | None:
    """The IBAN a match starts with (upper case, no spaces), when its check digits hold: as long as its country's
    IBANs, so a short word after it ("… 1332 ok", matched as a last group in any case) is left out."""
    compact = matched.replace(" ", "").upper()
    length = IBAN_LENGTHS.get(compact[:2])
    if length is None or len(compact) < length or not iban_ok(compact[:length]):
        return None
    if len(compact) > length:  # it must end where a group does: "DE89 3704 0044 0532 0130 00ab" is no IBAN
        seen = 0
        for position, char in enumerate(matched):
            if char != " ":
                seen += 1
                if seen == length:
                    if matched[position + 1 : position + 2] != " ":
                        return None
                    break
    return compact[:length]


def _starts_a_name_part(text: str, start: int) -> bool:
    """Whether the key word at ``start`` starts a part of a name: at the start, after a character that is not a
    letter or digit ("aws_secret", "db.password", '"token"'), or a capital after a small letter ("clientSecret")."""
    if start == 0:
        return True
    before = text[start - 1]
    if not before.isascii() or not before.isalnum():
        return True
    return text[start].isupper() and (before.islower() or before.isdigit())


def _key_name(text: str, start: int, end: int) -> str:
    """The whole name a key word is part of, lower case, at most 40 characters ("aws_secret_access_key"): the name
    parts before the word (up to 32 characters), the word and the parts after it (``end``)."""
    low = start
    while low > 0 and start - low < 32 and text[low - 1].lower() in NAME_CHARACTERS:
        low -= 1
    name = text[low:end].lower().strip("_.-")[:40]
    # a name is no secret, but one with many digits could carry a number the text should not repeat
    return name if sum(char.isdigit() for char in name) <= 4 else text[start:end].lower()


_DOTTED_NAME = re.compile(r"[A-Za-z_]+(?:\.[A-Za-z_]+)+")


def _is_code(value: str, after: str) -> bool:
    """Whether an assigned value is code rather than a secret: a call ("Fernet.generate_key("), a dotted name, or a
    type or class name (letters only, capitalised: ``key: GenericTypesCacheKey`` in a type hint — a random secret of
    16 characters or more almost always holds a digit)."""
    return (
        after == "("
        or _DOTTED_NAME.fullmatch(value) is not None
        or (value.isascii() and value.isalpha() and value[:1].isupper())
    )


def _is_password(value: str) -> bool:
    stripped = value.strip()
    if len(stripped) < PASSWORD_MIN_LENGTH or stripped.lower() in PASSWORD_PLACEHOLDERS:
        return False
    if set(stripped) <= set("*•xX.-_ ") or (stripped[:1] == "<" and stripped[-1:] == ">"):
        return False
    return not stripped.startswith(("${", "{{", "%("))


def _looks_random(value: str) -> bool:
    classes = any(c.islower() for c in value) + any(c.isupper() for c in value) + any(c.isdigit() for c in value)
    return classes >= 2 and shannon_entropy(value) >= SECRET_MIN_ENTROPY


class DenyList:
    """Words and phrases matched as whole words in any case (Unicode case folding).

    Single words: a few are looked for as substrings of the folded text first (the text is split into words only
    when one is there); many, by splitting the text into words and looking each up. Phrases (words apart by any
    whitespace): one pattern, longest first.
    """

    FEW_WORDS = 64

    def __init__(self, terms: list[str]) -> None:
        self.word = re.compile(r"\w+")
        self.words: dict[str, int] = {}  # folded word -> its number (1-based, in the order configured)
        self.phrase_numbers: dict[str, int] = {}  # folded phrase, single-spaced -> its number
        for number, term in enumerate(terms, start=1):
            folded = " ".join(unicodedata.normalize("NFKC", term).casefold().split())  # as the text is
            if self.word.fullmatch(folded):
                self.words.setdefault(folded, number)
            else:
                self.phrase_numbers.setdefault(folded, number)
        alternatives = sorted(
            (r"\s+".join(re.escape(part) for part in phrase.split(" ")) for phrase in self.phrase_numbers),
            key=len,
            reverse=True,
        )
        self.phrases = re.compile("(?:" + "|".join(alternatives) + r")(?!\w)") if alternatives else None

    def __len__(self) -> int:
        return len(self.words) + len(self.phrase_numbers)

    def scan(self, text: str) -> Iterator[int]:
        """The number of each term found (once per occurrence)."""
        folded = text.casefold()
        if self.words and (len(self.words) > self.FEW_WORDS or any(word in folded for word in self.words)):
            for token in self.word.findall(folded):
                number = self.words.get(token)
                if number is not None:
                    yield number
        if self.phrases is not None:
            for match in self.phrases.finditer(folded):
                start = match.start()
                number = self.phrase_numbers.get(" ".join(match.group().split()))
                if number is not None and (start == 0 or not (folded[start - 1].isalnum() or folded[start - 1] == "_")):
                    yield number


class RulesGuardrail:
    """Runs the configured rules over a text; the same scan at every stage."""

    kind = "rules"

    def __init__(
        self,
        name: str,
        stages: frozenset[str],
        rules: list[str],
        deny: DenyList,
        deny_type: str,
        deny_severity: str,
    ) -> None:
        self.name = name
        self.stages = stages
        self.rules = tuple(rules)
        compiled = _compiled()
        scans = _scans(compiled)
        self._format_characters = compiled.format_characters
        self._scans = [(rule, scans[rule], *RULE_VIOLATIONS[rule]) for rule in self.rules]
        self._deny = deny
        self._deny_type = deny_type
        self._deny_severity = deny_severity

    def check(self, text: str) -> CheckResult:
        text = normalize(text, self._format_characters)
        violations: list[Violation] = []
        matches: Counter[str] = Counter()
        worst = -1
        seen: set[tuple[str, str]] = set()
        for rule, scan, vtype, severity in self._scans:
            for description in scan(text):
                matches[rule] += 1
                worst = max(worst, SEVERITIES.index(severity))
                if len(violations) < MAX_VIOLATIONS and (rule, description) not in seen:
                    seen.add((rule, description))
                    violations.append(Violation(vtype, severity, description))
        if len(self._deny):
            for number in self._deny.scan(text):
                matches["deny"] += 1
                worst = max(worst, SEVERITIES.index(self._deny_severity))
                description = f"deny-list term #{number}"
                if len(violations) < MAX_VIOLATIONS and ("deny", description) not in seen:
                    seen.add(("deny", description))
                    violations.append(Violation(self._deny_type, self._deny_severity, description))
        risk = SEVERITY_RISK[SEVERITIES[worst]] if worst >= 0 else 0.0
        details: dict[str, Any] | None = {"matches": dict(matches)} if matches else None
        return CheckResult(violations=violations, risk_score=risk, details=details)

    def validate_input(self, text: str) -> CheckResult:
        return self.check(text)

    def detect_threats(self, text: str) -> CheckResult:
        return self.check(text)

    def filter_output(self, text: str) -> CheckResult:
        return self.check(text)

    def close(self) -> None:
        pass


def _read_deny_file(check: CheckConfig, path: Path) -> list[str]:
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problem = "there is no such file"
    except IsADirectoryError:
        problem = "it is a directory"
    except UnicodeDecodeError:
        problem = "it is not UTF-8 text"
    except OSError as exc:
        problem = f"it cannot be read ({exc.strerror})"
    else:
        return [line.strip() for line in content.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    raise GuardrailError(
        f"{check.source}: {check.where}.deny_file = {str(path)!r}: {problem}; "
        "expected a readable UTF-8 file with one word or phrase per line"
    )


def build(check: CheckConfig, context: BuildContext) -> RulesGuardrail:
    """The rules check of a [[guardrails.checks]] entry; reads deny_file now (an unreadable one: GuardrailError)."""
    options = {key: check.options[key] if key in check.options else spec.default() for key, spec in OPTIONS.items()}
    try:
        rules = _rule_names(options["rules"])
    except Invalid as exc:
        raise GuardrailError(f"{check.source}: {check.where}.rules: expected {exc}") from None
    terms = list(options["deny"])
    if options["deny_file"] is not None:
        terms += _read_deny_file(check, Path(options["deny_file"]))
    return RulesGuardrail(
        check.name,
        check.stages,
        rules,
        DenyList(terms),
        options["deny_type"],
        options["deny_severity"],
    )
