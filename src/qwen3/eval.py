"""``qwen3 eval``: what defines Qwen3, measured on a model — by default the shipped tiny one.

On a held-out problem set (a seed no training run uses; a quarter phrased with templates training never
saw), greedy decoding through the engine:

- exact-match accuracy per task in thinking and in non-thinking mode (the gap shows thinking helps);
- accuracy against the thinking budget, applied by the engine's budget mechanism (0 = non-thinking,
  None = unlimited), the curve of the Qwen3 report's Figure 2;
- mode following: ``/no_think`` gives an empty think block and ``/think`` a non-empty one in single
  turns, and the latest flag wins in multi-turn dialogs;
- tool use: offered the ``calculator`` tool, the model calls it with well-formed arguments and answers
  with its result, end to end through :class:`qwen3.agent.Agent`, on the problem set's arithmetic and on
  large operands (4-6 digits, results of up to 15 digits) whose result must be copied exactly;
- other languages: the same tasks asked with each language's held-out templates, right *and* answered in
  the question's language;
- off-skill questions (jokes, facts, chit-chat; a held-out list in every language): declined with the
  short honest reply that says what the model can do, instead of invented arithmetic.

:data:`TARGETS` are the bar the shipped model must clear (``--check`` exits 1 below it; CI runs that).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3.agent import CALCULATOR, Agent, evaluate_arithmetic
from qwen3.chat import soft_switch
from qwen3.llm import LLM
from qwen3.sampling import SamplingParams
from qwen3.train import languages, tasks

logger = logging.getLogger(__name__)

EVAL_SEED = 20_250_514  # training draws from Random(f"{seed}:{step}") and Random(seed) with small seeds
BUDGETS: tuple[int | None, ...] = (0, 8, 16, 32, 64, 128, None)
TARGETS = {
    "thinking_accuracy": 0.92,
    "thinking_gain": 0.20,  # thinking minus non-thinking accuracy
    "no_think_flag": 0.99,
    "think_flag": 0.99,
    "multi_turn_latest_flag": 0.95,
    "tool_use": 0.96,
    # floors a few points under what the shipped model measures (docs/tiny-model.md); issue 18's goals are
    # higher where it misses them (thinking 95%, held-out phrasings 92%, each language 90%)
    "heldout_phrasing_accuracy": 0.85,
    "tool_use_large_operands": 0.95,
    "declines_off_skill": 0.93,
    **{f"language_{lang}": 0.55 for lang in languages.LANGUAGES},
}
MAX_TOKENS = 768
FLAG_PROBE_TOKENS = 8  # enough to see whether the think block opens empty: <think> \n\n </think>


@dataclass
class EvalReport:
    """Every figure of one evaluation; :meth:`failures` lists the targets missed."""

    model: str
    problems: int
    seed: int
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)
    thinking_accuracy: float = 0.0
    non_thinking_accuracy: float = 0.0
    heldout_phrasing_accuracy: float = 0.0  # thinking mode, questions phrased with held-out templates
    budget_curve: list[tuple[int | None, float]] = field(default_factory=list)
    mode_following: dict[str, float] = field(default_factory=dict)
    tool_use: dict[str, float] = field(default_factory=dict)
    per_language: dict[str, dict[str, float]] = field(default_factory=dict)
    off_skill: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def figures(self) -> dict[str, float]:
        return {
            "thinking_accuracy": self.thinking_accuracy,
            "thinking_gain": self.thinking_accuracy - self.non_thinking_accuracy,
            "heldout_phrasing_accuracy": self.heldout_phrasing_accuracy,
            **self.mode_following,
            "tool_use": self.tool_use.get("accuracy", 0.0),
            "tool_use_large_operands": self.tool_use.get("accuracy_large_operands", 0.0),
            "declines_off_skill": self.off_skill.get("declined", 0.0),
            **{f"language_{lang}": row["accuracy"] for lang, row in self.per_language.items()},
        }

    def failures(self) -> list[str]:
        """The targets this model misses, each with its figure."""
        failed = [
            f"{k} {self.figures.get(k, 0.0):.3f} < {v}"
            for k, v in TARGETS.items()
            if self.figures.get(k, 0.0) < v
        ]
        accuracies = [acc for _, acc in self.budget_curve]
        if any(b < a - 0.05 for a, b in zip(accuracies, accuracies[1:], strict=False)):
            failed.append(f"budget curve falls somewhere: {accuracies}")
        return failed

    def table(self) -> str:
        """The report as Markdown tables."""
        pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
        lines = ["| task | n | thinking | non-thinking | gain |", "|---|---:|---:|---:|---:|"]
        for task, row in self.per_task.items():
            lines.append(f"| {task} | {row['n']:.0f} | {pct(row['thinking'])} | {pct(row['non_thinking'])} | "
                         f"{100 * (row['thinking'] - row['non_thinking']):+.1f} |")  # fmt: skip
        lines.append(f"| **all** | {self.problems} | **{pct(self.thinking_accuracy)}** | "
                     f"**{pct(self.non_thinking_accuracy)}** | "
                     f"**{100 * (self.thinking_accuracy - self.non_thinking_accuracy):+.1f}** |")  # fmt: skip
        lines += ["", f"Held-out phrasings (thinking): {pct(self.heldout_phrasing_accuracy)}", ""]
        lines += ["| thinking budget | " + " | ".join(_budget_label(b) for b, _ in self.budget_curve) + " |"]
        lines += ["|---" * (len(self.budget_curve) + 1) + "|"]
        lines += ["| accuracy | " + " | ".join(pct(a) for _, a in self.budget_curve) + " |", ""]
        lines += ["| behaviour | rate | target |", "|---|---:|---:|"]
        for key, target in TARGETS.items():
            lines.append(f"| {key.replace('_', ' ')} | {pct(self.figures.get(key, 0.0))} | {pct(target)} |")
        if self.tool_use:
            lines += ["", "Tool use: " + ", ".join(f"{k} {pct(v)}" for k, v in self.tool_use.items())]
        if self.per_language:
            lines += ["", "| language | n | right and in its language | right | in its language |",
                      "|---|---:|---:|---:|---:|"]  # fmt: skip
            for lang, row in self.per_language.items():
                lines.append(f"| {lang} | {row['n']:.0f} | {pct(row['accuracy'])} | {pct(row['right'])} | "
                             f"{pct(row['in_language'])} |")  # fmt: skip
        if self.off_skill:
            lines += [
                "",
                "Off-skill questions: " + ", ".join(f"{k} {pct(v)}" for k, v in self.off_skill.items()),
            ]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def _budget_label(budget: int | None) -> str:
    return "unlimited" if budget is None else str(budget)


def _rate(flags: Sequence[bool]) -> float:
    return sum(flags) / max(1, len(flags))


class Evaluator:
    """Runs the evaluation's parts on one :class:`LLM` (each part is one batched pass through the engine)."""

    def __init__(self, llm: LLM, max_tokens: int = MAX_TOKENS) -> None:
        self.llm = llm
        self.greedy = SamplingParams(temperature=0, max_tokens=max_tokens)

    def accuracy(self, problems: Sequence[tasks.Problem], **chat: Any) -> list[bool]:
        """Whether each problem's answer is right, asked as a single user turn."""
        convs = [[{"role": "user", "content": p.question}] for p in problems]
        outputs = self.llm.chat(convs, self.greedy, **chat)
        return [p.check(o.content) for p, o in zip(problems, outputs, strict=True)]

    def flag_following(self, conversations: Sequence[list[dict[str, str]]]) -> list[bool]:
        """Whether each reply opens the think block the latest flag asks for (empty for /no_think)."""
        probe = self.greedy.replace(max_tokens=FLAG_PROBE_TOKENS)
        outputs = self.llm.chat(list(conversations), probe, enable_thinking=True)
        results = []
        for conv, out in zip(conversations, outputs, strict=True):
            wants_thinking = soft_switch(conv) is not False
            if out.reasoning is None:  # no think block at all: Qwen3 always opens one in this mode
                results.append(False)
            else:
                results.append(bool(out.reasoning.strip()) == wants_thinking)
        return results

    def tool_use(
        self, problems: Sequence[tasks.Problem], large: Sequence[tasks.Problem] = ()
    ) -> dict[str, float]:
        """End to end with the calculator: called, with well-formed arguments, and the answer right; over
        ``problems`` and ``large`` together, and on ``large`` alone."""
        agent = Agent(self.llm, [CALCULATOR], sampling=self.greedy, max_rounds=3)
        everything = [*problems, *large]
        results = agent.run_batch([p.question for p in everything])
        called, wellformed, correct = [], [], []
        for p, r in zip(everything, results, strict=True):
            called.append(bool(r.calls))
            ok = bool(r.calls) and calculator_call_correct(r.calls[0][0], r.calls[0][1], p.result)
            wellformed.append(ok)
            correct.append(ok and p.check(r.content))
        figures = {"called": _rate(called), "wellformed_call": _rate(wellformed), "accuracy": _rate(correct)}
        if large:
            figures["accuracy_large_operands"] = _rate(correct[len(problems) :])
        return figures

    def languages(self, problems: Sequence[tasks.Problem]) -> dict[str, dict[str, float]]:
        """Per language, in thinking mode: right, answered in the question's language, and both."""
        convs = [[{"role": "user", "content": p.question}] for p in problems]
        outputs = self.llm.chat(convs, self.greedy, enable_thinking=True)
        rows: dict[str, dict[str, list[bool]]] = {}
        for p, o in zip(problems, outputs, strict=True):
            row = rows.setdefault(p.language, {"right": [], "in_language": []})
            row["right"].append(p.check(o.content))
            row["in_language"].append(languages.detect_language(o.content) == p.language)
        return {
            lang: {
                "n": len(row["right"]),
                "accuracy": _rate([a and b for a, b in zip(row["right"], row["in_language"], strict=True)]),
                "right": _rate(row["right"]),
                "in_language": _rate(row["in_language"]),
            }
            for lang, row in rows.items()
        }

    def off_skill(self, problems: Sequence[tasks.Problem]) -> dict[str, float]:
        """How often questions outside the skills get the honest reply, in thinking and non-thinking mode."""
        convs = [[{"role": "user", "content": p.question}] for p in problems]
        thinking = self.llm.chat(convs, self.greedy, enable_thinking=True)
        direct = self.llm.chat(convs, self.greedy, enable_thinking=False)
        return {
            "declined": _rate([languages.declines(o.content) for o in thinking]),
            "declined_non_thinking": _rate([languages.declines(o.content) for o in direct]),
            "in_language": _rate([languages.detect_language(o.content) == p.language
                                  for p, o in zip(problems, thinking, strict=True)]),
        }  # fmt: skip


def calculator_call_correct(name: str, arguments: str, result: str) -> bool:
    """Whether a tool call is the calculator with a well-formed expression whose value is ``result``."""
    try:
        expression = json.loads(arguments)["expression"]
        return name == "calculator" and str(evaluate_arithmetic(expression)) == result
    except (ValueError, KeyError, TypeError, SyntaxError, ZeroDivisionError, RecursionError):
        return False


def multi_turn_dialogs(seed: int, n: int) -> list[list[dict[str, str]]]:
    """Dialogs of 1-2 earlier turns and a new question, flags scattered over user and system messages."""
    rng = random.Random(seed)
    flags = ("", "", " /think", " /no_think")
    dialogs = []
    for _ in range(n):
        conv: list[dict[str, str]] = []
        if rng.random() < 0.25:
            conv.append({"role": "system", "content": "You are a helpful assistant." + rng.choice(flags)})
        for _ in range(rng.randint(1, 2)):
            p = tasks.generate(rng)
            conv += [{"role": "user", "content": p.question + rng.choice(flags)},
                     {"role": "assistant", "content": p.answer}]  # fmt: skip
        conv.append({"role": "user", "content": tasks.generate(rng).question + rng.choice(flags)})
        dialogs.append(conv)
    return dialogs


def evaluate(
    llm: LLM,
    problems: int = 700,
    seed: int = EVAL_SEED,
    budgets: Sequence[int | None] = BUDGETS,
    model_name: str = "",
) -> EvalReport:
    """The whole evaluation on ``problems`` held-out problems (tasks in equal shares)."""
    start = time.perf_counter()
    ev = Evaluator(llm)
    report = EvalReport(model_name or str(llm.model_dir), problems, seed)
    items = tasks.problem_set(seed, problems)
    logger.info("thinking mode on %d problems", len(items))
    thinking = ev.accuracy(items, enable_thinking=True)
    logger.info("non-thinking mode")
    non_thinking = ev.accuracy(items, enable_thinking=False)
    for task in tasks.TASKS:
        idx = [i for i, p in enumerate(items) if p.task == task]
        report.per_task[task] = {
            "n": len(idx),
            "thinking": _rate([thinking[i] for i in idx]),
            "non_thinking": _rate([non_thinking[i] for i in idx]),
        }
    report.thinking_accuracy, report.non_thinking_accuracy = _rate(thinking), _rate(non_thinking)
    heldout = [t for t, p in zip(thinking, items, strict=True) if p.phrasing == "heldout"]
    report.heldout_phrasing_accuracy = _rate(heldout)
    for budget in budgets:
        if budget == 0:
            acc = report.non_thinking_accuracy
        elif budget is None:
            acc = report.thinking_accuracy
        else:
            logger.info("thinking budget %d", budget)
            acc = _rate(ev.accuracy(items, thinking_budget=budget))
        report.budget_curve.append((budget, acc))
    logger.info("mode following")
    report.mode_following = {
        "no_think_flag": _rate(ev.flag_following([[{"role": "user", "content": f"{p.question} /no_think"}]
                                                  for p in items])),
        "think_flag": _rate(ev.flag_following([[{"role": "user", "content": f"{p.question} /think"}]
                                               for p in items])),
        "multi_turn_latest_flag": _rate(ev.flag_following(multi_turn_dialogs(seed + 1, problems))),
    }  # fmt: skip
    logger.info("tool use")
    large = tasks.tool_problem_set(seed + 2, max(1, problems // 7))
    report.tool_use = ev.tool_use([p for p in items if p.task in tasks.ARITHMETIC], large)
    logger.info("other languages")
    report.per_language = ev.languages(tasks.language_set(seed + 3, max(len(tasks.TASKS), problems // 10)))
    logger.info("off-skill questions")
    report.off_skill = ev.off_skill(tasks.off_skill_set())
    report.seconds = time.perf_counter() - start
    return report


def plot(report: EvalReport, path: str | Path) -> Path:
    """Two panels: accuracy per task in both modes, and accuracy against the thinking budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(report.per_task)
    xs = range(len(names))
    left.bar(
        [x - 0.2 for x in xs], [100 * report.per_task[n]["thinking"] for n in names], 0.4, label="thinking"
    )
    left.bar([x + 0.2 for x in xs], [100 * report.per_task[n]["non_thinking"] for n in names], 0.4,
             label="non-thinking")  # fmt: skip
    left.set_xticks(list(xs), names)
    left.set_ylabel("exact match (%)")
    left.set_ylim(0, 105)
    left.set_title("accuracy per task")
    left.legend(loc="lower left")
    labels = [_budget_label(b) for b, _ in report.budget_curve]
    right.plot(range(len(labels)), [100 * a for _, a in report.budget_curve], marker="o")
    right.set_xticks(range(len(labels)), labels)
    right.set_xlabel("thinking budget (tokens)")
    right.set_ylabel("exact match (%)")
    right.set_ylim(0, 105)
    right.set_title("accuracy vs thinking budget")
    right.grid(alpha=0.3)
    fig.suptitle(f"{Path(report.model).name or report.model}: {report.problems} held-out problems, greedy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# --- command line ---------------------------------------------------------------------------------------


def add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--model", "-m", default=None, help="checkpoint folder or Hub id (default: the shipped model)"
    )
    parser.add_argument("--problems", "-n", type=int, default=700, help="held-out problems (default: 700)")
    parser.add_argument(
        "--seed", type=int, default=EVAL_SEED, help=f"problem-set seed (default: {EVAL_SEED})"
    )
    parser.add_argument("--output", "-o", type=Path, default=None,
                        help="write report.md, report.json and eval.png to this folder")  # fmt: skip
    parser.add_argument("--check", action="store_true", help="exit 1 if any target is missed (what CI runs)")


def run(args: Any) -> int:
    llm = LLM(args.model, max_num_seqs=256, max_num_batched_tokens=8192, kv_cache_memory="1GiB")
    report = evaluate(llm, args.problems, args.seed, model_name=args.model or "qwen3 default (tiny)")
    print(report.table())
    print(f"\n({report.seconds:.0f} s)")
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "report.md").write_text(report.table() + "\n")
        (args.output / "report.json").write_text(report.to_json() + "\n")
        plot(report, args.output / "eval.png")
    failures = report.failures()
    if failures:
        logger.warning("targets missed: %s", "; ".join(failures))
    return 1 if args.check and failures else 0
