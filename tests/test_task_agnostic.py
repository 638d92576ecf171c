"""The server and the core library hold nothing of any one task: no word-ordering markup, prompt or correctness
function, so a bundle for another task is served unchanged (tests/test_arithmetic_e2e.py serves an arithmetic one).
Task knowledge lives in the records and in training/ only."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a word-ordering assumption looks like in code or docs: its markup, its prompt, its names, its modules.
TASK_MARKERS = re.compile(
    r"</?sentence>|word[ _-]?order|reorder|complete the sentence|harvard|wikipedia|"
    r"training\.(?:word_order|correctness|data|arithmetic)|first_sentence",
    re.IGNORECASE,
)


def task_mentions(folder: Path, root: Path = ROOT) -> list[str]:
    hits = []
    for path in sorted(folder.rglob("*")):
        if path.suffix not in (".py", ".md", ".json", ".yaml", ".yml", ".txt") or "__pycache__" in path.parts:
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if TASK_MARKERS.search(line):
                hits.append(f"{path.relative_to(root)}:{lineno}: {line.strip()[:120]}")
    return hits


def test_the_markers_catch_a_word_ordering_assumption(tmp_path):
    # The scan itself must be able to fail: a pipeline that extracted the <sentence> would be caught.
    (tmp_path / "pipeline.py").write_text('ANSWER = re.compile(r"<sentence>(.*?)</sentence>")\n')
    (tmp_path / "ok.py").write_text('TAG = "<verified>"\n')
    assert task_mentions(tmp_path, root=tmp_path) == [
        'pipeline.py:1: ANSWER = re.compile(r"<sentence>(.*?)</sentence>")'
    ]


def test_server_holds_nothing_of_word_ordering():
    assert task_mentions(ROOT / "server") == []


def test_sdm_core_holds_nothing_of_word_ordering():
    assert task_mentions(ROOT / "sdm_core") == []


def test_the_verification_tags_come_from_the_bundle():
    # The one piece of markup the server knows is the recipe's verification tag, and it reads it from bundle.json.
    pipeline = (ROOT / "server" / "pipeline.py").read_text(encoding="utf-8")
    assert "self.tags.open" in pipeline and '"<verified>"' not in pipeline
