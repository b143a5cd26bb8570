"""Answer extraction: the final number, choice letter or short text in a model's reasoning.

    extract_answer("… so 3 × 14 = 42. The answer is 42.", "number")    # "42"
    extract_answer("答案是：１，２３４", "number")                          # "1234"
    extract_answer("Therefore, among A through D, the answer is (C).", "choice")   # "C"
    extract_answer("Final Answer: Paris.", "text")                       # "Paris"
    detect_answer_type("How many apples are left?")                      # "number"

Numbers come back canonical (commas dropped, "0.50" → "0.5", "1/2" → "0.5", "6/4" → "1.5", "1/3" stays
"1/3") so that votes over paths compare equal answers as equal. Full-width characters are folded
(NFKC) first, so Chinese text with full-width digits, commas and colons reads like ASCII.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal
from fractions import Fraction

ANSWER_TYPES = ("auto", "number", "choice", "text")

# The answer marker closest to the end wins; what follows it is the answer.
_MARKER = re.compile(
    r"(?:final\s+answer\s*(?:is)?\s*[:：]?|the\s+answer\s+is\s*[:：]?|answer\s*[:：]|answer\s+is\s*[:：]?"
    r"|答案\s*(?:(?:是|为|應為|应为)\s*[:：]?|[:：])|最终答案\s*(?:是|为)?\s*[:：]?|####)",
    re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
# A number: optional sign (not a subtraction: no digit or ')' just before), thousands commas, decimals,
# an optional "/denominator".
_NUMBER = re.compile(r"(?<![A-Za-z0-9_.)])(-?)((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?:\s*/\s*(\d+))?(?![\d])")
_CN_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "兩": 2, "三": 3, "四": 4, "五": 5, "六": 6,
              "七": 7, "八": 8, "九": 9}
_CN_UNITS = {"十": 10, "百": 100, "千": 1000}
_CN_BIG = {"万": 10_000, "萬": 10_000, "亿": 100_000_000, "億": 100_000_000}
_CN_NUMBER = re.compile(r"(负|負)?([零〇一二两兩三四五六七八九十百千万萬亿億]+)")
# "(A) x", "A. x" at a line start or after a space ("选项 A. 124 B. 235"); A and B must both be there
_OPTION = re.compile(r"(?m)(?:(?:^|\s)\(?([A-J])[\).:：、]\s*\S|\(([A-J])\)\s*\S)")
_QUANTITY = re.compile(
    r"how\s+(?:many|much|old|long|far)|多少|几[个只天岁元本次人件张块分小年月]|一共|总共|合计|平均|"
    r"\d\s*[-+*/×÷^]\s*\d|\b(?:calculate|compute|sum|product|average|total|remainder|percent)\b|计算|求",
    re.IGNORECASE)
_NOT_QUANTITY = re.compile(r"\b(?:who|where|which|why|name)\b|哪|谁|为什么|名字", re.IGNORECASE)


def fold(text: str) -> str:
    """Full-width → ASCII (NFKC), unicode minus and fraction slash → ASCII, so patterns see one alphabet."""
    return unicodedata.normalize("NFKC", text).replace("\u2212", "-").replace("\u2044", "/")


def canonical_number(value: Fraction) -> str:
    """"42", "-0.5", "1/3": finite decimals as decimals, other fractions as p/q."""
    if value.denominator == 1:
        return str(value.numerator)
    d = value.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return f"{value.numerator}/{value.denominator}"
    text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _number_of(match: re.Match) -> Fraction:
    sign, body, denom = match.group(1), match.group(2).replace(",", ""), match.group(3)
    value = Fraction(body)
    if denom is not None and int(denom) != 0:
        value /= int(denom)
    return -value if sign else value


def chinese_numeral(text: str) -> int | None:
    """"四十二" → 42, "一万零五" → 10005, "两百" → 200; None when `text` holds no Chinese numeral."""
    m = _CN_NUMBER.search(text)
    if m is None:
        return None
    total = section = digit = 0
    for ch in m.group(2):
        if ch in _CN_DIGITS:
            digit = _CN_DIGITS[ch]
        elif ch in _CN_UNITS:
            # "十二" means 12: a unit with no digit before it counts once
            section += (digit or 1) * _CN_UNITS[ch]
            digit = 0
        else:
            total += (section + digit) * _CN_BIG[ch]
            section = digit = 0
    value = total + section + digit
    return -value if m.group(1) else value


def _after_marker(text: str) -> str | None:
    """The text after the last answer marker, or None when there is no marker."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1]
    marks = list(_MARKER.finditer(text))
    return text[marks[-1].end():] if marks else None


def extract_number(text: str) -> str | None:
    """After an answer marker: the first number there (a Chinese numeral when no digits); else the last
    number anywhere."""
    text = fold(text or "")
    tail = _after_marker(text)
    if tail is not None:
        # "The answer is 15 + 8 = 23.": the result follows the last "=" of the answer's own sentence
        sentence = re.split(r"(?<=[^\d])[.。!！?？](?!\d)|\n", tail, maxsplit=1)[0]
        if "=" in sentence:
            m = _NUMBER.search(sentence[sentence.rindex("=") + 1:])
            if m:
                return canonical_number(_number_of(m))
        m = _NUMBER.search(tail)
        if m:
            return canonical_number(_number_of(m))
        # only right after a marker: bare Chinese numerals elsewhere are too often words ("一个")
        head = tail.strip()[:12]
        if head and (head[0] in _CN_DIGITS or head[0] in _CN_UNITS or head[0] in "负負"):
            value = chinese_numeral(head)
            if value is not None:
                return str(value)
    found = list(_NUMBER.finditer(text))
    return canonical_number(_number_of(found[-1])) if found else None


def choice_letters(question: str) -> str:
    """The option letters a multiple-choice question offers ("ABCD"); "" when it offers none."""
    letters = {a or b for a, b in _OPTION.findall(fold(question or ""))}
    return "".join(sorted(letters)) if {"A", "B"} <= letters else ""


def extract_choice(text: str, letters: str = "ABCDE") -> str | None:
    """The chosen option letter: after an answer marker, else "(C)", a reply that is just "C", "option C"
    / "选C", else the last standalone capital letter that is not starting an English sentence."""
    text = fold(text or "")
    letters = letters or "ABCDE"
    cls = f"[{letters}]"
    tail = _after_marker(text)
    if tail is not None:
        m = re.search(rf"(?<![A-Za-z]){cls}(?![A-Za-z])", tail)
        if m:
            return m.group(0)
    m = re.fullmatch(rf"\s*\(?({cls})\)?[.。:：)]?\s*", text)
    if m:
        return m.group(1)
    for pattern in (rf"\(({cls})\)", rf"(?:option|choice|选项|选择|选)\s*({cls})(?![A-Za-z])"):
        found = re.findall(pattern, text, flags=re.IGNORECASE)
        if found:
            return found[-1].upper()
    found = re.findall(rf"(?<![A-Za-z]){cls}(?![A-Za-z])(?!\s+[a-z])", text)
    return found[-1] if found else None


def extract_text(text: str) -> str | None:
    """The line after the last answer marker, else the last non-empty line; quotes, markdown bold and a
    final full stop removed."""
    text = (text or "").strip()
    if not text:
        return None
    tail = _after_marker(fold(text))
    if tail is not None and tail.strip():
        line = tail.strip().splitlines()[0]
    else:
        line = [ln for ln in text.splitlines() if ln.strip()][-1]
    for _ in range(2):  # "**Carol**." needs the full stop and then the bold marks removed
        line = line.strip().strip("*_`\"'“”「」『』:： ").rstrip("。.！!").strip()
    return line or None


def extract_answer(text: str, answer_type: str, *, letters: str = "ABCDE") -> str | None:
    """Dispatch on `answer_type` ("number", "choice", "text"; resolve "auto" first with
    detect_answer_type). None when nothing of that type is in `text`."""
    if answer_type == "number":
        return extract_number(text)
    if answer_type == "choice":
        return extract_choice(text, letters)
    if answer_type == "text":
        return extract_text(text)
    raise ValueError(f"unknown answer type {answer_type!r}; one of number, choice, text")


def detect_answer_type(question: str) -> str:
    """"choice" when the question lists options (A) (B) …, "number" when it asks for a quantity or a
    computation, else "text"."""
    q = fold(question or "")
    if choice_letters(q):
        return "choice"
    if _QUANTITY.search(q):
        return "number"
    if re.search(r"\d", q) and not _NOT_QUANTITY.search(q):
        return "number"
    return "text"


def normalize_answer(answer: str, answer_type: str) -> str:
    """The key votes compare: numbers and letters as extracted; text case-folded with punctuation,
    articles and extra spaces removed."""
    if answer_type != "text":
        return answer.strip()
    t = fold(answer).casefold()
    t = re.sub(r"[^\w\s]", " ", t)
    t = re.sub(r"\b(?:the|a|an)\b", " ", t)
    return " ".join(t.split())
