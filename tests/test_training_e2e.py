"""End-to-end fine-tuning on the tiny preset: SDM loss with hard negatives, the CE baseline, calibration into a
bundle that loads and scores, and resume after a simulated crash (kill -9 right after a checkpoint)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdm_core.lm.bundle import load_bundle, read_bundle_info
from sdm_core.lm.embedding import embed_texts, verification_text
from sdm_core.settings import build
from training.calibrate import calibrate
from training.calibrate_config import PRESETS as CALIBRATE_PRESETS
from training.calibrate_config import CalibrateConfig
from training.config import PRESETS, FinetuneConfig
from training.finetune import run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def tiny_config(out: Path, **overrides) -> FinetuneConfig:
    return build(FinetuneConfig, {**PRESETS["tiny"], "output_dir": str(out), **overrides})


@pytest.fixture(scope="module")
def sdm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdm_run")
    # One epoch, with generation from the first epoch so that hard negatives occur in a one-epoch run.
    result = run(tiny_config(out, epochs=1, generate_from_epoch=0, gamma_generate=1.0))
    return out, result


def test_sdm_run_writes_outputs_and_generates_hard_negatives(sdm_run):
    out, result = sdm_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, result.steps + 1))
    assert any("eval_loss" in r for r in records)
    assert max(r["hard_negatives"] for r in records) > 0
    assert all(2.0 <= r["mean_base"] <= 3.0 for r in records)
    # uniform_bases counts the step's instances at b = 2.5 (d = 0); a step whose mean is 2.5 has them all there.
    per_step = PRESETS["tiny"]["micro_batch_size"] * PRESETS["tiny"]["gradient_accumulation"]
    assert all(0 <= r["uniform_bases"] <= per_step for r in records)
    assert all(r["uniform_bases"] == per_step for r in records if r["mean_base"] == 2.5)
    assert all(r["uniform_bases"] < per_step for r in records if r["mean_base"] != 2.5)
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["loss"] == "sdm" and "git_revision" in config
    assert (out / "best" / "model.safetensors").is_file() and (out / "checkpoint" / "checkpoint.json").is_file()
    assert result.best_eval_loss == min(r["eval_loss"] for r in records if "eval_loss" in r)


def test_calibrate_builds_a_bundle_that_loads_and_scores(sdm_run, tmp_path):
    out, _ = sdm_run
    bundle_dir = tmp_path / "bundle"
    summary = calibrate(build(CalibrateConfig, {**CALIBRATE_PRESETS["tiny"], "run": str(out), "out": str(bundle_dir)}))
    assert summary["calibration_docs"] == 16 and summary["hard_negatives"] > 0
    assert summary["documents_by_split"]["certification"] == CALIBRATE_PRESETS["tiny"]["certification_docs"]
    info = read_bundle_info(bundle_dir)
    # Every alpha of the ladder is certified on the held-out documents and the table is sealed into bundle.json.
    certification = info.certification
    assert certification is not None and certification.documents == 4
    assert [r.alpha for r in certification.rows] == list(load_bundle(bundle_dir).head.ladder.alphas)
    assert set(info.raw["baselines"]["tag_probability"]["thresholds"]) == {f"{a:g}" for a in certification_alphas(info)}
    assert info.recipe.sequence_end == "template" and info.tags.yes == "Yes"
    assert info.model["kind"] == "full" and info.model["base"] == {"kind": "tiny", "seed": 0}
    bundle = load_bundle(bundle_dir)
    text = verification_text(
        bundle.tokenizer, "Order: 'b a'", "<sentence>a b</sentence>\n<verified>Yes</verified>", info.chat, info.recipe
    )
    assert text.endswith("<verified><|im_end|>\n")
    scores = bundle.head.predict_scores(embed_texts(bundle.model, bundle.tokenizer, [text], info.recipe))
    record = scores.record(0)
    assert 0.0 <= record["probability"] <= 1.0 and record["prediction"] in (0, 1)
    # A tampered bundle file is refused.
    weights = bundle_dir / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(ValueError, match="modified or corrupted"):
        read_bundle_info(bundle_dir)


def certification_alphas(info) -> list[float]:
    return [r.alpha for r in info.certification.rows if r.alpha < 1.0]


def test_generations_calibration_half_holds_each_documents_own_labelled_generation(sdm_run, tmp_path):
    from sdm_core import SDMEstimator
    from training.correctness import get_correctness
    from training.records import load_records

    out, _ = sdm_run
    settings = {**CALIBRATE_PRESETS["tiny"], "run": str(out)}
    calibrate(
        build(CalibrateConfig, {**settings, "out": str(tmp_path / "mixture"), "calibration_instances": "mixture"})
    )
    calibrate(build(CalibrateConfig, {**settings, "out": str(tmp_path / "generations")}))  # the default
    mixture = SDMEstimator.load(tmp_path / "mixture" / "head")
    own = SDMEstimator.load(tmp_path / "generations" / "head")
    generations = {
        json.loads(line)["id"]: json.loads(line)["generation"]
        for line in (tmp_path / "generations.calibration_generations.jsonl").read_text().splitlines()
    }
    references = {r.id: r.reference or r.positive for r in load_records(out / "data" / "calibration.jsonl")}
    correct = get_correctness("word_order")
    assert own.calibration_ids == mixture.calibration_ids
    assert own.calibration_labels.tolist() == [
        int(bool(correct(generations[i], references[i]))) for i in own.calibration_ids
    ]
    # No certification document is in either half of the head.
    rows = [
        json.loads(line) for line in (tmp_path / "generations.calibration_generations.jsonl").read_text().splitlines()
    ]
    held = {r["id"] for r in rows if r["split"] == "certification"}
    assert len(held) == CALIBRATE_PRESETS["tiny"]["certification_docs"]
    assert not held & (set(own.calibration_ids) | set(own.support.ids))
    assert all(r["label"] == int(bool(correct(r["generation"], references[r["id"]]))) for r in rows)
    # The mixture's calibration half holds references (label 1); the tiny model's own generations are all wrong.
    assert (
        1 in mixture.calibration_labels.tolist()
        and own.calibration_labels.tolist() != mixture.calibration_labels.tolist()
    )
    with pytest.raises(ValueError, match="calibration_instances"):
        CalibrateConfig(out="x", run="y", calibration_instances="test").validate()


def test_cross_entropy_baseline_runs_on_the_same_encoding(tmp_path):
    result = run(tiny_config(tmp_path / "ce", loss="ce", epochs=1))
    records = [json.loads(line) for line in (tmp_path / "ce" / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == len(records) and all(abs(r["mean_base"] - 2.718281828) < 1e-6 for r in records)
    assert all(r["uniform_bases"] == 0 for r in records), "no SDM layer under CE"
    assert (tmp_path / "ce" / "best" / "model.safetensors").is_file()


def _finetune(out: Path, *extra: str, crash_after_step: int | None = None) -> subprocess.CompletedProcess:
    """``python -m training.finetune`` on the tiny preset, or the same run killed after a checkpoint
    (tests/crashing_finetune.py)."""
    entry = (
        ["-m", "training.finetune"]
        if crash_after_step is None
        else [str(ROOT / "tests" / "crashing_finetune.py"), str(crash_after_step)]
    )
    command = [sys.executable, *entry, "--preset", "tiny", "--output-dir", str(out), "--epochs", "2", *extra]
    return subprocess.run(
        command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("timing", ["step", "epoch"])
def test_resume_after_a_crash_ends_with_the_same_weights(tmp_path, timing):
    # Step 3 is inside epoch 2, where hard negatives are generated (with "epoch" timing, decoded at the epoch start
    # and carried by the checkpoint until drawn).
    straight = _finetune(tmp_path / "straight", "--generation-timing", timing)
    assert straight.returncode == 0, straight.stderr[-2000:]
    crashed = _finetune(tmp_path / "crashed", "--generation-timing", timing, crash_after_step=3)
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    assert not (tmp_path / "crashed" / "final").exists()
    resumed = _finetune(tmp_path / "crashed", "--generation-timing", timing, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no step logged twice after the resume


def test_lora_run_calibrates_into_an_adapter_bundle(tmp_path):
    out = tmp_path / "lora"
    run(tiny_config(out, epochs=1, lora=True, lora_r=4, lora_alpha=8))
    assert (out / "best" / "adapter_config.json").is_file()
    bundle_dir = tmp_path / "bundle"
    calibrate(build(CalibrateConfig, {**CALIBRATE_PRESETS["tiny"], "run": str(out), "out": str(bundle_dir)}))
    info = read_bundle_info(bundle_dir)
    assert info.model["kind"] == "adapter" and info.model["base"] == {"kind": "tiny", "seed": 0}
    bundle = load_bundle(bundle_dir)
    assert not hasattr(bundle.model, "peft_config")  # merged for serving
    text = verification_text(bundle.tokenizer, "x", "<sentence>y</sentence>", info.chat, info.recipe)
    assert bundle.head.predict_scores(
        embed_texts(bundle.model, bundle.tokenizer, [text], info.recipe)
    ).predictions.shape == (1,)


def test_lora_with_trainable_last_layers_adapts_only_the_last_blocks(tmp_path):
    from training.finetune import prepare_model

    model, _ = prepare_model(tiny_config(tmp_path, lora=True, lora_r=4, lora_alpha=8, trainable_last_layers=1))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    n_blocks = len(model.get_base_model().model.layers)
    assert all(f"layers.{n_blocks - 1}." in name for name in trainable), trainable
    with pytest.raises(ValueError, match="trainable_last_layers"):
        prepare_model(tiny_config(tmp_path, lora=True, trainable_last_layers=n_blocks + 1))


def test_bases_from_the_training_forward_equal_the_separate_embedding_pass(tmp_path):
    # With the recipe ending at <verified>, b comes from the training forward's hidden states (no extra pass).
    from training.bases import bases_from_h
    from training.finetune import load_task, prepare_model
    from training.trainer import SDMTrainer

    config = tiny_config(tmp_path, recipe_sequence_end="verified")
    train, cal = load_task(config)
    model, tokenizer = prepare_model(config)
    trainer = SDMTrainer(config, model, tokenizer, train, cal)
    from training.verification_layer import split_flags

    flags = split_flags([r.id for r in train], config.seed, 0)
    trainer.train_layer = trainer._fit_layer(train, flags, {}, "test-layer")
    instances = trainer.sampler.draw(train[:6], "test", generate_ok=False, store={})
    assert {i.label for i in instances} == {0, 1}
    encoded = trainer._encode(instances)
    prefixes = trainer._shared_prefixes(instances, encoded)
    assert prefixes is not None and all(0 < n < len(e.input_ids) for n, e in zip(prefixes, encoded))
    from training.encoding import collate
    from training.verification_layer import embed_instances

    separate = embed_instances(model, tokenizer, instances, trainer.chat, trainer.recipe, 8)
    ids, mask, _ = collate(encoded, trainer.pad_id)
    device = next(model.parameters()).device  # the trainer's accelerator moved the model (a GPU where there is one)
    with torch.no_grad():
        states = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, output_hidden_states=True
        ).hidden_states[-1]
    shared = trainer._prefix_h(states, prefixes)
    assert torch.allclose(shared, separate, rtol=1e-4, atol=1e-5), (shared - separate).abs().max()
    _, _, bases = trainer._loss_sum_shared(encoded, instances, prefixes, flags)
    assert torch.equal(bases, bases_from_h(shared, instances, trainer.train_layer, flags))
    template = SDMTrainer(tiny_config(tmp_path / "t"), model, tokenizer, train, cal)
    assert template._shared_prefixes(instances, encoded) is None  # the template recipe's h is not a prefix


def test_an_unfinetuned_model_is_bundled_by_reference(tmp_path):
    from training.data import WordOrderConfig, build_word_order

    build_word_order(tmp_path / "data", WordOrderConfig(train=8, calibration=12, test=4, quiet=True))
    bundle_dir = tmp_path / "base-bundle"
    calibrate(
        build(
            CalibrateConfig,
            {
                **CALIBRATE_PRESETS["tiny"],
                "model": {"kind": "tiny", "seed": 0},
                "calibration": str(tmp_path / "data" / "calibration.jsonl"),
                "out": str(bundle_dir),
            },
        )
    )
    info = read_bundle_info(bundle_dir)
    assert info.model["kind"] == "base" and not (bundle_dir / "model").exists()
    bundle = load_bundle(bundle_dir)
    text = verification_text(bundle.tokenizer, "x", "<sentence>y</sentence>", info.chat, info.recipe)
    assert bundle.head.predict_scores(
        embed_texts(bundle.model, bundle.tokenizer, [text], info.recipe)
    ).predictions.shape == (1,)


def test_epoch_generation_timing_decodes_the_drawn_documents_once_at_the_epoch_start(tmp_path):
    """With (almost) frozen weights, decoding at the epoch start gives the same hard negatives and losses as decoding
    in each step; every pre-generated prompt is drawn, and none is decoded twice."""
    from training import trainer as trainer_module

    calls: list[int] = []
    original = trainer_module.greedy_generate

    def counting(model, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return original(model, tokenizer, prompts, *args, **kwargs)

    frozen = dict(epochs=1, generate_from_epoch=0, gamma_generate=1.0, learning_rate=1e-12, eval_steps=100)
    trainer_module.greedy_generate = counting
    try:
        per_step = run(tiny_config(tmp_path / "step", **frozen))
        step_calls, calls = list(calls), []
        per_epoch = run(tiny_config(tmp_path / "epoch", generation_timing="epoch", **frozen))
    finally:
        trainer_module.greedy_generate = original
    drawn = [r for r in per_epoch.history if "hard_negatives" in r]
    assert [r["hard_negatives"] for r in drawn] == [
        r["hard_negatives"] for r in per_step.history if "hard_negatives" in r
    ]
    assert drawn[-1]["hard_negatives"] > 0
    assert [r["loss"] for r in per_epoch.history] == pytest.approx([r["loss"] for r in per_step.history], rel=1e-5)
    # The same prompts are decoded in both runs, each once, but the epoch's training draws in one batched call.
    assert sum(calls) == sum(step_calls) and len(calls) == len(step_calls) - per_step.steps + 1
    state = json.loads((tmp_path / "epoch" / "checkpoint" / "checkpoint.json").read_text())["trainer"]
    assert state["pregenerated"] == {}, "every pre-generated prompt was drawn"


def test_bf16_mixed_precision_trains_float32_weights_under_autocast(tmp_path):
    settings = dict(epochs=1, generate_from_epoch=0, gamma_generate=1.0)
    full = run(tiny_config(tmp_path / "fp32", **settings))
    mixed = run(tiny_config(tmp_path / "bf16", mixed_precision="bf16", **settings))
    first_full, first_mixed = full.history[0], mixed.history[0]
    # Same draws and instances; the step-1 loss differs by bfloat16 rounding only (so autocast was on).
    assert first_mixed["loss"] != first_full["loss"]
    assert first_mixed["loss"] == pytest.approx(first_full["loss"], rel=0.02)
    assert all(math.isfinite(r["loss"]) for r in mixed.history) and math.isfinite(mixed.best_eval_loss)
    weights = load_file(str(tmp_path / "bf16" / "final" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values()), "master weights stay float32"
    with pytest.raises(ValueError, match="mixed_precision"):
        tiny_config(tmp_path, mixed_precision="fp16")
    with pytest.raises(ValueError, match="float32 weights"):
        tiny_config(tmp_path, mixed_precision="bf16", dtype="bfloat16")


@pytest.mark.parametrize("module", ["training.finetune", "training.calibrate", "training.evaluate"])
def test_every_training_flag_has_a_help_line(module: str) -> None:
    from sdm_core.settings import options
    from training.evaluate import EvaluateConfig

    cls = {
        "training.finetune": FinetuneConfig,
        "training.calibrate": CalibrateConfig,
        "training.evaluate": EvaluateConfig,
    }[module]
    lines = {option.name: option.help for option in options(cls)}  # options() refuses a field without a help line
    assert all(lines.values()), (
        f"{cls.__name__} settings with an empty --help line: {[n for n, t in lines.items() if not t]}"
    )
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert done.returncode == 0, done.stderr
    text = "".join(done.stdout.split())  # argparse wraps lines, also at hyphens
    assert all("".join(line.split()) in text for line in lines.values()), [
        n for n, t in lines.items() if "".join(t.split()) not in text
    ]


def test_certify_writes_a_new_sealed_bundle_with_a_fresh_certification(sdm_run, tmp_path):
    from training.certify import PRESETS as CERTIFY_PRESETS
    from training.certify import CertifyConfig, certify

    out, _ = sdm_run
    bundle_dir = tmp_path / "bundle"
    calibrate(build(CalibrateConfig, {**CALIBRATE_PRESETS["tiny"], "run": str(out), "out": str(bundle_dir)}))
    before = read_bundle_info(bundle_dir).raw
    settings = {
        **CERTIFY_PRESETS["tiny"],
        "bundle": str(bundle_dir),
        "data": str(out / "data" / "test.jsonl"),
        "max_docs": 6,
    }
    result = certify(build(CertifyConfig, {**settings, "out": str(tmp_path / "recertified")}))
    info = read_bundle_info(tmp_path / "recertified")  # sealed: every checksum verifies
    assert info.certification.documents == result["documents"] == 6
    assert (
        info.certification.source["kind"] == "certify"
        and info.certification.source["recertified_from"] == before["bundle_sha256"]
    )
    assert info.raw["files"] == before["files"], "only bundle.json changes"
    assert read_bundle_info(bundle_dir).raw == before, "the input bundle is left unchanged"
    # Documents the head was calibrated on cannot certify it, and the output must be a new folder.
    with pytest.raises(ValueError, match="never saw"):
        certify(
            build(
                CertifyConfig, {**settings, "data": str(out / "data" / "calibration.jsonl"), "out": str(tmp_path / "x")}
            )
        )
    with pytest.raises(ValueError, match="not empty"):
        certify(build(CertifyConfig, {**settings, "out": str(tmp_path / "recertified")}))
    # r and the decoding limit default to the ones the bundle was calibrated with; another r is refused.
    recorded = read_bundle_info(bundle_dir).provenance
    assert info.provenance["certify_config"]["correctness"] == recorded["correctness"] == "word_order"
    assert info.provenance["certify_config"]["max_new_tokens"] == CALIBRATE_PRESETS["tiny"]["max_new_tokens"]
    with pytest.raises(ValueError, match="calibrated with correctness 'word_order', not 'arithmetic'"):
        certify(build(CertifyConfig, {**settings, "correctness": "arithmetic", "out": str(tmp_path / "y")}))
    assert not (tmp_path / "y").exists()
