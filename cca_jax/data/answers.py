"""Answer extraction and the generation stop rule (SPEC section 0).

reference: cut after the first ``answer is[^.]*\\.``, delete commas, take the last number.
           (A decimal "answer is 3.5." is cut at "3." -> 3: the original's behaviour.)
fixed:     first cut before a following "Q:", then cut after the first period that is not
           a decimal point, then as above.
"""

from __future__ import annotations

import re
from typing import Sequence

MODES = ("reference", "fixed")
_REF_CUT = re.compile(r"answer is[^.]*\.")
_FIXED_CUT = re.compile(r"answer is.*?\.(?!\d)", re.S)
_NEW_Q = re.compile(r"(^|\n)\s*Q:")
_NUMBER = re.compile(r"-?\d+\.?\d*")
# generation may stop once the answer sentence's period is followed by something that
# shows it is no decimal point, or once a new question starts
_STOP_ANSWER = re.compile(r"answer is[^\n]*?\.(?=\D)")


def extract(text: str, mode: str = "fixed") -> float | None:
    if mode not in MODES:
        from cca_jax.errors import CCAError

        raise CCAError(f"unknown answer mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "fixed":
        q = _NEW_Q.search(text)
        if q:
            text = text[: q.start()]
        m = _FIXED_CUT.search(text)
    else:
        m = _REF_CUT.search(text)
    if m:
        text = text[: m.end()]
    nums = _NUMBER.findall(text.replace(",", ""))
    if not nums:
        return None
    try:
        return float(nums[-1])
    except ValueError:  # "-." style fragments
        return None


def gold(answer_text: str) -> float:
    """The number after ``####`` in a GSM8K-style solution."""
    tail = answer_text.split("####")[-1].strip().replace(",", "")
    return float(tail)


def is_correct(pred: float | None, target: float, tol: float = 1e-6) -> bool:
    return pred is not None and abs(pred - target) <= tol * max(1.0, abs(target))


def stop_rule(tokenizer):
    """A ``generate`` stop rule: the answer sentence is complete, or a new "Q:" starts.

    Returns how many generated tokens to keep (a prefix of what was generated)."""

    def keep_len(ids: Sequence[int]) -> int | None:
        text = tokenizer.decode(list(ids), skip_special_tokens=False)
        q = _NEW_Q.search(text)
        a = _STOP_ANSWER.search(text)
        if q is None and a is None:
            return None
        if a is not None and (q is None or a.end() <= q.start()):
            target = a.end()  # keep through the answer's period: the fewest tokens whose text
            # reaches it, searched down from the end (rows are checked every few tokens, so
            # the answer ends near the end: a few decodes, not one per token of the row)
            k = len(ids)
            while k > 1 and len(tokenizer.decode(list(ids[:k - 1]), skip_special_tokens=False)) >= target:
                k -= 1
            return k
        # a new question starts: keep the tokens before its "Q"
        cut = q.end() - 2
        k = len(ids)
        while k > 0 and len(tokenizer.decode(list(ids[:k]), skip_special_tokens=False)) > cut:
            k -= 1
        return k

    return keep_len
