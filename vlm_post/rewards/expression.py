"""A small parser for answer expressions (LaTeX or plain), a float evaluator, and the pre-screen.

Why not sympy's parsers: ``parse_latex`` needs the antlr runtime, and
``parse_expr`` runs ``eval`` on its input, which here is model output. This
parser only knows numbers, one-letter variables, ``+ - * / ^ !``, ``\\frac``,
``\\sqrt``, ``\\pi``, a few functions, ``=`` and top-level commas, and returns a
tree of plain lists (JSON-able, so it can be sent to the sympy worker process).

Node forms: ``["n", "3.5"]`` number, ``["s", "x"]`` symbol, ``["pi"]``, ``["inf"]``,
``["+", a, b]``, ``["*", a, b]``, ``["/", a, b]``, ``["^", a, b]``, ``["neg", a]``,
``["f", name, a]`` function, ``["root", a, n]``, ``["log", a, base]``, ``["!", a]``,
``["=", a, b]``, ``["tuple", [a, b, ...]]``.

Most answers are constants (``5\\sqrt{3}``, ``\\frac{2\\sqrt{2}}{5}``, ``16\\pi/5``):
``evaluate`` gives their float value in microseconds, so sympy is only needed
for expressions with variables. ``screen`` rejects inputs too large to compare
safely before anything expensive runs.
"""

from __future__ import annotations

import math
import re

MAX_CHARS = 300  # longer "answers" are compared as strings only
MAX_TOKENS = 200
MAX_DEPTH = 24  # nesting of brackets; also bounds the parser's recursion
MAX_EXPONENT = 1000  # |integer exponent| and factorial argument allowed into sympy
MAX_TOWER = 3  # nested powers a^(b^(c^d)) allowed into sympy
MAX_MAGNITUDE = 1e300  # a float beyond this is "too big": compared by string only


class NotMath(ValueError):
    """The text is not an expression this parser reads (a word, a ratio, an inequality, bad syntax)."""


class TooComplex(ValueError):
    """Too long, too deep or too large to compare safely: graded by string equality only."""


_TOKEN = re.compile(
    r"\s*(?:(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)|(?P<cmd>\\[a-zA-Z]+)|(?P<word>[a-zA-Z]+)"
    r"|(?P<op>[-+*/^()\[\]{}_!,=]))"
)
FUNCTIONS = {
    "sin",
    "cos",
    "tan",
    "cot",
    "sec",
    "csc",
    "arcsin",
    "arccos",
    "arctan",
    "sinh",
    "cosh",
    "tanh",
    "exp",
    "ln",
}
_PLAIN_WORDS = FUNCTIONS | {"sqrt", "pi", "log", "inf", "infty"}  # words read as commands when written without "\"
_GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota", "kappa",
    "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi", "omega",
}  # fmt: skip
_WRAPPERS = {"mathbf", "boldsymbol", "mathit", "overline", "bar", "vec", "hat", "mathrm", "text"}
_MULTIPLY = {"*", "\\cdot", "\\times"}
_DIVIDE = {"/", "\\div"}


def nesting_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")]}":
            depth -= 1
    return deepest


def tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position, text = 0, text.strip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            raise NotMath(f"unexpected {text[position : position + 10]!r}")
        position = match.end()
        kind = match.lastgroup
        value = match.group(kind)
        if kind == "word":
            lower = value.lower()
            if lower in _PLAIN_WORDS:
                tokens.append(("cmd", "\\" + lower))
            elif len(value) <= 2:  # "xy" is x*y; a longer word is text, not math
                tokens.extend(("sym", char.lower()) for char in value)
            else:
                raise NotMath(f"word {value!r}")
        else:
            tokens.append((kind, value))
        if len(tokens) > MAX_TOKENS:
            raise TooComplex("too many tokens")
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens, self.index = tokens, 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None or (value is not None and token[1] != value):
            raise NotMath(f"expected {value or 'more'}")
        self.index += 1
        return token

    def accept(self, value: str) -> bool:
        token = self.peek()
        if token is not None and token[1] == value:
            self.index += 1
            return True
        return False

    # statement := expr ("," expr)* ["=" ...]
    def statement(self) -> list:
        items = [self.relation()]
        while self.accept(","):
            items.append(self.relation())
        if self.peek() is not None:
            raise NotMath(f"unexpected {self.peek()[1]!r}")
        return items[0] if len(items) == 1 else ["tuple", items]

    def relation(self) -> list:
        left = self.expr()
        if self.accept("="):
            return ["=", left, self.expr()]
        return left

    def expr(self) -> list:
        node = self.term()
        while True:
            if self.accept("+"):
                node = ["+", node, self.term()]
            elif self.accept("-"):
                node = ["+", node, ["neg", self.term()]]
            else:
                return node

    def term(self) -> list:
        node = self.unary()
        while True:
            token = self.peek()
            if token is None:
                return node
            if token[1] in _MULTIPLY:
                self.index += 1
                node = ["*", node, self.unary()]
            elif token[1] in _DIVIDE:
                self.index += 1
                node = ["/", node, self.unary()]
            elif self._starts_atom(token):  # implicit product: 2\sqrt{3}, 3x, 2(x+1)
                node = ["*", node, self.power()]
            else:
                return node

    def unary(self) -> list:
        if self.accept("-"):
            return ["neg", self.unary()]
        if self.accept("+"):
            return self.unary()
        return self.power()

    def power(self) -> list:
        base = self.postfix()
        if self.accept("^"):
            exponent = ["neg", self.power()] if self.accept("-") else self.power()  # right-associative
            return ["^", base, exponent]
        return base

    def postfix(self) -> list:
        node = self.atom()
        while self.accept("!"):
            node = ["!", node]
        return node

    @staticmethod
    def _starts_atom(token: tuple[str, str]) -> bool:
        kind, value = token
        if kind in ("num", "sym"):
            return True
        if kind == "cmd":
            return value not in _MULTIPLY and value not in _DIVIDE
        return value in ("(", "{")

    def group(self, close: str) -> list:
        node = self.relation()
        self.take(close)
        return node

    def argument(self) -> list:
        """A command's argument: ``{...}`` or a single token (``\\frac32`` is 3/2: one digit each)."""
        token = self.peek()
        if token is None:
            raise NotMath("missing argument")
        if token[1] == "{":
            self.index += 1
            return self.group("}")
        if token[0] == "num" and len(token[1]) > 1:
            self.tokens[self.index] = ("num", token[1][1:])  # leave the other digits for what follows
            return ["n", token[1][0]]
        return self.atom()

    def atom(self) -> list:
        kind, value = self.take()
        if kind == "num":
            return ["n", value]
        if kind == "sym":
            return self.subscript(value)
        if value in ("(", "{", "["):
            return self.group({"(": ")", "{": "}", "[": "]"}[value])
        if kind == "cmd":
            return self.command(value[1:])
        raise NotMath(f"unexpected {value!r}")

    def subscript(self, name: str) -> list:
        if self.accept("_"):
            token = self.take()
            if token[1] == "{":
                parts = []
                while not self.accept("}"):
                    parts.append(self.take()[1])
                name += "_" + "".join(parts)
            else:
                name += "_" + token[1]
        return ["s", name]

    def command(self, name: str) -> list:
        if name in ("frac", "dfrac", "tfrac", "cfrac"):
            return ["/", self.argument(), self.argument()]
        if name == "sqrt":
            degree = self.group("]") if self.accept("[") else None
            radicand = self.argument()
            return ["root", radicand, degree] if degree is not None else ["root", radicand, ["n", "2"]]
        if name == "pi":
            return ["pi"]
        if name in ("infty", "inf"):
            return ["inf"]
        if name == "log":
            base = self.argument() if self.accept("_") else None
            return ["log", self.function_argument(), base]
        if name in FUNCTIONS:
            exponent = self.argument() if self.accept("^") else None  # \sin^2 x
            node = ["f", name, self.function_argument()]
            return ["^", node, exponent] if exponent is not None else node
        if name in _GREEK:
            return self.subscript(name)
        if name in _WRAPPERS:
            return self.argument()
        raise NotMath(f"command \\{name}")

    def function_argument(self) -> list:
        token = self.peek()
        if token is not None and token[1] in ("(", "{"):
            return self.atom()
        return self.power()


def parse(text: str) -> list:
    """The expression tree of ``text``; raises NotMath or TooComplex."""
    if len(text) > MAX_CHARS:
        raise TooComplex("too long")
    if nesting_depth(text) > MAX_DEPTH:
        raise TooComplex("nested too deeply")
    tokens = tokenize(text)
    if not tokens:
        raise NotMath("empty")
    return _Parser(tokens).statement()


# --- evaluation -------------------------------------------------------------------------------------


class NeedsSympy(ValueError):
    """Not a real constant this evaluator handles (a variable, a complex value): sympy decides."""


class TooBig(ValueError):
    """A value beyond ``MAX_MAGNITUDE`` (9^{9^{9^9}}, 10000!): not compared numerically."""


_FLOAT_FUNCTIONS = {
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "arcsin": math.asin, "arccos": math.acos,
    "arctan": math.atan, "sinh": math.sinh, "cosh": math.cosh, "tanh": math.tanh, "exp": math.exp, "ln": math.log,
    "cot": lambda x: 1 / math.tan(x), "sec": lambda x: 1 / math.cos(x), "csc": lambda x: 1 / math.sin(x),
}  # fmt: skip


def _checked(value: float) -> float:
    if math.isnan(value):
        raise NeedsSympy("nan")
    if abs(value) > MAX_MAGNITUDE and not math.isinf(value):
        raise TooBig("too big")
    return value


def evaluate(node: list) -> float:
    """The float value of a constant tree. Raises NeedsSympy (variables, complex, domain errors) or TooBig."""
    kind = node[0]
    if kind == "n":
        value = float(node[1])
        if math.isinf(value):  # a written number past float range ("1e400"), not infinity itself
            raise TooBig("beyond floats")
        return _checked(value)
    if kind == "pi":
        return math.pi
    if kind == "inf":
        return math.inf
    if kind == "s" or kind in ("=", "tuple"):
        raise NeedsSympy(kind)
    if kind == "neg":
        return -evaluate(node[1])
    if kind in ("+", "*", "/"):
        a, b = evaluate(node[1]), evaluate(node[2])
        try:
            return _checked(a + b if kind == "+" else a * b if kind == "*" else a / b)
        except ZeroDivisionError:
            raise NeedsSympy("division by zero") from None
    if kind == "^":
        return _power(evaluate(node[1]), evaluate(node[2]))
    if kind == "root":
        degree = evaluate(node[2])
        radicand = evaluate(node[1])
        if radicand < 0 or degree == 0:
            raise NeedsSympy("complex root")
        return _power(radicand, 1.0 / degree)
    if kind == "!":
        value = evaluate(node[1])
        if value < 0 or value != int(value):
            raise NeedsSympy("factorial of a non-integer")
        if value > 170:
            raise TooBig("factorial")
        return float(math.factorial(int(value)))
    if kind in ("f", "log"):
        try:
            if kind == "log":
                base = 10.0 if node[2] is None else evaluate(node[2])  # \log without a base: base 10
                return _checked(math.log(evaluate(node[1]), base))
            return _checked(_FLOAT_FUNCTIONS[node[1]](evaluate(node[2])))
        except (ValueError, ZeroDivisionError, OverflowError):
            raise NeedsSympy("domain") from None
    raise NeedsSympy(kind)


def _power(base: float, exponent: float) -> float:
    if base == 0 or math.isinf(base) or math.isinf(exponent):
        try:
            return base**exponent
        except ZeroDivisionError:
            raise NeedsSympy("0 to a negative power") from None
    if base < 0 and exponent != int(exponent):
        raise NeedsSympy("complex power")
    if exponent * math.log10(abs(base)) > 300:  # decided in log space: never build the huge number
        raise TooBig("power")
    return _checked(float(base) ** exponent)


# --- pre-screen for sympy ---------------------------------------------------------------------------


def screen(node: list) -> None:
    """Raise TooComplex for trees that could make sympy run long: huge exponents, towers, big factorials."""
    _screen(node, tower=0)


def _screen(node: list, tower: int) -> None:
    kind = node[0]
    if kind == "^":
        if tower + 1 > MAX_TOWER:
            raise TooComplex("power tower")
        _check_magnitude(node[2])
        _screen(node[1], 0)
        _screen(node[2], tower + 1)
        return
    if kind == "!":
        _check_magnitude(node[1])
    children = node[1] if kind == "tuple" else [c for c in node[1:] if isinstance(c, list)]
    for child in children:
        _screen(child, 0)


def _check_magnitude(node: list) -> None:
    try:
        value = evaluate(node)
    except NeedsSympy:
        return  # symbolic exponent: sympy keeps it symbolic
    except TooBig:
        raise TooComplex("huge exponent") from None
    if abs(value) > MAX_EXPONENT:
        raise TooComplex("huge exponent")
