"""Countdown solver: exhaustive search over all operator trees with exact (Fraction) arithmetic.

One DP table per sub-multiset of the numbers; used to generate solvable instances with a canonical
reference solution, and by ``solve``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from fractions import Fraction
from typing import Union

Value = Union[int, Fraction]  # exact value; kept an int whenever integral (fast dict keys)
Node = Union[int, tuple]  # a leaf number, or (op, left, right)


# --- Solver: exhaustive search over all operator trees, one DP table per sub-multiset ---
# Cost of an expression, additive over nodes, so keeping the cheapest expression per value in each
# subset is exact. Lexicographic preference: fewest negative/fractional/zero intermediates, then
# fewest divisions, then fewest subtractions; ties go to the first found (deterministic order).
_BAD, _DIV, _SUB = 10_000, 100, 1
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _norm(v: Value) -> Value:
    return v.numerator if type(v) is Fraction and v.denominator == 1 else v


def _div(a: Value, b: Value) -> Value:
    if type(a) is int and type(b) is int:
        return a // b if a % b == 0 else Fraction(a, b)
    return _norm(Fraction(a) / b)


def _combine(left: dict, right: dict, out: dict) -> None:
    """Every (a op b) for a in left, b in right into ``out``, keeping the cheapest tree per value."""

    def put(v: Value, cost: int, node: tuple) -> None:
        if type(v) is Fraction:  # int op Fraction gives a Fraction even when integral
            if v.denominator == 1:
                v = v.numerator
            else:
                cost += _BAD
        elif v <= 0:
            cost += _BAD
        old = out.get(v)
        if old is None or cost < old[0]:
            out[v] = (cost, node)

    for a, (ca, na) in left.items():
        for b, (cb, nb) in right.items():
            c = ca + cb
            put(a + b, c, ("+", na, nb))
            put(a * b, c, ("*", na, nb))
            put(a - b, c + _SUB, ("-", na, nb))
            put(b - a, c + _SUB, ("-", nb, na))
            if b != 0:
                put(_div(a, b), c + _DIV, ("/", na, nb))
            if a != 0:
                put(_div(b, a), c + _DIV, ("/", nb, na))


def _combine_into_range(left: dict, right: dict, out: dict, lo: int, hi: int) -> None:
    """Like ``_combine`` but only keeps integer results in [lo, hi] (the last step of generation, its
    hot loop): integer arithmetic throughout, and results that cannot be integers are skipped."""

    def keep(v: int, cost: int, node: tuple) -> None:
        if lo <= v <= hi:
            old = out.get(v)
            if old is None or cost < old[0]:
                out[v] = (cost, node)

    for a, (ca, na) in left.items():
        a_int = type(a) is int
        for b, (cb, nb) in right.items():
            c = ca + cb
            if a_int and type(b) is int:
                keep(a + b, c, ("+", na, nb))
                keep(a * b, c, ("*", na, nb))
                keep(a - b, c + _SUB, ("-", na, nb))
                keep(b - a, c + _SUB, ("-", nb, na))
                if b != 0 and a % b == 0:
                    keep(a // b, c + _DIV, ("/", na, nb))
                if a != 0 and b % a == 0:
                    keep(b // a, c + _DIV, ("/", nb, na))
            elif a_int or type(b) is int:
                # x int, p/q non-integer: x +- p/q and (p/q)/x are never integers; x*(p/q) is iff q | x,
                # and x/(p/q) = x*q/p is iff p | x*q. Same candidates and order as _combine.
                x, f = (a, b) if a_int else (b, a)
                p, q = f.numerator, f.denominator
                if x % q == 0:
                    keep(x // q * p, c, ("*", na, nb))
                if (x * q) % p == 0:  # p != 0: f is not an integer
                    xn, fn = (na, nb) if a_int else (nb, na)
                    keep(x * q // p, c + _DIV, ("/", xn, fn))
            else:
                for v, cost, node in (
                    (a + b, c, ("+", na, nb)),
                    (a * b, c, ("*", na, nb)),
                    (a - b, c + _SUB, ("-", na, nb)),
                    (b - a, c + _SUB, ("-", nb, na)),
                    (a / b, c + _DIV, ("/", na, nb)),
                    (b / a, c + _DIV, ("/", nb, na)),
                ):
                    if v.denominator == 1:
                        keep(v.numerator, cost, node)


def _splits(numbers: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Each unordered split of a sorted multiset into two non-empty sorted parts, once, in a fixed order."""
    n, seen, out = len(numbers), set(), []
    for mask in range(1, 1 << (n - 1)):  # the last element always goes right: each split once
        left = tuple(x for i, x in enumerate(numbers) if mask >> i & 1)
        right = tuple(x for i, x in enumerate(numbers) if not mask >> i & 1)
        if (left, right) not in seen and (right, left) not in seen:
            seen.add((left, right))
            out.append((left, right))
    return out


@functools.lru_cache(maxsize=1 << 15)
def _solution_table(numbers: tuple[int, ...]) -> dict[Value, tuple[int, Node]]:
    """All values reachable from a sorted multiset using every number exactly once -> (cost, cheapest
    tree). Sub-multisets are cached, so instances sharing e.g. a triple share its table."""
    if len(numbers) == 1:
        return {numbers[0]: (0, numbers[0])}
    out: dict = {}
    for left, right in _splits(numbers):
        _combine(_solution_table(left), _solution_table(right), out)
    return out


@functools.lru_cache(maxsize=1 << 14)
def range_table(numbers: tuple[int, ...], lo: int, hi: int) -> dict[int, tuple[int, Node]]:
    """The integer entries of ``_solution_table(numbers)`` within [lo, hi], computed without building
    the full top-level table (same costs and tie order, hence the same canonical solutions)."""
    if len(numbers) == 1:
        return {numbers[0]: (0, numbers[0])} if lo <= numbers[0] <= hi else {}
    out: dict = {}
    for left, right in _splits(numbers):
        _combine_into_range(_solution_table(left), _solution_table(right), out, lo, hi)
    return out


def render(node: Node) -> tuple[str, int]:
    """Expression string with the minimum parentheses, and its precedence (3 = atom)."""
    if isinstance(node, int):
        return str(node), 3
    op, lhs, rhs = node
    (ls, lp), (rs, rp), p = render(lhs), render(rhs), _PREC[op]
    if lp < p:
        ls = f"({ls})"
    if rp < p or (rp == p and op in "-/"):  # a-(b-c), a/(b*c) need them; a+(b-c), a*(b/c) do not
        rs = f"({rs})"
    return f"{ls}{op}{rs}", p


def solve(numbers: Sequence[int], target: Value) -> str | None:
    """A canonical equation using each number exactly once that equals ``target``, or None."""
    entry = _solution_table(tuple(sorted(numbers))).get(_norm(Fraction(target)))
    return None if entry is None else render(entry[1])[0]
