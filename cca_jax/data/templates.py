"""GSM-Symbolic templates: parse, check and instantiate them without eval/exec.

A template (Apple's ml-gsm-symbolic format) is a JSON object whose ``question_annotated``
holds the question with ``{var,default}`` placeholders, then ``#init:`` (how each variable is
sampled), ``#conditions:`` (what a valid instance satisfies) and ``#answer:``; its
``answer_annotated`` is the worked solution with ``{expr}`` placeholders, ending in
``#### {expr}``. The expressions are python-like. They are parsed with ``ast`` and compiled
into closures over a small whitelist (``_Compiler``), so template text never reaches
``eval``/``exec``/``compile`` and a hostile template gets a one-line ``CCAError``.

Work is bounded: every value (nested lists counted in full) holds at most MAX_VALUE_SIZE
elements and characters, checked before a repetition or concatenation builds it; a rendered
question or solution has at most MAX_RENDERED_CHARS characters; parsing a template and making
its instances each get a wall-clock budget (max_seconds, default $CCA_JAX_TEMPLATE_SECONDS or
DEFAULT_MAX_SECONDS). Every limit, and running out of memory or stack, raises a CCAError that
names the template.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np

from cca_jax.data import vocab
from cca_jax.data.vocab import Labeled, RandomStream, TemplateValueError, snap, unwrap
from cca_jax.errors import CCAError

MAX_EXPR_CHARS = 2000
MAX_STR = 100_000
MAX_VALUE_SIZE = 100_000  # elements and characters in one value, nested lists counted in full
MAX_RENDERED_CHARS = 20_000  # a rendered question or solution (the public ones reach ~800)
MAX_TEMPLATE_BYTES = 1_000_000  # a template file (the public ones are ~3 kB)
DEFAULT_MAX_TRIES = 200_000  # rejection-sampling attempts per instance
# Why 20 s: the slowest public template makes 50 instances in ~1 s on a loaded 2-core machine.
DEFAULT_MAX_SECONDS = 20.0  # wall clock to parse one template, and to make its instances
SECONDS_ENV = "CCA_JAX_TEMPLATE_SECONDS"
MAX_ID = 2**63  # template ids seed numpy generators and go into JSONL: non-negative, 64-bit
DEDUP_FACTOR = 10  # instances() draws at most n * DEDUP_FACTOR candidates
_RUNTIME_ERRORS = (ArithmeticError, TypeError, ValueError, IndexError, KeyError, RecursionError)


class _Reject(Exception):
    """A template expression is not allowed (raised while compiling)."""


class _Unbound(Exception):
    pass


class _OutOfTime(Exception):
    """The template's wall-clock budget is spent (never caught as a failed condition)."""


class _Ctx:
    """Evaluation state: bound template variables, the random generator, the deadline
    (a time.monotonic() value, or None for no time limit)."""

    __slots__ = ("vars", "rng", "deadline")

    def __init__(self, rng, variables=None, deadline=None):
        self.rng = rng
        self.vars = {} if variables is None else dict(variables)
        self.deadline = deadline


def _tick(ctx: _Ctx) -> None:
    if ctx.deadline is not None and time.monotonic() > ctx.deadline:
        raise _OutOfTime


def max_seconds_default() -> float:
    """$CCA_JAX_TEMPLATE_SECONDS if set, else DEFAULT_MAX_SECONDS."""
    text = os.environ.get(SECONDS_ENV)
    return DEFAULT_MAX_SECONDS if text is None else _seconds(text, SECONDS_ENV)


def _seconds(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and v > 0) or isinstance(value, bool):
        raise CCAError(f"{what} must be a positive number of seconds, got {str(value)[:40]!r}")
    return v


def _deadline(max_seconds: float | None) -> tuple[float, float]:
    """(seconds, deadline) for a budget of max_seconds (None: the default)."""
    s = max_seconds_default() if max_seconds is None else _seconds(max_seconds, "max_seconds")
    return s, time.monotonic() + s


@contextmanager
def _guarded(tid, seconds: float, doing: str, hint: str):
    """Turn the time limit, memory exhaustion and too-deep nesting into one-line errors."""
    try:
        yield
    except _OutOfTime:
        raise _fail(tid, f"{doing} took longer than {seconds:g} s (the time limit per template; "
                         f"set {SECONDS_ENV} to change it): {hint}") from None
    except MemoryError:
        raise _fail(tid, f"ran out of memory while {doing}: its values are too large") from None
    except RecursionError:
        raise _fail(tid, f"values or expressions nested too deeply while {doing}") from None


# ---------------------------------------------------------------- arithmetic with caps

def _number(x: Any) -> Any:
    x = unwrap(x)
    if isinstance(x, (bool, int, float, Fraction)):
        return x
    raise TypeError(f"expected a number, got {type(x).__name__}")


_SCALARS = frozenset({int, float, bool, Fraction})


def _size(x: Any, limit: int = MAX_VALUE_SIZE) -> int:
    """Elements and characters in x, nested lists counted in full (a list repeated inside
    another counts every time, as printing or copying it would); stops counting past limit,
    so the work is bounded too."""
    if isinstance(x, (str, range)):
        return len(x)
    if isinstance(x, Labeled):
        return max(1, len(x.label))
    if not isinstance(x, (list, tuple)):
        return 1
    total, stack = 0, [x]
    while stack:  # a loop, not recursion: values may nest deeply
        for e in stack.pop():
            if type(e) in _SCALARS:  # the common case first (this runs in the sampling loop)
                total += 1
            elif isinstance(e, (list, tuple)):
                total += 1  # the inner list itself, so [[]] * n is not free
                stack.append(e)
            else:
                total += max(1, _size(e))  # [""] * n is not free either
        if total > limit:  # per list: the work stays below limit + MAX_SEQ
            return total
    return total


def _too_large() -> TemplateValueError:
    return TemplateValueError(f"value too large (over {MAX_VALUE_SIZE} elements and characters, "
                              f"nested lists counted in full)")


def _checked(x: Any) -> Any:
    """Refuse non-finite floats and huge ints / sequences (memory and time caps).

    Floats keep full precision here ((1/3) * 3 is exactly 1.0); float noise is dealt with
    where it matters: is_int, int, divides, //, % and rendering."""
    if isinstance(x, float):
        if not math.isfinite(x):
            raise TemplateValueError("number too large")
        return x
    if isinstance(x, int):
        if x.bit_length() > vocab.MAX_INT_BITS:
            raise TemplateValueError("number too large")
        return x
    if isinstance(x, Fraction) and max(abs(x.numerator), x.denominator).bit_length() > vocab.MAX_INT_BITS:
        raise TemplateValueError("number too large")
    if isinstance(x, (list, tuple)):
        if len(x) > vocab.MAX_SEQ:
            raise TemplateValueError("list too long")
        n = _size(x)
        if n > MAX_VALUE_SIZE:
            raise _too_large()
    if isinstance(x, str) and len(x) > MAX_STR:
        raise TemplateValueError("string too long")
    return x


def _add(a, b):
    a, b = unwrap(a), unwrap(b)
    if isinstance(a, (str, list, tuple)) and type(a) is type(b):  # list + list, str + str
        if len(a) + len(b) > vocab.MAX_SEQ:
            raise TemplateValueError("sequence too long")
        n = _size(a) + _size(b)
        if n > MAX_VALUE_SIZE:  # checked before building it
            raise _too_large()
        return a + b
    return _number(a) + _number(b)


def _mul(a, b):
    a, b = unwrap(a), unwrap(b)
    for seq, k in ((a, b), (b, a)):  # [..] * 3 repeats a list
        if isinstance(seq, (str, list, tuple)):
            if not isinstance(k, int) or isinstance(k, bool) or len(seq) * max(k, 0) > vocab.MAX_SEQ:
                raise TemplateValueError("bad or too large sequence repetition")
            n = _size(seq) * max(k, 0)  # [[0] * 10**5] * 10**5: refused before building it
            if n > MAX_VALUE_SIZE:
                raise _too_large()
            return seq * k
    return _number(a) * _number(b)


def _floordiv(a, b):
    a, b = _number(a), _number(b)
    if isinstance(a, float) or isinstance(b, float):  # 0.7 // 0.1 is 7 here, not 6
        return float(math.floor(snap(a / b)))
    return a // b


def _mod(a, b):
    a, b = _number(a), _number(b)
    if isinstance(a, float) or isinstance(b, float):
        return snap(a - b * _floordiv(a, b))
    return a % b


def _pow(a, b):
    a, b = _number(a), _number(b)
    if isinstance(b, int):
        if abs(b) > 10_000:
            raise TemplateValueError("exponent too large")
        base = a if isinstance(a, int) else (max(abs(a.numerator), a.denominator)
                                             if isinstance(a, Fraction) else 0)
        if base and abs(b) * int(base).bit_length() > vocab.MAX_INT_BITS:
            raise TemplateValueError("power too large")
    elif abs(b) > 10_000:
        raise TemplateValueError("exponent too large")
    r = a ** b
    if isinstance(r, complex):
        raise TemplateValueError("complex result")
    return r


_BINOPS: dict[type, Callable] = {
    ast.Add: _add,
    ast.Sub: lambda a, b: _number(a) - _number(b),
    ast.Mult: _mul,
    ast.Div: lambda a, b: _number(a) / _number(b),
    ast.FloorDiv: _floordiv,
    ast.Mod: _mod,
    ast.Pow: _pow,
}
_CMPOPS: dict[type, Callable] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
    ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
}


def _index(seq, idx):
    if isinstance(seq, Labeled):  # x[0] is the label, x[1] the value
        return (seq.label, seq.value)[idx]
    if not isinstance(seq, (str, list, tuple, range)):
        raise TypeError(f"cannot index {type(seq).__name__}")
    if isinstance(idx, slice):
        return seq[idx]
    idx = unwrap(idx)
    if not isinstance(idx, int) or isinstance(idx, bool):
        raise TypeError("index must be an integer")
    return seq[idx]


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id] + parts[::-1])


# ---------------------------------------------------------------- the compiler

class _Const:
    """A compiled sub-expression without variables or randomness: evaluated once, at compile time."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __call__(self, ctx):
        return self.value


class _Compiler:
    """AST -> closure ``f(ctx)``; anything outside the whitelist raises ``_Reject``.

    Allowed: number/string/bool literals, names (template variables and vocab lists), the
    arithmetic, unary, boolean and comparison operators, conditional expressions,
    list/tuple literals, indexing and slicing, and calls (positional arguments only) to
    ``vocab.FUNCTIONS``. No attribute access except the exact names ``np.arange`` and
    ``np.random.randint`` as called functions; no comprehensions, lambdas, starred args.
    ``used`` collects the template variables read since the last reset. Constant folding
    runs under ``deadline`` (a time.monotonic() value or None).
    """

    def __init__(self, variables: frozenset[str], deadline: float | None = None):
        self.variables = variables
        self.used: set[str] = set()
        self._fold_ctx = _Ctx(None, deadline=deadline)

    def _fold(self, fn, parts):
        """Constant folding. Also rejects range(10**12) or 10**10**10 before any sampling."""
        if not all(isinstance(p, _Const) for p in parts):
            return fn
        try:
            return _Const(fn(self._fold_ctx))
        except (_Unbound, *_RUNTIME_ERRORS) as e:
            raise _Reject(_why(e)) from None

    def compile(self, src: str) -> Callable[[_Ctx], Any]:
        if len(src) > MAX_EXPR_CHARS:
            raise _Reject("expression too long")
        _tick(self._fold_ctx)  # folding constants takes time too
        try:
            tree = ast.parse(src.strip(), mode="eval")
        except SyntaxError as e:
            raise _Reject(f"syntax error ({e.msg})") from None
        except (ValueError, RecursionError, MemoryError) as e:
            raise _Reject(f"cannot parse ({type(e).__name__})") from None
        try:
            return self.node(tree.body)
        except RecursionError:
            raise _Reject("expression nested too deeply") from None

    def node(self, n: ast.AST) -> Callable[[_Ctx], Any]:
        meth = getattr(self, "n_" + type(n).__name__, None)
        if meth is None:
            raise _Reject(f"{type(n).__name__} is not allowed")  # attributes, lambdas, ...
        return meth(n)

    def n_Constant(self, n):
        v = n.value
        if isinstance(v, (bool, int, float, str)) and not (isinstance(v, str) and len(v) > 1000):
            try:
                return _Const(_checked(v))
            except TemplateValueError as e:
                raise _Reject(str(e)) from None
        raise _Reject(f"literal {type(v).__name__} is not allowed")

    def n_Name(self, n):
        name = n.id
        if name in self.variables:
            self.used.add(name)

            def get(ctx):
                try:
                    return ctx.vars[name]
                except KeyError:
                    raise _Unbound(name) from None
            return get
        if name in vocab.VOCAB:
            return _Const(tuple(vocab.VOCAB[name]))  # immutable: templates cannot change it
        if name in vocab.FUNCTIONS:
            raise _Reject(f"function '{name}' used without calling it")
        raise _Reject(f"unknown name '{name}'")

    def n_BinOp(self, n):
        op = _BINOPS.get(type(n.op))
        if op is None:
            raise _Reject(f"operator {type(n.op).__name__} is not allowed")
        left, right = self.node(n.left), self.node(n.right)

        def f(ctx):
            v = op(left(ctx), right(ctx))
            if type(v) not in _SCALARS:  # a list or string: up to MAX_VALUE_SIZE steps
                _tick(ctx)
            return _checked(v)
        return self._fold(f, (left, right))

    def n_UnaryOp(self, n):
        arg = self.node(n.operand)
        if isinstance(n.op, ast.Not):
            fn = lambda ctx: not unwrap(arg(ctx))  # noqa: E731
        elif isinstance(n.op, ast.USub):
            fn = lambda ctx: _checked(-_number(arg(ctx)))  # noqa: E731
        elif isinstance(n.op, ast.UAdd):
            fn = lambda ctx: _number(arg(ctx))  # noqa: E731
        else:
            raise _Reject(f"operator {type(n.op).__name__} is not allowed")
        return self._fold(fn, (arg,))

    def n_BoolOp(self, n):
        parts = [self.node(v) for v in n.values]
        stop_on = False if isinstance(n.op, ast.And) else True  # and: first falsy; or: first truthy

        def f(ctx):
            v = None
            for p in parts:
                v = p(ctx)
                if bool(unwrap(v)) is stop_on:
                    return v
            return v
        return self._fold(f, parts)

    def n_Compare(self, n):
        ops = []
        for op in n.ops:
            fn = _CMPOPS.get(type(op))
            if fn is None:
                raise _Reject(f"comparison {type(op).__name__} is not allowed")
            ops.append(fn)
        first, rest = self.node(n.left), [self.node(c) for c in n.comparators]

        def f(ctx):
            a = unwrap(first(ctx))
            for fn, c in zip(ops, rest):
                b = unwrap(c(ctx))
                if not fn(a, b):
                    return False
                a = b
            return True
        return self._fold(f, [first, *rest])

    def n_IfExp(self, n):
        test, body, orelse = self.node(n.test), self.node(n.body), self.node(n.orelse)
        return self._fold(lambda ctx: body(ctx) if unwrap(test(ctx)) else orelse(ctx), (test, body, orelse))

    def n_List(self, n):
        items = [self.node(e) for e in n.elts]
        return self._fold(lambda ctx: _checked([i(ctx) for i in items]), items)

    def n_Tuple(self, n):
        items = [self.node(e) for e in n.elts]
        return self._fold(lambda ctx: _checked(tuple(i(ctx) for i in items)), items)

    def n_Subscript(self, n):
        value = self.node(n.value)
        if isinstance(n.slice, ast.Slice):
            parts = [_Const(None) if p is None else self.node(p)
                     for p in (n.slice.lower, n.slice.upper, n.slice.step)]

            def f(ctx):
                bounds = [unwrap(p(ctx)) for p in parts]
                if not all(b is None or (isinstance(b, int) and not isinstance(b, bool)) for b in bounds):
                    raise TypeError("slice bounds must be integers")
                return _index(value(ctx), slice(*bounds))
            return self._fold(f, [value, *parts])
        idx = self.node(n.slice)
        return self._fold(lambda ctx: _index(value(ctx), idx(ctx)), (value, idx))

    def n_Call(self, n):
        name = n.func.id if isinstance(n.func, ast.Name) else _dotted(n.func)
        if name in self.variables:
            raise _Reject(f"variable '{name}' called as a function")
        if name not in vocab.FUNCTIONS:
            raise _Reject(f"call to unknown function '{name or ast.unparse(n.func)}'")
        if n.keywords or any(isinstance(a, ast.Starred) for a in n.args):
            raise _Reject(f"keyword or starred arguments in call to '{name}'")
        fn, needs_rng = vocab.FUNCTIONS[name]
        args = [self.node(a) for a in n.args]
        clock = time.monotonic

        def call(ctx):
            vals = [a(ctx) for a in args]
            if ctx.deadline is not None and clock() > ctx.deadline:  # helpers do up to MAX_SEQ
                raise _OutOfTime  # steps each: check the time between them
            return _checked(fn(ctx.rng, *vals) if needs_rng else fn(*vals))
        if needs_rng:  # never folded: each draw must be fresh
            return call
        return self._fold(call, args)


# ---------------------------------------------------------------- data classes

@dataclass(frozen=True)
class Assignment:
    """One ``#init`` line: ``targets = expr`` (``$`` markers removed)."""

    targets: tuple[str, ...]
    expr: str


@dataclass(frozen=True)
class Template:
    id: int  # id_orig: the GSM8K test index (9001.. for the builtin set)
    question: str  # question text with {var,default} placeholders
    init: tuple[Assignment, ...]
    conditions: tuple[str, ...]
    answer: str  # the #answer expression
    answer_annotated: str
    defaults: Mapping[str, str]  # var -> default text of its first placeholder
    original_values: Mapping[str, Any]  # var -> value parsed from the defaults
    source_question: str = ""  # the JSON "question" field (the original problem text)
    source_answer: str = ""  # the JSON "answer" field
    _prog: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Instance:
    template_id: int
    index: int  # position in instances(); 0 for instantiate()/instantiate_original()
    seed: int | None  # the seed of instances(); None for instantiate_original()
    question: str
    answer_text: str  # the rendered solution, ending in "#### N"
    answer: int | float  # value of #answer (int when integral)
    values: dict = field(compare=False)  # var -> sampled value


@dataclass
class _Step:
    targets: tuple[str, ...]
    fn: Callable
    pool: Callable | None  # the list a default is looked up in (sample's first argument)
    checks: list = field(default_factory=list)  # conditions whose variables are now all bound
    fixed: list | range | None = None  # constant pool of a one-variable draw: the fast path


@dataclass
class _Prog:
    steps: list[_Step]
    pre_checks: list  # conditions on no variable
    conditions: list  # (fn, src, ast) for every condition
    answer: Callable
    question: list  # str | (var, default)
    solution: list  # str | (fn, src, bare_var)


# ---------------------------------------------------------------- parsing

_PLACEHOLDER = re.compile(r"\{\s*([A-Za-z_]\w*)\s*(?:,([^{}]*))?\}")
_EXPR_SLOT = re.compile(r"\{([^{}]*)\}")
_IDENT = re.compile(r"^[A-Za-z_]\w*$")
_SECTION = re.compile(r"^#\s*(init|conditions|answer)\s*[:=]?\s*(.*)$")
_DOLLAR_VAR = re.compile(r"\$(?=[A-Za-z_])")  # "$x" marks a numeric variable; drop the mark
_FINAL_NUMBER = re.compile(r"\s*-?\d+(\.\d+)?\s*")  # what follows the last "####" once rendered
_FINAL_SLOT = re.compile(r"\s*(\{[^{}]*\}|-?\d+(\.\d+)?)\s*")  # and before: one {expr} or a number


def _fail(tid, what: str, expr: str | None = None) -> CCAError:
    what = " ".join(what.split())  # one line, whatever an exception's text held
    if expr is None:
        return CCAError(f"template {tid}: {what}")
    expr = " ".join(expr.split())
    expr = expr if len(expr) <= 120 else expr[:117] + "..."
    return CCAError(f"template {tid}: {what} in `{expr}`")


def _clean(expr: str, braces: bool = False) -> str:
    expr = _DOLLAR_VAR.sub("", expr.strip())
    if braces and expr.startswith("{") and expr.endswith("}"):  # the "#answer: {expr}" form
        expr = expr[1:-1].strip()
    return expr


def _split_annotated(tid, text: str):
    lines = text.split("\n")
    start = next((i for i, ln in enumerate(lines) if _SECTION.match(ln.strip())), None)
    if start is None:
        raise _fail(tid, "question_annotated has no #init/#conditions/#answer sections")
    body = "\n".join(lines[:start]).rstrip()
    init, conds, answer, section = [], [], None, None
    for ln in lines[start:]:
        s = ln.strip()
        if not s:
            continue
        m = _SECTION.match(s)
        if m:
            section = m.group(1)
            if section == "answer":
                if answer is not None:
                    raise _fail(tid, "two #answer lines")
                answer = m.group(2).strip()
            elif m.group(2).strip():
                raise _fail(tid, f"text after #{section}", s)
            continue
        if not s.startswith("-") or section not in ("init", "conditions"):
            raise _fail(tid, "unexpected line", s)
        item = s[1:].strip()
        if section == "conditions":
            conds.append(_clean(item))
            continue
        if "=" not in item:
            raise _fail(tid, "#init line without '='", s)
        lhs, rhs = item.split("=", 1)
        targets = tuple(t.strip().lstrip("$").strip() for t in lhs.split(","))
        if not all(_IDENT.match(t) for t in targets):
            raise _fail(tid, "bad #init target", s)
        init.append(Assignment(targets, _clean(rhs)))
    if not init:
        raise _fail(tid, "no #init lines")
    if not answer:
        raise _fail(tid, "no #answer line")
    return body, tuple(init), tuple(conds), _clean(answer, braces=True)


def _segments(tid, text: str, pattern: re.Pattern, what: str) -> list:
    out, pos = [], 0
    for m in pattern.finditer(text):
        out.append(text[pos:m.start()])
        out.append(m)
        pos = m.end()
    out.append(text[pos:])
    for s in out:
        if isinstance(s, str) and ("{" in s or "}" in s):
            raise _fail(tid, f"unbalanced or nested braces in {what}", s)
    return out


def _compile(tid, comp: _Compiler, src: str):
    try:
        return comp.compile(src)
    except _Reject as e:
        raise _fail(tid, f"rejected expression: {e}", src) from None


def _brief(x: Any) -> str:
    """A short one-line rendering of a bad id for an error message."""
    if isinstance(x, (int, float, str)) and not (isinstance(x, int) and x.bit_length() > 64):
        r = repr(x)
        return r if len(r) <= 40 else r[:37] + "..."
    return f"<{type(x).__name__}>"


def parse_template(d: Mapping[str, Any], *, max_seconds: float | None = None) -> Template:
    """A JSON template (dict) -> Template; raises CCAError naming the id and expression.

    Parsing (which folds constants and works out the original values) stops after
    ``max_seconds`` (None: $CCA_JAX_TEMPLATE_SECONDS, else DEFAULT_MAX_SECONDS)."""
    if not isinstance(d, Mapping):
        raise CCAError("template: expected a JSON object")
    if "id_orig" not in d:
        raise _fail("?", "missing field 'id_orig'")
    tid = d["id_orig"]
    if not isinstance(tid, int) or isinstance(tid, bool):
        raise _fail(_brief(tid), "id_orig is not an integer")
    if not 0 <= tid < MAX_ID:
        raise _fail(_brief(tid), "id_orig must be a non-negative integer below 2**63 (the GSM8K test index)")
    seconds, deadline = _deadline(max_seconds)
    with _guarded(tid, seconds, "parsing it", "its constant expressions are too slow"):
        return _parse(d, tid, deadline)


def _parse(d: Mapping[str, Any], tid: int, deadline: float) -> Template:
    for key in ("question_annotated", "answer_annotated"):
        if key not in d:
            raise _fail(tid, f"missing field '{key}'")
    qa, aa = d["question_annotated"], d["answer_annotated"]
    if not isinstance(qa, str) or not isinstance(aa, str):
        raise _fail(tid, "question_annotated/answer_annotated must be strings")

    body, init, conds, answer = _split_annotated(tid, qa)
    variables = frozenset(t for a in init for t in a.targets)
    if len(variables) != sum(len(a.targets) for a in init):
        raise _fail(tid, "a variable is assigned twice in #init")

    question, defaults = [], {}
    for s in _segments(tid, body, _PLACEHOLDER, "the question"):
        if isinstance(s, str):
            question.append(s)
            continue
        var, default = s.group(1), (s.group(2) or "").strip()
        if var not in variables:
            raise _fail(tid, f"placeholder '{var}' has no #init line", s.group(0))
        if s.group(2) is not None:
            defaults.setdefault(var, default)
        question.append((var, default))

    comp = _Compiler(variables, deadline)
    steps, bound = [], set()
    for a in init:
        fn = _compile(tid, comp, a.expr)
        tree = ast.parse(a.expr, mode="eval").body
        pool = None
        if isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.args and \
                tree.func.id in ("sample", "sample_sequential", "shuffle_list"):
            pool = comp.node(tree.args[0])
        steps.append(_Step(a.targets, fn, pool, fixed=_fixed_pool(tid, a, fn, pool, tree)))
    conditions, pre = [], []
    for src in conds:
        comp.used = set()
        fn = _compile(tid, comp, src)
        conditions.append((fn, src, ast.parse(src, mode="eval").body))
        if not comp.used:
            pre.append((fn, src))
            continue
        bound = set()
        for step in steps:  # check as soon as its variables are bound: early rejection
            bound.update(step.targets)
            if comp.used <= bound:
                step.checks.append((fn, src))
                break
    answer_fn = _compile(tid, comp, answer)

    solution, cache = [], {}
    if not re.search(r"####", aa):
        raise _fail(tid, "answer_annotated has no '####' line")
    for s in _segments(tid, aa, _EXPR_SLOT, "answer_annotated"):
        if isinstance(s, str):
            solution.append(s)
            continue
        src = _clean(s.group(1))
        if src not in cache:
            cache[src] = _compile(tid, comp, src)
        solution.append((cache[src], src, src if src in variables else None))
    tail = aa.rsplit("####", 1)[1]
    if not _FINAL_SLOT.fullmatch(tail):  # the gold answer is read from after "####"
        raise _fail(tid, "answer_annotated must end with '#### {expression}' (or a number) and nothing "
                         "after it", tail)

    prog = _Prog(steps, pre, conditions, answer_fn, question, solution)
    return Template(
        id=tid, question=body, init=init, conditions=conds, answer=answer, answer_annotated=aa,
        defaults=MappingProxyType(defaults),
        original_values=MappingProxyType(_original_values(prog, defaults, deadline)),
        source_question=str(d.get("question", "")), source_answer=str(d.get("answer", "")),
        _prog=prog,
    )


# ---------------------------------------------------------------- original values

_NUMERAL = re.compile(r"^-?(\d+|\d*\.\d+)$")
_FRACTION = re.compile(r"^(\d+)\s*/\s*(\d+)$")


def _parse_default(text: str, pool: Callable[[], list]) -> Any:
    """The value a default text stands for: a number, a pool element, number words, or text."""
    if _NUMERAL.match(text):
        return float(text) if "." in text else int(text)
    m = _FRACTION.match(text)
    if m and int(m.group(2)):
        return Fraction(int(m.group(1)), int(m.group(2)))
    low = text.lower()
    for item in pool():
        if isinstance(item, Labeled) and item.label.lower() == low:
            return Labeled(text, item.value)
    w = vocab.word_value(text)
    if w is not None:
        return Labeled(text, w)
    return text


def _pool(step: _Step, ctx: _Ctx) -> list:
    try:
        v = (step.pool or step.fn)(ctx)
    except (_Unbound, *_RUNTIME_ERRORS):
        return []
    v = unwrap(v) if not isinstance(v, Labeled) else [v]
    if isinstance(v, (list, tuple, range)):
        return [vocab.labeled(x) for x in list(v)[:10_000]]
    return [v]


def _solve_linear(cond_ast, var: str, ctx: _Ctx, comp: _Compiler):
    """Solve ``lhs == rhs`` for one missing variable, assuming it enters linearly."""
    if not (isinstance(cond_ast, ast.Compare) and len(cond_ast.ops) == 1
            and isinstance(cond_ast.ops[0], ast.Eq)):
        return None
    lhs, rhs = comp.node(cond_ast.left), comp.node(cond_ast.comparators[0])

    def f(v):
        ctx.vars[var] = v
        return Fraction(unwrap(lhs(ctx))) - Fraction(unwrap(rhs(ctx)))
    try:
        f0, f1 = f(0), f(1)
        if f1 == f0:
            return None
        v = -f0 / (f1 - f0)
        ok = f(v) == 0
    except (_Unbound, *_RUNTIME_ERRORS):
        return None
    finally:
        ctx.vars.pop(var, None)
    if not ok:
        return None
    return int(v) if v.denominator == 1 else v


def _original_values(prog: _Prog, defaults: Mapping[str, str], deadline: float | None) -> dict[str, Any]:
    """Values behind the {var,default} texts; a variable without a default is solved from an
    equality condition (e.g. ``x + y + ans == total``), else the first element of its pool."""
    ctx = _Ctx(RandomStream(np.random.default_rng(0)), deadline=deadline)
    missing = []
    for step in prog.steps:
        for i, var in enumerate(step.targets):
            if var in defaults:
                ctx.vars[var] = _parse_default(defaults[var], lambda: _pool(step, ctx))
            else:
                missing.append((var, step, i))
    comp = _Compiler(frozenset(t for s in prog.steps for t in s.targets), deadline)
    for _ in range(2):  # a second pass lets one solved variable unlock another
        for var, step, i in list(missing):
            for _fn, _src, tree in prog.conditions:
                v = _solve_linear(tree, var, ctx, comp)
                if v is not None:
                    ctx.vars[var] = v
                    missing.remove((var, step, i))
                    break
    for var, step, i in missing:
        pool = _pool(step, ctx)
        first = pool[0] if pool else None
        ctx.vars[var] = first[i] if len(step.targets) > 1 and isinstance(first, (list, tuple)) else first
    return ctx.vars


# ---------------------------------------------------------------- rendering

def _decimals(default: str | None) -> int:
    m = re.match(r"^\s*-?\d*\.(\d+)\s*$", default or "")
    return len(m.group(1)) if m else 0


def format_number(x: Any, decimals: int = 0) -> str:
    """Numbers as a person writes them: 5 not 5.0, 1/3 as a fraction, 0.3 not 0.30000000000000004;
    ``decimals`` pads a non-integral float like the template's default ("0.40")."""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, Fraction):
        return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
    if isinstance(x, float):
        x = snap(x)
        if x == int(x):
            return str(int(x))
        s = f"{x:.10f}".rstrip("0")
        if decimals > len(s.split(".")[1]):
            s = f"{x:.{decimals}f}"
        return s
    return str(x)


def _at_sentence_start(before: str) -> bool:
    b = before.rstrip(" ")
    return not b or b[-1] in ".!?\n" and not b.endswith(("Mr.", "Mrs.", "Ms.", "Dr.", "Prof."))


class _TooLong(Exception):
    """A rendered question or solution passed MAX_RENDERED_CHARS."""


def _bounded_str(x: Any, limit: int) -> str:
    """str(x) of a list or tuple, built piece by piece: [2**4000] * 10**5 stops at limit
    characters instead of printing 120 MB first."""
    parts, n = [], 0

    def put(s: str) -> None:
        nonlocal n
        n += len(s)
        if n > limit:
            raise _TooLong
        parts.append(s)

    def walk(v) -> None:  # str() of a list shows its elements' repr()
        if not isinstance(v, (list, tuple)):
            put(repr(v))
            return
        put("[" if isinstance(v, list) else "(")
        for i, e in enumerate(v):
            if i:
                put(", ")
            walk(e)
        put("]" if isinstance(v, list) else ("," if len(v) == 1 else "") + ")")

    walk(x)
    return "".join(parts)


def _text(value: Any, default: str | None, before: str, *, in_answer: bool,
          limit: int = MAX_RENDERED_CHARS) -> str:
    """One placeholder's text. Labels show in the question, numbers in the solution."""
    if isinstance(value, Labeled) and in_answer:
        value = value.value
    if isinstance(value, Labeled):
        s = value.label
    elif isinstance(value, str):
        s = value
    elif isinstance(value, (list, tuple)):
        return _bounded_str(value, limit)
    else:
        return format_number(value, _decimals(default))
    # Why: "{c3,Yellow} cards" opens a sentence; a sampled "purple" must read "Purple" there.
    # A capitalised default mid-sentence ("the {location,Farmers Market}") is a proper noun
    # that sampled common nouns must not copy, so only sentence starts are capitalised.
    if s and _at_sentence_start(before):
        s = s[0].upper() + s[1:]
    return s


def _too_long(tid, what: str) -> CCAError:
    return _fail(tid, f"the rendered {what} is longer than {MAX_RENDERED_CHARS} characters")


def _render_question(t: Template, values: Mapping[str, Any], *, original: bool = False) -> str:
    out, n = [], 0
    for s in t._prog.question:
        if not isinstance(s, str):
            var, default = s
            v = default if original and default else values[var]
            try:
                s = _text(v, default, "".join(out[-2:]), in_answer=False, limit=MAX_RENDERED_CHARS - n)
            except _TooLong:
                raise _too_long(t.id, "question") from None
        n += len(s)
        if n > MAX_RENDERED_CHARS:
            raise _too_long(t.id, "question")
        out.append(s)
    return "".join(out)


def _render_solution(t: Template, ctx: _Ctx) -> str:
    out, n, src = [], 0, ""
    for s in t._prog.solution:
        if not isinstance(s, str):
            fn, src, bare = s
            try:
                v = fn(ctx)
                s = _text(v, t.defaults.get(bare), "".join(out[-2:]), in_answer=True,
                          limit=MAX_RENDERED_CHARS - n)
            except _TooLong:
                raise _too_long(t.id, "solution (answer_annotated)") from None
            except (_Unbound, *_RUNTIME_ERRORS) as e:
                raise _fail(t.id, f"answer_annotated failed ({_why(e)})", src) from None
        n += len(s)
        if n > MAX_RENDERED_CHARS:
            raise _too_long(t.id, "solution (answer_annotated)")
        out.append(s)
    text = "".join(out)
    final = text.rsplit("####", 1)[1]
    if not _FINAL_NUMBER.fullmatch(final):  # 1/3, a name or a list is no gold answer
        raise _fail(t.id, f"the final '####' line renders as {final.strip()[:40]!r}, not a number", src)
    return text


def _why(e: Exception) -> str:
    if isinstance(e, _Unbound):
        return f"'{e}' is not set yet"
    if isinstance(e, TemplateValueError):
        return str(e)
    if isinstance(e, RecursionError):
        return "values or expressions nested too deeply"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _answer_value(t: Template, ctx: _Ctx) -> int | float:
    try:
        v = unwrap(t._prog.answer(ctx))
        if isinstance(v, bool) or not isinstance(v, (int, float, Fraction)):
            raise TypeError(f"#answer is a {type(v).__name__}, not a number")
    except (_Unbound, *_RUNTIME_ERRORS) as e:
        raise _fail(t.id, f"#answer failed ({_why(e)})", t.answer) from None
    if isinstance(v, float):
        v = snap(v)
    return int(v) if v == int(v) else float(v)


def _make(t: Template, ctx: _Ctx, question: str, index: int, seed) -> Instance:
    return Instance(template_id=t.id, index=index, seed=seed, question=question,
                    answer_text=_render_solution(t, ctx), answer=_answer_value(t, ctx),
                    values=dict(ctx.vars))


# ---------------------------------------------------------------- sampling

def _fixed_pool(tid, a: Assignment, fn, pool, tree):
    """``$x = range(..)`` or ``x = sample(LIST)`` with a constant list: precompute the list."""
    if len(a.targets) != 1:
        return None
    if isinstance(fn, _Const):
        seq = fn.value
    elif isinstance(pool, _Const) and len(tree.args) == 1 and tree.func.id == "sample":
        seq = pool.value
    else:
        return None
    if not isinstance(seq, (list, tuple, range)):
        return None
    if len(seq) == 0:
        raise _fail(tid, "samples from an empty list", a.expr)
    return seq if isinstance(seq, range) else [vocab.labeled(x) for x in seq]


def _assign(t: Template, step: _Step, ctx: _Ctx) -> None:
    try:
        v = step.fn(ctx)
        if len(step.targets) == 1:
            v = vocab.pick(ctx.rng, v) if isinstance(v, (list, tuple, range)) else v
            ctx.vars[step.targets[0]] = v
            return
        if not isinstance(v, (list, tuple)) or len(v) != len(step.targets):
            raise ValueError(f"needs {len(step.targets)} values")
        for name, x in zip(step.targets, v):
            ctx.vars[name] = vocab.labeled(x)
    except (_Unbound, *_RUNTIME_ERRORS) as e:
        raise _fail(t.id, f"#init failed ({_why(e)})", ", ".join(step.targets) + " = ...") from None


def _holds(fn, ctx) -> bool:
    """A condition that errors (e.g. divides by zero for this draw) counts as false."""
    try:
        return bool(unwrap(fn(ctx)))
    except (_Unbound, *_RUNTIME_ERRORS):
        return False


_SLOW_DRAW = "its #conditions are rarely true or its expressions are too slow"


def _draw(t: Template, rng: RandomStream, max_tries: int, deadline: float) -> _Ctx:
    prog = t._prog
    if not all(_holds(fn, _Ctx(rng, deadline=deadline)) for fn, _ in prog.pre_checks):
        raise _fail(t.id, "a condition on no variable is false")
    steps = [(s, s.targets[0], s.fixed, [fn for fn, _ in s.checks]) for s in prog.steps]
    index, clock = rng.index, time.monotonic
    for _ in range(max_tries):
        if clock() > deadline:
            raise _OutOfTime
        ctx = _Ctx(rng, deadline=deadline)
        values = ctx.vars
        for step, name, fixed, checks in steps:
            if fixed is not None:  # hot path: one draw from a precomputed list
                values[name] = fixed[index(len(fixed))]
            else:
                _assign(t, step, ctx)
            if checks and not all(_holds(fn, ctx) for fn in checks):
                break
        else:
            return ctx
    raise _fail(t.id, f"no sample satisfied all #conditions in {max_tries} tries")


def failed_conditions(template: Template, values: Mapping[str, Any]) -> list[str]:
    """The #conditions that do not hold for these values (an error counts as not holding)."""
    ctx = _Ctx(RandomStream(np.random.default_rng(0)), values)
    return [src for fn, src, _ in template._prog.conditions if not _holds(fn, ctx)]


def instantiate(template: Template, rng: np.random.Generator, max_tries: int = DEFAULT_MAX_TRIES,
                *, index: int = 0, seed: int | None = None, max_seconds: float | None = None) -> Instance:
    """One random instance: sample #init in order, reject until every condition holds,
    within ``max_seconds`` (None: $CCA_JAX_TEMPLATE_SECONDS, else DEFAULT_MAX_SECONDS)."""
    seconds, deadline = _deadline(max_seconds)
    with _guarded(template.id, seconds, "making an instance", _SLOW_DRAW):
        ctx = _draw(template, RandomStream(rng), max_tries, deadline)
        return _make(template, ctx, _render_question(template, ctx.vars), index, seed)


def instantiate_original(template: Template, *, max_seconds: float | None = None) -> Instance:
    """The instance with the template's own default values (its source problem).

    The question shows each placeholder's default text verbatim; the values (and so the
    solution and #answer) come from ``template.original_values``. Conditions are not
    checked: many originals lie outside the ranges the template samples from.
    """
    seconds, deadline = _deadline(max_seconds)
    with _guarded(template.id, seconds, "rendering its original", "its expressions are too slow"):
        ctx = _Ctx(RandomStream(np.random.default_rng(0)), template.original_values, deadline)
        q = _render_question(template, ctx.vars, original=True)
        return _make(template, ctx, q, 0, None)


def instances(template: Template, n: int, seed: int, max_tries: int = DEFAULT_MAX_TRIES,
              *, max_seconds: float | None = None) -> list[Instance]:
    """n instances with distinct questions, deterministic for (seed, template id).

    Duplicates are redrawn, at most n * DEDUP_FACTOR draws in all. If the template cannot
    produce n distinct questions within that, FEWER than n are returned (never repeats), so a
    train/test split of the result cannot leak a question. All n must be made within
    ``max_seconds`` (None: $CCA_JAX_TEMPLATE_SECONDS, else DEFAULT_MAX_SECONDS), else CCAError.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise CCAError(f"instances: n must be a non-negative integer, got {n!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise CCAError(f"instances: seed must be a non-negative integer, got {seed!r}")
    seconds, deadline = _deadline(max_seconds)
    rng = RandomStream(np.random.default_rng([seed, template.id]))
    out, seen = [], set()
    with _guarded(template.id, seconds, f"making {n} instances", _SLOW_DRAW):
        for _ in range(n * DEDUP_FACTOR):
            if len(out) == n:
                break
            ctx = _draw(template, rng, max_tries, deadline)
            q = _render_question(template, ctx.vars)
            if q in seen:
                continue
            seen.add(q)
            out.append(_make(template, ctx, q, len(out), seed))
    return out


# ---------------------------------------------------------------- loading

def _load_file(path: Path, data: bytes, max_seconds: float | None = None) -> Template:
    if len(data) > MAX_TEMPLATE_BYTES:
        raise CCAError(f"{path}: template file of {len(data)} bytes is too large (at most {MAX_TEMPLATE_BYTES})")
    try:
        d = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CCAError(f"{path}: not UTF-8 text (byte {e.start}): a template is a UTF-8 JSON file") from None
    except json.JSONDecodeError as e:
        raise CCAError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except ValueError as e:  # a number of 5000 digits
        raise CCAError(f"{path}: invalid JSON ({str(e).split(';')[0][:100]})") from None
    except RecursionError:  # [[[...]]] 200k deep
        raise CCAError(f"{path}: invalid JSON (nested too deeply)") from None
    except MemoryError:
        raise CCAError(f"{path}: JSON too large to parse") from None
    try:
        return parse_template(d, max_seconds=max_seconds)
    except CCAError as e:
        raise CCAError(f"{path}: {e}") from None


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_TEMPLATE_BYTES + 1)  # no more than the limit, however large the file
    except OSError as e:
        raise CCAError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None


def load_templates(directory: str | Path, *, max_seconds: float | None = None) -> list[Template]:
    """Every ``*.json`` template in a directory, sorted by id (``max_seconds``: parse_template's)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CCAError(f"template directory not found: {directory}")
    files = sorted(directory.glob("*.json"))
    if not files:
        raise CCAError(f"no *.json templates in {directory}")
    seconds = _deadline(max_seconds)[0]  # a bad $CCA_JAX_TEMPLATE_SECONDS is no file's fault
    out = [_load_file(p, _read(p), seconds) for p in files]
    ids = [t.id for t in out]
    if len(set(ids)) != len(ids):
        raise CCAError(f"duplicate template ids in {directory}")
    return sorted(out, key=lambda t: t.id)


def load_builtin_templates() -> list[Template]:
    """The 24 templates shipped with the package (ids 9001..9024, our own problems)."""
    root = resources.files("cca_jax.data") / "builtin"
    files = sorted((p for p in root.iterdir() if p.name.endswith(".json")), key=lambda p: p.name)
    return sorted((_load_file(Path(p.name), p.read_bytes()) for p in files), key=lambda t: t.id)
