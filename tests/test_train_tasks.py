"""The synthetic reasoning tasks: every problem is right, checkable, reproducible, and phrased variously."""

from __future__ import annotations

import random
import re

import pytest

from qwen3.agent import evaluate_arithmetic
from qwen3.train import tasks


@pytest.mark.parametrize("task", tasks.TASKS)
def test_problems_are_correct_and_self_consistent(task: str) -> None:
    rng = random.Random(0)
    for _ in range(400):
        p = tasks.generate(rng, task)
        assert p.task == task
        assert p.check(p.answer), p  # the stated answer passes the checker
        assert p.result in p.thinking.splitlines()[-1], p  # the worked solution ends with the result
        if p.expression is not None:
            assert str(evaluate_arithmetic(p.expression)) == p.result, p
            assert p.thinking.splitlines()[0] == p.expression  # the solution restates the problem first


def test_count_sort_compare_results() -> None:
    rng = random.Random(2)
    for _ in range(500):
        p = tasks.count_letters(rng)
        word, letter = re.search(r"Count (\w) in (\w+)\.", p.thinking).group(2, 1)
        assert int(p.result) == word.count(letter)
        p = tasks.sort_numbers(rng)
        numbers = [int(x) for x in re.search(r"Sort ([\d, ]+) in", p.thinking).group(1).split(", ")]
        descending = "descending" in p.thinking.splitlines()[0]
        assert p.result == ", ".join(map(str, sorted(numbers, reverse=descending)))
        p = tasks.compare_decimals(rng)
        x, y = re.search(r"Compare ([\d.]+) and ([\d.]+)\.", p.thinking).groups()
        want = max(x, y, key=float) if "larger" in p.answer else min(x, y, key=float)
        assert p.result == want


def test_checker_reads_the_result_not_the_operands() -> None:
    assert tasks.check_answer("add", "936", "347 + 589 = 936.")
    assert not tasks.check_answer("add", "936", "347 + 589 = 935.")
    assert not tasks.check_answer("add", "936", "")
    assert tasks.check_answer("compare", "9.9", "9.9 is larger than 9.11.")
    assert not tasks.check_answer("compare", "9.9", "9.11 is larger than 9.9.")
    assert tasks.check_answer("sort", "1, 2, 5, 9", "The sorted list is 1, 2, 5, 9.")
    assert not tasks.check_answer("sort", "1, 2, 5, 9", "The sorted list is 1, 2, 9, 5.")
    assert tasks.check_answer("sub", "-491", "543 - 1034 = -491.")


def test_problem_sets_are_reproducible_balanced_and_mix_phrasings() -> None:
    a, b = tasks.problem_set(7, 140), tasks.problem_set(7, 140)
    assert a == b
    assert a != tasks.problem_set(8, 140)
    assert {t: sum(p.task == t for p in a) for t in tasks.TASKS} == dict.fromkeys(tasks.TASKS, 20)
    held = [p for p in a if p.phrasing == "heldout"]
    assert 15 <= len(held) <= 60


def test_heldout_phrasings_are_never_training_phrasings() -> None:
    rng = random.Random(3)
    for task in tasks.TASKS:
        train = {tasks.generate(rng, task, "train").question.lower() for _ in range(300)}
        held = {tasks.generate(rng, task, "heldout").question.lower() for _ in range(100)}
        # the fixed words of each held-out template never appear among training questions
        for q in held:
            skeleton = re.sub(r"[\d.,]+|\b[a-z]\b", "", q)
            assert all(re.sub(r"[\d.,]+|\b[a-z]\b", "", t) != skeleton for t in train), q
    with pytest.raises(ValueError, match="phrasing"):
        tasks.generate(rng, "add", "other")


@pytest.mark.parametrize("phrasing", ["broad", "wide"])
def test_wider_phrasings_widen_training_and_stay_clear_of_heldout(phrasing: str) -> None:
    openings = tasks._BROAD_PREFIXES + tasks._WIDE_PREFIXES

    def skeleton(q: str) -> str:
        q = re.sub(r"^(" + "|".join(re.escape(p.strip().lower()) for p in openings) + ")", "", q)
        return re.sub(r"[\d.,]+|\b[a-z]\b", "", q).strip()

    rng = random.Random(4)
    for task in tasks.TASKS:
        train = {tasks.generate(rng, task, "train").question.lower() for _ in range(300)}
        wider = {tasks.generate(rng, task, phrasing).question.lower() for _ in range(600)}
        held = {skeleton(tasks.generate(rng, task, "heldout").question.lower()) for _ in range(100)}
        assert len(wider - train) > 300, task  # new wordings, not the training ones again
        assert not {skeleton(q) for q in wider} & held, task
        # the same problem whatever the phrasing: the worked solution never depends on it
        a, b = (
            tasks.generate(random.Random(9), task, "train"),
            tasks.generate(random.Random(9), task, phrasing),
        )
        assert (a.thinking, a.answer, a.result) == (b.thinking, b.answer, b.result), task


def test_tool_problems_have_large_operands_and_results_the_calculator_gives() -> None:
    problems = tasks.tool_problem_set(3, 300)
    assert problems == tasks.tool_problem_set(3, 300)
    for p in problems:
        assert p.task in tasks.ARITHMETIC and p.check(p.answer)
        assert str(evaluate_arithmetic(p.expression)) == p.result
        operands = [int(x) for x in re.findall(r"\d+", p.expression)]
        assert max(len(str(x)) for x in operands) >= 4 or len(operands) == 3
    lengths = [len(p.result.lstrip("-")) for p in problems]
    assert max(lengths) <= 15 and sum(n >= 12 for n in lengths) > 10 and min(lengths) <= 6
    assert {p.phrasing for p in problems} == {"train", "heldout"}


@pytest.mark.parametrize("language", tasks.languages.LANGUAGES)
def test_problems_in_other_languages_keep_the_thinking_and_answer_in_the_language(language: str) -> None:
    rng, again = random.Random(5), random.Random(5)
    for task in tasks.TASKS:
        for phrasing in ("wide", "heldout"):
            english = tasks.generate(random.Random(9), task, phrasing)
            p = tasks.generate(random.Random(9), task, phrasing, language)
            assert (p.thinking, p.result, p.expression) == (
                english.thinking,
                english.result,
                english.expression,
            )
            assert p.language == language and p.question != english.question
            assert p.check(p.answer) and tasks.languages.detect_language(p.answer) == language
            assert not p.check(english.answer.replace(english.result, english.result + "1"))
    assert tasks.generate(rng, language=language) == tasks.generate(again, language=language)
    problems = tasks.language_set(2, 14)
    assert len(problems) == 14 * len(tasks.languages.LANGUAGES)
    assert {p.phrasing for p in problems} == {"heldout"}


def test_off_skill_questions_are_declined_and_tasks_are_not() -> None:
    rng = random.Random(0)
    for language in ("en", *tasks.languages.LANGUAGES):
        p = tasks.off_skill(rng, "train", language)
        assert p.task == tasks.DECLINE and p.check(p.answer) and p.expression is None
        assert p.question in tasks.languages.OFF_SKILL[language][0]
        assert not p.check("2 + 2 = 4.")
    held = tasks.off_skill_set()
    assert all(p.phrasing == "heldout" and p.check(p.answer) for p in held)
    train = {q for lang in tasks.languages.OFF_SKILL.values() for q in lang[0]}
    assert not train & {p.question for p in held}
    assert not any(tasks.generate(rng).check(tasks.languages.DECLINE["en"]) for _ in range(50))
