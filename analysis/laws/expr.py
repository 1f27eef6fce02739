"""A safe, differentiable formula language for scaling laws: `"E + A/N**alpha + B/D**beta"`.

Parsed with Python's `ast` and evaluated by walking the tree over numpy arrays: only numbers, the declared names
(inputs and parameters), `+ - * / **`, unary minus and the functions in FUNCTIONS are accepted, so a formula cannot
run arbitrary code (no attribute access, subscripts, lambdas or calls of anything else). Earlier lines may name
intermediate quantities (`U_N = minimum(N, G*U_D)` then a final expression using U_N), separated by newlines or `;`.

`evaluate(..., grad=True)` also returns the derivatives with respect to the parameters by forward-mode automatic
differentiation (each node carries its value and its gradient, Griewank & Walther 2008, "Evaluating Derivatives",
ch. 3): exact gradients for L-BFGS without finite differences. Written by hand because no small, well-kept library
does both safe parsing and derivatives over numpy (sympy's parse_expr calls eval; numexpr has no derivatives).
"""

from __future__ import annotations

import ast
import dataclasses
import math

import numpy as np

FUNCTIONS = ("exp", "log", "sqrt", "abs", "tanh", "minimum", "maximum")
CONSTANTS = {"pi": math.pi}
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}


@dataclasses.dataclass(frozen=True)
class Formula:
    """A parsed formula: `steps` are (name, expression AST) assignments, the last one named "" is the result."""

    text: str
    steps: tuple
    names: frozenset  # the free names it reads (inputs and parameters)


def parse(text: str, allowed: set[str] | frozenset[str]) -> Formula:
    """Parse `text`, accepting only the names in `allowed` (and those it defines itself, and `pi`)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("law expression is empty; write one such as 'E + A/N**alpha + B/D**beta'")
    try:
        tree = ast.parse("\n".join(line.strip() for line in text.replace(";", "\n").splitlines()), mode="exec")
    except SyntaxError as exc:
        raise ValueError(f"law expression {text!r} is not a formula ({exc.msg} at column {exc.offset}); use numbers, "
                         f"names, + - * / ** and the functions {', '.join(FUNCTIONS)}") from None
    defined: set[str] = set()
    used: set[str] = set()
    steps = []
    for i, stmt in enumerate(tree.body):
        last = i == len(tree.body) - 1
        if isinstance(stmt, ast.Expr) and last:
            steps.append(("", _check(stmt.value, text, allowed | defined, used)))
        elif (isinstance(stmt, ast.Assign) and not last and len(stmt.targets) == 1
              and isinstance(stmt.targets[0], ast.Name)):
            name = stmt.targets[0].id
            if name in allowed or name in FUNCTIONS:
                raise ValueError(f"law expression {text!r}: {name!r} is an input, a parameter or a function and "
                                 "cannot be redefined; name the intermediate quantity differently")
            steps.append((name, _check(stmt.value, text, allowed | defined, used)))
            defined.add(name)
        else:
            raise ValueError(f"law expression {text!r}: line {i + 1} is not allowed; write 'name = formula' lines "
                             "followed by one final formula (the loss)")
    return Formula(text=text, steps=tuple(steps), names=frozenset(used))


def _check(node: ast.AST, text: str, allowed, used: set) -> ast.AST:
    callees = {id(sub.func) for sub in ast.walk(node) if isinstance(sub, ast.Call)}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            if sub.id in FUNCTIONS and id(sub) not in callees:
                raise ValueError(f"law expression {text!r}: {sub.id!r} is a function; call it, e.g. {sub.id}(N)")
            if sub.id not in allowed and sub.id not in CONSTANTS and sub.id not in FUNCTIONS:
                raise ValueError(f"law expression {text!r}: unknown name {sub.id!r}; the names are "
                                 f"{sorted(allowed)} (declare parameters with --param NAME=LO:HI:INIT...)")
            if sub.id in allowed:
                used.add(sub.id)
        elif isinstance(sub, ast.Call):
            if not (isinstance(sub.func, ast.Name) and sub.func.id in FUNCTIONS) or sub.keywords:
                what = sub.func.id if isinstance(sub.func, ast.Name) else ast.unparse(sub.func)
                raise ValueError(f"law expression {text!r}: call of {what!r} is not allowed; the functions are "
                                 f"{', '.join(FUNCTIONS)}")
        elif isinstance(sub, ast.BinOp):
            if type(sub.op) not in _BINOPS:
                raise ValueError(f"law expression {text!r}: operator {type(sub.op).__name__} is not allowed; use "
                                 "+ - * / **")
        elif isinstance(sub, ast.Constant):
            if isinstance(sub.value, bool) or not isinstance(sub.value, (int, float)):
                raise ValueError(f"law expression {text!r}: {sub.value!r} is not a number")
        elif isinstance(sub, ast.UnaryOp):
            if not isinstance(sub.op, (ast.USub, ast.UAdd)):
                raise ValueError(f"law expression {text!r}: operator {type(sub.op).__name__} is not allowed")
        elif not isinstance(sub, (ast.Load, ast.expr_context, ast.operator, ast.unaryop)):
            raise ValueError(f"law expression {text!r}: {ast.unparse(sub) if isinstance(sub, ast.expr) else type(sub).__name__!r} "
                             "is not allowed in a formula")
    return node


# A node's value: (v, g) with v the value (array) and g its gradient, shape (P, *v.shape), or None (no dependence on
# the parameters).
def evaluate(formula: Formula, env: dict, params: tuple[str, ...] = (), *, grad: bool = False):
    """The formula's value over `env` (name -> number or array, broadcasting). With grad: (value, d value / d p for
    each p in `params`, stacked on axis 0)."""
    scope: dict = {}
    n_p = len(params)
    for name, value in env.items():
        arr = np.asarray(value, float)
        if grad and name in params:
            g = np.zeros((n_p,) + arr.shape)
            g[params.index(name)] = 1.0
            scope[name] = (arr, g)
        else:
            scope[name] = (arr, None)
    for name, node in formula.steps:
        out = _eval(node, scope, grad)
        if name:
            scope[name] = out
    v, g = out
    if not grad:
        return v
    shape = np.broadcast_shapes(np.shape(v), () if g is None else g.shape[1:])
    g = np.zeros((n_p,) + shape) if g is None else np.broadcast_to(_lift(g, len(shape)), (n_p,) + shape)
    return np.broadcast_to(v, shape), g


def _eval(node, scope, grad):
    if isinstance(node, ast.Constant):
        return np.asarray(float(node.value)), None
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS and node.id not in scope:
            return np.asarray(CONSTANTS[node.id]), None
        return scope[node.id]
    if isinstance(node, ast.UnaryOp):
        v, g = _eval(node.operand, scope, grad)
        return (-v, None if g is None else -g) if isinstance(node.op, ast.USub) else (v, g)
    if isinstance(node, ast.BinOp):
        return _binop(_BINOPS[type(node.op)], _eval(node.left, scope, grad), _eval(node.right, scope, grad))
    # a Call of FUNCTIONS (checked at parse time)
    args = [_eval(a, scope, grad) for a in node.args]
    return _call(node.func.id, args)


def _lift(g, ndim: int):
    """A gradient (P, *s) with 1s inserted after axis 0 so that s has `ndim` axes: it then broadcasts against values
    of that many axes the way the value itself does (numpy aligns trailing axes, never the leading P)."""
    return g.reshape(g.shape[:1] + (1,) * (ndim - (g.ndim - 1)) + g.shape[1:]) if g.ndim - 1 < ndim else g


def _add(g1, g2, s=1.0):
    if g1 is None:
        return None if g2 is None else s * g2
    if g2 is None:
        return g1
    n = max(g1.ndim, g2.ndim) - 1
    return _lift(g1, n) + s * _lift(g2, n)


def _scale(g, factor):
    if g is None:
        return None
    factor = np.asarray(factor)
    return _lift(g, factor.ndim) * factor


def _binop(op, a, b):
    (u, gu), (w, gw) = a, b
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if op == "+":
            return u + w, _add(gu, gw)
        if op == "-":
            return u - w, _add(gu, gw, -1.0)
        if op == "*":
            return u * w, _add(_scale(gu, w), _scale(gw, u))
        if op == "/":
            return u / w, _add(_scale(gu, 1 / w), _scale(gw, -u / w ** 2))
        v = u ** w  # op == "**": d(u^w) = w u^(w-1) du + u^w log(u) dw
        g = _scale(gu, w * u ** (w - 1))
        if gw is not None:
            g = _add(g, _scale(gw, v * np.log(np.where(u > 0, u, np.nan))))
        return v, g


def _call(fn, args):
    if fn in ("minimum", "maximum"):
        if len(args) != 2:
            raise ValueError(f"{fn}() takes 2 arguments, got {len(args)}")
        (u, gu), (w, gw) = args
        pick = (u <= w) if fn == "minimum" else (u >= w)  # the derivative of the branch taken
        v = np.where(pick, u, w)
        if gu is None and gw is None:
            return v, None
        gu = _scale(gu, np.ones_like(v)) if gu is not None else _scale(gw, np.zeros_like(v))
        gw = _scale(gw, np.ones_like(v)) if gw is not None else _scale(gu, np.zeros_like(v))
        return v, np.where(pick, gu, gw)
    if len(args) != 1:
        raise ValueError(f"{fn}() takes 1 argument, got {len(args)}")
    (u, gu), = args
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if fn == "exp":
            v = np.exp(u)
            return v, _scale(gu, v)
        if fn == "log":
            return np.log(u), _scale(gu, 1 / u)
        if fn == "sqrt":
            v = np.sqrt(u)
            return v, _scale(gu, 0.5 / v)
        if fn == "abs":
            return np.abs(u), _scale(gu, np.sign(u))
        v = np.tanh(u)  # tanh
        return v, _scale(gu, 1 - v ** 2)
