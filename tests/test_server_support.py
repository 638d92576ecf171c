"""Shared helpers for the server tests (imported by tests/test_server_*.py; holds no tests itself).

The tiny bundle: a tiny random Llama (sdm_core.lm.models, seed 0) with the SmolLM2 tokenizer and an SDM head fitted
on that model's embeddings of two prompt families, so that outputs are admitted (family A, class Yes), admitted as
No (family B: abstained with ``predicted_no``), or abstained by the head. It is built once per test process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SDM_CACHE_DIR", str(ROOT / ".cache" / "test-models"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_TOKENS = 4  # the generation length the tests use (the categories below were computed at this length)
ALPHAS = (0.9, 0.8, 0.7, 0.6)
DEFAULT_ALPHA = 0.8
API_KEY = "test-key-123"


@dataclass
class TinyBundle:
    path: Path
    path2: Path  # a second, identical bundle at another path (reload target)
    admitted_prompt: str
    predicted_no_prompt: str
    abstained_prompt: str
    abstained_reason: str
    positive_prompts: list[str] = field(default_factory=list)


def family_a(i: int) -> str:
    return ("apple " * 12) + f"sort {i}"


def family_b(i: int) -> str:
    return ("zebra " * 12) + f"sort {i}"


def _greedy(model, tokenizer, prompts, chat, max_new_tokens):
    import torch

    from sdm_core.lm.embedding import chat_messages

    out = []
    for p in prompts:
        text = tokenizer.apply_chat_template(chat_messages(p, chat), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            gen = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        out.append(tokenizer.decode(gen[0, len(ids) :], skip_special_tokens=True))
    return out


def fit_toy_head(model, tokenizer, flip: bool = False):
    """(head, chat, recipe): an SDM head that separates prompt family A (label 1) from family B (label 0); with
    ``flip``, family B is label 1 (a head that decides the same prompts the other way)."""
    import torch

    from sdm_core import SDMConfig, SDMEstimator
    from sdm_core.lm.embedding import ChatFormat, HiddenStateRecipe, embed_texts, verification_text

    chat, recipe = ChatFormat(), HiddenStateRecipe(max_length=256)
    prompts = [family_a(i) for i in range(48)] + [family_b(i) for i in range(48)]
    labels = torch.tensor([0] * 48 + [1] * 48) if flip else torch.tensor([1] * 48 + [0] * 48)
    h = embed_texts(model, tokenizer, [verification_text(tokenizer, p, "", chat, recipe) for p in prompts], recipe)
    train, cal = torch.arange(0, 96, 2), torch.arange(1, 96, 2)
    head = SDMEstimator(
        SDMConfig(
            epochs=3,
            exemplar_dim=16,
            learning_rate=1e-2,
            progress=False,
            alpha=DEFAULT_ALPHA,
            alpha_ladder=ALPHAS,
            class_names=("No", "Yes"),
        )
    )
    head.fit(
        h[train],
        labels[train],
        h[cal],
        labels[cal],
        num_classes=2,
        train_ids=[f"doc-{int(i)}" for i in train],
        calibration_ids=[f"doc-{int(i)}" for i in cal],
    )
    return head, chat, recipe


def _build(root: Path) -> TinyBundle:
    from sdm_core.lm.bundle import write_bundle
    from sdm_core.lm.embedding import embed_texts, verification_text
    from sdm_core.lm.models import load_model, load_tokenizer

    tokenizer = load_tokenizer({"kind": "tiny"})
    model = load_model({"kind": "tiny"}).eval()
    head, chat, recipe = fit_toy_head(model, tokenizer)
    path = root / "bundle"
    write_bundle(
        path,
        model=model,
        tokenizer=tokenizer,
        head=head,
        chat=chat,
        recipe=recipe,
        base_model={"kind": "tiny"},
        provenance={"purpose": "server tests"},
    )
    path2 = root / "bundle2"
    shutil.copytree(path, path2)

    # What the server will answer for candidate prompts (greedy, MAX_TOKENS): pick one of each outcome.
    candidates = (
        [family_a(i) for i in range(0, 12)] + [family_b(i) for i in range(0, 12)] + ["What is the capital of France?"]
    )
    generations = _greedy(model, tokenizer, candidates, chat, MAX_TOKENS)
    texts = [verification_text(tokenizer, p, g, chat, recipe) for p, g in zip(candidates, generations)]
    scores = head.predict_scores(embed_texts(model, tokenizer, texts, recipe), alpha=DEFAULT_ALPHA)
    admitted = [p for i, p in enumerate(candidates) if scores.admitted[i] and int(scores.predictions[i]) == 1]
    predicted_no = [p for i, p in enumerate(candidates) if scores.admitted[i] and int(scores.predictions[i]) == 0]
    abstained = [(p, scores.abstention_reason[i]) for i, p in enumerate(candidates) if not scores.admitted[i]]
    if not (admitted and predicted_no and abstained):
        raise RuntimeError(
            f"the tiny bundle has no example of every outcome: admitted={admitted} no={predicted_no} "
            f"abstained={abstained}"
        )
    return TinyBundle(path, path2, admitted[0], predicted_no[0], abstained[0][0], abstained[0][1], admitted)


_CACHE: dict[str, TinyBundle] = {}


def tiny_bundle_cached() -> TinyBundle:
    if "bundle" not in _CACHE:
        root = Path(tempfile.mkdtemp(prefix="sdm-server-tests-"))
        import atexit

        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _CACHE["bundle"] = _build(root)
    return _CACHE["bundle"]


@pytest.fixture(scope="session")
def tiny_bundle() -> TinyBundle:
    return tiny_bundle_cached()


def make_config(bundle: TinyBundle | Path, **overrides):
    from server.config import ServerConfig

    path = bundle.path if isinstance(bundle, TinyBundle) else bundle
    values = dict(
        bundle=str(path),
        device="cpu",
        default_max_tokens=MAX_TOKENS,
        max_tokens_cap=64,
        max_prompt_tokens=200,
        batch_wait_ms=5.0,
        warmup=True,
        model_name="tiny-sdm",
        traffic_store="off",
    )  # tests that record traffic pass their own store (tests/test_traffic_*.py)
    values.update(overrides)
    return ServerConfig(**values)


@contextlib.asynccontextmanager
async def serve(app, ready: bool = True, headers: dict | None = None):
    """Run the app's lifespan and yield an httpx client over ASGI (waits for /ready unless ready=False)."""
    import httpx

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=headers or {}, timeout=120
        ) as client:
            if ready:
                await wait_ready(app)
            yield client


async def wait_ready(app, timeout: float = 120.0) -> None:
    manager = app.state.server.manager
    deadline = time.monotonic() + timeout
    while not manager.ready:
        if manager.state == "failed":
            raise RuntimeError(f"the server failed to load: {manager.error}")
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not become ready")
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UvicornThread:
    """A real HTTP server for the app on 127.0.0.1 in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, access_log=False, lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.app = app

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not (self.server.started and self.app.state.server.manager.ready):
            if self.app.state.server.manager.state == "failed":
                raise RuntimeError(self.app.state.server.manager.error)
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def slow_down(backend, seconds_per_step: float) -> dict:
    """Make the backend's LM take ``seconds_per_step`` per forward pass (generation steps); returns a call counter."""
    model = backend.model
    forward = model.forward
    calls = {"n": 0}

    def slow_forward(*args, **kwargs):
        calls["n"] += 1
        time.sleep(seconds_per_step)
        return forward(*args, **kwargs)

    model.forward = slow_forward
    return calls


def metric_value(text: str, name: str, labels: dict | None = None) -> float:
    """The value of one sample in Prometheus text output (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return 0.0


def script_model(backend, text: str) -> None:
    """Make every generation of the backend's LM produce ``text`` (token by token, then its last token again)."""
    tokens = backend.worker_tokenizer(text, add_special_tokens=False)["input_ids"]
    model = backend.model
    forward = model.forward
    state = {"k": 0}

    def scripted(*args, **kwargs):
        out = forward(*args, **kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            state["k"] = 0  # a prefill: a new generation starts
        token = tokens[min(state["k"], len(tokens) - 1)]
        state["k"] += 1
        out.logits[:, -1, :] = -1e9
        out.logits[:, -1, token] = 0.0
        return out

    model.forward = scripted
