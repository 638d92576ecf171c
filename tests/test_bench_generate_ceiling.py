"""``bench/generate_ceiling.py`` end to end on the tiny bundle: static greedy batches of the bundle's own model, one
JSON line whose figures follow from what was asked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_server_support import ROOT, TinyBundle, tiny_bundle  # noqa: F401

pytestmark = pytest.mark.slow


def test_generate_ceiling_decodes_every_request_in_batches_of_each_size(tiny_bundle: TinyBundle, tmp_path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in tiny_bundle.positive_prompts[:3]), encoding="utf-8"
    )
    argv = [sys.executable, str(ROOT / "bench" / "generate_ceiling.py"), "--bundle", str(tiny_bundle.path)]
    argv += ["--batch-sizes", "1,2", "--requests", "3", "--max-tokens", "4", "--prompts", str(prompts)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout
    out = json.loads(lines[0])
    assert out["benchmark"] == "generate_ceiling" and out["max_tokens"] == 4
    assert [level["batch"] for level in out["levels"]] == [1, 2]
    for level in out["levels"]:
        assert level["requests"] == 3 and level["wall_s"] > 0
        assert level["requests_per_s"] == pytest.approx(3 / level["wall_s"], rel=1e-2)
        assert 0 <= level["generated_tokens_per_request"] <= 4


def test_continuous_batching_decodes_every_request_under_each_cap(tiny_bundle: TinyBundle, tmp_path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in tiny_bundle.positive_prompts[:3]), encoding="utf-8"
    )
    argv = [sys.executable, str(ROOT / "bench" / "generate_ceiling.py"), "--bundle", str(tiny_bundle.path)]
    argv += ["--batch-sizes", "1,2", "--requests", "3", "--max-tokens", "4", "--prompts", str(prompts), "--continuous"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(level["mode"], level["batch"]) for level in out["levels"]] == [
        ("static", 1),
        ("static", 2),
        ("continuous", 1),
        ("continuous", 2),
    ]
    for level in out["levels"]:
        assert level["requests"] == 3 and 0 < level["generated_tokens_per_request"] <= 4
