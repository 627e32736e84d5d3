"""Word lists, number words and helper functions that GSM-Symbolic templates may reference.

Apple's generator (ml-gsm-symbolic) is not available here, so every list and helper is our
own, reconstructed from how the 100 public templates use it. Why each choice was made is
noted next to it. The lists hold our own words; they contain the original (default) value of
every template variable that samples from them, except defaults that are roles or titles
rather than names ("Grandma", "Prince ...") or that the template text itself garbles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction as _Fraction
from typing import Any

# Caps that keep a hostile template from exhausting memory or time.
MAX_SEQ = 100_000  # elements in a range / list / arange
MAX_INT_BITS = 4096  # size of any integer a template computes


class TemplateValueError(ValueError):
    """A helper was called with arguments it refuses (too large, wrong type)."""


@dataclass(frozen=True)
class Labeled:
    """A number shown as words, e.g. ``Labeled("twice", 2)``.

    Templates sample ``("six-sided", 6)`` pairs and multipliers like "twice", then use the
    variable both in text (the label) and in arithmetic (the value); ``x[0]`` / ``x[1]`` give
    label / value as for the tuples the templates write. The evaluator unwraps it before
    arithmetic, comparison and helper calls.
    """

    label: str
    value: Any

    def __str__(self) -> str:
        return self.label


def unwrap(x: Any) -> Any:
    return x.value if isinstance(x, Labeled) else x


def snap(x: float) -> float:
    """Round float noise away (0.1 * 3 -> 0.3), so is_int/int/% agree with exact arithmetic.

    12 significant digits (noise is relative), then 10 decimals (noise around zero).
    """
    if not math.isfinite(x):
        raise TemplateValueError(f"non-finite number {x}")
    return round(float(f"{x:.12g}"), 10)


def _num(x: Any) -> Any:
    x = unwrap(x)
    if isinstance(x, bool) or not isinstance(x, (int, float, _Fraction)):
        raise TemplateValueError(f"expected a number, got {type(x).__name__}")
    return x


def _seq(x: Any) -> list | range:
    x = unwrap(x)
    if isinstance(x, (list, tuple, range)):
        if len(x) > MAX_SEQ:
            raise TemplateValueError(f"sequence of {len(x)} elements is too long")
        return x
    raise TemplateValueError(f"expected a list, got {type(x).__name__}")


# ---------------------------------------------------------------- number words

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_to_words(n: int) -> str:
    """0..999 as English words, hyphenated like the templates ("forty-two")."""
    if not 0 <= n < 1000:
        raise TemplateValueError(f"no words for {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))


# ---------------------------------------------------------------- helpers templates call

def labeled(x: Any) -> Any:
    """A sampled ("label", value) pair becomes a Labeled; anything else is returned as is.
    A list is no label (printing a large one would take long)."""
    if isinstance(x, tuple) and len(x) == 2 and not isinstance(x[1], (str, tuple, list)) \
            and not isinstance(x[0], (tuple, list)):
        return Labeled(str(x[0]), x[1])
    return x


class RandomStream:
    """Uniform draws from a numpy Generator, fetched 1024 at a time.

    Why: a numpy call costs about a microsecond, and rejection sampling makes thousands of
    draws per instance. Deterministic for the generator's seed.
    """

    __slots__ = ("_gen", "_buf", "_i")

    def __init__(self, gen):
        self._gen, self._buf, self._i = gen, [], 0

    def index(self, n: int) -> int:
        """A uniform integer in [0, n)."""
        if self._i >= len(self._buf):
            self._buf, self._i = self._gen.random(1024).tolist(), 0
        i = int(self._buf[self._i] * n)
        self._i += 1
        return i if i < n else n - 1


def pick(rng: RandomStream, seq) -> Any:
    """One uniformly random element of a list/range (the meaning of ``$x = range(...)``)."""
    seq = _seq(seq)
    if len(seq) == 0:
        raise TemplateValueError("cannot pick from an empty list")
    return labeled(seq[rng.index(len(seq))])


def _positions(rng: RandomStream, n: int, k: int) -> list[int]:
    """k distinct positions of n, in random order (partial Fisher-Yates, sparse)."""
    swaps: dict[int, int] = {}
    out = []
    for i in range(k):
        j = i + rng.index(n - i)
        vi, vj = swaps.get(i, i), swaps.get(j, j)
        swaps[j] = vi
        out.append(vj)
    return out


def sample(rng, seq, k=None):
    """``sample(xs)``: one random element; ``sample(xs, k)``: k distinct positions, random order."""
    if k is None:
        return pick(rng, seq)
    seq, k = _seq(seq), _num(k)
    if not isinstance(k, int) or not 0 <= k <= len(seq):
        raise TemplateValueError(f"cannot sample {k} of {len(seq)} elements")
    return [labeled(seq[i]) for i in _positions(rng, len(seq), k)]


def sample_sequential(rng, seq, k):
    """k consecutive elements from a random start, wrapping around.

    Why wrap: the templates' originals include (Saturday, Sunday) and (Sunday, Monday, Tuesday)
    from the same week list, so consecutive days must cross the end of the list.
    """
    seq, k = _seq(seq), _num(k)
    if not isinstance(k, int) or not 0 < k <= len(seq):
        raise TemplateValueError(f"cannot take {k} consecutive of {len(seq)} elements")
    start = rng.index(len(seq))
    return [labeled(seq[(start + i) % len(seq)]) for i in range(k)]


def shuffle_list(rng, seq):
    """A shuffled copy."""
    seq = list(_seq(seq))
    return [seq[i] for i in _positions(rng, len(seq), len(seq))]


def randint(rng, low, high=None, size=None):
    """numpy.random.randint: ints in [low, high) (or [0, low)); a list when size is given."""
    low, high = _num(low), None if high is None else _num(high)
    if high is None:
        low, high = 0, low
    if not (isinstance(low, int) and isinstance(high, int)) or high <= low:
        raise TemplateValueError(f"bad randint bounds {low}, {high}")
    if size is None:
        return low + rng.index(high - low)
    size = _num(size)
    if not isinstance(size, int) or not 0 <= size <= MAX_SEQ:
        raise TemplateValueError(f"bad randint size {size}")
    return [low + rng.index(high - low) for _ in range(size)]


def range_(*args):
    """Python range over ints, at most MAX_SEQ long."""
    args = [_num(a) for a in args]
    if not 1 <= len(args) <= 3 or not all(isinstance(a, int) for a in args):
        raise TemplateValueError("range takes 1 to 3 integers")
    r = range(*args)
    if len(r) > MAX_SEQ:
        raise TemplateValueError(f"range of {len(r)} elements is too long")
    return r


def arange(start, stop=None, step=1):
    """numpy.arange for floats (stop excluded), as a list of noise-free floats."""
    start, stop, step = _num(start), None if stop is None else _num(stop), _num(step)
    if stop is None:
        start, stop = 0, start
    if step == 0:
        raise TemplateValueError("arange step is zero")
    count = max(0, math.ceil((stop - start) / step))
    if count > MAX_SEQ:
        raise TemplateValueError(f"arange of {count} elements is too long")
    return [snap(float(start + i * step)) for i in range(count)]


def frange(start, stop, step):
    """A float range, stop excluded (same as arange)."""
    return arange(start, stop, step)


def fix_floats(x):
    """Round float noise (np.arange's 56.040000000001 -> 56.04); lists element-wise."""
    x = unwrap(x)
    if isinstance(x, (list, tuple, range)):
        return [fix_floats(v) for v in _seq(x)]
    return snap(x) if isinstance(x, float) else x


def list_(x=()):
    return list(_seq(x))


def is_int(x) -> bool:
    """Is the number integral? Exact for int/Fraction, noise-tolerant for floats."""
    x = unwrap(x)
    if isinstance(x, bool) or not isinstance(x, (int, float, _Fraction)):
        return False
    if isinstance(x, float):
        return math.isfinite(x) and abs(x - round(x)) < 1e-9 * max(1.0, abs(x))
    return x == int(x)


def int_(x) -> int:
    """Truncate toward zero like int(), but read 28.999999999999996 as 29 (float noise)."""
    x = _num(x)
    if isinstance(x, float) and is_int(x):
        return int(round(x))
    return int(x)


def fraction(a, b=None) -> _Fraction:
    """fractions.Fraction; a float enters through its shortest decimal form (0.1 -> 1/10)."""
    def conv(v):
        v = _num(v)
        if not isinstance(v, float):
            return _Fraction(v)
        exact = _Fraction(v)  # 0.1 is 3602879701896397/2**55 in binary: find the intended 1/10
        g = exact.limit_denominator(10**6)
        if abs(g - exact) <= abs(exact) * _Fraction(1, 10**12):
            return g
        return _Fraction(repr(snap(v)))

    return conv(a) if b is None else conv(a) / conv(b)


def round_(x, ndigits=None):
    """Round half away from zero (what the templates' "5 or higher rounds up" text means)."""
    x = _num(x)
    if isinstance(x, _Fraction):
        d = Decimal(x.numerator) / Decimal(x.denominator)
    else:
        d = Decimal(repr(snap(x)) if isinstance(x, float) else x)
    if ndigits is None:
        return int(d.quantize(Decimal(1), rounding=ROUND_HALF_UP))
    ndigits = _num(ndigits)
    if not isinstance(ndigits, int) or not 0 <= ndigits <= 12:
        raise TemplateValueError(f"bad ndigits {ndigits}")
    return float(d.quantize(Decimal(1).scaleb(-ndigits), rounding=ROUND_HALF_UP))


def divides(a, b) -> bool:
    """True when b divides a (a is a whole multiple of b).

    Why this direction: with the originals, divides(x * 12, k * y) is divides(120, 12) and
    divides(total, n1) is divides(90, 6); the reverse reading fails on them.
    """
    a, b = _num(a), _num(b)
    if b == 0:
        return False
    q = a / b
    return is_int(snap(q) if isinstance(q, float) else q)


def format_frac(x) -> str:
    """A fraction as a mixed number, like the solutions write it: 7/2 -> "3 1/2"."""
    f = fraction(x)
    if f.denominator == 1:
        return str(f.numerator)
    sign, f = ("-" if f < 0 else ""), abs(f)
    whole, rest = divmod(f, 1)
    return f"{sign}{whole} {rest}" if whole else f"{sign}{rest}"


def numbers_within(a, b):
    """The numbers a..b (both included) as words, e.g. Labeled("four", 4)."""
    a, b = _num(a), _num(b)
    if not (isinstance(a, int) and isinstance(b, int)) or not 0 <= a <= b < 1000:
        raise TemplateValueError(f"bad numbers_within({a}, {b})")
    return [Labeled(number_to_words(i), i) for i in range(a, b + 1)]


# Functions: name -> (callable, needs_rng). Dotted numpy names are the only attribute
# access templates may use, and only as these exact names.
FUNCTIONS: dict[str, tuple[Any, bool]] = {
    "sample": (sample, True),
    "sample_sequential": (sample_sequential, True),
    "shuffle_list": (shuffle_list, True),
    "randint": (randint, True),
    "np.random.randint": (randint, True),
    "range": (range_, False),
    "arange": (arange, False),
    "np.arange": (arange, False),
    "frange": (frange, False),
    "fix_floats": (fix_floats, False),
    "list": (list_, False),
    "is_int": (is_int, False),
    "int": (int_, False),
    "Fraction": (fraction, False),
    "round": (round_, False),
    "divides": (divides, False),
    "format_frac": (format_frac, False),
    "numbers_within": (numbers_within, False),
}


# ---------------------------------------------------------------- word lists

def _labeled(pairs: str) -> list[Labeled]:
    """"half=1/2; a third=1/3" -> [Labeled("half", Fraction(1, 2)), ...]."""
    out = []
    for item in pairs.split(";"):
        label, value = item.split("=")
        v = _Fraction(value.strip())
        out.append(Labeled(label.strip(), int(v) if v.denominator == 1 else v))
    return out


NAMES_MALE = [
    "Adam", "Allan", "Artie", "Ben", "Benny", "Bill", "Billie", "Brandon", "Brendan", "Brett",
    "Carlos", "Charlie", "Chester", "Cole", "Craig", "Daniel", "David", "Dax", "Deandre",
    "Ethan", "Frankie", "Garrett", "George", "Harry", "Hassan", "Jack", "Jaime", "James",
    "Jasper", "Jerry", "John", "Josh", "Kenji", "Lamar", "Liam", "Lucas", "Mateo", "Mike",
    "Nate", "Omar", "Peter", "Pierson", "Raphael", "Ravi", "Ray", "Roger", "Sam", "Sunny",
    "Teddy", "Watson",
]
NAMES_FEMALE = [
    "Abby", "Aisha", "Alison", "Amara", "Angela", "Aries", "Candy", "Carmen", "Carol",
    "Chloe", "Dana", "Dorothy", "Doxa", "Elena", "Elise", "Emily", "Emma", "Fatima", "Grace",
    "Hannah", "Isabel", "Jackie", "Jennifer", "Jewel", "Julia", "Julie", "Katy", "Leila",
    "Lucia", "Maria", "Martha", "Mary", "Mei", "Mia", "Mina", "Morgan", "Nikita", "Nora",
    "Olivia", "Pat", "Priya", "Rosa", "Sally", "Shiela", "Sophie", "Stacy", "Toula", "Yara",
    "Zoe", "Ingrid",
]

# Multipliers: "multi_times" reads "<k> times", "multiple_ice" the -ice words, "multiple"
# the -ple words; each template's own text decides which fits ("{mult} as many",
# "{mult} the number").
MULTI_TIMES = _labeled("twice=2; three times=3; four times=4; five times=5")
MULTIPLE_ICE = _labeled("twice=2; thrice=3")
MULTIPLE = _labeled("double=2; triple=3; quadruple=4")

# Fractions in the three spellings the templates' originals use.
FRACTION_ALNUM = _labeled(
    "half=1/2; one-third=1/3; two-thirds=2/3; one-quarter=1/4; three quarters=3/4; "
    "one-fifth=1/5; two-fifths=2/5; three-fifths=3/5; four-fifths=4/5; one-sixth=1/6; "
    "one-eighth=1/8; one-tenth=1/10; "
    + "; ".join(f"{f}={f}" for f in "1/2 1/3 2/3 1/4 3/4 1/5 2/5 3/5 4/5 1/6 1/8 1/10 1/16".split())
)
FRACTION_ALPH = _labeled(
    "half=1/2; a third=1/3; two thirds=2/3; a quarter=1/4; three quarters=3/4; a fifth=1/5; "
    "a sixth=1/6; an eighth=1/8; a tenth=1/10"
)
FRACTIONS = _labeled(
    "half=1/2; one third=1/3; two thirds=2/3; one quarter=1/4; three quarters=3/4; "
    "one fifth=1/5; two fifths=2/5; three fifths=3/5; one tenth=1/10"
)
# Why this order: fraction_nums[:4] (a "1/2 off" discount) should stay unit fractions.
FRACTION_NUMS = [_Fraction(s) for s in "1/2 1/3 1/4 1/5 2/3 3/4 1/6 1/8 1/10 2/5 3/5 4/5".split()]
FRACTION_DECIMALS = [0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9]

VOCAB: dict[str, list] = {
    "names_male": NAMES_MALE,
    "names_female": NAMES_FEMALE,
    "names": sorted(set(NAMES_MALE) | set(NAMES_FEMALE)),
    "currencies_sym": ["$", "€", "£", "¥", "₹", "₣"],
    "weekdays": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    # Singular nouns that take a plain "s" plural: the templates write "{fruit}s".
    "fruits": ["apple", "apricot", "banana", "coconut", "fig", "grape", "guava", "kiwi",
               "lemon", "lime", "mango", "melon", "orange", "papaya", "pear", "pineapple",
               "plum"],
    "colors": ["black", "blue", "brown", "gray", "green", "orange", "pink", "purple", "red",
               "white", "yellow"],
    "cities": ["Berlin", "Cairo", "Chicago", "Houston", "Lagos", "London", "Los Angeles",
               "Madrid", "Mumbai", "New York", "Paris", "Rome", "Seoul", "Sydney", "Tokyo",
               "Toronto"],
    "sports": ["badminton", "baseball", "basketball", "cricket", "golf", "hockey", "rugby",
               "soccer", "tennis", "volleyball"],
    # Singular units: templates write "{unit}s".
    "weights_sm": ["ounce", "gram"],
    "weights_med": ["pound", "kilogram"],
    "length_lg": ["mile", "kilometer"],
    "multi_times": MULTI_TIMES,
    "multiple_ice": MULTIPLE_ICE,
    "multiple": MULTIPLE,
    "fraction_alnum": FRACTION_ALNUM,
    "fraction_alph": FRACTION_ALPH,
    "fractions": FRACTIONS,
    "fraction_nums": FRACTION_NUMS,
    "fraction_decimals": FRACTION_DECIMALS,
}


def word_value(text: str) -> Any:
    """The number a default's words mean ("twice" -> 2, "forty-two" -> 42), or None."""
    t = text.strip().lower()
    for lst in (MULTI_TIMES, MULTIPLE_ICE, MULTIPLE, FRACTION_ALNUM, FRACTION_ALPH, FRACTIONS):
        for item in lst:
            if isinstance(item, Labeled) and item.label.lower() == t:
                return item.value
    for n in range(1000):
        if number_to_words(n) == t:
            return n
    return None
