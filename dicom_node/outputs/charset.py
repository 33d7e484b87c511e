"""Which Specific Character Set an output declares, and our own text kept inside it.

Outputs copy the source's Patient and Study values, so they must declare what the source's
bytes are in (PS3.5 6.1.2.3, PS3.3 C.12.1.1.2), never a guess:

- a source that declares a character set: the output declares the same value, verbatim
  (``\\ISO 2022 IR 87`` included, which highdicom's own check refuses), and the copied
  values are written back in it;
- a source that declares none, whose copied values are all ASCII: ISO-IR 6 is a subset of
  UTF-8, so the output may declare ``ISO_IR 192`` and still carry the source's exact bytes;
- a source that declares none but holds bytes outside ISO-IR 6: what they mean is undefined
  (PS3.5 6.1.2.3), so they are copied as they are and the output declares nothing either.

Text the node writes itself (the AI notice, summaries, descriptions) must then fit the
declared set: a character it cannot hold is replaced (an en dash by a hyphen, an accented
letter by its base letter, anything else by ``?``), never transcoded into bytes that the
declaration would misname.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Collection, Iterable, Sequence
from typing import cast

from pydicom.charset import python_encoding
from pydicom.dataset import Dataset

UNICODE = "ISO_IR 192"
# Declared values whose repertoire holds every character we could write.
_WHOLE_REPERTOIRE = {"ISO_IR 192", "GB18030", "GBK"}
# Single-byte sets without code extensions (PS3.3 C.12.1.1.2 Table C.12-2) besides ISO-IR 6
# and ISO-IR 13 (whose G0 is JIS X 0201 Roman, not ASCII): text may use their whole repertoire.
_SINGLE_BYTE = {
    term
    for term in python_encoding
    if term.startswith("ISO_IR ") and term not in ("ISO_IR 6", "ISO_IR 13", UNICODE)
}
_TEXT_VRS = {"SH", "LO", "ST", "LT", "UT", "UC", "PN"}
# Each at most as long in bytes as the character in UTF-8, so clip limits still hold.
_SUBSTITUTES = {
    "\u2013": "-",
    "\u2014": "-",
    "\u2212": "-",
    "\u2026": "...",
    "\u2018": "'",
    "\u2019": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u00b7": "-",
    "\u00d7": "x",
    "\u2264": "<=",
    "\u2265": ">=",
    "\u00a0": " ",
}

CharacterSet = str | Sequence[str] | None


def output_character_set(declared: object, copied_values: Iterable[object]) -> CharacterSet:
    """What an output declares, given the source's declared value and the values it copies."""
    if declared not in (None, "", []):
        if isinstance(declared, str):
            return str(declared)
        return [str(v) for v in cast(Iterable[object], declared)]  # a multi-valued (0008,0005)
    if all(str(value or "").isascii() for value in copied_values):
        return UNICODE
    return None


def declare(dataset: Dataset, character_set: CharacterSet, copied: Collection[str]) -> None:
    """Set ``dataset``'s Specific Character Set and fit every text value we wrote to it.

    Values of the ``copied`` keywords (the source's, at the top level) are left untouched.
    """
    if character_set is None:
        if "SpecificCharacterSet" in dataset:
            del dataset.SpecificCharacterSet
    else:
        dataset.SpecificCharacterSet = character_set
    codec = _codec(character_set)
    if codec is not None:
        _fit_dataset(dataset, codec, set(copied))


def without_character_set(dataset: Dataset) -> Dataset:
    """A shallow copy of ``dataset`` without Specific Character Set, for highdicom.

    highdicom copies and checks the value of its reference image, refusing forms the
    standard allows (``\\ISO 2022 IR 87``); :func:`declare` sets it on the result instead.
    """
    return Dataset(
        {element.tag: element for element in dataset if element.keyword != "SpecificCharacterSet"}
    )


def fit_text(text: str, character_set: CharacterSet) -> str:
    """``text`` with every character the declared set cannot hold replaced."""
    codec = _codec(character_set)
    return text if codec is None else _fit(text, codec)


def _codec(character_set: CharacterSet) -> str | None:
    """The Python codec our own text must fit in; None when any character is allowed."""
    values = [character_set] if isinstance(character_set, str) else list(character_set or [])
    if len(values) == 1 and values[0].strip() in _WHOLE_REPERTOIRE:
        return None
    if len(values) == 1 and values[0].strip() in _SINGLE_BYTE:
        return python_encoding[values[0].strip()]
    # Absent, ISO-IR 6, ISO 2022 code extensions or a value we do not know: ASCII only,
    # which every one of them holds unchanged without an escape sequence.
    return "ascii"


def _fit(text: str, codec: str) -> str:
    if _encodes(text, codec):
        return text
    return "".join(char if _encodes(char, codec) else _substitute(char) for char in text)


def _substitute(char: str) -> str:
    if char in _SUBSTITUTES:
        return _SUBSTITUTES[char]
    decomposed = unicodedata.normalize("NFD", char)  # "é" -> "e" and a combining accent
    base, marks = decomposed[:1], decomposed[1:]
    if base.isascii() and base.isprintable() and all(unicodedata.combining(m) for m in marks):
        return base
    return "?"


def _encodes(text: str, codec: str) -> bool:
    try:
        text.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def _fit_dataset(dataset: Dataset, codec: str, skip: set[str]) -> None:
    for element in dataset:
        if element.keyword in skip:
            continue
        if element.VR == "SQ":
            for item in element.value:
                _fit_dataset(item, codec, set())
        elif element.VR in _TEXT_VRS and element.value not in (None, ""):
            if isinstance(element.value, str):
                element.value = _fit(element.value, codec)
            elif element.VR != "PN" and all(isinstance(v, str) for v in element.value):
                element.value = [_fit(v, codec) for v in element.value]
