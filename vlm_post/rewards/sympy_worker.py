"""The sympy side of ``math_equal``, run as a separate process by ``sympy_pool``.

Run as a script (``python sympy_worker.py``), not imported by the trainer: it
imports nothing from vlm_post, so it starts in a fraction of a second and the
training process never imports sympy at all. Protocol, one JSON object per line:
``{"id", "a", "b", "rel_tol"}`` in (``a``, ``b``: trees from ``expression.parse``),
``{"id", "equal": true|false, "error"?: str}`` out. The parent kills this
process when an answer takes too long, which is the only timeout that works in
any thread of any process (``signal.alarm`` only works in a main thread, and
not inside long C-level integer arithmetic).
"""

from __future__ import annotations

import cmath
import json
import os
import random
import sys
import threading
import time

MEMORY_LIMIT_BYTES = 4 << 30
SAMPLE_POINTS = 5  # random substitutions that must agree before two expressions count as equal
sympy = None  # imported in main(), after the memory limit is set


def build(node):
    """A sympy expression from a tree (see ``expression.py`` for the node forms)."""
    kind = node[0]
    if kind == "n":
        return sympy.Rational(node[1])
    if kind == "s":
        return sympy.Symbol(node[1])
    if kind == "pi":
        return sympy.pi
    if kind == "inf":
        return sympy.oo
    if kind == "neg":
        return -build(node[1])
    if kind == "+":
        return build(node[1]) + build(node[2])
    if kind == "*":
        return build(node[1]) * build(node[2])
    if kind == "/":
        return build(node[1]) / build(node[2])
    if kind == "^":
        return build(node[1]) ** build(node[2])
    if kind == "root":
        return sympy.root(build(node[1]), build(node[2]))
    if kind == "!":
        return sympy.factorial(build(node[1]))
    if kind == "log":
        return sympy.log(build(node[1]), build(node[2]) if node[2] is not None else 10)
    if kind == "f":
        names = {"ln": "log", "arcsin": "asin", "arccos": "acos", "arctan": "atan"}
        return getattr(sympy, names.get(node[1], node[1]))(build(node[2]))
    raise ValueError(f"cannot build {kind!r}")


EXACT_REL_TOL = 1e-25  # for inputs without decimals, where exact arithmetic is not possible (sin, sqrt, pi)


def _value(expr, subs=None) -> complex | None:
    try:
        value = complex(expr.evalf(50, subs=subs))
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    return value if cmath.isfinite(value) else None  # nan / inf: no evidence


def _agree(a, b, rel_tol: float, subs=None) -> bool | None:
    """Whether a and b agree at a point; None when either has no finite value there.

    Exact inputs (no decimals: ``rel_tol`` is ``EXACT_REL_TOL``) at rational points are compared
    exactly when the difference is rational, so "(x+1)^{200} + 1" never matches "(x+1)^{200}".
    Otherwise the difference is evaluated as one expression, so sympy keeps the precision of
    cancelling terms, and compared relative to the values.
    """
    if rel_tol <= EXACT_REL_TOL:
        exact = (a - b).subs(subs) if subs else a - b
        if exact.is_Rational:
            return exact == 0
    va, vb, difference = _value(a, subs), _value(b, subs), _value(a - b, subs)
    if va is None or vb is None or difference is None:
        return None
    return abs(difference) <= max(rel_tol * max(abs(va), abs(vb)), 1e-30)


def expressions_equal(a, b, rel_tol: float) -> bool:
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    if not symbols:
        agree = _agree(a, b, rel_tol)
        return agree if agree is not None else sympy.simplify(a - b) == 0
    # Random substitution first: different expressions almost surely differ at a random point,
    # and it costs a few evalf calls instead of a simplify.
    rng = random.Random(0)
    agreed = 0
    for _ in range(SAMPLE_POINTS * 2):
        subs = {s: sympy.Rational(rng.randint(50, 250), 100) for s in symbols}
        agree = _agree(a, b, rel_tol, subs)
        if agree is None:
            continue
        if not agree:
            return False
        agreed += 1
        if agreed >= SAMPLE_POINTS:
            return True
    return sympy.simplify(a - b) == 0


def _has_decimal(tree) -> bool:
    if isinstance(tree, list):
        if tree and tree[0] == "n":
            return not tree[1].isdigit()
        return any(_has_decimal(child) for child in tree)
    return False


def trees_equal(a, b, rel_tol: float) -> bool:
    if a[0] == "tuple" or b[0] == "tuple":
        return a[0] == b[0] and len(a[1]) == len(b[1]) and all(trees_equal(x, y, rel_tol) for x, y in zip(a[1], b[1]))
    if a[0] == "=" and b[0] == "=":  # equations: the same up to a constant factor (2x = 4 is x = 2)
        left, right = build(a[1]) - build(a[2]), build(b[1]) - build(b[2])
        if right == 0:
            return left == 0
        ratio = sympy.simplify(left / right)
        return ratio.is_number and ratio != 0
    if a[0] == "=":  # "y = 2x + 1" against "2x + 1"
        a = a[2]
    if b[0] == "=":
        b = b[2]
    return expressions_equal(build(a), build(b), rel_tol)


def _exit_with_parent() -> None:
    """A worker whose parent died (killed, crashed) must not live on: poll the parent id."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    global sympy
    _exit_with_parent()
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ImportError, ValueError, OSError):
        pass  # no hard memory limit where the OS does not allow one; the parent's timeout still holds
    import sympy as _sympy

    sympy = _sympy
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        request: dict = {}
        try:
            request = json.loads(line)
            if "sleep" in request:  # test hook: a comparison that hangs, to exercise the parent's timeout
                time.sleep(float(request["sleep"]))
            a, b = request["a"], request["b"]
            # The numeric tolerance is for answers written with decimals; exact inputs compare exactly.
            rel_tol = request["rel_tol"] if _has_decimal(a) or _has_decimal(b) else EXACT_REL_TOL
            reply = {"id": request["id"], "equal": bool(trees_equal(a, b, rel_tol))}
        except (Exception, RecursionError, MemoryError) as error:  # noqa: BLE001 - any failure is "not equal"
            reply = {"id": request.get("id"), "equal": False, "error": f"{type(error).__name__}: {error}"[:200]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
