"""``python -m training.update`` (labelled traffic into a new sealed bundle) and ``python -m training.seal`` (a bundle
edited by hand), from stores on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from pg_support import PostgresServer
from test_server_support import TinyBundle, tiny_bundle  # noqa: F401

from sdm_core.artifact import ArtifactError, sha256_file
from sdm_core.estimator import SDMEstimator
from sdm_core.lm.bundle import read_bundle_info, seal_bundle
from sdm_core.traffic import Feedback, TrafficRecord, TrafficStore, sqlite_url
from training.seal import main as seal_main
from training.update import UpdateConfig, UpdateError, split_role, update_bundle
from training.update import main as update_main


@pytest.fixture(scope="module")
def postgres():
    with PostgresServer() as pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        url = sqlite_url(tmp_path / "traffic.sqlite3")
    else:
        url = request.getfixturevalue("postgres").url
    store = TrafficStore(url)
    store.migrate()
    with store.engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM sdm_verifications")
    store.close()
    return url


def head_of(path) -> SDMEstimator:
    info = read_bundle_info(path)
    return SDMEstimator.load(info.path / info.head["path"])


def fill(url: str, dim: int, labels: list[str], *, width: int | None = None, start: int = 0) -> list[str]:
    """Rows with random head inputs, labelled in order (one second apart)."""
    rng = np.random.default_rng(start)
    store = TrafficStore(url)
    ids = []
    for n, label in enumerate(labels):
        h, d = TrafficRecord.encode_h(rng.normal(size=width or dim).astype(np.float32))
        identifier = f"gen-{start + n:05d}"
        store.insert(
            [
                TrafficRecord(
                    id=identifier,
                    created_at=1000.0 + n,
                    bundle="/b",
                    bundle_sha256="s",
                    head_version="v1",
                    route="/generate",
                    alpha=0.8,
                    admitted=True,
                    prediction=1,
                    probability=0.9,
                    q=3,
                    q_prime=2.0,
                    d=0.5,
                    abstention_reason=None,
                    h=h,
                    h_dim=d,
                )
            ]
        )
        store.set_feedback([Feedback(identifier, label)], at=2000.0 + start + n)
        ids.append(identifier)
    store.close()
    return ids


def test_the_split_is_deterministic_and_follows_the_fraction() -> None:
    roles = [split_role(f"gen-{i}", "wrong", 0.3, seed=7) for i in range(4000)]
    assert roles == [split_role(f"gen-{i}", "wrong", 0.3, seed=7) for i in range(4000)]
    assert 0.27 < roles.count("calibration") / 4000 < 0.33
    assert roles != [split_role(f"gen-{i}", "wrong", 0.3, seed=8) for i in range(4000)]
    assert split_role("gen-1", "ood", 0.99, seed=0) == "ood"
    assert {split_role(f"gen-{i}", "correct", 0.0, seed=0) for i in range(100)} == {"support"}


def test_update_adds_support_and_calibration_and_seals_a_new_bundle(
    tiny_bundle: TinyBundle, store_url, tmp_path
) -> None:
    source = tmp_path / "b1"
    shutil.copytree(tiny_bundle.path, source)
    before = read_bundle_info(source)
    old = head_of(source)
    source_digests = {rel: sha256_file(source / rel) for rel in before.raw["files"]}
    labels = ["correct", "wrong"] * 10 + ["ood"] * 3
    ids = fill(store_url, old.input_dim, labels)
    out = tmp_path / "b2"
    assert (
        update_main(
            [
                "--bundle",
                str(source),
                "--store",
                store_url,
                "--out",
                str(out),
                "--calibration-fraction",
                "0.5",
                "--seed",
                "3",
            ]
        )
        == 0
    )

    info = read_bundle_info(out)  # sealed: every checksum verifies
    new = head_of(out)
    roles = {i: split_role(i, lab, 0.5, 3) for i, lab in zip(ids, labels)}
    n_cal = sum(r == "calibration" for r in roles.values())
    assert 0 < n_cal < 20
    assert len(new.support) == len(old.support) + len(ids) - n_cal
    assert len(new.calibration_ids) == len(old.calibration_ids) + n_cal
    assert new.calibration.probabilities.shape[0] == len(new.calibration_ids) == new.calibration_labels.shape[0]
    # wrong -> class 0, correct -> class 1 (the bundle's positive class), ood -> the OOD label
    by_id = dict(zip(new.support.ids, new.support.labels.tolist()))
    for identifier, label in zip(ids, labels):
        if roles[identifier] != "calibration":
            assert by_id[identifier] == {"correct": 1, "wrong": 0, "ood": -1}[label]
    cal_labels = dict(zip(new.calibration_ids, new.calibration_labels.tolist()))
    assert all(
        cal_labels[i] == {"correct": 1, "wrong": 0}[lab] for i, lab in zip(ids, labels) if roles[i] == "calibration"
    )
    assert list(new.ladder.alphas) == list(old.ladder.alphas) and new.ladder.default_alpha == old.ladder.default_alpha
    # the regions were refit over the larger calibration set
    assert new.ladder.regions[new.ladder.default_alpha].calibration_size == len(new.calibration_ids)

    head_manifest = f"{info.head['path']}/manifest.json"
    assert info.raw["files"][head_manifest] != before.raw["files"][head_manifest]  # a new head version
    update = info.provenance["updates"][-1]
    assert update["rows"] == len(ids) and update["ood_added"] == 3 and update["calibration_added"] == n_cal
    assert update["labels"] == {"correct": 10, "wrong": 10, "ood": 3}
    assert (
        update["labelled_from"] == "1970-01-01T00:33:20+00:00" and update["labelled_to"] == "1970-01-01T00:33:42+00:00"
    )
    assert update["store"].split("://")[0] in ("sqlite", "postgresql+psycopg") and "from_head_version" in update
    listed = json.loads((out / "feedback_rows.json").read_text())["rows"]
    assert [r["id"] for r in listed] == ids and {r["id"]: r["role"] for r in listed} == roles
    assert new.metadata["updates"][-1]["rows"] == len(ids)
    # the source bundle is untouched (its model files are hard links of the new bundle's, never written)
    assert {rel: sha256_file(source / rel) for rel in before.raw["files"]} == source_digests
    read_bundle_info(source)

    # A second update from the same store has nothing new to add.
    with pytest.raises(UpdateError, match="no usable labelled rows"):
        update_bundle(UpdateConfig(bundle=str(out), store=store_url, out=str(tmp_path / "b3")))


def test_update_skips_rows_of_another_width_and_refuses_an_empty_store(
    tiny_bundle: TinyBundle, store_url, tmp_path, capsys
) -> None:
    dim = head_of(tiny_bundle.path).input_dim
    fill(store_url, dim, ["wrong"], width=dim + 1)
    assert update_main(["--bundle", str(tiny_bundle.path), "--store", store_url, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no usable labelled rows" in err and "'wrong_width': 1" in err
    assert not (tmp_path / "x").exists()


def test_update_names_an_unreachable_store(tiny_bundle: TinyBundle, tmp_path, capsys) -> None:
    code = update_main(
        [
            "--bundle",
            str(tiny_bundle.path),
            "--store",
            "postgresql+psycopg://sdm:pw@127.0.0.1:1/none",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot read the traffic store postgresql+psycopg://sdm:***@127.0.0.1:1/none" in err and "pw" not in err


def test_a_certified_bundle_is_recertified_on_held_out_rows(tiny_bundle: TinyBundle, tmp_path) -> None:
    from sdm_core.certification import Certification, certify_ladder

    source = tmp_path / "b1"
    shutil.copytree(tiny_bundle.path, source)
    head = head_of(source)
    x = torch.randn(40, head.input_dim)
    s = head.predict_scores(x)
    old, _ = certify_ladder(
        head.ladder,
        s.probabilities,
        s.predictions,
        s.q_prime,
        torch.ones(40, dtype=torch.bool),
        min_admitted=2,
        source={"kind": "test"},
    )
    seal_bundle(source, {"certification": old.to_dict()})
    url = sqlite_url(tmp_path / "t.sqlite3")
    TrafficStore(url).migrate()
    labels = ["correct", "wrong"] * 20
    ids = fill(url, head.input_dim, labels)
    result = update_bundle(
        UpdateConfig(
            bundle=str(source),
            store=url,
            out=str(tmp_path / "b2"),
            calibration_fraction=0.0,
            certification_fraction=0.5,
            seed=1,
        )
    )
    held = [i for i, lab in zip(ids, labels) if split_role(i, lab, 0.0, 1, 0.5) == "certification"]
    assert 0 < result.certification_rows == len(held) < len(ids) and result.support_added == len(ids) - len(held)
    info = read_bundle_info(result.out)
    new = Certification.from_dict(info.raw["certification"])
    assert new.source["kind"] == "update" and new.documents == len(held)
    assert (new.policy, new.min_admitted) == (old.policy, old.min_admitted)  # the old certification's rules
    assert info.provenance["previous_certification"] == old.to_dict()
    assert result.certified == list(new.certified) and result.head_version != result.previous_head_version
    assert not (set(held) & set(head_of(result.out).support.ids))  # held-out rows never join the head

    # Nothing held out: the new head has no certification (the old one does not hold for it).
    result = update_bundle(
        UpdateConfig(bundle=str(source), store=url, out=str(tmp_path / "b3"), certification_fraction=0.0)
    )
    assert read_bundle_info(result.out).raw["certification"] is None and result.certified is None


def test_seal_makes_a_hand_edited_bundle_loadable(tiny_bundle: TinyBundle, tmp_path, capsys) -> None:
    from sdm_core.cli import main as sdm_main

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, bundle)
    head = head_of(bundle)
    x = torch.randn(2, head.input_dim)
    np.save(tmp_path / "x.npy", x.numpy())
    (tmp_path / "labels.jsonl").write_text('{"id": "hand-1", "label": "ood"}\n{"id": "hand-2", "label": 0}\n')
    assert (
        sdm_main(
            [
                "add-exemplars",
                "--artifact",
                str(bundle / "head"),
                "--embeddings",
                str(tmp_path / "x.npy"),
                "--labels",
                str(tmp_path / "labels.jsonl"),
            ]
        )
        == 0
    )
    with pytest.raises(ArtifactError, match="modified or corrupted; rebuild the bundle"):
        read_bundle_info(bundle)
    before = json.loads((bundle / "bundle.json").read_text())
    capsys.readouterr()
    assert seal_main(["--bundle", str(bundle), "--note", "two exemplars by hand"]) == 0
    out = json.loads(capsys.readouterr().out)
    info = read_bundle_info(bundle)
    assert out["n_support"] == len(head.support) + 2 == info.head["n_support"]
    assert (
        out["head_version"]
        == info.raw["files"]["head/manifest.json"][:16]
        != before["files"]["head/manifest.json"][:16]
    )
    assert info.provenance["seals"][-1]["note"] == "two exemplars by hand"
    assert seal_main(["--bundle", str(tmp_path / "nothing")]) == 2
