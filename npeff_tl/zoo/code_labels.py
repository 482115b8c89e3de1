"""Mechanism labels for next-token examples in Python source, from the text alone.

An example is a context window of BPE tokens and the token that follows it (the target). Rules decide which
mechanisms predicting the target needs; an example may carry several labels, or none. The rules read the
text through Python's own ``tokenize`` module (names, numbers, strings, comments, brackets, logical lines),
so they describe the *text*: they say what a good predictor must do, not what the model does inside.

- ``induction``: the target copies what followed the current token at its most recent earlier occurrence in
  the window, and bigram statistics of the training text do not predict it (P(target | current) below
  ``INDUCTION_MAX_BIGRAM``).
- ``close_bracket``: the target closes a bracket opened inside the window.
- ``close_string``: the target ends a string literal opened inside the window.
- ``indent`` / ``dedent``: the target is the newline (with indentation) that leads into the next statement, and
  that statement is indented deeper / shallower than the current one.
- ``attribute``: the target starts the name after a ``.``.
- ``keyword``: the target is a keyword that starts a statement (``def``, ``return``, ``if``, ...).
- ``continuation``: the target continues a name or number already begun (a multi-token identifier or number).
- ``prose``: the target is inside a comment or a triple-quoted string (docstrings): English, not code.

English prose mechanisms, which Python's ``tokenize`` does not see (to it a comment or a docstring is one token).
They are the rule set ``PROSE_CATEGORIES``, added to ``CATEGORIES`` for models that read English
(``CODE_AND_PROSE_CATEGORIES``). A target they label is inside prose by definition, so it does not also carry
``prose``: there ``prose`` means prose that none of them explains.

- ``prose_close``: the target closes a bracket, a double quote or a run of backquotes (reST's `x` and ``x``)
  opened earlier in the same comment block or docstring, inside the window (consecutive comment lines are one
  block; single quotes are left out, as apostrophes cannot be told from them).
- ``prose_copy``: the target begins a word of the prose (two or more letters) whose token already occurred in the
  window's prose, though never after the current token (so not ``induction``), and neither the current token
  (P(target | current) below ``INDUCTION_MAX_BIGRAM``) nor the word's frequency in the training text (below
  ``PROSE_COPY_MAX_UNIGRAM``) predicts it: a content word copied from earlier in the text.
"""

from __future__ import annotations

import io
import keyword
import re
import tokenize
from collections.abc import Callable, Sequence
from dataclasses import dataclass

CATEGORIES = ("induction", "close_bracket", "close_string", "indent", "dedent", "attribute", "keyword",
              "continuation", "prose")
PROSE_CATEGORIES = ("prose_close", "prose_copy")
CODE_AND_PROSE_CATEGORIES = CATEGORIES + PROSE_CATEGORIES
INDUCTION_MAX_BIGRAM = 0.05
PROSE_COPY_MAX_UNIGRAM = 3e-4  # rarer than 3 in 10,000 tokens of the training text: not a function word
_WORD_TOKEN = re.compile(r" ?[A-Za-z]{2,}")
_PROSE_OPENERS = {")": "(", "]": "[", "}": "{"}
_PROSE_QUOTES = '"`'
_OPENERS = {")": "(", "]": "[", "}": "{"}
_STATEMENT_BOUNDARIES = (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING)
_BLANKS = re.compile(r"[ \t]*")


@dataclass(frozen=True)
class SourceFacts:
    """Per character of one source text, what Python's tokenizer says about it (-1 / False where nothing)."""

    text: str
    opener_of: list[int]  # at a closing bracket: the offset of the bracket it closes
    string_start_of: list[int]  # at the last character of a string literal: the literal's first offset
    attribute_start: list[bool]  # first character of a name that follows "."
    keyword_start: list[bool]  # first character of a keyword that starts a statement
    inside_word: list[bool]  # strictly inside a name or number (not its first character)
    prose: list[bool]  # inside a comment after "#", or inside a triple-quoted string's body
    statement_indent: list[int]  # at the first character of a statement: its column
    current_indent: list[int]  # the column of the last statement that starts at or before the character
    prose_region: list[int]  # inside prose: the number of its comment block or triple-quoted string
    prose_opener_of: list[int]  # at a closing bracket or quote in prose: the offset of what it closes there

    @classmethod
    def of(cls, text: str) -> SourceFacts:
        """Facts of ``text``; raises ``ValueError`` if Python cannot tokenize it."""
        n = len(text) + 1
        facts = cls(text, [-1] * n, [-1] * n, [False] * n, [False] * n, [False] * n, [False] * n, [-1] * n, [-1] * n,
                    [-1] * n, [-1] * n)
        line_starts = [0]
        for line in text.splitlines(keepends=True):
            line_starts.append(line_starts[-1] + len(line))

        def offset(row_col: tuple[int, int]) -> int:
            return line_starts[row_col[0] - 1] + row_col[1]

        stack: list[int] = []
        previous = None
        at_statement_start = True
        region, last_comment_row = -1, None  # a comment on the row after the last one continues its block
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
        except (tokenize.TokenError, IndentationError, SyntaxError) as error:
            raise ValueError(f"Python cannot tokenize this text: {error}") from None
        for token in tokens:
            start, end = offset(token.start), offset(token.end)
            if token.type == tokenize.OP and token.string in "([{":
                stack.append(start)
            elif token.type == tokenize.OP and token.string in _OPENERS and stack:
                facts.opener_of[start] = stack.pop()
            elif token.type == tokenize.STRING:
                facts.string_start_of[end - 1] = start
                quote = token.string.lstrip("rRbBuUfF")[:3]
                if quote in ('"""', "'''"):
                    body = start + len(token.string) - len(token.string.lstrip("rRbBuUfF")) + 3
                    facts.prose[body: end - 3] = [True] * max(0, end - 3 - body)
                    region += 1
                    facts.prose_region[body: end - 3] = [region] * max(0, end - 3 - body)
            elif token.type == tokenize.COMMENT:
                facts.prose[start + 1: end] = [True] * (end - start - 1)
                if last_comment_row is None or token.start[0] != last_comment_row + 1:
                    region += 1
                last_comment_row = token.start[0]
                facts.prose_region[start + 1: end] = [region] * (end - start - 1)
            elif token.type in (tokenize.NAME, tokenize.NUMBER):
                facts.inside_word[start + 1: end] = [True] * (end - start - 1)
                if token.type == tokenize.NAME:
                    if previous is not None and previous.type == tokenize.OP and previous.string == ".":
                        facts.attribute_start[start] = True
                    if at_statement_start and keyword.iskeyword(token.string):
                        facts.keyword_start[start] = True
            if at_statement_start and token.type not in (*_STATEMENT_BOUNDARIES, tokenize.NL, tokenize.COMMENT,
                                                          tokenize.ENDMARKER):
                facts.statement_indent[start] = token.start[1]
            if token.type in _STATEMENT_BOUNDARIES:
                at_statement_start = True
            elif token.type not in (tokenize.NL, tokenize.COMMENT):
                at_statement_start = False
            if token.type not in (tokenize.NL, tokenize.COMMENT):
                previous = token
            if token.type not in (tokenize.NL, tokenize.COMMENT, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                last_comment_row = None  # code between two comments ends the block
        for c in range(n):
            facts.current_indent[c] = facts.statement_indent[c] if facts.statement_indent[c] >= 0 else (
                facts.current_indent[c - 1] if c else -1)
        facts._match_prose_pairs()
        return facts

    def _match_prose_pairs(self) -> None:
        """``prose_opener_of``, within each prose region: brackets by a stack (a closer whose region's innermost
        open bracket is of another kind, or that has none open, closes nothing); double quotes and backquotes
        by turns, a run of them (``) closing the last open run of the same character and length."""
        stacks: dict[int, list[tuple[str, int]]] = {}
        open_quotes: dict[tuple[int, str, int], int] = {}
        c = 0
        while c < len(self.text):
            char, region = self.text[c], self.prose_region[c]
            if region >= 0 and char in _PROSE_QUOTES:
                end = c
                while end < len(self.text) and self.text[end] == char and self.prose_region[end] == region:
                    end += 1
                key = (region, char, end - c)
                if key in open_quotes:
                    self.prose_opener_of[c] = open_quotes.pop(key)
                else:
                    open_quotes[key] = c
                c = end
                continue
            if region >= 0:
                stack = stacks.setdefault(region, [])
                if char in "([{":
                    stack.append((char, c))
                elif char in _PROSE_OPENERS and stack and stack[-1][0] == _PROSE_OPENERS[char]:
                    self.prose_opener_of[c] = stack.pop()[1]
            c += 1


def target_labels(
    facts: SourceFacts,
    ids: Sequence[int],
    spans: Sequence[tuple[int, int]],
    target: int,
    window: int,
    bigram_prob: Callable[[int, int], float],
    categories: Sequence[str] = CATEGORIES,
    unigram_prob: Callable[[int], float] | None = None,
) -> frozenset[str]:
    """The labels of predicting token ``target`` of a tokenized text from the ``window`` tokens before it.

    Args:
        facts: ``SourceFacts.of(text)``.
        ids, spans: the text's token ids and their character spans [start, end) (spans may be empty for
            special tokens).
        target: index of the predicted token; the context is tokens ``target - window .. target - 1``.
        bigram_prob: P(b | a) under the training text's bigram statistics.
        categories: the rule set: only these labels are given (``CATEGORIES``, or
            ``CODE_AND_PROSE_CATEGORIES``); where one of ``PROSE_CATEGORIES`` is given, ``prose`` is not.
        unigram_prob: P(b) under the training text's unigram statistics (``prose_copy`` needs it).
    """
    if not window <= target < len(ids):
        raise ValueError(f"target {target} needs {window} tokens before it among {len(ids)}")
    unknown = set(categories) - set(CODE_AND_PROSE_CATEGORIES)
    if unknown:
        raise ValueError(f"no rule for categories {sorted(unknown)}; known: {CODE_AND_PROSE_CATEGORIES}")
    if "prose_copy" in categories and unigram_prob is None:
        raise ValueError("the prose_copy rule needs unigram_prob")
    first = target - window
    context_start = next((spans[i][0] for i in range(first, target) if spans[i][1] > spans[i][0]), spans[target][0])
    start, end = spans[target]
    chars = range(start, end)
    labels = set()
    current, following = ids[target - 1], ids[target]
    earlier = next((q for q in range(target - 2, first - 1, -1) if ids[q] == current), None)
    if earlier is not None and ids[earlier + 1] == following and bigram_prob(current, following) < INDUCTION_MAX_BIGRAM:
        labels.add("induction")
    if any(context_start <= facts.opener_of[c] < start for c in chars):
        labels.add("close_bracket")
    if any(context_start <= facts.string_start_of[c] < start for c in chars):
        labels.add("close_string")
    if any(facts.attribute_start[c] for c in chars):
        labels.add("attribute")
    if any(facts.keyword_start[c] for c in chars):
        labels.add("keyword")
    if end > start and facts.inside_word[start]:
        labels.add("continuation")
    if end > start and facts.prose[start]:
        labels.add("prose")
    newline = facts.text.rfind("\n", start, end)
    if newline >= 0:
        code = _BLANKS.match(facts.text, newline + 1).end()
        before = facts.current_indent[start]
        if facts.statement_indent[code] >= 0 and before >= 0:
            if facts.statement_indent[code] > before:
                labels.add("indent")
            elif facts.statement_indent[code] < before:
                labels.add("dedent")
    labels &= set(categories)
    if "prose_close" in categories and any(context_start <= facts.prose_opener_of[c] < start for c in chars):
        labels.add("prose_close")
    if "prose_copy" in categories and _is_prose_copy(facts, ids, spans, target, first, bigram_prob, unigram_prob):
        labels.add("prose_copy")
    if labels & set(PROSE_CATEGORIES):
        labels.discard("prose")
    return frozenset(labels)


def _is_prose_copy(facts: SourceFacts, ids, spans, target: int, first: int, bigram_prob, unigram_prob) -> bool:
    """The ``prose_copy`` rule (module docstring)."""
    start, end = spans[target]
    text = facts.text
    if end <= start or not facts.prose[start] or not _WORD_TOKEN.fullmatch(text, start, end):
        return False
    if text[start] != " " and start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_"):
        return False  # a piece inside a word, not its beginning
    current, following = ids[target - 1], ids[target]
    if not any(ids[q] == following and facts.prose[spans[q][0]] and spans[q][1] > spans[q][0]
               for q in range(first, target - 1)):
        return False
    if any(ids[q] == current and ids[q + 1] == following for q in range(first, target - 1)):
        return False  # the current token was followed by it before: a prefix-matching copy (induction's)
    return bigram_prob(current, following) < INDUCTION_MAX_BIGRAM and unigram_prob(following) < PROSE_COPY_MAX_UNIGRAM
