"""Prompt blocklist: words (whole-word, case-insensitive) and 're:' regular expressions.

A prompt is matched as written and as its plain form (``plain``): Unicode compatibility forms
folded (fullwidth ``ｎｕｄｅ``, ligatures, circled letters) and invisible format characters
dropped (zero-width spaces and joiners, soft hyphens), so spellings that read as a listed
word do not slip it past the list (CLIP's tokenizer folds fullwidth letters itself when ftfy
is installed). It is also matched as its look-alike form (``look_alike``): letters and digits of
other scripts that Unicode's confusables list gives as looking like one Latin letter or digit
read as that one (Cyrillic ``е`` and ``і``, Greek ``ο``, Cherokee ``Ꭺ``), in the prompt and in
the listed words alike, so ``nudе`` with a Cyrillic ``е`` matches ``nude``. Only whole listed
words match, so a word of another script matches only where it reads, letter by letter, as a
listed word. Cost, for a non-ASCII prompt (an ASCII one is matched as written only): about
0.2 ms at the default maxPromptLength (1 000 characters), 15-20 ms at the CR's largest (100 000).
"""

from __future__ import annotations

import functools
import re
import unicodedata

from .watched import WatchedFile


@functools.cache
def _format_class() -> re.Pattern[str]:
    """Every format character (Unicode category Cf, about 160 in 20 runs) as one character class
    of ranges: a pass over a prompt (100 000 characters at the CR's longest) takes about a
    millisecond, where a loop in Python, or a class of single characters, takes ten. Built once
    (a scan of every code point, ~0.1 s) by the first blocklist that lists anything, not at
    import and not at a request."""
    runs: list[list[int]] = []
    for c in range(0x110000):
        if unicodedata.category(chr(c)) == "Cf":
            if runs and runs[-1][1] == c - 1:
                runs[-1][1] = c
            else:
                runs.append([c, c])
    return re.compile("[" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in runs) + "]")


@functools.cache
def _look_alikes() -> dict[int, str]:
    """Lower-case letters and digits of other scripts -> the Latin letter or digit Unicode's
    confusables list (as the confusable_homoglyphs package ships it) gives them as looking like
    (about 1 250). For text already lower-cased: Cyrillic ``І`` is read as ``і``, so as ``i``
    (its own entry says ``l``), and a lower case with no entry takes its capital's (Cherokee
    ``ꭺ``, as ``Ꭺ``: ``a``). Built once (~0.1 s), as ``_format_class``."""
    from confusable_homoglyphs.confusables import confusables_data

    latin: dict[str, str] = {}
    for char, entries in confusables_data.items():
        if len(char) == 1 and not char.isascii():
            found = [e["c"] for e in entries if len(e["c"]) == 1 and e["c"].isascii() and e["c"].isalnum()]
            if found:
                latin[char] = found[0].lower()
    table: dict[int, str] = {}
    for char, to in latin.items():
        lower = char.lower()
        if len(lower) == 1 and not lower.isascii():
            table[ord(lower)] = latin.get(lower, to)
    return table


def look_alike(text: str) -> str:
    """``text`` (plain) lower-cased, with look-alike letters of other scripts as the Latin ones."""
    lowered = text.lower()
    return lowered if lowered.isascii() else lowered.translate(_look_alikes())


def plain(text: str) -> str:
    """``text`` in NFKC with its format characters (Unicode category Cf) dropped."""
    if text.isascii():  # the common case, already plain
        return text
    return _format_class().sub("", unicodedata.normalize("NFKC", text))


class Blocklist:
    def __init__(self, words: list[str], patterns: list[str]):
        if words or patterns:
            _format_class()  # what check's forms need, built here rather than at a request
            _look_alikes()
        self.words = [plain(w).lower() for w in words]
        spellings = sorted(set(self.words) | {look_alike(w) for w in self.words})
        self._word_re = (
            re.compile(r"\b(" + "|".join(re.escape(w) for w in spellings) + r")\b", re.IGNORECASE) if words else None
        )
        self._patterns = [re.compile(p, re.IGNORECASE) for p in patterns]

    @classmethod
    def from_text(cls, text: str) -> Blocklist:
        words, patterns = [], []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("re:"):
                patterns.append(line[3:].strip())
            else:
                words.append(line)
        return cls(words, patterns)

    def check(self, *texts: str | None) -> str | None:
        """The reason code of the first match, or None."""
        if self._word_re is None and not self._patterns:
            return None
        for text in texts:
            if not text:
                continue
            forms = {text}
            if not text.isascii():
                flat = plain(text)
                forms |= {flat, look_alike(flat)}
            if self._word_re and any(self._word_re.search(f) for f in forms):
                return "blocked_word"
            for p in self._patterns:
                if any(p.search(f) for f in forms):
                    return "blocked_pattern"
        return None


class WatchedBlocklist:
    """The blocklist file's current list: an edited ConfigMap applies within seconds."""

    def __init__(self, path: str):
        self._file = WatchedFile(path, Blocklist.from_text, "prompt blocklist")

    def check(self, *texts: str | None) -> str | None:
        return self._file.current().check(*texts)


def blocklist_from(path: str | None) -> Blocklist | WatchedBlocklist:
    """SDSERVE_BLOCKLIST_FILE's list, kept current; none without a file."""
    return WatchedBlocklist(path) if path else Blocklist([], [])
