"""Hostile or broken templates and JSONL data: one line naming the template or file, exit 2.

Every case goes through the CLI (``data gsm-symbolic`` or ``eval``, which reads its data before
it loads a model) and checks: exit status 2, exactly one stderr line starting
``cca-jax: error: ``, no traceback, nothing written at --out. The memory cases are refused
before anything large is built (MemoryError itself is simulated); the time-limit cases run
under a 0.5 s budget.
"""

import json
import time
from pathlib import Path

import pytest

import tiny
from cca_jax.data import templates as tpl
from cca_jax.data import vocab

SECONDS = "0.5"


def template(cond="x > 0", init="range(1, 5)", answer="x", answer_text="#### {x}", extra="", tid=77):
    """A one-variable template; ``extra`` adds #init lines after x."""
    return {
        "id_orig": tid, "question": "Q 1?", "answer": "#### 1",
        "question_annotated": f"Q {{x,1}}?\n\n#init:\n- $x = {init}\n{extra}\n#conditions:\n- {cond}\n\n"
                              f"#answer: {answer}",
        "answer_annotated": answer_text,
    }


def template_dir(tmp_path, content, name="0077.json") -> Path:
    """A directory holding one good template and ``content`` (a dict, text or bytes)."""
    d = tmp_path / "templates"
    d.mkdir()
    (d / "0001.json").write_text(json.dumps(template(init="[1, 2, 3, 4]", tid=1)))  # calls no helper
    if isinstance(content, dict):
        content = json.dumps(content)
    if isinstance(content, str):
        content = content.encode("utf-8")
    (d / name).write_bytes(content)
    return d


def listing(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fails(capsys, tmp_path, argv, *names) -> str:
    """Run the CLI; check exit 2, one error line naming ``names``, no traceback, no output."""
    before = listing(tmp_path)
    line = tiny.cli_error(capsys, argv, *names)
    assert listing(tmp_path) == before  # nothing written, nothing deleted
    out = Path(argv[argv.index("--out") + 1])
    assert not out.exists() and not out.parent.exists()
    return line


def data_cli(capsys, tmp_path, content, *names, name="0077.json") -> str:
    d = template_dir(tmp_path, content, name)
    out = tmp_path / "out" / "items.jsonl"
    argv = ["data", "gsm-symbolic", "--templates", str(d), "--per-template", "2", "--out", str(out)]
    return fails(capsys, tmp_path, argv, *names)


def eval_cli(capsys, tmp_path, data: Path, *names) -> str:
    """``eval`` with a model that does not exist: the data must fail first."""
    out = tmp_path / "eval" / "run"
    argv = ["eval", "--model", str(tmp_path / "no-such-model"), "--data", str(data),
            "--per-template", "2", "--out", str(out)]
    return fails(capsys, tmp_path, argv, *names)


@pytest.fixture
def small_budget(monkeypatch):
    """For the tests of the time limit itself."""
    monkeypatch.setenv(tpl.SECONDS_ENV, SECONDS)


@pytest.fixture
def size_budget(monkeypatch):
    """For the size and depth checks: short enough that a missing check fails fast, long
    enough that a slow or loaded machine meets the size check first (with 0.5 s a loaded
    CI machine hit the time limit while rendering 30,000 placeholders)."""
    monkeypatch.setenv(tpl.SECONDS_ENV, "15")


# ---------------------------------------------------------------- sizes (defect 5)

@pytest.mark.parametrize("where, expr", [
    ("answer_text", "[[0]*100000]*100000"),  # refused while parsing (a constant)
    ("answer_text", "[[x]*100000]*100000"),  # refused while rendering
    ("init", "fix_floats([[0]*100000]*100000)"),
    ("init", "fix_floats([[x]*100000]*100000)"),
    ("answer_text", "[['']*99999]*99999"),  # empty strings still count
    ("answer_text", "[[[]]*99999]*99999"),  # so do empty lists
    ("cond", "['ab'*50000]*2 == []"),  # characters count
    ("cond", "[range(99999)] + [range(99999)] == []"),
])
def test_nested_values_are_bounded_before_they_are_built(capsys, tmp_path, size_budget, where, expr):
    if where == "answer_text":
        d = template(answer_text=f"{{{expr}}}\n#### {{x}}")
    elif where == "init":
        d = template(extra=f"- $y = {expr}\n")
    else:
        d = template(cond=expr)
    t0 = time.perf_counter()
    data_cli(capsys, tmp_path, d, "template 77", "value too large")
    assert time.perf_counter() - t0 < 60  # bounded (hours or no end without the limit), with room for a slow machine


@pytest.mark.parametrize("answer_text", [
    "{list(range(99999))}\n#### {x}",  # one long list
    "{[2**2000 * 2**2000 + x]*99999}\n#### {x}",  # few elements, each 1205 digits long
    "{x} " * 30_000 + "\n#### {x}",  # many short placeholders
])
def test_rendered_text_is_bounded(capsys, tmp_path, size_budget, answer_text):
    data_cli(capsys, tmp_path, template(answer_text=answer_text), "template 77",
             f"longer than {tpl.MAX_RENDERED_CHARS} characters")


def test_template_file_size_is_bounded(capsys, tmp_path):
    d = template(answer_text="x" * tpl.MAX_TEMPLATE_BYTES + "\n#### {x}")
    data_cli(capsys, tmp_path, d, "0077.json", "too large")


# ---------------------------------------------------------------- time (defect 5)

def test_rejection_sampling_stops_at_the_time_limit(capsys, tmp_path, small_budget):
    d = template(cond="sample(range(w), w) == [1]", extra="- $w = range(1000, 100000)\n")
    t0 = time.perf_counter()
    msg = data_cli(capsys, tmp_path, d, "template 77", f"longer than {SECONDS} s", tpl.SECONDS_ENV)
    assert "making 2 instances" in msg
    assert time.perf_counter() - t0 < 60  # bounded (hours or no end without the limit), with room for a slow machine  # about 2 hours without the limit


def test_slow_constants_stop_parsing_at_the_time_limit(capsys, tmp_path, small_budget):
    slow = "".join(f"- $y{i} = fix_floats(arange(99999))[{i}]\n" for i in range(40))  # ~0.2 s each
    t0 = time.perf_counter()
    data_cli(capsys, tmp_path, template(extra=slow), "0077.json", "template 77", "parsing it",
             f"longer than {SECONDS} s")
    assert time.perf_counter() - t0 < 60  # bounded (hours or no end without the limit), with room for a slow machine


def test_the_time_limit_must_be_a_positive_number(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv(tpl.SECONDS_ENV, "soon")
    msg = data_cli(capsys, tmp_path, template(), tpl.SECONDS_ENV, "positive number of seconds", "'soon'")
    assert ".json" not in msg  # no template's fault


# ---------------------------------------------------------------- memory and stack (defect 5)

def _out_of_memory(*args):
    raise MemoryError


@pytest.mark.parametrize("function, init, doing", [
    ("range", "range(1, 5)", "parsing it"),  # a constant: folded while parsing
    ("sample", "sample([1, 2, 3], 1)[0]", "making 2 instances"),  # drawn while sampling
])
def test_memory_error_is_one_line(capsys, tmp_path, monkeypatch, function, init, doing):
    _, needs_rng = vocab.FUNCTIONS[function]
    monkeypatch.setitem(vocab.FUNCTIONS, function, (_out_of_memory, needs_rng))
    data_cli(capsys, tmp_path, template(init=init), "template 77", "ran out of memory", doing)


def test_values_nested_deeper_than_the_stack(capsys, tmp_path, size_budget):
    chain = "".join(f"- $a{i} = [[a{i - 1}]]\n" for i in range(1, 1200))
    d = template(extra="- $a0 = [[x]]\n" + chain, answer_text="{a1199}\n#### {x}")
    data_cli(capsys, tmp_path, d, "template 77", "nested too deeply")


def test_expression_nested_too_deeply(capsys, tmp_path):
    data_cli(capsys, tmp_path, template(cond="-" * 1900 + "x < 0"), "0077.json", "template 77",
             "nested too deeply")


def test_template_json_nested_200k_deep(capsys, tmp_path):
    text = '{"id_orig": 77, "x": ' + "[" * 200_000 + "]" * 200_000 + "}"
    data_cli(capsys, tmp_path, text, "0077.json", "nested too deeply")


# ---------------------------------------------------------------- broken templates (defect 9)

def test_negative_id_orig(capsys, tmp_path):
    data_cli(capsys, tmp_path, template(tid=-1), "0077.json", "template -1", "non-negative integer")


@pytest.mark.parametrize("answer_text, why", [
    ("#### {x} apples", "nothing after it"),  # caught while parsing
    ("#### {x}\nThat is all.", "nothing after it"),
    ("#### {Fraction(x, 7)}", "not a number"),  # caught once rendered: 1/7 is no gold answer
    ("#### {'many'}", "not a number"),
])
def test_text_after_the_final_answer(capsys, tmp_path, answer_text, why):
    data_cli(capsys, tmp_path, template(answer_text=answer_text), "template 77", why)


def test_template_file_not_utf8(capsys, tmp_path):
    data_cli(capsys, tmp_path, b'{"id_orig": 77, "question": "caf\xe9"}', "0077.json", "not UTF-8")


@pytest.mark.parametrize("text", ["{not json", '{"id_orig": ' + "7" * 5000 + "}", ""])
def test_template_file_not_json(capsys, tmp_path, text):
    data_cli(capsys, tmp_path, text, "0077.json", "invalid JSON")


def test_template_id_not_a_number(capsys, tmp_path):
    data_cli(capsys, tmp_path, {**template(), "id_orig": "7\n8"}, "0077.json", "id_orig is not an integer")


def test_eval_checks_templates_before_loading_the_model(capsys, tmp_path):
    d = template_dir(tmp_path, template(tid=-3))
    eval_cli(capsys, tmp_path, d, "0077.json", "template -3")
    d2 = tmp_path / "t2"
    d2.mkdir()
    (d2 / "0077.json").write_text(json.dumps(template(answer_text="#### {x} apples")))
    eval_cli(capsys, tmp_path, d2, "template 77", "nothing after it")


# ---------------------------------------------------------------- JSONL data (defect 9)

GOOD_ROW = {"original_id": 5, "instance": 0, "question": "Q?", "answer": "a\n#### 3"}


@pytest.mark.parametrize("line, why", [
    ("[1, 2]", "not an object"),
    ('"just text"', "not an object"),
    ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    (json.dumps({**GOOD_ROW, "original_id": -1}), "original_id must be a non-negative integer"),
    (json.dumps({**GOOD_ROW, "original_id": float("inf")}), "original_id must be a non-negative integer"),
    (json.dumps({**GOOD_ROW, "instance": 2.5}), "instance must be a non-negative integer"),
    (json.dumps({**GOOD_ROW, "answer": "#### 5 apples"}), "not a GSM-Symbolic record"),
    (json.dumps({**GOOD_ROW, "answer": "#### nan"}), "not a finite number"),
    (json.dumps({**GOOD_ROW, "question": ["Q?"]}), "question is a list"),
    ('{"original_id": ' + "9" * 5000 + "}", "invalid JSON"),
])
def test_bad_jsonl_rows(capsys, tmp_path, line, why):
    p = tmp_path / "items.jsonl"
    p.write_text(json.dumps(GOOD_ROW) + "\n" + line + "\n")
    msg = eval_cli(capsys, tmp_path, p, "items.jsonl:2", why)
    assert len(msg) < 400


def test_jsonl_not_utf8(capsys, tmp_path):
    p = tmp_path / "items.jsonl"
    p.write_bytes(json.dumps(GOOD_ROW).encode() + b'\n{"question": "caf\xe9"}\n')
    eval_cli(capsys, tmp_path, p, "items.jsonl:2", "not UTF-8")


def test_max_seconds_argument_is_checked():
    from cca_jax.errors import CCAError

    for bad in (0, -1, float("nan"), float("inf"), "soon", True):
        with pytest.raises(CCAError, match="max_seconds must be a positive number of seconds"):
            tpl.parse_template(template(), max_seconds=bad)
    t = tpl.parse_template(template(), max_seconds=5)
    with pytest.raises(CCAError, match="max_seconds must be a positive number of seconds"):
        tpl.instances(t, 2, 0, max_seconds=0)
    assert len(tpl.instances(t, 2, 0, max_seconds=5)) == 2
