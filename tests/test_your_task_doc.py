"""docs/your-task.md stays true: every bash block marked ``<!-- doc-test -->`` runs, in order, in a scratch folder,
with the tiny preset in place of arithmetic-cpu; the block marked ``<!-- doc-test: server -->`` runs in the
background and the blocks after it talk to it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_server_support import free_port

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "your-task.md"
BLOCK_RE = re.compile(r"<!-- doc-test(?:: (?P<kind>\w+))? -->\n```bash\n(?P<body>.*?)```", re.DOTALL)
DOC_SIZES = "--train 864 --calibration 256 --holdout 1024 --test 256 --shift 256"
TINY_SIZES = "--train 32 --calibration 8 --holdout 16 --test 16 --shift 16"
pytestmark = pytest.mark.slow


def doc_blocks() -> list[tuple[str, str]]:
    """(kind, commands) of every marked block, in document order; kind is "" or "server"."""
    return [(m.group("kind") or "", m.group("body")) for m in BLOCK_RE.finditer(DOC.read_text(encoding="utf-8"))]


def test_the_marked_blocks_cover_the_whole_path():
    blocks = doc_blocks()
    text = "\n".join(body for _, body in blocks)
    for command in (
        "python -m training.data arithmetic",
        "python -m training.data validate",
        "training.correctness",
        "python -m training.finetune",
        "python -m training.calibrate",
        "python -m training.certify",
        "python -m training.evaluate",
        "curl -s localhost:8000/generate",
    ):
        assert command in text, f"no tested block runs {command!r}"
    assert [kind for kind, _ in blocks].count("server") == 1 and "python -m server" in dict(blocks)["server"]
    assert "arithmetic-cpu" in text and DOC_SIZES in text, (
        "the page documents the real preset; the test swaps in the tiny one"
    )


def test_the_documents_commands_run_on_the_tiny_model(tmp_path):
    port = free_port()
    work = tmp_path / "work"
    work.mkdir()
    # The scratch folder sees this checkout's packages (python -m puts the working folder first on sys.path) and a
    # `python` that is this interpreter, as an activated environment would give.
    for package in ("training", "sdm_core", "server"):
        (work / package).symlink_to(ROOT / package, target_is_directory=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SDM_CACHE_DIR": os.environ["SDM_CACHE_DIR"],
    }
    env.pop("PYTHONPATH", None)

    def adapt(body: str) -> str:
        # Smaller splits: calibrate decodes every calibration document, and the tiny model needs only a few.
        return (
            body.replace("arithmetic-cpu", "arithmetic-tiny")
            .replace("localhost:8000", f"localhost:{port}")
            .replace("--port 8000", f"--port {port}")
            .replace(DOC_SIZES, TINY_SIZES)
        )

    server = None
    server_log = tmp_path / "server.log"
    outputs: list[str] = []
    timings: list[tuple[str, float]] = []
    try:
        for kind, body in doc_blocks():
            script = "set -euo pipefail\n" + adapt(body)
            first = body.strip().splitlines()[0][:60]
            if kind == "server":
                server = subprocess.Popen(
                    ["bash", "-c", script],
                    cwd=work,
                    env=env,
                    stdout=server_log.open("w"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                timings.append(("server started", time.monotonic()))
                continue
            started = time.monotonic()
            try:
                done = subprocess.run(
                    ["bash", "-c", script],
                    cwd=work,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600 if server is None else 240,
                )
            except subprocess.TimeoutExpired:
                log = server_log.read_text() if server_log.exists() else ""
                pytest.fail(f"block {first!r} timed out; server log tail:\n{log[-3000:]}")
            timings.append((first, time.monotonic() - started))
            assert done.returncode == 0, (
                f"block {first!r} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
            outputs.append(done.stdout)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    print("\n".join(f"{name}: {seconds:.1f} s" for name, seconds in timings if name != "server started"))

    validated = outputs[0]
    assert validated.count("OK") == 3, validated
    assert "my_task.checks:city resolves and checks" in outputs[1]
    info = json.loads((work / "bundles" / "arith" / "bundle.json").read_text())
    assert info["certification"]["documents"] == 4, "the tiny preset certifies on 4 held-out documents"
    recertified = json.loads((work / "bundles" / "arith-certified" / "bundle.json").read_text())
    assert recertified["certification"]["documents"] == 16, "training.certify certifies on every test prompt"
    assert recertified["head"] == info["head"], "re-certification keeps the head"
    metrics = json.loads((work / "reports" / "arith" / "metrics.json").read_text())
    assert metrics["config"]["correctness"] == "arithmetic" and set(metrics["results"]["arith"]) == {"test", "shift"}
    answer = json.loads(outputs[-1].strip().splitlines()[-1])
    assert answer["verified"] in ("Yes", "No") and 0.0 <= answer["probability"] <= 1.0, answer
    assert answer["text"].endswith(f"<verified>{answer['verified']}</verified>")
