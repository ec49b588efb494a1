"""Mutation check: do the tests go red when the code they cover changes? (issue 20: "make it a habit")

    python bench/mutate.py athena/models/trm/losses.py --tests tests/models/test_model_losses.py
    python bench/mutate.py athena/models/trm/model.py --functions decide_halt reset_slots --tests tests/models/test_model_trm.py
    python bench/mutate.py athena/training/optimizers.py --tests tests/training/test_optimizers.py --list

Makes one small change at a time to the module's source: a comparison flipped (< to <=, == to !=, ...), an
arithmetic operator swapped (+ -, * /, ** *), a number moved by one, True/False or and/or flipped, a `not` or unary
minus dropped, a call statement or a self-update (`x = x | ...`, `x += ...`) replaced by `pass`. For each it runs the
given tests (`pytest -x`, one thread, no bytecode written) and then writes the original source back, always (also
on Ctrl-C). A mutant the tests pass on SURVIVED: a behaviour no test checks, or a change that is equivalent (alters
nothing observable). Docstrings, `raise` and `assert` statements and f-strings are left alone.

Prints every mutant's fate and a summary; exits 0. Runs take a few seconds each: restrict with --functions or
--lines, resume with --start.
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SWAP_COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
SWAP_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
              ast.FloorDiv: ast.Div, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
SKIP = (ast.Raise, ast.Assert, ast.JoinedStr)


@dataclass
class Mutant:
    line: int
    start: tuple[int, int]  # (line, column) of the replaced span, 1-based line, byte column
    end: tuple[int, int]
    replacement: str
    description: str


def _replaced(node: ast.AST, **changes) -> ast.AST:
    new = copy.deepcopy(node)
    for key, value in changes.items():
        setattr(new, key, value)
    return new


def _span(node: ast.AST) -> tuple[tuple[int, int], tuple[int, int]]:
    return (node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset)


def _is_docstring(node: ast.AST, parent: ast.AST | None) -> bool:
    body = getattr(parent, "body", None)
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            and bool(body) and body[0] is node)


def find_mutants(source: str, functions: set[str] | None) -> list[Mutant]:
    """Every single-point change this tool makes to `source`, in source order."""
    tree = ast.parse(source)
    mutants: list[Mutant] = []

    def expression(node: ast.AST, new: ast.AST, description: str) -> None:
        start, end = _span(node)
        mutants.append(Mutant(node.lineno, start, end, ast.unparse(new), description))

    def visit(node: ast.AST, parent: ast.AST | None, inside: bool) -> None:
        if isinstance(node, SKIP) or _is_docstring(node, parent):
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside = inside or functions is None or node.name in functions
            args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs + [node.args.vararg, node.args.kwarg]
            annotations = [a.annotation for a in args if a is not None and a.annotation is not None]
            for skipped in [*node.decorator_list, *annotations, node.returns]:  # not behaviour
                if skipped is not None:
                    setattr(skipped, "_skip", True)
        if isinstance(node, ast.AnnAssign):
            setattr(node.annotation, "_skip", True)
        if inside and not getattr(node, "_skip", False):
            mutate(node)
        for child in ast.iter_child_nodes(node):
            if not getattr(child, "_skip", False):
                visit(child, node, inside)

    def mutate(node: ast.AST) -> None:
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in SWAP_COMPARE:
                    ops = list(node.ops)
                    ops[i] = SWAP_COMPARE[type(op)]()
                    new = _replaced(node, ops=ops)
                    expression(node, new, f"{ast.unparse(node)}  ->  {ast.unparse(new)}")
        elif isinstance(node, ast.BinOp) and type(node.op) in SWAP_BINOP:
            if not (isinstance(node.left, ast.Constant) and isinstance(node.left.value, str)):  # "a" + b: not maths
                new = _replaced(node, op=SWAP_BINOP[type(node.op)]())
                expression(node, new, f"{ast.unparse(node)}  ->  {ast.unparse(new)}")
        elif isinstance(node, ast.BoolOp):
            new = _replaced(node, op=ast.Or() if isinstance(node.op, ast.And) else ast.And())
            expression(node, new, f"{ast.unparse(node)}  ->  {ast.unparse(new)}")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            expression(node, node.operand, f"{ast.unparse(node)}  ->  {ast.unparse(node.operand)}")
        elif isinstance(node, ast.Constant) and not isinstance(node.value, str):
            if isinstance(node.value, bool):
                new_value = not node.value
            elif isinstance(node.value, (int, float)):
                new_value = node.value + 1
            else:
                return
            expression(node, ast.Constant(new_value), f"{node.value!r}  ->  {new_value!r}")
        elif isinstance(node, ast.AugAssign):
            start, end = _span(node)
            mutants.append(Mutant(node.lineno, start, end, "pass", f"drop `{ast.unparse(node)}`"))
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node.value)):  # x = f(x): an update
                start, end = _span(node)
                mutants.append(Mutant(node.lineno, start, end, "pass", f"drop `{ast.unparse(node)}`"))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            start, end = _span(node)
            mutants.append(Mutant(node.lineno, start, end, "pass", f"drop `{ast.unparse(node)}`"))

    visit(tree, None, functions is None)
    return mutants


def apply(source: str, mutant: Mutant) -> str:
    lines = source.encode().splitlines(keepends=True)
    (l0, c0), (l1, c1) = mutant.start, mutant.end
    head = b"".join(lines[: l0 - 1]) + lines[l0 - 1][:c0]
    tail = lines[l1 - 1][c1:] + b"".join(lines[l1:])
    return (head + mutant.replacement.encode() + tail).decode()


def run_tests(tests: list[str], timeout: float) -> tuple[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed (timeout)", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if proc.returncode == 0:
        return "SURVIVED", seconds
    if proc.returncode == 1:
        return "killed", seconds
    return f"killed (pytest exit {proc.returncode})", seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module", type=Path, help="the source file to mutate, relative to the repository")
    parser.add_argument("--tests", nargs="+", required=True, help="pytest arguments: test files, -k expressions")
    parser.add_argument("--functions", nargs="*", default=None, help="mutate only inside these functions/methods")
    parser.add_argument("--lines", default=None,
                        help="only mutants on these lines, e.g. 21-29,64 (re-check survivors after adding tests)")
    parser.add_argument("--start", type=int, default=1, help="begin at mutant N (resume a run cut short)")
    parser.add_argument("--list", action="store_true", help="print the mutants and stop")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop starting new mutants after this")
    args = parser.parse_args()

    path = (ROOT / args.module).resolve()
    original = path.read_text()
    mutants = find_mutants(original, set(args.functions) if args.functions is not None else None)
    mutants = [m for m in mutants if _compiles(apply(original, m))]
    if args.lines:
        wanted = _line_set(args.lines)
        mutants = [m for m in mutants if m.line in wanted]
    if args.list:
        for i, m in enumerate(mutants, 1):
            print(f"[{i}] {args.module}:{m.line}: {m.description}")
        print(f"{len(mutants)} mutants")
        return

    def restore(*_):
        path.write_text(original)
        sys.exit(130)

    signal.signal(signal.SIGINT, restore)
    signal.signal(signal.SIGTERM, restore)
    baseline, seconds = run_tests(args.tests, timeout=1800)
    if baseline != "SURVIVED":
        sys.exit(f"error: the tests fail on the unmutated code ({baseline}); fix that first")
    timeout = 3 * seconds + 30
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else float("inf")
    results: list[tuple[Mutant, str]] = []
    try:
        for i, mutant in enumerate(mutants, 1):
            if i < args.start:
                continue
            if time.monotonic() > deadline:
                print(f"[mutate] --max-minutes reached: {len(mutants) - i + 1} mutants not run", flush=True)
                break
            path.write_text(apply(original, mutant))
            try:
                fate, took = run_tests(args.tests, timeout)
            finally:
                path.write_text(original)
            results.append((mutant, fate))
            print(f"[{i}/{len(mutants)}] {fate:<10} {args.module}:{mutant.line}: {mutant.description}  ({took:.0f} s)",
                  flush=True)
    finally:
        path.write_text(original)
    survivors = [(m, f) for m, f in results if f == "SURVIVED"]
    print(f"\n[mutate] {args.module}: {len(results)} run, {len(results) - len(survivors)} killed, "
          f"{len(survivors)} survived")
    for m, _ in survivors:
        print(f"  survived  {args.module}:{m.line}: {m.description}")


def _line_set(spec: str) -> set[int]:
    lines: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        lines.update(range(int(first), int(last or first) + 1))
    return lines


def _compiles(source: str) -> bool:
    try:
        compile(source, "<mutant>", "exec")
        return True
    except SyntaxError:
        return False


if __name__ == "__main__":
    main()
