"""The other languages' templates, answers and refusals: every template fills with its form's values,
held-out phrasings stay out of training, answers pass the checker and are recognised as their language."""

from __future__ import annotations

import random
import re
import string
import unicodedata

import pytest

from qwen3.train import languages, tasks


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


@pytest.mark.parametrize("language", languages.LANGUAGES)
def test_templates_cover_every_form_with_its_placeholders_and_disjoint_heldout(language: str) -> None:
    templates = languages.TEMPLATES[language]
    assert set(templates) == set(languages.FORMS)
    for form, (train, heldout) in templates.items():
        assert len(train) >= 7 and len(heldout) >= 3 and not set(train) & set(heldout), form
        for t in train + heldout:
            assert _fields(t) == set(languages.PLACEHOLDERS[form]), t
            assert unicodedata.is_normalized("NFC", t), t


class _Blank(dict):
    """Fills every placeholder with a space."""

    def __missing__(self, key: str) -> str:
        return " "


def _wording(template: str, language: str) -> set[str]:
    """A template's fixed wording: its words, or for Chinese and Japanese (no spaces) its character pairs."""
    text = string.Formatter().vformat(template.lower(), (), _Blank())
    if language in ("zh", "ja"):
        runs = re.findall(r"[^\W\d_]+", text)
        return {run[i : i + 2] for run in runs for i in range(max(1, len(run) - 1))}
    return set(re.findall(r"[^\W\d_]+", text))


@pytest.mark.parametrize("language", languages.LANGUAGES)
def test_every_heldout_template_has_wording_training_never_uses(language: str) -> None:
    """A held-out template that only reorders training words ("Ordne bitte {s} aufsteigend." beside
    "Ordne {s} ..." and "... aufsteigend.") would measure memory, not understanding."""
    for form, (train, heldout) in languages.TEMPLATES[language].items():
        seen = set().union(*(_wording(t, language) for t in train))
        for t in heldout:
            assert _wording(t, language) - seen, (form, t)


@pytest.mark.parametrize("language", ("en", *languages.LANGUAGES))
def test_off_skill_lists_are_disjoint_hold_no_numbers_and_get_a_refusal_in_the_language(
    language: str,
) -> None:
    train, heldout = languages.OFF_SKILL[language]
    assert len(train) >= (50 if language == "en" else 12) and len(heldout) >= (30 if language == "en" else 6)
    assert not set(train) & set(heldout)
    assert not any(c.isdigit() for q in train + heldout for c in q)
    reply = languages.DECLINE[language]
    assert languages.declines(reply) and languages.detect_language(reply) == language


def test_a_refusal_with_invented_numbers_is_not_a_refusal() -> None:
    assert not languages.declines(languages.DECLINE["en"] + " But 2 + 2 = 5.")
    assert not languages.declines("The answer is 42.")


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("7 + 8 = 15, so the answer is 15.", "en"),
        ("7 + 8 = 15，所以答案是 15。", "zh"),
        ("7 + 8 = 15 なので、答えは 15 です。", "ja"),
        ("La letra r aparece 3 veces en strawberry.", "es"),
        ("0.9 est plus grand que 0.11.", "fr"),
        ("Die sortierte Liste ist 1, 2, 3.", "de"),
    ],
)
def test_detect_language(text: str, language: str) -> None:
    assert languages.detect_language(text) == language


@pytest.mark.parametrize("language", languages.LANGUAGES)
def test_localized_answers_pass_the_checker_and_questions_are_deterministic(language: str) -> None:
    rng = random.Random(3)
    for i in range(300):
        p = tasks.generate(rng, tasks.TASKS[i % len(tasks.TASKS)], ("wide", "heldout")[i % 2], language)
        assert p.check(p.answer) and languages.detect_language(p.answer) == language
        assert not p.check(p.answer.replace(p.result, p.result + "7"))
    a = languages.phrase(random.Random(1), language, "add", a=12, b=30)
    assert a == languages.phrase(random.Random(1), language, "add", a=12, b=30) and "12" in a and "30" in a
