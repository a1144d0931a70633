"""Stage 6's composed templates: every form in every language, hundreds of them, each with its form's
placeholders, none a copy of an older template, and none using wording only the held-out templates use."""

from __future__ import annotations

import random
import unicodedata

import pytest

from qwen3.train import composed, languages, tasks
from tests.test_train_languages import _fields, _wording

ENGLISH = {  # form: (every training template of stages 2-5, the held-out ones)
    form: (train + broad + wide, heldout) for form, (train, heldout, broad, wide) in tasks.TEMPLATES.items()
}
ALL = ("en", *languages.LANGUAGES)


def _older(language: str) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    return ENGLISH if language == "en" else languages.TEMPLATES[language]


def _heldout_only(language: str, form: str) -> set[str]:
    """Wording a composed template of ``form`` must not use: what the form's held-out templates say and
    its older training templates do not, and what any form's held-out templates say and no older training
    template of any form does (so a word the evaluation keeps unseen is not taught under another form)."""
    older = _older(language)
    anywhere = set().union(*(_wording(t, language) for train, _ in older.values() for t in train))
    here = set().union(*(_wording(t, language) for t in older[form][0]))
    return {
        w
        for other, (_, heldout) in older.items()
        for t in heldout
        for w in _wording(t, language) - (here if other == form else anywhere)
    }


@pytest.mark.parametrize("language", ALL)
def test_every_form_has_many_templates_with_its_placeholders(language: str) -> None:
    assert set(composed.GROUPS[language]) == set(languages.FORMS)
    older = {t for train, heldout in _older(language).values() for t in train + heldout}
    for form in languages.FORMS:
        templates = composed.templates(language, form)
        assert len(templates) >= 60 and len(set(templates)) == len(templates), form
        assert not set(templates) & older, form
        for t in templates:
            assert _fields(t) == set(languages.PLACEHOLDERS[form]) and t.count("{") == len(_fields(t)), t
            assert unicodedata.is_normalized("NFC", t), t


@pytest.mark.parametrize("language", ALL)
def test_no_composed_template_uses_wording_only_the_heldout_ones_use(language: str) -> None:
    for form in languages.FORMS:
        banned = _heldout_only(language, form)
        assert banned, form  # the check has something to check
        for t in composed.templates(language, form):
            assert not _wording(t, language) & banned, (form, t, sorted(_wording(t, language) & banned))


@pytest.mark.parametrize("language", ALL)
def test_rich_questions_draw_on_the_composed_templates_and_keep_the_solution(language: str) -> None:
    rng = random.Random(5)
    rich = [tasks.generate(rng, tasks.TASKS[i % 7], "rich", language) for i in range(700)]
    wide = {tasks.generate(rng, tasks.TASKS[i % 7], "wide", language).question for i in range(2000)}
    assert len({p.question for p in rich} - wide) > 500
    for p in rich:
        assert p.check(p.answer) and languages.detect_language(p.answer) == language
    a, b = (
        tasks.generate(random.Random(9), "mul", "wide", language),
        tasks.generate(random.Random(9), "mul", "rich", language),
    )
    assert (a.thinking, a.result) == (b.thinking, b.result)
