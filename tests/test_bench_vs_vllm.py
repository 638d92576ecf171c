"""The pieces of ``bench/vs_vllm.py`` that decide what is compared: plain vLLM gets exactly the token ids the
project's server generates from, and texts are compared up to the verification tag the project writes. The run
itself needs vLLM and three servers (minutes on CPU); docs/performance.md records how it was run."""

from __future__ import annotations

import asyncio
import sys

from test_server_support import ROOT, TinyBundle, tiny_bundle  # noqa: F401

sys.path.insert(0, str(ROOT))


def test_texts_are_compared_up_to_the_tag() -> None:
    from bench.server_load import Sample
    from bench.vs_vllm import answer_text

    tag = "<verified>"
    project = Sample(1.0, 200, body={"text": "b a c\n<verified>Yes</verified>"})
    plain = Sample(1.0, 200, body={"choices": [{"text": "b a c "}]})
    assert answer_text("vllm", project, tag) == answer_text("plain", plain, tag) == "b a c"
    # A length-stopped answer: the project writes it right-stripped, a newline, then the tag.
    cut = Sample(1.0, 200, body={"text": "x x x\n<verified>No</verified>"})
    assert answer_text("vllm", cut, tag) == answer_text(
        "plain", Sample(1.0, 200, body={"choices": [{"text": "x x x"}]}), tag
    )
    assert answer_text("plain", Sample(1.0, 200, body={"choices": [{"text": "x x y"}]}), tag) != answer_text(
        "vllm", cut, tag
    )
    assert answer_text("transformers", Sample(1.0, 200, body={"text": "no tag at all"}), tag) == "no tag at all"
    assert answer_text("plain", Sample(1.0, 500, error="boom"), tag) is None


def test_plain_vllm_gets_the_ids_the_project_generates_from(tiny_bundle: TinyBundle) -> None:
    from bench.vs_vllm import rendered_ids
    from server.backends.transformers_backend import TransformersBackend

    prompts = [{"prompt": p} for p in tiny_bundle.positive_prompts[:2]] + [
        {"messages": [{"role": "user", "content": "b a c"}]}
    ]
    got = rendered_ids(tiny_bundle.path, prompts)

    async def expected():
        backend = TransformersBackend(str(tiny_bundle.path), device="cpu")
        await backend.load()
        try:
            return [backend.encode(backend.render_prompt(p.get("prompt") or p["messages"])) for p in prompts]
        finally:
            await backend.close()

    want = asyncio.run(expected())
    assert got == want and all(len(ids) > 5 for ids in got)


def test_engine_counters_are_summed_over_labels_and_other_metrics_ignored() -> None:
    import httpx

    from bench.vs_vllm import engine_counters

    text = "\n".join(
        [
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            'vllm:prompt_tokens_total{engine="0",model_name="a"} 120.0',
            'vllm:prompt_tokens_total{engine="0",model_name="b"} 30.0',
            'vllm:prefix_cache_hits_total{engine="0"} 64.0',
            'vllm:prompt_tokens_created{engine="0"} 1.7e9',
            "sdm_requests_total 5.0",
        ]
    )
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=text))

    async def go():
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            return await engine_counters(client)

    assert asyncio.run(go()) == {"vllm:prompt_tokens_total": 150.0, "vllm:prefix_cache_hits_total": 64.0}


def test_cpu_seconds_split_the_server_process_from_its_children() -> None:
    import subprocess

    from bench.vs_vllm import cpu_seconds, per_request

    # A parent that sleeps while its child spins: the child's CPU time lands under the child's name.
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\ntime.sleep(30)"
    launch = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {spin!r}]); time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", launch])
    try:
        for _ in range(100):
            used = cpu_seconds(parent.pid)
            children = sum(v for k, v in used.items() if k != "server_process")
            if children >= 0.5:
                break
            asyncio.run(asyncio.sleep(0.1))
        assert children >= 0.5 and used["server_process"] < 0.5, used
    finally:
        import psutil

        for child in psutil.Process(parent.pid).children(recursive=True):
            child.kill()
        parent.kill()
        parent.wait()
    runs = [
        {"answered": 2, "cpu_s": {"server_process": 1.0, "VLLM::Worker": 3.0}},
        {"answered": 2, "cpu_s": {"server_process": 1.0, "VLLM::Worker": 1.0}},
    ]
    assert per_request(runs, "cpu_s") == {"server_process": 0.5, "VLLM::Worker": 1.0}
