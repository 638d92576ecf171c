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
