"""The miniature world's task family: arithmetic expressions with a checkable integer answer.

A problem is an expression over the digits 1-9 with 2 to 5 operations (+, -, *)
and the usual precedence, e.g. ``9-4+7*2`` or ``(8+5-3)*2-8``. Its difficulty is
its number of operations. Every intermediate value stays in 0..20, so each
single step is a small fact. Three shapes: chains read left to right (60%),
flat expressions where products come first (30%), any tree (10%).

Why so small: the world's models are trained from scratch in minutes on a CPU.
With values up to 99, neither model learnt to copy operands in that budget; with
values up to 9, a 0.13M-parameter student learnt everything (97%) and no gap was
left. Up to 20 leaves the student middling and the teacher ahead.

One computation, two ways to write it (the capacity gap of the world):

- STUDENT style: one operation per line, in evaluation order::

      9-4=5
      7*2=14
      5+14=19

- TEACHER style: up to two operations folded into one line, with the values of
  the lines before substituted in::

      9-4=5
      5+7*2=19

A completion is ``<think>\\n{steps}\\n</think>\\n\\n\\boxed{19}`` after the user
turn ``"{question}\\n{INSTRUCTION}"`` (the instruction `tracetailor eval` appends).

Problems come from a seed; splits never share a problem (dedupe on the question
text). Not its job: tokens, models, files (tokenizer.py, pretrain.py, build.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

OPS = ("+", "-", "*")
PRECEDENCE = {"+": 1, "-": 1, "*": 2}
MIN_OPS, MAX_OPS = 2, 5
MAX_VALUE = 20  # every intermediate value stays in 0..MAX_VALUE
TEACHER_OPS_PER_LINE = 2
CHAIN_SHARE = 0.6  # share of problems evaluated left to right (left-deep trees)
PAREN_SHARE = 0.1  # share of problems drawn as any tree shape (with parentheses where needed)
# The instruction `tracetailor eval` appends to a question (evaluate/benchmarks.py MATH_INSTRUCTION);
# the world's models are trained on this exact user turn. A test keeps the two equal.
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
THINK_PREFILL = "<think>\n"


# ---------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Node:
    """A leaf (op None, value) or an operation over two subtrees."""

    value: int
    op: str | None = None
    left: "Node | None" = None
    right: "Node | None" = None

    @property
    def ops(self) -> int:
        return 0 if self.op is None else 1 + self.left.ops + self.right.ops


def apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def render(node: Node, values: dict[int, int] | None = None) -> str:
    """The expression as text, with only the parentheses its left-to-right, precedence
    parse needs. `values` maps id(subtree) -> value for subtrees already computed."""
    if values and id(node) in values:
        return str(values[id(node)])
    if node.op is None:
        return str(node.value)
    left, right = render(node.left, values), render(node.right, values)
    p = PRECEDENCE[node.op]
    if _is_pending_op(node.left, values) and PRECEDENCE[node.left.op] < p:
        left = f"({left})"
    # right operands bind tighter: a-(b+c), a*(b*c) would otherwise parse differently
    if _is_pending_op(node.right, values) and PRECEDENCE[node.right.op] <= p:
        right = f"({right})"
    return f"{left}{node.op}{right}"


def _is_pending_op(node: Node, values: dict[int, int] | None) -> bool:
    return node.op is not None and not (values and id(node) in values)


def random_tree(rng: random.Random, n_ops: int) -> Node | None:
    """A random expression tree with `n_ops` operations, or None if a value would leave 0..MAX_VALUE.

    Three shapes: a chain read left to right ("7-3+4*2" read as ((7-3)+4)*2, printed
    "(7-3+4)*2"), a flat expression where products come first ("5+3*2-4"), or, a share
    PAREN_SHARE of the time, any tree (parentheses wherever it needs them)."""
    r = rng.random()
    if r < CHAIN_SHARE:
        return _chain_tree(rng, n_ops)
    if r < CHAIN_SHARE + PAREN_SHARE:
        return _any_tree(rng, n_ops)
    return _flat_tree(rng, n_ops)


def _operand_choices(value: int) -> list[tuple[str, int, int]]:
    """(op, least, most) right operands that keep `value op b` in 0..MAX_VALUE; products by 1 left out."""
    choices = []
    if value < MAX_VALUE:
        choices.append(("+", 1, min(9, MAX_VALUE - value)))
    if value >= 1:
        choices.append(("-", 1, min(9, value)))
    if 1 <= value <= MAX_VALUE // 2:
        choices.append(("*", 2, min(9, MAX_VALUE // value)))
    return choices


def _chain_tree(rng: random.Random, n_ops: int) -> Node:
    tree = Node(rng.randint(1, 9))
    for _ in range(n_ops):
        op, least, most = rng.choice(_operand_choices(tree.value))
        right = Node(rng.randint(least, most))
        tree = Node(apply(op, tree.value, right.value), op, tree, right)
    return tree


def _flat_tree(rng: random.Random, n_ops: int) -> Node | None:
    """Terms that are products of one or more factors, joined by + and - (which ones: whichever keep
    the running value in range). At least one product, so precedence matters."""
    n_products = rng.randint(1, n_ops)
    n_terms = n_ops - n_products + 1
    factors = [1] * n_terms  # extra factors per term
    for _ in range(n_products):
        factors[rng.randrange(n_terms)] += 1
    terms = []
    for k in factors:
        term = Node(rng.randint(1, 9))
        for _ in range(k - 1):
            if not 1 <= term.value <= MAX_VALUE // 2:
                return None
            right = Node(rng.randint(2, min(9, MAX_VALUE // term.value)))
            term = Node(term.value * right.value, "*", term, right)
        terms.append(term)
    tree = terms[0]
    for term in terms[1:]:
        ops = [op for op in ("+", "-") if 0 <= apply(op, tree.value, term.value) <= MAX_VALUE]
        if not ops:
            return None
        op = rng.choice(ops)
        tree = Node(apply(op, tree.value, term.value), op, tree, term)
    return tree


def _any_tree(rng: random.Random, n_ops: int) -> Node | None:
    if n_ops == 0:
        return Node(rng.randint(1, 9))
    k = rng.randint(0, n_ops - 1)
    left, right = _any_tree(rng, k), _any_tree(rng, n_ops - 1 - k)
    if left is None or right is None:
        return None
    return _combine(rng.choice(OPS), left, right)


def _combine(op: str, left: Node, right: Node) -> Node | None:
    value = apply(op, left.value, right.value)
    return Node(value, op, left, right) if 0 <= value <= MAX_VALUE else None


def steps(node: Node) -> list[Node]:
    """The operations in evaluation order (post-order: left subtree, right subtree, node)."""
    if node.op is None:
        return []
    return steps(node.left) + steps(node.right) + [node]


def student_lines(tree: Node) -> list[str]:
    """One operation per line: ``a op b = c``."""
    return [f"{s.left.value}{s.op}{s.right.value}={s.value}" for s in steps(tree)]


def teacher_lines(tree: Node, per_line: int = TEACHER_OPS_PER_LINE) -> list[str]:
    """Up to `per_line` operations folded into each line, earlier lines' values substituted.

    Walking the tree bottom-up, a subtree waits to be written until adding its parent
    would put more than `per_line` pending operations on one line; the root's line closes."""
    values: dict[int, int] = {}
    lines: list[str] = []

    def emit(node: Node) -> None:
        lines.append(f"{render(node, values)}={node.value}")
        values[id(node)] = node.value

    def pending(node: Node) -> int:
        if node.op is None or id(node) in values:
            return 0
        return 1 + pending(node.left) + pending(node.right)

    def walk(node: Node) -> None:
        if node.op is None:
            return
        walk(node.left)
        walk(node.right)
        for child in (node.left, node.right):
            if pending(node) > per_line and pending(child) > 0:
                emit(child)

    walk(tree)
    emit(tree)
    return lines


# ---------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: int
    difficulty: int  # number of operations
    expression: str
    student_solution: str
    teacher_solution: str

    @property
    def prompt(self) -> str:
        """The user turn, exactly as `tracetailor eval` asks a question."""
        return user_turn(self.question)

    def to_row(self) -> dict:
        return {"id": self.id, "question": self.question, "answer": str(self.answer), "difficulty": self.difficulty,
                "prompt": self.prompt, "expression": self.expression,
                "student_solution": self.student_solution, "teacher_solution": self.teacher_solution}


def user_turn(question: str) -> str:
    return f"{question}\n{INSTRUCTION}"


def question_text(expression: str) -> str:
    return f"What is {expression}?"


def completion(lines: list[str], answer: int) -> str:
    """The assistant's whole answer: think block, then the boxed result."""
    body = "\n".join(lines)
    return f"{THINK_PREFILL}{body}\n</think>\n\n\\boxed{{{answer}}}"


def make_problem(tree: Node, problem_id: str) -> Problem:
    expression = render(tree)
    return Problem(
        id=problem_id, question=question_text(expression), answer=tree.value, difficulty=tree.ops,
        expression=expression,
        student_solution=completion(student_lines(tree), tree.value),
        teacher_solution=completion(teacher_lines(tree), tree.value),
    )


def problem_stream(seed: int, stream: str) -> Iterator[Node]:
    """An endless stream of trees; difficulty cycles 2, 3, 4, 5 so every split is balanced.
    `stream` names an independent stream (the splits vs. the models' pretraining data)."""
    rng = random.Random(f"tracetailor-world/{seed}/{stream}")
    i = 0
    while True:
        n_ops = MIN_OPS + i % (MAX_OPS - MIN_OPS + 1)
        tree = None
        while tree is None:
            tree = random_tree(rng, n_ops)
        i += 1
        yield tree


def make_splits(seed: int, sizes: dict[str, int]) -> dict[str, list[Problem]]:
    """Problems for each split in `sizes` (order kept), none shared: a question seen once is skipped."""
    seen: set[str] = set()
    trees = problem_stream(seed, "splits")
    splits: dict[str, list[Problem]] = {}
    for name, size in sizes.items():
        rows: list[Problem] = []
        while len(rows) < size:
            tree = next(trees)
            expression = render(tree)
            if expression in seen:
                continue
            seen.add(expression)
            rows.append(make_problem(tree, f"{name}-{len(rows):05d}"))
        splits[name] = rows
    return splits


def pretraining_trees(seed: int, exclude: set[str], stream: str = "pretrain") -> Iterator[Node]:
    """Fresh problems for pretraining the world's models, never one of the splits' questions.
    `stream` names another independent draw (a grown teacher's further training)."""
    for tree in problem_stream(seed, stream):
        if render(tree) not in exclude:
            yield tree


# ---------------------------------------------------------------- checking


def evaluate_expression(text: str) -> int:
    """The value of an expression over integers, +, -, * and parentheses."""
    return parse_tree(text).value


def parse_tree(text: str) -> Node:
    """The tree of an expression, read with the usual precedence, left to right (a small
    recursive-descent parser, independent of how problems are drawn: tests check with it)."""
    tokens = _lex(text)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError(f"unexpected end of {text!r}")
        pos += 1
        return tokens[pos - 1]

    def atom() -> Node:
        tok = take()
        if tok == "(":
            node = expr()
            if take() != ")":
                raise ValueError(f"unbalanced parentheses in {text!r}")
            return node
        if not tok.isdigit():
            raise ValueError(f"unexpected {tok!r} in {text!r}")
        return Node(int(tok))

    def term() -> Node:
        node = atom()
        while peek() == "*":
            take()
            right = atom()
            node = Node(node.value * right.value, "*", node, right)
        return node

    def expr() -> Node:
        node = term()
        while peek() in ("+", "-"):
            op = take()
            right = term()
            node = Node(apply(op, node.value, right.value), op, node, right)
        return node

    node = expr()
    if pos != len(tokens):
        raise ValueError(f"trailing {tokens[pos]!r} in {text!r}")
    return node


def _lex(text: str) -> list[str]:
    tokens, number = [], ""
    for ch in text:
        if ch.isdigit():
            number += ch
            continue
        if number:
            tokens.append(number)
            number = ""
        if ch in "+-*()":
            tokens.append(ch)
        elif not ch.isspace():
            raise ValueError(f"unexpected character {ch!r} in {text!r}")
    if number:
        tokens.append(number)
    return tokens


def parse_completion(text: str) -> tuple[list[str], str | None]:
    """(step lines inside the think block, boxed answer) of a completion in the world's format."""
    body = text[len(THINK_PREFILL):] if text.startswith(THINK_PREFILL) else text
    thinking, _, after = body.partition("</think>")
    lines = [line for line in thinking.split("\n") if line.strip()]
    start, end = after.rfind("\\boxed{"), after.rfind("}")
    boxed = after[start + len("\\boxed{"):end] if start >= 0 and end > start else None
    return lines, boxed


def check_line(line: str) -> bool:
    """Whether a step line ``expression=value`` is arithmetically true."""
    left, sep, right = line.partition("=")
    try:
        return bool(sep) and right.strip().isdigit() and evaluate_expression(left) == int(right)
    except (ValueError, IndexError):
        return False
