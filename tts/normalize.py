"""Make answer text speakable: numbers, money, times, dates, abbreviations, URLs, markdown.

``normalize(piece)`` runs on one segmenter piece at a time (a clause or a sentence), so every
rule works on fragments. The result is only what the voice reads: the text reported as spoken
stays the original. Emoji are dropped; markdown marks are dropped, keeping their text.

Over 400 lines because it is mostly tables (units, abbreviations, ordinals, month names) and
one small function per rule, applied in one order; split up, the order would be harder to see.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from tts.numbers import cardinal, decimal, digits, ordinal, year

Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str] | str]

MONTHS = (
    "January February March April May June July August September October November December"
).split()
MONTH_RE = "|".join(MONTHS + [m[:3] + r"\.?" for m in MONTHS if len(m) > 3] + ["Sept\\.?"])
CURRENCY = {
    "$": ("dollar", "dollars", "cent", "cents"),
    "€": ("euro", "euros", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
    "¥": ("yen", "yen", "", ""),
}
SCALE_WORDS = {
    "k": "thousand",
    "m": "million",
    "mn": "million",
    "b": "billion",
    "bn": "billion",
    "thousand": "thousand",
    "million": "million",
    "billion": "billion",
    "trillion": "trillion",
}
UNITS = {
    "km": "kilometers",
    "kg": "kilograms",
    "cm": "centimeters",
    "mm": "millimeters",
    "mph": "miles per hour",
    "km/h": "kilometers per hour",
    "kph": "kilometers per hour",
    "lb": "pounds",
    "lbs": "pounds",
    "oz": "ounces",
    "ft": "feet",
    "mi": "miles",
    "ml": "milliliters",
    "m": "meters",
    "kb": "kilobytes",
    "mb": "megabytes",
    "gb": "gigabytes",
    "tb": "terabytes",
    "ghz": "gigahertz",
    "mhz": "megahertz",
    "khz": "kilohertz",
    "hz": "hertz",
    "ms": "milliseconds",
    "kw": "kilowatts",
    "kwh": "kilowatt hours",
    "°c": "degrees Celsius",
    "°f": "degrees Fahrenheit",
    "°": "degrees",
    "x": "times",
}
ABBREVIATIONS = {
    "Dr.": "Doctor",
    "Mr.": "Mister",
    "Mrs.": "Missus",
    "Ms.": "Miz",
    "Prof.": "Professor",
    "Jr.": "Junior",
    "Sr.": "Senior",
    "vs.": "versus",
    "vs": "versus",
    "etc.": "et cetera",
    "e.g.": "for example",
    "i.e.": "that is",
    "approx.": "approximately",
    "Dept.": "Department",
    "Inc.": "Incorporated",
    "Ltd.": "Limited",
    "Corp.": "Corporation",
    "Ave.": "Avenue",
    "Blvd.": "Boulevard",
    "Mt.": "Mount",
    "Fig.": "Figure",
    "w/o": "without",
    "w/": "with",
    "a.m.": "A M",
    "p.m.": "P M",
    "cf.": "compare",
    "et al.": "and others",
    "U.S.": "U S",
    "U.K.": "U K",
    "FAQ": "F A Q",
}
SYMBOLS = {
    "&": " and ",
    "+": " plus ",
    "=": " equals ",
    "@": " at ",
    "~": " about ",
    "×": " times ",
    "÷": " divided by ",
    "→": " to ",
    "<": " less than ",
    ">": " greater than ",
    "|": ", ",
    "\\": " ",
    "^": " ",
    "_": " ",
    "*": " ",
    "#": " ",
    "[": " ",
    "]": " ",
    "{": " ",
    "}": " ",
    "`": " ",
}
TLDS = "com|org|net|io|ai|dev|edu|gov|co|uk|de|fr|app|info|me|ly|us|ca"
FRACTIONS = {
    "1/2": "one half",
    "1/3": "one third",
    "2/3": "two thirds",
    "1/4": "one quarter",
    "3/4": "three quarters",
    "24/7": "twenty-four seven",
}


def _rules(
    pairs: list[tuple[str, Callable[[re.Match[str]], str] | str]], flags: int = 0
) -> list[Rule]:
    return [(re.compile(p, flags), r) for p, r in pairs]


# -- emoji ------------------------------------------------------------------------------------


EMOJI_RANGES = (
    (0x1F000, 0x1FAFF),  # pictographs, emoticons, flags (regional indicators), skin tones
    (0x2600, 0x27BF),  # miscellaneous symbols, dingbats
    (0x2300, 0x23FF),  # watch, hourglass, ...
    (0x2B00, 0x2BFF),  # arrows, stars
    (0x200D, 0x200D),  # zero-width joiner
    (0xFE00, 0xFE0F),  # variation selectors
    (0x20E3, 0x20E3),  # keycap
    (0xE0020, 0xE007F),  # tag characters (subdivision flags)
)


def _is_emoji(c: str) -> bool:
    cp = ord(c)
    return any(lo <= cp <= hi for lo, hi in EMOJI_RANGES)


def drop_emoji(text: str) -> str:
    return "".join(c for c in text if not _is_emoji(c))


# -- markdown ---------------------------------------------------------------------------------

MARKDOWN = _rules(
    [
        (r"```[^\n]*", " "),  # code fences (the code itself is read as text)
        (r"!\[([^\]]*)\]\([^)]*\)", r"\1"),  # image -> alt text
        (r"\[([^\]]*)\]\([^)]*\)", r"\1"),  # link -> its text
        (r"\]\([^)\s]*\)?", " "),  # the tail of a link cut by the segmenter
        (r"^\s*#{1,6}\s+", ""),  # headers
        (r"^\s*>\s?", ""),  # quotes
        (r"^\s*(?:[-*_]\s*){3,}$", " "),  # rules
        (r"^\s*[-*+•]\s+", ""),  # bullets
        (r"^\s*(\d+)[.)]\s+", r"\1, "),  # numbered items: "1. Mix" -> "1, Mix"
        (r"(\*\*|__|~~)", ""),  # bold, strike
        (r"(?<![\w*])\*(?=\S)|(?<=\S)\*(?![\w*])", ""),  # *emphasis*
        (r"(?<!\w)_(?=\S)|(?<=\S)_(?!\w)", ""),  # _emphasis_
    ],
    re.MULTILINE,
)

# -- URLs and emails ----------------------------------------------------------------------------


def _speak_host(host: str) -> str:
    host = re.sub(r"^www\.", "", host.lower())
    return " dot ".join(host.split("."))


def _url(m: re.Match[str]) -> str:
    url = m.group(0)
    rest = re.sub(r"^[a-z]+://", "", url, flags=re.IGNORECASE)
    host, _, path = rest.partition("/")
    words = _speak_host(host.split(":")[0])
    segments = [s for s in re.split(r"[/?#]", path) if s]
    if 0 < len(segments) <= 2 and all(re.fullmatch(r"[A-Za-z-]+", s) for s in segments):
        words += " slash " + " slash ".join(s.replace("-", " ") for s in segments)
    return words


def _email(m: re.Match[str]) -> str:
    user, host = m.group(1), m.group(2)
    return (
        " dot ".join(re.split(r"\.", user)).replace("_", " underscore ")
        + " at "
        + _speak_host(host)
    )


WEB = _rules(
    [
        (r"\b([\w.+-]+)@([\w-]+(?:\.[\w-]+)+)", _email),
        (r"\b(?:https?|ftp)://[^\s<>()\[\]]+[^\s<>()\[\].,;:!?'\"]", _url),
        (r"\bwww\.[^\s<>()\[\]]+[^\s<>()\[\].,;:!?'\"]", _url),
        (rf"\b[\w-]+(?:\.[\w-]+)*\.(?:{TLDS})\b(?:/[\w/-]*[\w])?", _url),
    ],
    re.IGNORECASE,
)

# -- times and dates ----------------------------------------------------------------------------


def _ampm(s: str | None) -> str:
    if not s:
        return ""
    return " A M" if s.lower().startswith("a") else " P M"


def _clock(hours: int, minutes: int) -> str:
    if minutes == 0:
        return cardinal(hours) + (" hundred" if hours > 12 else " o'clock")
    if minutes < 10:
        return f"{cardinal(hours)} oh {cardinal(minutes)}"
    return f"{cardinal(hours)} {cardinal(minutes)}"


def _keep_final_stop(m: re.Match[str], words: str) -> str:
    """ "at 9 a.m." at the end of a piece: the period also ended the sentence."""
    if m.group(0).endswith(".") and not m.string[m.end() :].strip():
        return words + "."
    return words


def _time(m: re.Match[str]) -> str:
    hours, minutes = int(m.group(1)), int(m.group(2))
    if hours > 24 or minutes > 59:
        return m.group(0)
    suffix = _ampm(m.group(3))
    if suffix and minutes == 0:
        return _keep_final_stop(m, cardinal(hours) + suffix)
    return _keep_final_stop(m, _clock(hours, minutes) + suffix)


def _hour_ampm(m: re.Match[str]) -> str:
    return _keep_final_stop(m, cardinal(int(m.group(1))) + _ampm(m.group(2)))


def _month(name: str) -> str:
    key = name.rstrip(".")[:3].lower()
    return next(mo for mo in MONTHS if mo[:3].lower() == key)


def _date_words(month: int, day: int, yr: str | None) -> str:
    words = f"{MONTHS[month - 1]} {ordinal(day)}"
    if yr:
        y = int(yr) + (2000 if len(yr) == 2 else 0)
        words += f", {year(y)}"
    return words


def _iso_date(m: re.Match[str]) -> str:
    y, mo, d = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if not (1 <= mo <= 12 and 1 <= d <= 31):
        return m.group(0)
    return _date_words(mo, d, str(y))


def _us_date(m: re.Match[str]) -> str:
    mo, d = int(m.group(1)), int(m.group(2))
    if not (1 <= mo <= 12 and 1 <= d <= 31):
        return m.group(0)
    return _date_words(mo, d, m.group(3))


def _month_day(m: re.Match[str]) -> str:
    words = f"{_month(m.group(1))} {ordinal(int(m.group(2)))}"
    if m.group(3):
        words += f", {year(int(m.group(3)))}"
    return words


def _day_month(m: re.Match[str]) -> str:
    words = f"the {ordinal(int(m.group(1)))} of {_month(m.group(2))}"
    if m.group(3):
        words += f", {year(int(m.group(3)))}"
    return words


def _month_year(m: re.Match[str]) -> str:
    return f"{_month(m.group(1))} {year(int(m.group(2)))}"


AMPM = r"([aApP])\.?[mM]\.?(?![A-Za-z])"
TIMES_AND_DATES = _rules(
    [
        (r"\b(\d{1,2}):(\d{2})(?::\d{2})?(?:\s*" + AMPM + ")?", _time),
        (r"\b(\d{1,2})\s*" + AMPM, _hour_ampm),
        (r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b", _iso_date),
        (r"\b(\d{1,2})/(\d{1,2})/(\d{4}|\d{2})\b", _us_date),
        (rf"\b({MONTH_RE})\s+(\d{{1,2}})(?:st|nd|rd|th)?\b(?:,?\s+(\d{{4}})\b)?", _month_day),
        (
            rf"\b(\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?({MONTH_RE})(?:,?\s+(\d{{4}})\b)?",
            _day_month,
        ),
        (rf"\b({MONTH_RE})\s+(\d{{4}})\b", _month_year),
    ],
)

# -- money, percentages, units, ordinals, plain numbers ------------------------------------------

NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+"


def _money(m: re.Match[str]) -> str:
    one, many, cent, cents = CURRENCY[m.group(1)]
    amount = m.group(2).replace(",", "")
    scale = SCALE_WORDS.get((m.group(3) or "").lower())
    if scale:
        return f"{decimal(amount)} {scale} {many}"
    whole, _, frac = amount.partition(".")
    units = int(whole or 0)
    words = [] if units == 0 and frac else [f"{cardinal(units)} {one if units == 1 else many}"]
    if frac and cent:
        sub = int((frac + "0")[:2])
        if sub:
            words.append(f"{cardinal(sub)} {cent if sub == 1 else cents}")
    elif frac:
        return f"{decimal(amount)} {many}"
    return " and ".join(words) or f"zero {many}"


def _unit(m: re.Match[str]) -> str:
    unit = UNITS[m.group(2).lower()]
    if m.group(1) in ("1", "1.0") and unit.endswith("s") and unit != "times":
        unit = unit[:-1] if not unit.endswith("feet") else "foot"
    return f"{decimal(m.group(1))} {unit}"


def _plain_number(m: re.Match[str]) -> str:
    s = m.group(0)
    sign = "minus " if s[0] in "-−" else ""  # noqa: RUF001
    s = s.lstrip("-−")  # noqa: RUF001
    if "." in s or "," in s:
        return sign + decimal(s)
    if len(s) > 1 and s.startswith("0") or len(s) > 15:
        return sign + digits(s)
    n = int(s)
    if not sign and 1100 <= n <= 1999:
        return year(n)
    return sign + cardinal(n)


UNIT_RE = "|".join(sorted((re.escape(u) for u in UNITS), key=len, reverse=True))
NUMBERS = _rules(
    [
        (r"#(?=\d)", "number "),
        (r"\bNo\.\s?(?=\d)", "number "),
        (
            r"([$€£¥])\s?(" + NUMBER + r")(?:\s?(k|mn?|bn?|thousand|million|billion|trillion)\b)?",
            _money,
        ),
        (r"(" + NUMBER + r")\s?%", lambda m: f"{decimal(m.group(1))} percent"),
        (
            r"\b(\d{3})[-.](\d{3})[-.](\d{4})\b",
            lambda m: ", ".join(digits(g) for g in m.groups()),
        ),  # phone numbers
        (r"\b(\d+)(st|nd|rd|th)\b", lambda m: ordinal(int(m.group(1)))),
        (r"\b(\d+/\d+)\b", lambda m: FRACTIONS.get(m.group(1), m.group(1).replace("/", " over "))),
        (r"(?<![\w.])(" + NUMBER + r")\s?(" + UNIT_RE + r")(?![\w/])", _unit),
        (r"\b(\d+)\s?[-–]\s?(\d+)\b", lambda m: f"{m.group(1)} to {m.group(2)}"),  # noqa: RUF001
        (r"(?:(?<=\s)|^)[-−](?=\d)", "-"),  # noqa: RUF001 (a minus sign)
        (r"(?:(?<=[\s(])|^)-?(?:" + NUMBER + r")", _plain_number),
        (r"(?<![\w])(?:" + NUMBER + r")", _plain_number),
    ],
    re.IGNORECASE,
)


def _abbreviation(m: re.Match[str]) -> str:
    word = m.group(0)
    if word == "St.":
        following = m.string[m.end() :].lstrip()
        return "Saint" if following[:1].isupper() else "Street"
    spoken = ABBREVIATIONS.get(word, word)
    if word.endswith(".") and not m.string[m.end() :].strip():
        spoken += "."  # "apples, etc." ends a sentence
    return spoken


ABBREV_RE = re.compile(
    r"(?<![\w.])(?:"
    + "|".join(re.escape(a) for a in sorted(ABBREVIATIONS, key=len, reverse=True))
    + r"|St\.)(?![\w])"
)


def _symbols(text: str) -> str:
    text = re.sub(r"\s*(?:->|=>|-->)\s*", " to ", text)
    text = re.sub(r"(?<=\d)\s*\*\s*(?=\d)", " times ", text)
    text = re.sub(r"(?<=\w)\+\+", " plus plus", text)  # C++
    text = re.sub(r"\band/or\b", "and or", text)
    text = re.sub(r"(?<=[A-Za-z])/(?=[A-Za-z])", " or ", text)  # yes/no
    return "".join(SYMBOLS.get(c, c) for c in text)


def normalize(text: str) -> str:
    """The words a voice should read for ``text`` (one piece of an answer)."""
    text = unicodedata.normalize("NFKC", drop_emoji(text))
    for pattern, repl in MARKDOWN:
        text = pattern.sub(repl, text)
    for pattern, repl in WEB:
        text = pattern.sub(repl, text)
    text = ABBREV_RE.sub(_abbreviation, text)
    for pattern, repl in TIMES_AND_DATES:
        text = pattern.sub(repl, text)
    for pattern, repl in NUMBERS:
        text = pattern.sub(repl, text)
    text = _symbols(text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    return text.strip(" ,;:")
