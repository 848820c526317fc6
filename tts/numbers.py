"""Numbers to English words: cardinals, ordinals, years, decimals, digit strings."""

from __future__ import annotations

ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
ORDINAL_WORDS = {
    "one": "first",
    "two": "second",
    "three": "third",
    "five": "fifth",
    "eight": "eighth",
    "nine": "ninth",
    "twelve": "twelfth",
}


def _under_100(n: int) -> str:
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def _under_1000(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    parts = []
    if hundreds:
        parts.append(f"{ONES[hundreds]} hundred")
    if rest or not hundreds:
        parts.append(_under_100(rest))
    return " ".join(parts)


def cardinal(n: int) -> str:
    """``1234`` -> "one thousand two hundred thirty-four"; digits beyond 10**15."""
    if n < 0:
        return "minus " + cardinal(-n)
    if n >= 10**15:
        return digits(str(n))
    parts = []
    for scale, name in SCALES:
        if n >= scale:
            count, n = divmod(n, scale)
            parts.append(f"{_under_1000(count)} {name}")
    if n or not parts:
        parts.append(_under_1000(n))
    return " ".join(parts)


def ordinal(n: int) -> str:
    """``21`` -> "twenty-first"."""
    words = cardinal(n)
    head, sep, last = words.rpartition("-") if "-" in words.split()[-1] else words.rpartition(" ")
    if last in ORDINAL_WORDS:
        last = ORDINAL_WORDS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return head + sep + last


def year(n: int) -> str:
    """``1984`` -> "nineteen eighty-four", ``2005`` -> "two thousand five"."""
    if n < 1000 or n >= 10000:
        return cardinal(n)
    century, rest = divmod(n, 100)
    if 2000 <= n < 2010:
        return cardinal(n)
    if rest == 0:
        return f"{cardinal(century)} hundred"
    if rest < 10:
        return f"{cardinal(century)} oh {ONES[rest]}"
    return f"{cardinal(century)} {_under_100(rest)}"


def digits(s: str) -> str:
    """``"0421"`` -> "zero four two one"."""
    return " ".join(ONES[int(c)] for c in s if c.isdigit())


def decimal(s: str) -> str:
    """``"3.14"`` -> "three point one four"; ``"1,234.5"``; ``"-2"``; ``".5"``."""
    sign = ""
    if s.startswith(("-", "−")):  # noqa: RUF001
        sign, s = "minus ", s[1:]
    whole, _, frac = s.replace(",", "").partition(".")
    words = cardinal(int(whole)) if whole else "zero"
    if frac:
        words += " point " + digits(frac)
    return sign + words
