import pytest

from cca_jax.data import answers
from cca_jax.data.prompt import SHOTS, build_prompt


@pytest.mark.parametrize("text,ref,fixed", [
    (" Tom has 3 + 5 = 8 apples. The final answer is 8.", 8.0, 8.0),
    (" So 1,250 in all. The final answer is 1,250.\n\nQ: next 77", 1250.0, 1250.0),
    (" It costs 3.5 dollars. The answer is 3.5.", 3.0, 3.5),   # reference cuts at the point
    (" The answer is -4. Then 9", -4.0, -4.0),
    (" no number here", None, None),
    (" 12 eggs then\nQ: How many 99", 99.0, 12.0),              # fixed stops at a new Q:
    (" The answer is $12.50. Done 7.", 12.0, 12.5),
])
def test_extract_modes(text, ref, fixed):
    assert answers.extract(text, "reference") == ref
    assert answers.extract(text, "fixed") == fixed


def test_gold_and_correct():
    assert answers.gold("so 3 + 4\n#### 1,007") == 1007.0
    assert answers.is_correct(7.0, 7.0) and not answers.is_correct(None, 7.0) and not answers.is_correct(7.5, 7)


def test_prompt_format():
    p = build_prompt("What is 2 + 2?")
    assert p.startswith("As an expert problem solver, solve step by step the following mathematical questions.\n\nQ: ")
    assert p.endswith("\n\nQ: What is 2 + 2?\nA: Let's think step by step.")
    assert p.count("Q: ") == 9 and p.count("The final answer is") == 8
    assert [a for _, _, a in SHOTS] == [6, 5, 39, 8, 9, 29, 33, 8]


class CharTok:
    """A tokenizer whose tokens are characters: decode is exact and easy to reason about."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def test_stop_rule_keeps_through_answer_period_or_before_new_question():
    rule = answers.stop_rule(CharTok())
    ids = [ord(c) for c in " so 7. The answer is 3.5. More"]
    k = rule(ids)
    assert "".join(map(chr, ids[:k])) == " so 7. The answer is 3.5."
    assert rule([ord(c) for c in " The answer is 3."]) is None  # might still be a decimal
    ids = [ord(c) for c in " 4 apples\nQ: what"]
    assert "".join(map(chr, ids[: rule(ids)])) == " 4 apples\n"


class WordTok:
    """Tokens of several characters (a word and its space), as a BPE vocabulary has them."""

    def __init__(self, text):
        import re

        self.pieces = re.findall(r"\s*\S+", text)

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[i] for i in ids)


@pytest.mark.parametrize("text", [
    " We add 3 and 4. The final answer is 7. Then more words follow here",
    " 12 + 30 = 42 so the answer is 42.\nQ: and then",
    " The answer is 1,250. Next the answer is 9. end",
])
def test_stop_rule_keeps_the_fewest_tokens_that_reach_the_answer(text):
    """The answer's end is searched down from the row's end; it is the fewest tokens whose
    text reaches it, as the search up from the first token finds."""
    tok = WordTok(text)
    ids = list(range(len(tok.pieces)))
    target = answers._STOP_ANSWER.search(text).end()
    fewest = next(k for k in range(1, len(ids) + 1) if len(tok.decode(ids[:k])) >= target)
    assert answers.stop_rule(tok)(ids) == fewest
