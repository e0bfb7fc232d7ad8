"""``text_stats``: counts and frequencies for a piece of text."""

import re
from collections import Counter

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_WORDS_PER_MINUTE = 200


def text_stats(text: str, top: int = 10) -> dict:
    """Statistics of a text: characters, words, lines, sentences, paragraphs, unique words,
    average word and sentence length, estimated reading time, and the ``top`` most frequent
    words (case-folded) with their counts."""
    if not isinstance(text, str):
        raise TypeError("text must be a string")
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 1000:
        raise ValueError("top must be an integer from 0 to 1000")
    words = _WORD.findall(text)
    folded = Counter(word.casefold() for word in words)
    sentences = len(_SENTENCE_END.findall(text)) or (1 if words else 0)
    paragraphs = sum(1 for block in re.split(r"\n\s*\n", text) if block.strip())
    return {
        "characters": len(text),
        "characters_no_spaces": sum(1 for ch in text if not ch.isspace()),
        "words": len(words),
        "unique_words": len(folded),
        "lines": text.count("\n") + 1 if text else 0,
        "sentences": sentences,
        "paragraphs": paragraphs,
        "average_word_length": round(sum(map(len, words)) / len(words), 2) if words else 0.0,
        "average_sentence_words": round(len(words) / sentences, 2) if sentences else 0.0,
        "reading_time_s": round(len(words) * 60 / _WORDS_PER_MINUTE, 1),
        "top_words": [[word, count] for word, count in folded.most_common(top)],
    }
