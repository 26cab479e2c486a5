"""The shipped multiple-choice tasks (tasks/): each file is what its builder makes from the Debian bsdgames quiz
files, loads under the library's schema, and asks what it says it asks."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from anllm_ext.evaluation import load_multiple_choice

TASKS = Path(__file__).resolve().parents[1] / "tasks"
QUIZ = Path("/usr/share/games/bsdgames/quiz")
needs_quiz = pytest.mark.skipif(not QUIZ.is_dir(), reason="needs the bsdgames quiz files (package bsdgames)")
STATE_FILES = [f"state_{r}.jsonl" for r in ("capital", "postal", "flower")]


@needs_quiz
@pytest.mark.parametrize("builder,outputs", [("make_capitals.py", ["capitals.jsonl"]),
                                             ("make_state_facts.py", STATE_FILES)])
def test_builder_reproduces_the_shipped_files(tmp_path, builder, outputs):
    out_arg = ["--out", str(tmp_path / outputs[0])] if builder == "make_capitals.py" else ["--out-dir", str(tmp_path)]
    subprocess.run([sys.executable, str(TASKS / builder), *out_arg], check=True, capture_output=True, cwd=TASKS)
    for name in outputs:
        assert (tmp_path / name).read_text() == (TASKS / name).read_text(), name


@pytest.mark.parametrize("name", ["capitals.jsonl", *STATE_FILES])
def test_shipped_task_loads(name):
    questions = load_multiple_choice(TASKS / name)
    assert len(questions) == (213 if name == "capitals.jsonl" else 48)
    assert all(len(q.choices) == 4 for q in questions)


def test_state_facts_only_the_relation_tells_the_answers_apart():
    rows = {name: [json.loads(line) for line in (TASKS / name).read_text().splitlines()] for name in STATE_FILES}
    by_state = {}
    for questions in rows.values():
        for q in questions:
            by_state.setdefault(q["question"], {})[q["relation"]] = q
    assert len(by_state) == 48
    for state, qs in by_state.items():
        facts = {r: q["choices"][q["answer"]] for r, q in qs.items()}
        assert len(set(facts.values())) == 3, (state, facts)
        assert facts["postal"].isupper() and len(facts["postal"]) == 2, (state, facts)
        for relation, q in qs.items():
            # every file offers the state's three facts: the question alone cannot say which one is asked
            assert set(facts.values()) <= set(q["choices"]), (state, relation, q["choices"])
    assert by_state["Ohio"]["capital"]["choices"][by_state["Ohio"]["capital"]["answer"]] == "Columbus"
    assert by_state["Texas"]["flower"]["choices"][by_state["Texas"]["flower"]["answer"]] == "blue-bonnet"
