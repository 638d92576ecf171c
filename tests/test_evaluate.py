"""training.evaluate end to end on tiny bundles built here (a tiny random Llama and small SDM heads)."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from sdm_core import SDMConfig
from sdm_core.estimator import SDMEstimator
from sdm_core.lm.bundle import seal_bundle, write_bundle
from sdm_core.lm.embedding import ChatFormat, HiddenStateRecipe, embed_texts, verification_text
from training import evaluate as ev
from training.records import Record, write_records
from training.surface_metrics import aggregate_surface
from training.word_order import make_record

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Neat plans fail without a little luck.",
    "A small boat drifted slowly across the calm lake.",
    "She opened the old door and stepped into the garden.",
    "Rain fell softly on the roof all night long.",
    "The children laughed while the band played loud music.",
    "He wrote a short letter to his oldest friend.",
    "Bright stars filled the sky above the quiet town.",
    "Fresh bread smells wonderful early in the morning.",
    "The river carved a deep canyon through the soft rock.",
    "Our team finished the long project before the deadline.",
    "Cold wind swept across the empty field at dusk.",
]
CHAT = ChatFormat()
RECIPE = HiddenStateRecipe(max_length=256)


def _records(prefix: str, sentences) -> list[Record]:
    rng = random.Random(prefix)
    out = []
    for i, sentence in enumerate(sentences):
        record = make_record(sentence, rng, record_id=f"{prefix}-{i}", source=prefix, tag_drop_prob=0.0)
        assert record is not None
        out.append(record)
    return out


def _head(x: torch.Tensor, y: torch.Tensor, seed: int) -> SDMEstimator:
    flags = torch.arange(x.shape[0]) % 2 == 0
    config = SDMConfig(epochs=2, exemplar_dim=16, progress=False, seed=seed, class_names=("No", "Yes"))
    return SDMEstimator(config).fit(x[flags], y[flags], x[~flags], y[~flags], num_classes=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, tiny_tokenizer):
    root = tmp_path_factory.mktemp("evaluate")
    wiki, harvard = _records("wiki", SENTENCES[:6]), _records("harvard", SENTENCES[6:])
    write_records(root / "wiki.jsonl", wiki)
    write_records(root / "harvard.jsonl", harvard)

    # Head "sdm": fitted on the tiny model's own embeddings of positives (Yes) and negatives (No).
    pool = wiki + harvard
    texts = [verification_text(tiny_tokenizer, r.prompt, r.positive, CHAT, RECIPE) for r in pool]
    texts += [verification_text(tiny_tokenizer, r.prompt, r.negative, CHAT, RECIPE) for r in pool]
    x = embed_texts(tiny_model, tiny_tokenizer, texts, RECIPE, batch_size=8)
    y = torch.tensor([1] * len(pool) + [0] * len(pool))
    dim = 2 * tiny_model.config.hidden_size
    assert x.shape == (2 * len(pool), dim)
    heads = {"sdm": _head(x, y, 0)}
    # Head "ce": random embeddings of the right dimension.
    gen = torch.Generator().manual_seed(1)
    heads["ce"] = _head(torch.randn(40, dim, generator=gen), torch.arange(40) % 2, 1)
    for name, head in heads.items():
        write_bundle(
            root / f"bundle_{name}", model=tiny_model, tokenizer=tiny_tokenizer, head=head, chat=CHAT, recipe=RECIPE
        )

    # A random tiny model never writes a correct answer; replace every other generation by the record's positive
    # (after running the real decoder) so that both labels, the surface metrics and the own-tag counts are exercised.
    positives = {r.prompt: r.positive for r in pool}
    import training.generation as generation

    real = generation.greedy_generate

    def half_correct(model, tokenizer, prompts, *args, **kwargs):
        out = real(model, tokenizer, prompts, *args, **kwargs)
        return [positives[p] if i % 2 == 0 else text for i, (p, text) in enumerate(zip(prompts, out))]

    config = ev.EvaluateConfig(
        bundles=(f"sdm={root / 'bundle_sdm'}", f"ce={root / 'bundle_ce'}"),
        data=(f"wiki={root / 'wiki.jsonl'}", f"harvard={root / 'harvard.jsonl'}"),
        out=str(root / "out"),
        max_new_tokens=6,
        generate_batch_size=4,
        embed_batch_size=4,
        progress=False,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generation, "greedy_generate", half_correct)
        metrics = ev.evaluate(config)
    return {"root": root, "out": root / "out", "metrics": metrics, "n": {"wiki": len(wiki), "harvard": len(harvard)}}


def test_metrics_json(setup):
    out = setup["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["bundles"]) == ["sdm", "ce"]
    assert list(metrics["datasets"]) == ["wiki", "harvard"]
    for bundle in ("sdm", "ce"):
        info = metrics["bundles"][bundle]
        assert info["alpha"] == 0.95 and 0.95 in info["ladder"]
        for dataset, n in setup["n"].items():
            r = metrics["results"][bundle][dataset]
            assert r["n"] == n == metrics["datasets"][dataset]["n"]
            for key in ("sentence_acc", "exact_match_acc", "generation_acc", "ood_proportion", "word_acc_mean"):
                assert 0.0 <= r[key] <= 1.0, key
            # Half the generations are the positive: correct under every measure.
            expected = (n + 1) // 2
            assert r["generation_correct"] == r["exact_match"] == r["sentence_correct"] == expected
            assert r["sentence_acc"] == pytest.approx(expected / n)
            assert 0 <= r["no_response"] <= n - expected
            own = r["own_tag_vs_sentence"]
            assert own["tp"] >= expected and sum(own.values()) == n - r["no_response"]
            hr = r["sdm_hr"]
            assert 0.0 <= hr["admitted_proportion"] <= 1.0
            assert hr["admitted"] == round(hr["admitted_proportion"] * n)
            assert hr["accuracy"] is None if hr["admitted"] == 0 else 0.0 <= hr["accuracy"] <= 1.0
            assert hr["admitted"] + sum(r["abstention_reasons"].values()) == n
            assert set(r["abstention_reasons"]) <= {"ood", "no_region", "low_similarity", "below_threshold"}
            report = r["report"]
            assert report["n"] == n and report["class_names"] == ["No", "Yes"]
            assert report["class_counts"] == [n - expected, expected]
            assert [row["alpha"] for row in report["alphas"]] == info["ladder"]
            for row in report["alphas"]:
                for est in ("HR", "HR_lower"):
                    assert 0.0 <= row[est]["marginal"]["proportion"] <= 1.0
            assert report["no_reject"]["marginal"]["proportion"] == 1.0
            # Every alternative is reported at every alpha of the ladder, SDM_HR's verified answers agree with
            # Table 4's predicted-Yes cell, and each score has an AUROC (both labels occur).
            methods = r["methods"]
            assert set(methods) == {"lm_tag", "lm_probability", "softmax", "sdm", "sdm_hr", "sdm_hr_lower"}
            assert all([row["alpha"] for row in rows] == info["ladder"] for rows in methods.values())
            for row, hr_row in zip(methods["sdm_hr"], report["alphas"]):
                assert row["verified"]["admitted"] == hr_row["HR"]["prediction_conditional"][1]["admitted"]
            assert all(0.0 <= value <= 1.0 for value in r["auroc"].values())


def test_predictions_files(setup):
    out = setup["out"]
    metrics = setup["metrics"]
    for bundle in ("sdm", "ce"):
        for dataset, n in setup["n"].items():
            rows = [
                json.loads(line) for line in (out / f"predictions_{bundle}_{dataset}.jsonl").read_text().splitlines()
            ]
            assert len(rows) == n
            for row in rows:
                assert {
                    "id",
                    "generation",
                    "label",
                    "prediction",
                    "probability",
                    "q",
                    "q_prime",
                    "d",
                    "admitted",
                    "abstention_reason",
                    "region_alpha",
                } <= set(row)
                assert row["label"] in (0, 1) and row["prediction"] in (0, 1)
                assert 0.0 <= row["probability"] <= 1.0 and row["q_prime"] >= 0.0 and 0.0 <= row["d"] <= 1.0
                assert (row["abstention_reason"] is None) == row["admitted"]
            r = metrics["results"][bundle][dataset]
            assert sum(row["admitted"] for row in rows) == r["sdm_hr"]["admitted"]
            assert sum(row["label"] for row in rows) == r["generation_correct"]
            assert [row["id"] for row in rows] == [f"{dataset}-{i}" for i in range(n)]


def test_report_and_plots(setup):
    out = setup["out"]
    text = (out / "report.md").read_text()
    for heading in (
        "## Table 2",
        "## Table 3",
        "## Table 4",
        "## Held-out validity of SDM_HR",
        "## AUROC",
        "## Methods side by side",
    ):
        assert heading in text
    # These bundles predate certification, and the report says so.
    assert "- sdm: no certification recorded" in text
    # Both bundles side by side in one Table 2 / Table 3, and one Table 4 per bundle x dataset.
    assert "| Dataset | sdm (α=0.95) | ce (α=0.95) |" in text
    assert "| Dataset | sdm | ce |" in text
    for bundle in ("sdm", "ce"):
        for dataset in ("wiki", "harvard"):
            assert text.count(f"### {bundle} on {dataset}") == 2  # Table 4 and the methods table
    assert text.count("| NO-REJECT |") == 4
    assert text.count("| SDM_HR | 0.95 |") == 4
    pngs = [f"admitted_vs_alpha_{d}.png" for d in ("wiki", "harvard")] + [
        f"risk_coverage_{d}.png" for d in ("wiki", "harvard")
    ]
    pngs += [f"q_prime_by_correctness_{b}_{d}.png" for b in ("sdm", "ce") for d in ("wiki", "harvard")]
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 1000


def test_surface_metrics():
    record = _records("unit", SENTENCES[:1])[0]
    reference = record.reference
    exact = ev.surface_metrics(record.positive + "\n", record)
    assert exact == {
        "sentence_correct": True,
        "exact_match": True,
        "no_response": False,
        "word_acc": 1.0,
        "own_tag": "Yes",
    }
    # The sentence without a paired verified tag still counts for sentence accuracy, but not for exact match.
    spaced = ev.surface_metrics(f"<sentence> {'  '.join(reference.split())} </sentence> trailing", record)
    assert spaced["sentence_correct"] and not spaced["exact_match"] and spaced["own_tag"] is None
    words = reference.split()
    swapped = " ".join(words[:-2] + [words[-1], words[-2]])
    wrong = ev.surface_metrics(f"<sentence>{swapped}</sentence>\n<verified>No</verified>", record)
    assert not wrong["sentence_correct"] and wrong["own_tag"] == "No"
    assert wrong["word_acc"] == pytest.approx((len(words) - 2) / len(words))
    empty = ev.surface_metrics("I cannot do that.", record)
    assert empty["no_response"] and empty["word_acc"] == 0.0
    agg = aggregate_surface([exact, spaced, wrong, empty])
    assert agg["sentence_correct"] == 2 and agg["exact_match"] == 1 and agg["no_response"] == 1
    assert agg["own_tag_vs_sentence"] == {"tp": 1, "fp": 0, "fn": 0, "tn": 1, "missing": 1}


@pytest.mark.parametrize("spec", ["=path", "name=", "bad name=path", "a/b=path", "-x=path"])
def test_bad_named_path_rejected(spec):
    with pytest.raises(ValueError, match="bad bundle entry"):
        ev.parse_named_paths([spec], "bundle")


def test_named_paths():
    got = ev.parse_named_paths(["/x/bundle_a", "b=/y/z"], "bundle")
    assert {k: str(v) for k, v in got.items()} == {"bundle_a": "/x/bundle_a", "b": "/y/z"}
    assert list(ev.parse_named_paths(["/d/test.jsonl"], "data")) == ["test"]
    with pytest.raises(ValueError, match="duplicate"):
        ev.parse_named_paths(["a=/x", "a=/y"], "data")


def test_config_errors(setup, tmp_path):
    root = setup["root"]
    data = (f"wiki={root / 'wiki.jsonl'}",)
    with pytest.raises(ValueError, match="not an sdm-lm bundle"):
        ev.evaluate(ev.EvaluateConfig(bundles=(f"x={tmp_path / 'missing'}",), data=data, out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="does not exist"):
        ev.evaluate(
            ev.EvaluateConfig(
                bundles=(str(root / "bundle_sdm"),), data=(f"w={tmp_path / 'none.jsonl'}",), out=str(tmp_path / "o")
            )
        )
    with pytest.raises(ValueError, match="--bundles is required"):
        ev.EvaluateConfig(data=data, out="o").validate()
    with pytest.raises(ValueError, match="unknown correctness"):
        ev.EvaluateConfig(bundles=(str(root / "bundle_sdm"),), data=data, out="o", correctness="nope").validate()
    with pytest.raises(ValueError, match="not on the calibrated ladder"):
        ev.evaluate(
            ev.EvaluateConfig(
                bundles=(str(root / "bundle_sdm"),),
                data=data,
                out=str(tmp_path / "o"),
                alpha=0.951,
                progress=False,
                max_new_tokens=2,
            )
        )
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_answers_are_labelled_by_the_correctness_function_the_bundles_were_calibrated_with(setup, tmp_path):
    root = setup["root"]
    # Bundles that record no r were calibrated by word ordering (the default), and the report says which r it used.
    assert setup["metrics"]["config"]["correctness"] == "word_order"
    shutil.copytree(root / "bundle_ce", tmp_path / "arith")
    seal_bundle(tmp_path / "arith", {"provenance": {"correctness": "arithmetic"}})
    data = (f"wiki={root / 'wiki.jsonl'}",)
    word_order = f"sdm={root / 'bundle_sdm'}"
    mixed = ev.EvaluateConfig(bundles=(word_order, f"a={tmp_path / 'arith'}"), data=data, out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="differs from what these bundles were calibrated with"):
        ev.evaluate(mixed)
    asked = ev.EvaluateConfig(bundles=(word_order,), data=data, out=str(tmp_path / "o"), correctness="arithmetic")
    with pytest.raises(ValueError, match=r"\{'sdm': 'word_order'\}"):
        ev.evaluate(asked)
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_main_cli(setup, tmp_path, capsys, monkeypatch):
    root = setup["root"]
    monkeypatch.setenv("SDM_EVALUATE_MAX_NEW_TOKENS", "4")
    code = ev.main(
        [
            "--preset",
            "tiny",
            "--bundles",
            str(root / "bundle_ce"),
            "--data",
            f"h={root / 'harvard.jsonl'}",
            "--max-docs",
            "2",
            "--alpha",
            "0.9",
            "--out",
            str(tmp_path / "cli"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    result = summary["results"]["bundle_ce"]["h"]
    assert result["n"] == 2 and result["alpha"] == 0.9
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert metrics["config"]["max_new_tokens"] == 4 and metrics["config"]["alpha"] == 0.9
    assert (tmp_path / "cli" / "report.md").is_file()

    code = ev.main(
        ["--bundles", "bad name=/x", "--data", f"h={root / 'harvard.jsonl'}", "--out", str(tmp_path / "bad")]
    )
    assert code == 2
    assert capsys.readouterr().err.startswith("error: bad bundle entry")


def test_device_names_are_checked_before_anything_is_loaded():
    from sdm_core.lm.models import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")
