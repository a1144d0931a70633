"""Verifiable reasoning problems for the tiny Qwen3: a question, a worked solution, an answer, a checker.

Each task is small enough for a few-million-parameter model to learn, and hard enough that thinking
helps: the worked solution (what goes inside ``<think>``) breaks the problem into steps a small
transformer can do one at a time — one column of digits, one letter, one comparison — while the answer
alone asks for all of them at once. Every solution starts by restating the problem in one canonical
form (``347 + 589``), so the steps after it never depend on how the user phrased the question.

Questions come in many phrasings. Each task has templates for training, a disjoint set held out for
evaluation (``phrasing="heldout"``), so the evaluation measures whether the model copes with phrasings
it never saw word for word, and a broader set (``phrasing="broad"``: the training templates, more of
them, more openings and closings) for the third training stage, which teaches the model to look past
the wording, and a wider one still (``phrasing="wide"``: everyday word problems, more synonyms) for the
fourth, and the richest (``phrasing="rich"``: hundreds of templates per form composed from stems and
endings, :mod:`qwen3.train.composed`) for the sixth. Generators are pure functions of a
:class:`random.Random`, so a seed fixes a data set.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from qwen3.train import composed, languages

TASKS = ("add", "sub", "mul", "expr", "count", "compare", "sort")


@dataclass(frozen=True)
class Problem:
    """One problem: what the user asks, how to think it through, what to answer, and the result."""

    task: str
    question: str  # the user's message
    thinking: str  # the worked solution, without <think> tags
    answer: str  # the final answer as the model should state it
    result: str  # the canonical result the checker compares (a number, or "1, 2, 5" for sort)
    expression: str | None = None  # for arithmetic: what a calculator tool would be given
    phrasing: str = "train"  # which templates the question came from: one of PHRASINGS
    language: str = "en"  # the question's and the answer's language: "en" or one of languages.LANGUAGES
    form: str = ""  # the template family (languages.FORMS), so the question can be asked in another language
    values: tuple[tuple[str, str], ...] = ()  # what the templates were filled with

    def check(self, content: str) -> bool:
        """Whether a model's answer (the content after thinking) states this problem's result."""
        return check_answer(self.task, self.result, content)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def check_answer(task: str, result: str, content: str) -> bool:
    """Exact match of the result in an answer: the last number for arithmetic and counting, the first
    number for comparisons (the answer names the winner first), the whole list for sorting."""
    if task == DECLINE:
        return languages.declines(content)
    numbers = _NUMBER.findall(content.replace(",", " , "))
    if not numbers:
        return False
    if task == "sort":
        return numbers == _NUMBER.findall(result)
    if task == "compare":
        return numbers[0] == result
    return numbers[-1] == result


# --- phrasing ---------------------------------------------------------------------------------------

_PREFIXES = ("", "", "", "", "Please ", "Quick question: ", "Hey, ", "Can you help? ", "I need this: ")
_BROAD_PREFIXES = ("Hi! ", "Hello, ", "Question: ", "So, ", "OK, ", "Help me out: ", "I wonder: ",
                   "My homework asks: ", "Be careful: ", "Another one. ")  # fmt: skip
_BROAD_SUFFIXES = (
    "",
    "",
    "",
    " Thanks!",
    " Thank you.",
    " Show your steps.",
    " Be quick.",
    " Answer please.",
)
_WIDE_PREFIXES = ("Can you tell me: ", "Please help: ", "Math time! ", "Next: ", "Here is one: ")
PHRASINGS = ("train", "heldout", "broad", "wide", "rich")
_OPENINGS = {  # the prefixes each phrasing draws from
    "train": _PREFIXES,
    "heldout": _PREFIXES,
    "broad": _PREFIXES + _BROAD_PREFIXES,
    "wide": _PREFIXES + _BROAD_PREFIXES + _WIDE_PREFIXES,
    "rich": _PREFIXES + _BROAD_PREFIXES + _WIDE_PREFIXES,
}


def _phrase(rng: random.Random, templates: tuple[str, ...], phrasing: str, **values: object) -> str:
    """A template filled in, with an optional polite prefix and light variation in case and ending;
    ``broad``, ``wide`` and ``rich`` phrasings add more openings and a closing remark."""
    text = rng.choice(templates).format(**values)
    prefix = rng.choice(_OPENINGS.get(phrasing, _PREFIXES))
    if prefix and prefix.endswith(" ") and not prefix.endswith((": ", "? ", "! ", ". ")):
        text = text[0].lower() + text[1:]
    text = prefix + text
    roll = rng.random()
    if roll < 0.1:
        text = text.rstrip("?.!")
    elif roll < 0.15:
        text = text.lower()
    if phrasing in ("broad", "wide", "rich"):
        text += rng.choice(_BROAD_SUFFIXES)
    return text


def _templates(form: str, phrasing: str) -> tuple[str, ...]:
    """The templates ``phrasing`` draws questions of ``form`` from: each wider phrasing adds to the last."""
    train, heldout, broad, wide = TEMPLATES[form]
    if phrasing == "train":
        return train
    if phrasing == "heldout":
        return heldout
    if phrasing == "broad":
        return train + broad
    if phrasing == "wide":
        return train + broad + wide
    if phrasing == "rich":
        return train + broad + wide + composed.templates("en", form)
    raise ValueError(f"phrasing must be one of {PHRASINGS}, not {phrasing!r}")


def _filled(form: str, **values: object) -> dict[str, object]:
    """The ``form`` and ``values`` fields of a :class:`Problem`: what :func:`localize` asks again."""
    return {"form": form, "values": tuple((k, str(v)) for k, v in values.items())}


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def _digits(n: int) -> list[int]:
    """Digits from the right (ones first)."""
    return [int(d) for d in reversed(str(n))]


# --- addition, subtraction, multiplication ----------------------------------------------------------------


def addition_steps(a: int, b: int) -> list[str]:
    """Column addition from the right, carrying, keeping the digits found so far."""
    da, db = _digits(a), _digits(b)
    lines, carry, so_far = [], 0, ""
    for i in range(max(len(da), len(db))):
        x = da[i] if i < len(da) else 0
        y = db[i] if i < len(db) else 0
        s = x + y + carry
        so_far = str(s % 10) + so_far
        lines.append(f"{x} + {y} + {carry} = {s}, digit {s % 10}, carry {s // 10}, so far {so_far}")
        carry = s // 10
    if carry:
        so_far = "1" + so_far
        lines.append(f"carry 1 in front, so far {so_far}")
    return lines


ADD_TRAIN = (
    "What is {a} + {b}?",
    "Compute {a} + {b}.",
    "Calculate {a}+{b}.",
    "What's {a} plus {b}?",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
    "{a} + {b} = ?",
    "How much is {a} plus {b}?",
    "Find {a} + {b}.",
    "Work out {a} + {b}.",
    "What do you get when you add {a} to {b}?",
    "Sum {a} and {b}.",
    "{a} plus {b}?",
    "Evaluate {a} + {b}.",
)
ADD_HELDOUT = (
    "Tell me the total of {a} and {b}.",
    "If I have {a} and get {b} more, how many do I have?",
    "Solve: {a} + {b}",
    "What does {a} + {b} equal?",
)
ADD_BROAD = (
    "Add up {a} and {b}.",
    "{a} added to {b} gives what?",
    "Can you add {a} with {b}?",
    "Give me the sum: {a} + {b}",
    "I want {a} + {b}.",
    "{a} and {b} together make how much?",
    "Total up {a} and {b}.",
    "Increase {a} by {b}.",
    "A shop sold {a} items and then {b} more. How many in all?",
    "Result of {a} + {b}?",
    "{a}+{b}",
    "Figure out {a} + {b}.",
    "Determine {a} plus {b}.",
    "What number is {b} more than {a}?",
)
ADD_WIDE = (
    "What is {a} and {b} added together?",
    "Tom has {a} marbles and finds {b} more. How many marbles does he have now?",
    "A library owns {a} books and buys {b} new ones. How many books does it own?",
    "There were {a} people at a concert and {b} more arrived. How many people are there?",
    "What is {a} increased by {b}?",
    "Combine {a} and {b}. What is the total?",
    "{a} plus {b} equals what?",
    "Please sum up {a} and {b} for me.",
    "Adding {b} to {a} gives?",
    "Tell me what {a} plus {b} is.",
)


def addition(rng: random.Random, phrasing: str = "train") -> Problem:
    a, b = _number(rng, rng.randint(2, 4)), _number(rng, rng.randint(2, 4))
    expr = f"{a} + {b}"
    thinking = "\n".join([f"{expr}", *addition_steps(a, b), f"So {expr} = {a + b}."])
    question = _phrase(rng, _templates("add", phrasing), phrasing, a=a, b=b)
    return Problem(
        "add", question, thinking, f"{expr} = {a + b}.", str(a + b), expr, **_filled("add", a=a, b=b)
    )


def subtraction_steps(a: int, b: int) -> list[str]:
    """Column subtraction of b from a (a >= b) from the right, borrowing."""
    da, db = _digits(a), _digits(b)
    lines, borrow, so_far = [], 0, ""
    for i in range(len(da)):
        x, y = da[i], db[i] if i < len(db) else 0
        d = x - y - borrow
        if d < 0:
            lines.append(f"{x} - {y} - {borrow} = {d}, add 10: {d + 10}, borrow 1, so far {d + 10}{so_far}")
            so_far, borrow = f"{d + 10}{so_far}", 1
        else:
            lines.append(f"{x} - {y} - {borrow} = {d}, borrow 0, so far {d}{so_far}")
            so_far, borrow = f"{d}{so_far}", 0
    if so_far.lstrip("0") != so_far:
        lines.append(f"drop leading zeros: {int(so_far)}")
    return lines


SUB_TRAIN = (
    "What is {a} - {b}?",
    "Compute {a} - {b}.",
    "Calculate {a}-{b}.",
    "What's {a} minus {b}?",
    "Subtract {b} from {a}.",
    "What is the difference {a} - {b}?",
    "{a} - {b} = ?",
    "How much is {a} minus {b}?",
    "Find {a} - {b}.",
    "Work out {a} - {b}.",
    "Take {b} away from {a}.",
    "{a} minus {b}?",
    "Evaluate {a} - {b}.",
)
SUB_HELDOUT = (
    "If I have {a} and lose {b}, how many are left?",
    "Solve: {a} - {b}",
    "What does {a} - {b} equal?",
    "Tell me {a} take away {b}.",
)
SUB_BROAD = (
    "Decrease {a} by {b}.",
    "What is {a} less {b}?",
    "How much is left when {b} is taken from {a}?",
    "Give me the difference: {a} - {b}",
    "Result of {a} - {b}?",
    "{a}-{b}",
    "Figure out {a} - {b}.",
    "Determine {a} minus {b}.",
    "Deduct {b} from {a}.",
    "A tank holds {a} liters and {b} leak out. How many remain?",
    "I want {a} - {b}.",
    "What number is {b} less than {a}?",
)
SUB_WIDE = (
    "{a} minus {b} equals what?",
    "Sara had {a} stickers and gave away {b}. How many stickers does she have now?",
    "A farmer had {a} sheep and sold {b}. How many sheep are left?",
    "A bus carries {a} people and {b} get off. How many people are still on the bus?",
    "What is {a} reduced by {b}?",
    "What is {b} subtracted from {a}?",
    "Subtracting {b} from {a} gives?",
    "What remains when you remove {b} from {a}?",
    "Please take {b} off {a}.",
    "Tell me what {a} minus {b} is.",
)


def subtraction(rng: random.Random, phrasing: str = "train") -> Problem:
    a, b = _number(rng, rng.randint(2, 4)), _number(rng, rng.randint(2, 4))
    expr = f"{a} - {b}"
    big, small = max(a, b), min(a, b)
    lines = [expr]
    if a < b:
        lines.append(f"{b} is larger than {a}, so compute {b} - {a} and make it negative.")
    lines += subtraction_steps(big, small)
    if a < b:
        lines.append(f"{b} - {a} = {b - a}, so the result is {a - b}")
    lines.append(f"So {expr} = {a - b}.")
    question = _phrase(rng, _templates("sub", phrasing), phrasing, a=a, b=b)
    answer, filled = f"{expr} = {a - b}.", _filled("sub", a=a, b=b)
    return Problem("sub", question, "\n".join(lines), answer, str(a - b), expr, **filled)


def multiply_by_digit_steps(a: int, d: int) -> tuple[list[str], int]:
    """a times one digit d, from the right: each digit product plus the carry."""
    da = _digits(a)
    parts, carry, so_far = [], 0, ""
    for i, x in enumerate(da):
        s = x * d + carry
        if i == len(da) - 1:
            so_far = f"{s}{so_far}"
            parts.append(f"{x} * {d} + {carry} = {s}, so far {so_far}")
        else:
            so_far = f"{s % 10}{so_far}"
            parts.append(f"{x} * {d} + {carry} = {s}, digit {s % 10}, carry {s // 10}, so far {so_far}")
            carry = s // 10
    return parts, a * d


MUL_TRAIN = (
    "What is {a} * {b}?",
    "Compute {a} * {b}.",
    "Calculate {a}*{b}.",
    "What's {a} times {b}?",
    "Multiply {a} by {b}.",
    "What is the product of {a} and {b}?",
    "{a} * {b} = ?",
    "How much is {a} times {b}?",
    "Find {a} * {b}.",
    "Work out {a} * {b}.",
    "{a} times {b}?",
    "Evaluate {a} * {b}.",
    "What is {a} x {b}?",
)
MUL_HELDOUT = (
    "If {b} boxes hold {a} each, how many in total?",
    "Solve: {a} * {b}",
    "What does {a} * {b} equal?",
    "Tell me {a} multiplied by {b}.",
)
MUL_BROAD = (
    "Multiply {a} with {b}.",
    "Give me the product: {a} * {b}",
    "Result of {a} * {b}?",
    "{a}*{b}",
    "Figure out {a} * {b}.",
    "Determine {a} times {b}.",
    "What is {b} groups of {a}?",
    "There are {b} rows of {a} seats. How many seats?",
    "I want {a} * {b}.",
    "{a} x {b} = ?",
    "Find the product {a} * {b}.",
)
MUL_WIDE = (
    "{a} multiplied by {b} is what?",
    "What do you get if you multiply {a} by {b}?",
    "Each of {b} bags has {a} apples. How many apples are there?",
    "A class has {b} tables with {a} pencils on each. How many pencils in all?",
    "A train has {b} cars and each car seats {a} people. How many people can it seat?",
    "What is {a} multiplied by {b}?",
    "Multiplying {a} and {b} gives?",
    "Please multiply {a} and {b}.",
    "{a} times {b} equals what?",
    "Tell me what {a} times {b} is.",
)


def multiplication(rng: random.Random, phrasing: str = "train") -> Problem:
    a_digits, b_digits = rng.choice(((2, 1), (3, 1), (2, 2), (2, 2), (3, 2)))
    a, b = _number(rng, a_digits), max(_number(rng, b_digits), 2)
    expr = f"{a} * {b}"
    lines = [expr]
    db = _digits(b)
    if len(db) == 1:
        steps, _ = multiply_by_digit_steps(a, b)
        lines += steps
    else:
        ones, tens = db[0], db[1]
        lines.append(f"{a} * {b} = {a} * {ones} + {a} * {tens}0")
        steps, p1 = multiply_by_digit_steps(a, ones)
        lines += [f"{a} * {ones}:", *steps]
        steps, p2 = multiply_by_digit_steps(a, tens)
        lines += [f"{a} * {tens}:", *steps, f"times 10: {p2 * 10}"]
        lines += [f"{p1} + {p2 * 10}", *addition_steps(p1, p2 * 10)]
    lines.append(f"So {expr} = {a * b}.")
    question = _phrase(rng, _templates("mul", phrasing), phrasing, a=a, b=b)
    answer, filled = f"{expr} = {a * b}.", _filled("mul", a=a, b=b)
    return Problem("mul", question, "\n".join(lines), answer, str(a * b), expr, **filled)


# --- expressions with precedence ------------------------------------------------------------------


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def _random_expression(rng: random.Random) -> tuple[list[int | str], tuple[int, int] | None]:
    """Tokens like [3, '+', 4, '*', 5] and optional parentheses (start, end) around operands start..end."""
    n = rng.choice((3, 3, 4))
    ops = [rng.choice("+-*") for _ in range(n - 1)]
    if "*" not in ops:
        ops[rng.randrange(n - 1)] = "*"
    values = [rng.randint(1, 9) for _ in range(n)]
    for i, op in enumerate(ops):  # additive terms may be larger; factors stay single digits
        if op != "*" and (i == 0 or ops[i - 1] != "*") and rng.random() < 0.5:
            values[i] = rng.randint(10, 30)
    tokens: list[int | str] = [values[0]]
    for op, v in zip(ops, values[1:], strict=True):
        tokens += [op, v]
    parens = None
    if rng.random() < 0.35:
        start = rng.randrange(n - 1)
        parens = (start, start + 1)
    return tokens, parens


def _format(tokens: list[int | str], parens: tuple[int, int] | None) -> str:
    out = []
    for i, t in enumerate(tokens):
        if isinstance(t, str):
            out.append(t)
            continue
        k = i // 2
        text = str(t)
        if parens and k == parens[0]:
            text = "(" + text
        if parens and k == parens[1]:
            text += ")"
        out.append(text)
    return " ".join(out)


def expression_steps(tokens: list[int | str], parens: tuple[int, int] | None) -> tuple[list[str], int] | None:
    """Evaluate with precedence, one operation per line, and the value; None if an intermediate value
    leaves the range a small model can do in its head (negative, or a product over 100)."""
    lines = []
    tokens = list(tokens)
    if parens:
        i = 2 * parens[0]
        x, op, y = tokens[i], tokens[i + 1], tokens[i + 2]
        v = _apply(x, op, y)  # type: ignore[arg-type]
        if v < 0:
            return None
        tokens[i : i + 3] = [v]
        lines.append(f"Parentheses first: {x} {op} {y} = {v}. Now {_format(tokens, None)}.")
    while "*" in tokens:
        i = tokens.index("*") - 1
        x, y = tokens[i], tokens[i + 2]
        v = x * y  # type: ignore[operator]
        if v > 100:
            return None
        tokens[i : i + 3] = [v]
        rest = f" Now {_format(tokens, None)}." if len(tokens) > 1 else ""
        lines.append(f"Multiply first: {x} * {y} = {v}.{rest}")
    while len(tokens) > 1:
        x, op, y = tokens[0], tokens[1], tokens[2]
        v = _apply(x, op, y)  # type: ignore[arg-type]
        if v < 0 or v > 200:
            return None
        tokens[0:3] = [v]
        rest = f" Now {_format(tokens, None)}." if len(tokens) > 1 else ""
        lines.append(f"Left to right: {x} {op} {y} = {v}.{rest}")
    return lines, int(tokens[0])


EXPR_TRAIN = (
    "What is {e}?",
    "Compute {e}.",
    "Evaluate {e}.",
    "Calculate {e}.",
    "What's the value of {e}?",
    "{e} = ?",
    "Work out {e}.",
    "Find the value of {e}.",
    "What does {e} come to?",
    "Simplify {e}.",
)
EXPR_HELDOUT = (
    "Solve: {e}",
    "Tell me what {e} equals.",
    "Mind the order of operations: {e}",
)
EXPR_BROAD = (
    "Give me the result of {e}.",
    "Result of {e}?",
    "Figure out {e}.",
    "Determine {e}.",
    "{e}",
    "Work this out: {e}",
    "Using precedence rules, compute {e}.",
    "What number is {e}?",
    "I want {e}.",
    "Careful with precedence: {e} = ?",
)
EXPR_WIDE = (
    "{e} equals what?",
    "Please evaluate {e} for me.",
    "Respect operator precedence and compute {e}.",
    "Remember that * comes before + and -: {e}",
    "What is the result of {e}?",
    "Calculate the value of {e}.",
    "Work out the value: {e}",
    "Tell me the value of {e}.",
)


def expression(rng: random.Random, phrasing: str = "train") -> Problem:
    while True:
        tokens, parens = _random_expression(rng)
        evaluated = expression_steps(tokens, parens)
        if evaluated is not None:
            break
    steps, value = evaluated
    expr = _format(tokens, parens)
    thinking = "\n".join([expr, *steps, f"So {expr} = {value}."])
    question = _phrase(rng, _templates("expr", phrasing), phrasing, e=expr)
    return Problem(
        "expr", question, thinking, f"{expr} = {value}.", str(value), expr, **_filled("expr", e=expr)
    )


# --- counting letters -----------------------------------------------------------------------------------

_WORD_LIST = """strawberry blueberry raspberry banana apple orange lemon cherry grape mango papaya peach pear
plum melon watermelon coconut pineapple apricot kiwi avocado tomato potato carrot onion garlic pepper
cabbage lettuce spinach broccoli celery cucumber pumpkin mushroom bread butter cheese coffee tea sugar
cookie cake candy chocolate pizza pasta noodle rice soup salad sandwich burger mississippi tennessee
alabama california banana bookkeeper committee balloon letter little bottle kettle puzzle pizzazz
success address assessment possession accommodation necessary embarrass parallel millennium
occurrence recommend tomorrow beginning professor programming keyboard computer monitor mouse
printer window door floor ceiling kitchen bedroom garden garage street bridge tunnel river mountain
valley forest desert island ocean beach harbor lighthouse elephant giraffe hippopotamus kangaroo
koala panda tiger lion zebra monkey gorilla rabbit squirrel hamster parrot penguin dolphin whale
shark octopus butterfly caterpillar grasshopper mosquito spider turtle crocodile alligator
flamingo peacock ostrich eagle falcon sparrow pigeon rooster chicken turkey goose duck sheep goat
horse donkey camel llama buffalo cheetah leopard jaguar panther wolf fox bear raccoon skunk
hedgehog beaver otter seal walrus salmon tuna sardine lobster oyster jellyfish starfish seahorse
umbrella backpack suitcase blanket pillow mattress curtain carpet mirror scissors needle button
pencil notebook eraser ruler calendar envelope stamp newspaper magazine dictionary library museum
theater cinema concert orchestra guitar violin trumpet piano drummer saxophone harmonica accordion
basketball football baseball volleyball tennis hockey swimming running marathon bicycle motorcycle
airplane helicopter submarine rocket spaceship satellite telescope microscope thermometer
barometer hurricane tornado thunder lightning rainbow snowflake blizzard avalanche volcano
earthquake mirror yellow purple green silver golden crimson turquoise lavender magenta scarlet
happiness sadness excitement kindness friendship knowledge freedom wisdom courage patience
breakfast lunch dinner supper dessert appetizer vanilla cinnamon nutmeg ginger peppermint
assassin bookshelf cappuccino espresso spaghetti macaroni lasagna broccoli zucchini eggplant
referee rhythm syzygy queue bubble giggle jigsaw jazz quizzes buzzer fuzzy dizzy puppy kitten
mammal reptile amphibian insect letterbox doorbell toothbrush toothpaste shampoo hairbrush
engineer scientist teacher doctor nurse pilot farmer baker butcher carpenter plumber electrician
lawyer banker actor singer dancer painter sculptor writer poet journalist detective sheriff"""
WORDS = tuple(dict.fromkeys(_WORD_LIST.split()))  # unique, in order

COUNT_TRAIN = (
    "How many {l}'s are in {w}?",
    "How many times does the letter {l} appear in {w}?",
    "Count the letter {l} in {w}.",
    "How many {l}s are there in the word {w}?",
    'Count how many times {l} occurs in "{w}".',
    "In the word {w}, how many {l}'s are there?",
    "Number of {l}'s in {w}?",
    'How often does {l} appear in the word "{w}"?',
    "How many letters {l} does {w} have?",
    "Count the {l}'s in the word {w}.",
)
COUNT_HELDOUT = (
    "Tell me the number of {l} characters in {w}.",
    "What is the count of the letter {l} in {w}?",
    "Spell {w} and count its {l}'s.",
)
COUNT_BROAD = (
    "In {w}, how many {l}s are there?",
    "{w}: how many {l}'s?",
    "Number of times {l} appears in {w}?",
    "How often is the letter {l} in {w}?",
    "Tally the letter {l} in the word {w}.",
    "Find how many {l} letters {w} has.",
    "Count every {l} in {w}.",
    "How many {l} does the word {w} contain?",
)
COUNT_WIDE = (
    "Look at the word {w}. How many {l}'s are in it?",
    "Count the occurrences of {l} in {w}.",
    "What number of {l}'s appear in {w}?",
    "In {w}, count the letter {l}.",
    "The word is {w}. How many {l}'s?",
    "Letter {l} in {w}: how many times?",
    "Tell me how many {l}'s {w} has.",
)


def count_letters(rng: random.Random, phrasing: str = "train") -> Problem:
    word = rng.choice(WORDS)
    letter = rng.choice(word) if rng.random() < 0.85 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    spelled = " ".join(word)
    marks, n = [], 0
    for ch in word:
        if ch == letter:
            n += 1
            marks.append(f"{ch} {n}")
        else:
            marks.append(ch)
    thinking = "\n".join(
        [
            f"Count {letter} in {word}.",
            f"Spell it: {spelled}",
            f"Count {letter}: {', '.join(marks)}",
            f"So {letter} appears {n} times.",
        ]
    )
    question = _phrase(
        rng,
        _templates("count", phrasing),
        phrasing,
        l=letter,
        w=word,
    )
    answer = f"The letter {letter} appears {n} times in {word}."
    return Problem("count", question, thinking, answer, str(n), **_filled("count", l=letter, w=word))


# --- comparing decimals -----------------------------------------------------------------------------------


def _decimal(rng: random.Random, whole: int) -> str:
    """``whole`` with 1-3 decimal places, trailing zeros dropped (9.10 is written 9.1)."""
    places = rng.randint(1, 3)
    fraction = f"{rng.randint(0, 10**places - 1):0{places}d}".rstrip("0")
    return f"{whole}.{fraction}" if fraction else str(whole)


def compare_steps(x: str, y: str, larger: bool) -> tuple[list[str], str]:
    """Whole parts first, then the decimals digit by digit after padding them to the same length."""
    wx, _, fx = x.partition(".")
    wy, _, fy = y.partition(".")
    lines = [f"Compare {x} and {y}."]
    if int(wx) != int(wy):
        big = x if int(wx) > int(wy) else y
        lines.append(f"Whole parts: {wx} and {wy}. {max(int(wx), int(wy))} is bigger.")
    else:
        lines.append(f"Whole parts: {wx} and {wy}, equal.")
        width = max(len(fx), len(fy))
        px, py = fx.ljust(width, "0"), fy.ljust(width, "0")
        lines.append(f"Pad the decimals: {wx}.{px} and {wy}.{py}.")
        big = x
        for i, (cx, cy) in enumerate(zip(px, py, strict=True)):
            place = ("Tenths", "Hundredths", "Thousandths")[i]
            if cx == cy:
                lines.append(f"{place}: {cx} and {cy}, equal.")
                continue
            big = x if cx > cy else y
            lines.append(f"{place}: {cx} and {cy}. {max(cx, cy)} is bigger.")
            break
    small = y if big == x else x
    winner = big if larger else small
    lines.append(f"So {big} is larger and {small} is smaller.")
    return lines, winner


LARGER_TRAIN = (
    "Which is larger, {x} or {y}?",
    "Which is bigger: {x} or {y}?",
    "Which number is greater, {x} or {y}?",
    "Is {x} or {y} larger?",
    "Compare {x} and {y}. Which is larger?",
    "What's bigger, {x} or {y}?",
    "Which is the larger number: {x} or {y}?",
    "Between {x} and {y}, which is greater?",
)
SMALLER_TRAIN = (
    "Which is smaller, {x} or {y}?",
    "Which number is less, {x} or {y}?",
    "Is {x} or {y} smaller?",
    "What's smaller, {x} or {y}?",
    "Between {x} and {y}, which is smaller?",
)
LARGER_HELDOUT = ("Pick the greater value: {x} vs {y}.", "{x} or {y}: which one is more?")
LARGER_BROAD = (
    "Of {x} and {y}, which is bigger?",
    "Between {x} and {y}, which number is higher?",
    "Is {x} or {y} the bigger number?",
    "Choose the larger: {x}, {y}.",
    "Which of {x} and {y} has the greater value?",
    "Max of {x} and {y}?",
)
LARGER_WIDE = (
    "Which value is larger: {x} or {y}?",
    "Tell me which is bigger, {x} or {y}.",
    "Which is more, {x} or {y}?",
    "Which one is higher: {x} or {y}?",
)
SMALLER_HELDOUT = ("Pick the lesser value: {x} vs {y}.", "{x} or {y}: which one is less?")
SMALLER_BROAD = (
    "Of {x} and {y}, which is less?",
    "Between {x} and {y}, which number is lower?",
    "Is {x} or {y} the smaller number?",
    "Choose the smaller: {x}, {y}.",
    "Which of {x} and {y} has the lower value?",
    "Min of {x} and {y}?",
)
SMALLER_WIDE = (
    "Which value is smaller: {x} or {y}?",
    "Tell me which is smaller, {x} or {y}.",
    "Which is less, {x} or {y}?",
    "Which one is lower: {x} or {y}?",
)


def compare_decimals(rng: random.Random, phrasing: str = "train") -> Problem:
    while True:
        w1 = rng.randint(0, 20)
        w2 = w1 if rng.random() < 0.7 else rng.randint(0, 20)
        x, y = _decimal(rng, w1), _decimal(rng, w2)
        if float(x) != float(y):
            break
    larger = rng.random() < 0.6
    lines, winner = compare_steps(x, y, larger)
    if larger:
        templates = _templates("larger", phrasing)
        answer = f"{winner} is larger than {y if winner == x else x}."
    else:
        templates = _templates("smaller", phrasing)
        answer = f"{winner} is smaller than {y if winner == x else x}."
    question = _phrase(rng, templates, phrasing, x=x, y=y)
    filled = _filled("larger" if larger else "smaller", x=x, y=y)
    return Problem("compare", question, "\n".join(lines), answer, winner, **filled)


# --- sorting ---------------------------------------------------------------------------------------------

SORT_UP_TRAIN = (
    "Sort {s}.",
    "Sort these numbers: {s}.",
    "Put {s} in ascending order.",
    "Order {s} from smallest to largest.",
    "Arrange {s} in increasing order.",
    "Can you sort {s}?",
    "Sort the list {s} in ascending order.",
    "List {s} from lowest to highest.",
)
SORT_DOWN_TRAIN = (
    "Sort {s} in descending order.",
    "Order {s} from largest to smallest.",
    "Arrange {s} in decreasing order.",
    "List {s} from highest to lowest.",
    "Sort these numbers from biggest to smallest: {s}.",
)
SORT_UP_HELDOUT = ("Rank {s} from least to greatest.", "Please give me {s} sorted.")
SORT_UP_BROAD = (
    "Order {s} from low to high.",
    "Put {s} in order, smallest first.",
    "Sort: {s}",
    "Ascending order of {s}?",
    "Sort {s}, smallest first.",
    "Arrange these from least to most: {s}.",
)
SORT_UP_WIDE = (
    "Could you put {s} in ascending order?",
    "Sort these numbers: {s}.",
    "Write {s} in order from smallest to biggest.",
    "Order the numbers {s} from lowest to highest.",
)
SORT_DOWN_HELDOUT = ("Rank {s} from greatest to least.", "Reverse-sort {s}.")
SORT_DOWN_BROAD = (
    "Order {s} from high to low.",
    "Put {s} in order, largest first.",
    "Descending order of {s}?",
    "Sort {s}, biggest first.",
    "Arrange these from most to least: {s}.",
    "Sort {s} from big to small.",
)
SORT_DOWN_WIDE = (
    "Could you put {s} in descending order?",
    "Write {s} in order from biggest to smallest.",
    "Order the numbers {s} from highest to lowest.",
    "Sort {s} with the largest first.",
)


def sort_numbers(rng: random.Random, phrasing: str = "train") -> Problem:
    n = rng.randint(3, 6)
    values = rng.sample(range(100 if rng.random() < 0.6 else 10), n)
    ascending = rng.random() < 0.65
    listed = ", ".join(map(str, values))
    order, pick = ("ascending", "Smallest") if ascending else ("descending", "Largest")
    lines = [f"Sort {listed} in {order} order."]
    left, out = list(values), []
    while len(left) > 1:
        best = min(left) if ascending else max(left)
        rest = list(left)
        rest.remove(best)
        lines.append(f"{pick} of {', '.join(map(str, left))} is {best}. Left: {', '.join(map(str, rest))}.")
        out.append(best)
        left = rest
    out.append(left[0])
    result = ", ".join(map(str, out))
    lines.append(f"Last: {left[0]}. So the sorted list is {result}.")
    form = "sort_up" if ascending else "sort_down"
    question = _phrase(rng, _templates(form, phrasing), phrasing, s=listed)
    filled = _filled(form, s=listed)
    return Problem("sort", question, "\n".join(lines), f"The sorted list is {result}.", result, **filled)


# --- the registry ----------------------------------------------------------------------------------------

GENERATORS: dict[str, Callable[[random.Random, str], Problem]] = {
    "add": addition,
    "sub": subtraction,
    "mul": multiplication,
    "expr": expression,
    "count": count_letters,
    "compare": compare_decimals,
    "sort": sort_numbers,
}
ARITHMETIC = ("add", "sub", "mul", "expr")  # the tasks a calculator tool can answer
TEMPLATES = {  # per form (languages.FORMS): the train, held-out, broad and wide templates
    "add": (ADD_TRAIN, ADD_HELDOUT, ADD_BROAD, ADD_WIDE),
    "sub": (SUB_TRAIN, SUB_HELDOUT, SUB_BROAD, SUB_WIDE),
    "mul": (MUL_TRAIN, MUL_HELDOUT, MUL_BROAD, MUL_WIDE),
    "expr": (EXPR_TRAIN, EXPR_HELDOUT, EXPR_BROAD, EXPR_WIDE),
    "count": (COUNT_TRAIN, COUNT_HELDOUT, COUNT_BROAD, COUNT_WIDE),
    "larger": (LARGER_TRAIN, LARGER_HELDOUT, LARGER_BROAD, LARGER_WIDE),
    "smaller": (SMALLER_TRAIN, SMALLER_HELDOUT, SMALLER_BROAD, SMALLER_WIDE),
    "sort_up": (SORT_UP_TRAIN, SORT_UP_HELDOUT, SORT_UP_BROAD, SORT_UP_WIDE),
    "sort_down": (SORT_DOWN_TRAIN, SORT_DOWN_HELDOUT, SORT_DOWN_BROAD, SORT_DOWN_WIDE),
}


def generate(
    rng: random.Random, task: str | None = None, phrasing: str = "train", language: str = "en"
) -> Problem:
    """One problem of ``task`` (a uniformly chosen task when None), asked and answered in ``language``."""
    problem = GENERATORS[task or rng.choice(TASKS)](rng, phrasing)
    problem = dataclasses.replace(problem, phrasing=phrasing)
    return problem if language == "en" else localize(rng, problem, language)


def localize(rng: random.Random, problem: Problem, language: str) -> Problem:
    """``problem`` asked in ``language`` (its held-out templates when the problem is phrased "heldout")
    and answered in it. The thinking stays the canonical English one: it restates the problem in
    symbols first, so the steps after it are the same whatever the question's language."""
    values = dict(problem.values)
    question = languages.phrase(rng, language, problem.form, problem.phrasing, **values)
    if problem.task in ARITHMETIC:
        said = {"expr": problem.expression, "result": problem.result}
    elif problem.task == "count":
        said = {"l": values["l"], "w": values["w"], "n": problem.result}
    elif problem.task == "compare":
        loser = values["y"] if problem.result == values["x"] else values["x"]
        said = {"winner": problem.result, "loser": loser}
    else:
        said = {"result": problem.result}
    answer = languages.answer(language, problem.form, **said)
    return dataclasses.replace(problem, question=question, answer=answer, language=language)


def tool_problem(rng: random.Random, phrasing: str = "train") -> Problem:
    """Arithmetic meant for the calculator: operands of 4 to 6 digits, and products of two or three factors
    with results of up to 15 digits, which the model cannot work out in its head but must copy exactly
    into the call and from the tool's response. Only for tool dialogs: the thinking is just the
    restatement (the calculator does the rest)."""
    kind = rng.choice(("add", "sub", "mul", "mul", "mul3"))
    if kind == "mul3":
        a, b, c = (_number(rng, rng.randint(3, 5)) for _ in range(3))
        task, expr, value, values = "expr", f"{a} * {b} * {c}", a * b * c, {"e": f"{a} * {b} * {c}"}
    else:
        a, b = _number(rng, rng.randint(4, 6)), _number(rng, rng.randint(2 if kind == "mul" else 4, 6))
        op = {"add": "+", "sub": "-", "mul": "*"}[kind]
        task, expr, value, values = kind, f"{a} {op} {b}", _apply(a, op, b), {"a": a, "b": b}
    question = _phrase(rng, _templates(task, phrasing), phrasing, **values)
    filled = _filled(task, **values)
    return Problem(task, question, expr, f"{expr} = {value}.", str(value), expr, phrasing, **filled)


DECLINE = "decline"  # the task of questions outside the model's skills, answered with an honest reply
DECLINE_THINKING = (
    "This is not arithmetic, counting letters, comparing decimals or sorting numbers, so I cannot "
    "solve it. I will say what I can do."
)


def off_skill(rng: random.Random, phrasing: str = "train", language: str = "en") -> Problem:
    """A question outside the seven tasks (a joke, a fact, chit-chat), and the short honest reply that
    says what the model can do instead of inventing arithmetic."""
    question = languages.off_skill_question(rng, language, heldout=phrasing == "heldout")
    reply = languages.DECLINE[language]
    return Problem(DECLINE, question, DECLINE_THINKING, reply, "", phrasing=phrasing, language=language)


def problem_set(
    seed: int, n: int, heldout_fraction: float = 0.25, tasks: tuple[str, ...] = TASKS
) -> list[Problem]:
    """``n`` problems, tasks in equal shares, a fraction phrased with held-out templates; fixed by ``seed``."""
    rng = random.Random(seed)
    return [
        generate(rng, tasks[i % len(tasks)], "heldout" if rng.random() < heldout_fraction else "train")
        for i in range(n)
    ]


def language_set(seed: int, n: int) -> list[Problem]:
    """``n`` problems in each of :data:`languages.LANGUAGES`, tasks in equal shares, all phrased with the
    language's held-out templates; fixed by ``seed``."""
    rng = random.Random(seed)
    return [
        generate(rng, TASKS[i % len(TASKS)], "heldout", language)
        for language in languages.LANGUAGES
        for i in range(n)
    ]


def tool_problem_set(seed: int, n: int, heldout_fraction: float = 0.25) -> list[Problem]:
    """``n`` :func:`tool_problem` s, a fraction phrased with held-out templates; fixed by ``seed``."""
    rng = random.Random(seed)
    return [tool_problem(rng, "heldout" if rng.random() < heldout_fraction else "train") for _ in range(n)]


def off_skill_set() -> list[Problem]:
    """Every held-out off-skill question, in every language (English and :data:`languages.LANGUAGES`)."""
    reply = languages.DECLINE
    return [
        Problem(DECLINE, q, DECLINE_THINKING, reply[lang], "", phrasing="heldout", language=lang)
        for lang in ("en", *languages.LANGUAGES)
        for q in languages.OFF_SKILL[lang][1]
    ]
