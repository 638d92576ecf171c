"""Several adapter bundles on one base model (--extra-bundles): one transformers engine holds the tiny base model
once and two random LoRA adapters beside it; each bundle's head decides its own requests (the two heads decide the
prompt families opposite ways); the request's ``model`` picks the bundle; /v1/models lists both; /admin/reload
swaps one while the other keeps serving; /ready and sdm_ready wait for every bundle and /ready reports each;
bundles that cannot share the engine are refused with a clear error."""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_server_support import (
    DEFAULT_ALPHA,
    MAX_TOKENS,
    _greedy,
    family_a,
    family_b,
    fit_toy_head,
    make_config,
    metric_value,
    serve,
)

SOURCE = {"kind": "tiny"}
ADMIN = "admin-key-multi"
PROMPTS = [family_a(0), family_b(0), family_a(1), family_b(1)]


@dataclass
class Expected:
    verified: str
    probability: float
    verification_text: str
    h: torch.Tensor


@dataclass
class Bundles:
    root: Path
    alpha: Path
    beta: Path
    expected: dict[str, list[Expected]]  # bundle name -> per PROMPTS, computed on the merged model as training would


def _adapter_bundle(path: Path, seed: int, flip: bool, source: dict = SOURCE, rank: int = 4) -> Path:
    """A random LoRA adapter of rank ``rank`` over ``source`` with a toy head (``flip``: the opposite decisions)."""
    from peft import LoraConfig, get_peft_model

    from sdm_core.lm.bundle import write_bundle
    from sdm_core.lm.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Random A and B (not peft's B=0 start): each adapter changes the model's states and generations.
        model = get_peft_model(
            load_model(source),
            LoraConfig(
                r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
            ),
        )
    model.eval()
    head, chat, recipe = fit_toy_head(model, tokenizer, flip=flip)
    return write_bundle(path, model=model, tokenizer=tokenizer, head=head, chat=chat, recipe=recipe, base_model=source)


def _expected(path: Path, prompts: list[str] = PROMPTS) -> list[Expected]:
    """What the bundle alone decides for ``prompts``: greedy generation, training's verification text and embedding
    on the merged model, the bundle's head."""
    from sdm_core.lm.bundle import load_bundle
    from sdm_core.lm.embedding import embed_texts, verification_text

    bundle = load_bundle(path)
    info = bundle.info
    generations = _greedy(bundle.model, bundle.tokenizer, prompts, info.chat, MAX_TOKENS)
    texts = [verification_text(bundle.tokenizer, p, g, info.chat, info.recipe) for p, g in zip(prompts, generations)]
    h = embed_texts(bundle.model, bundle.tokenizer, texts, info.recipe)
    scores = bundle.head.predict_scores(h, alpha=DEFAULT_ALPHA)
    return [
        Expected(
            info.tags.yes if int(scores.predictions[i]) == info.tags.positive_class else info.tags.no,
            float(scores.probabilities[i, int(scores.predictions[i])]),
            texts[i],
            h[i],
        )
        for i in range(len(prompts))
    ]


def _resealed(source: Path, target: Path, model: dict) -> Path:
    """A copy of ``source`` whose manifest records ``model`` (sealed again, so it verifies)."""
    from sdm_core.lm.bundle import seal_bundle

    shutil.copytree(source, target)
    raw = json.loads((target / "bundle.json").read_text())
    seal_bundle(target, {"model": {**raw["model"], **model}})
    return target


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Bundles:
    root = tmp_path_factory.mktemp("multi-bundle")
    alpha = _adapter_bundle(root / "alpha", seed=0, flip=False)
    beta = _adapter_bundle(root / "beta", seed=1, flip=True)
    shutil.copytree(alpha, root / "alpha-copy")
    _resealed(beta, root / "other-base", {"base": {"kind": "tiny", "seed": 1}})
    _resealed(beta, root / "merged", {"kind": "full", "path": "adapter"})
    return Bundles(root, alpha, beta, {"alpha": _expected(alpha), "beta": _expected(beta)})


def _app(bundles: Bundles, extra: tuple[str, ...] | None = None, **overrides):
    from server.app import create_app

    extra = extra if extra is not None else (f"beta={bundles.beta}",)
    return create_app(make_config(bundles.alpha, model_name="alpha", extra_bundles=extra, **overrides))


async def _ask(client, route: str, model: str | None, prompt: str) -> tuple[str, str, float]:
    """(model, verified, probability) of one greedy request on ``route`` (``model`` None: the body names none)."""
    body: dict = {"max_tokens": MAX_TOKENS} | ({"model": model} if model is not None else {})
    if route == "/generate":
        r = await client.post(route, json={**body, "prompt": prompt})
        assert r.status_code == 200, r.text
        return r.json()["model"], r.json()["verified"], r.json()["probability"]
    if route == "/v1/completions":
        r = await client.post(route, json={**body, "prompt": prompt})
    else:
        r = await client.post(route, json={**body, "messages": [{"role": "user", "content": prompt}]})
    assert r.status_code == 200, r.text
    sdm = r.json()["choices"][0]["sdm"]
    return r.json()["model"], sdm["verified"], sdm["probability"]


# -- configuration -----------------------------------------------------------------------------------------------
def test_extra_bundles_setting_is_validated(fake_bundle: Path, tmp_path: Path) -> None:
    from server.config import ConfigError, ServerConfig

    other = tmp_path / "other"
    other.mkdir()
    (other / "bundle.json").write_text("{}")
    config = ServerConfig(bundle=str(fake_bundle), model_name="main", extra_bundles=(f"b={other}", f" c = {other} "))
    assert config.extra_bundle_paths == {"b": str(other), "c": str(other)}
    env = ServerConfig.from_sources(
        ["--bundle", str(fake_bundle)], {"SDM_EXTRA_BUNDLES": f"b={other},c={other}", "SDM_MODEL_NAME": "main"}
    )
    assert env.extra_bundle_paths == {"b": str(other), "c": str(other)}
    for pairs, words in [
        ((str(other),), "NAME=PATH"),
        ((f"main={other}",), "default bundle's model name"),
        ((f"b={other}", f"b={other}"), "named twice"),
        ((f"b={tmp_path / 'missing'}",), "does not exist"),
        ((f"b/c={other}",), "letters, digits"),
    ]:
        with pytest.raises(ConfigError, match="--extra-bundles") as caught:
            ServerConfig(bundle=str(fake_bundle), model_name="main", extra_bundles=pairs)
        assert words in str(caught.value) and "SDM_EXTRA_BUNDLES" in str(caught.value)
    with_vllm = ServerConfig(bundle=str(fake_bundle), model_name="main", backend="vllm", extra_bundles=(f"b={other}",))
    assert with_vllm.extra_bundle_paths == {"b": str(other)}  # vLLM multi-LoRA (tests/test_server_vllm.py)
    with pytest.raises(ConfigError, match="needs the engine's head input") as caught:
        ServerConfig(
            bundle=str(fake_bundle),
            model_name="main",
            backend="vllm",
            vllm_hidden_states="transformers",
            extra_bundles=(f"b={other}",),
        )
    assert "one server per bundle" in str(caught.value)


def test_batches_hold_requests_of_one_adapter_each() -> None:
    """The batcher's key keeps each batch to one adapter; other adapters' items wait, in order, for the next."""
    from concurrent.futures import ThreadPoolExecutor

    from server.batching import DynamicBatcher

    batches: list[list[tuple[str, int]]] = []

    def process(items: list[tuple[str, int]]) -> list[int]:
        batches.append(items)
        return [n for _, n in items]

    async def scenario() -> list[int]:
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(process, pool, max_batch=8, max_wait_s=0.05, key=lambda item: item[0])
            items = [("a", 0), ("b", 1), ("a", 2), ("b", 3), ("a", 4)]
            try:
                return list(await asyncio.gather(*(batcher.submit(item) for item in items)))
            finally:
                await batcher.close()

    assert asyncio.run(scenario()) == [0, 1, 2, 3, 4]
    assert batches == [[("a", 0), ("a", 2), ("a", 4)], [("b", 1), ("b", 3)]]


# -- two adapter bundles served at once --------------------------------------------------------------------------
def test_two_adapter_bundles_are_served_at_once_each_decided_by_its_own_head(bundles: Bundles) -> None:
    from server.pipeline import VerificationRequest

    expected = bundles.expected
    # The heads decide the families opposite ways, so routing to the wrong bundle changes the verdict.
    assert [e.verified for e in expected["alpha"]] != [e.verified for e in expected["beta"]]

    async def scenario() -> None:
        app = _app(bundles)
        manager = app.state.server.manager
        async with serve(app) as client:
            engine = manager.served["alpha"].backend.engine
            assert manager.served["beta"].backend.engine is engine  # one engine: the base model is loaded once
            assert len(engine.adapter_set.bundles) == 2

            models = (await client.get("/v1/models")).json()["data"]
            assert [m["id"] for m in models] == ["alpha", "beta"]
            assert [m["root"] for m in models] == ["alpha", "beta"]
            assert models[0]["sdm"]["head_version"] != models[1]["sdm"]["head_version"]
            assert all(m["sdm"]["model_kind"] == "adapter" for m in models)

            # Every route, both models and the default (no model), all at once: batches mix nothing.
            asks = [
                (route, model, i)
                for route in ("/generate", "/v1/completions", "/v1/chat/completions")
                for model in ("alpha", "beta", None)
                for i in range(len(PROMPTS))
            ]
            answers = await asyncio.gather(*(_ask(client, r, m, PROMPTS[i]) for r, m, i in asks))
            for (route, model, i), (named, verified, probability) in zip(asks, answers):
                want = expected[model or "alpha"][i]
                assert named == (model or "alpha"), (route, model, i)
                assert verified == want.verified, (route, model, i)
                assert probability == pytest.approx(want.probability, abs=1e-4), (route, model, i)

            # Each bundle's generation and head input run with its own adapter: its verification text (the greedy
            # generation) and head input equal those of training's embedding on that bundle's merged model.
            for name in ("alpha", "beta"):
                served = manager.served[name]
                h = await served.backend.embed([e.verification_text for e in expected[name]])
                assert torch.allclose(h, torch.stack([e.h for e in expected[name]]), atol=1e-4), name
                result = await served.pipeline.run(
                    VerificationRequest(served.pipeline.prepare(PROMPTS[0]), max_tokens=MAX_TOKENS)
                )
                assert result.best.verification_text == expected[name][0].verification_text
                assert torch.allclose(result.best.embedding, expected[name][0].h, atol=1e-4), name
            assert not torch.allclose(expected["alpha"][0].h, expected["beta"][0].h, atol=1e-2)
            assert [e.verification_text for e in expected["alpha"]] != [e.verification_text for e in expected["beta"]]

            metrics = (await client.get("/metrics")).text
            for name in ("alpha", "beta"):  # one sdm_bundle_info series per served model
                assert metric_value(metrics, "sdm_bundle_info", {"model": name, "bundle": name}) == 1.0

    asyncio.run(scenario())


def test_unknown_model_is_a_404_naming_the_served_models(bundles: Bundles) -> None:
    async def scenario() -> None:
        app = _app(bundles, warmup=False)
        async with serve(app) as client:
            for route, body in [
                ("/generate", {"prompt": "hi"}),
                ("/v1/completions", {"prompt": "hi"}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
            ]:
                r = await client.post(route, json={**body, "model": "gamma"})
                assert r.status_code == 404, r.text
                error = r.json()["error"]
                assert set(r.json()) == {"error"}
                assert error["code"] == "model_not_found" and error["param"] == "model"
                assert "'gamma'" in error["message"] and "'alpha', 'beta'" in error["message"]

    asyncio.run(scenario())


# -- readiness ---------------------------------------------------------------------------------------------------
def test_ready_and_sdm_ready_wait_for_every_bundle_and_report_each(bundles: Bundles, monkeypatch) -> None:
    """While beta still loads, alpha being served does not make the server ready: /ready is 503 naming beta as
    still loading and sdm_ready stays 0. Once beta is in, /ready is 200 with each model's state and facts."""
    from server.backends.adapters import AdapterBackend

    gate = asyncio.Event()
    load = AdapterBackend.load

    async def gated_load(self) -> None:
        if Path(self.bundle_path).name == "beta":
            await gate.wait()
        await load(self)

    monkeypatch.setattr(AdapterBackend, "load", gated_load)

    async def scenario() -> None:
        app = _app(bundles)  # with the warm-up: ready means loaded and warmed up
        manager, metrics = app.state.server.manager, app.state.server.metrics
        async with serve(app, ready=False) as client:
            for _ in range(3000):
                if "alpha" in manager.served:
                    break
                await asyncio.sleep(0.02)
            assert "alpha" in manager.served
            assert metric_value((await client.get("/metrics")).text, "sdm_ready") == 0
            assert manager.model_states["beta"] == "loading"
            r = await client.get("/ready")
            assert r.status_code == 503 and r.headers["retry-after"]
            assert r.json()["error"]["code"] == "loading"
            assert r.json()["error"]["message"] == "not ready: loading; still loading: 'beta' (loading)"
            waiting = r.json()["models"]
            assert [(m["model"], m["state"]) for m in waiting] == [("alpha", "ready"), ("beta", "loading")]
            assert waiting[0]["bundle"] == "alpha" and "bundle" not in waiting[1]
            assert (await client.post("/generate", json={"prompt": "hi", "model": "alpha"})).status_code == 503

            gate.set()
            for _ in range(3000):
                if (await client.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.02)
            body = (await client.get("/ready")).json()
            assert metric_value((await client.get("/metrics")).text, "sdm_ready") == 1
            cards = {m["id"]: m["sdm"] for m in (await client.get("/v1/models")).json()["data"]}
            # The single-bundle keys stay (the default model's); "models" adds every model, the default first.
            assert (body["status"], body["model"], body["bundle"]) == ("ready", "alpha", "alpha")
            assert body["head_version"] == cards["alpha"]["head_version"] and "traffic_store" in body
            assert [(m["model"], m["state"], m["bundle"]) for m in body["models"]] == [
                ("alpha", "ready", "alpha"),
                ("beta", "ready", "beta"),
            ]
            for entry in body["models"]:
                card = cards[entry["model"]]
                for key in ("bundle_sha256", "head_version", "model_kind", "default_alpha"):
                    assert entry[key] == card[key], (entry["model"], key)
                summary = card["certification"]["summary"] if card["certification"] else None
                assert entry["certification"] == summary
            assert str(bundles.root) not in (await client.get("/ready")).text
        assert metric_value(metrics.render().decode(), "sdm_ready") == 0  # shut down: not ready
        assert manager.model_states == {"alpha": "closed", "beta": "closed"}

    asyncio.run(scenario())


# -- bundles that cannot share the engine ---------------------------------------------------------------------------
def test_bundles_that_cannot_share_the_engine_are_a_clear_startup_error(bundles: Bundles) -> None:
    from sdm_core.lm.bundle import read_bundle_info
    from server.backends import BackendError
    from server.backends.adapters import check_compatible, load_adapter_engine

    async def scenario(extra: str) -> tuple[str, int, str, list, float]:
        app = _app(bundles, extra=(f"other={bundles.root / extra}",), warmup=False)
        manager = app.state.server.manager
        async with serve(app, ready=False) as client:
            await manager.wait_ready(60)
            r = await client.get("/ready")
            ready = metric_value((await client.get("/metrics")).text, "sdm_ready")
            return manager.state, r.status_code, r.json()["error"]["message"], r.json().get("models"), ready

    state, status, message, models, ready = asyncio.run(scenario("other-base"))
    assert ready == 0  # the default bundle loaded before the other failed: the server is still not ready
    assert state == "failed" and status == 503
    assert models == [{"model": "alpha", "state": "not_loaded"}, {"model": "other", "state": "failed"}]
    assert "still loading" not in message
    assert "model 'other'" in message and "'other-base'" in message and "base model" in message
    assert "serve it from a server of its own" in message and str(bundles.root) not in message

    default = read_bundle_info(bundles.alpha)
    with pytest.raises(BackendError, match="'merged' bundle|is a 'full' bundle, not a LoRA adapter"):
        check_compatible(default, read_bundle_info(bundles.root / "merged"), "merged")
    with pytest.raises(BackendError, match="--extra-bundles needs adapter bundles"):
        load_adapter_engine(bundles.root / "merged", dtype=torch.float32, verify=True, device="cpu")


# -- reload of one bundle ------------------------------------------------------------------------------------------
def test_reload_swaps_one_bundle_and_leaves_the_other_serving(bundles: Bundles) -> None:
    from server.pipeline import VerificationRequest

    expected = bundles.expected

    async def scenario() -> None:
        app = _app(bundles, bundles_root=str(bundles.root), admin_api_keys=(ADMIN,), warmup=False)
        manager = app.state.server.manager
        async with serve(app, headers={"Authorization": f"Bearer {ADMIN}"}) as client:
            versions = {m["id"]: m["sdm"]["head_version"] for m in (await client.get("/v1/models")).json()["data"]}
            alpha_before, beta_before = manager.served["alpha"], manager.served["beta"]
            held = manager.hold("beta")  # an in-flight request on the old beta

            r = await client.post("/admin/reload", json={"model": "beta", "bundle": "alpha-copy"})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "beta" and r.json()["bundle"] == "alpha-copy"
            assert r.json()["previous_bundle"] == "beta" and r.json()["head_version"] == versions["alpha"]
            assert manager.served["alpha"] is alpha_before and manager.served["beta"] is not beta_before
            now = {m["id"]: m["sdm"]["head_version"] for m in (await client.get("/v1/models")).json()["data"]}
            assert now == {"alpha": versions["alpha"], "beta": versions["alpha"]}

            # The held request still runs on the old beta (its adapter and head), then the old beta is retired.
            old = await held.pipeline.run(VerificationRequest(held.pipeline.prepare(PROMPTS[0]), max_tokens=MAX_TOKENS))
            assert old.best.verified == expected["beta"][0].verified
            assert old.best.probability == pytest.approx(expected["beta"][0].probability, abs=1e-4)
            engine = alpha_before.backend.engine
            assert len(engine.adapter_set.bundles) == 3
            manager.release(held)
            for _ in range(200):
                if len(engine.adapter_set.bundles) == 2:
                    break
                await asyncio.sleep(0.02)
            assert len(engine.adapter_set.bundles) == 2

            for model, want in (("beta", expected["alpha"]), ("alpha", expected["alpha"])):
                for i in (0, 1):
                    named, verified, probability = await _ask(client, "/generate", model, PROMPTS[i])
                    assert named == model and verified == want[i].verified
                    assert probability == pytest.approx(want[i].probability, abs=1e-4)

            # A bundle that cannot share the engine is refused, and beta keeps serving what it served.
            r = await client.post("/admin/reload", json={"model": "beta", "bundle": "other-base"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_bundle"
            assert "base model" in r.json()["error"]["message"]
            r = await client.post("/admin/reload", json={"model": "gamma"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            now = {m["id"]: m["sdm"]["head_version"] for m in (await client.get("/v1/models")).json()["data"]}
            assert now == {"alpha": versions["alpha"], "beta": versions["alpha"]}

            # Today's body (no model) reloads the default, re-read; beta is not touched.
            beta_now = manager.served["beta"]
            r = await client.post("/admin/reload")
            assert r.status_code == 200 and r.json()["model"] == "alpha" and r.json()["bundle"] == "alpha"
            assert manager.served["beta"] is beta_now and manager.served["alpha"] is not alpha_before

    asyncio.run(scenario())
