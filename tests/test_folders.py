"""sdm_core.folders.atomic_folder: a folder appears whole or not at all, and an existing target is treated as
``if_exists`` says."""

from __future__ import annotations

import pytest

from sdm_core.folders import atomic_folder


def write_marker(text: str):
    def write(tmp):
        (tmp / "marker.txt").write_text(text)

    return write


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_failed_write_leaves_neither_the_target_nor_a_temporary_folder(tmp_path):
    def fail(tmp):
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_folder(tmp_path / "out", fail)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_error_refuses_a_non_empty_target_and_fills_an_empty_one(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty"):
        atomic_folder(target, write_marker("new"))
    assert (target / "old.txt").read_text() == "old" and not (target / "marker.txt").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert atomic_folder(empty, write_marker("new")) == empty
    assert (empty / "marker.txt").read_text() == "new"
    assert leftovers(tmp_path) == []


def test_keep_returns_a_finished_folder_without_building_it_again(tmp_path):
    target = tmp_path / "cache" / "model"
    assert atomic_folder(target, write_marker("first"), if_exists="keep") == target

    def must_not_run(tmp):
        raise AssertionError("a cached folder was built again")

    assert atomic_folder(target, must_not_run, if_exists="keep") == target
    assert (target / "marker.txt").read_text() == "first"


def test_keep_lets_a_concurrent_build_that_finished_first_stand(tmp_path):
    target = tmp_path / "model"

    def raced(tmp):
        (tmp / "marker.txt").write_text("loser")
        target.mkdir()
        (target / "marker.txt").write_text("winner")

    assert atomic_folder(target, raced, if_exists="keep") == target
    assert (target / "marker.txt").read_text() == "winner"
    assert leftovers(tmp_path) == []


def test_replace_swaps_the_new_folder_in_and_removes_the_old_one(tmp_path):
    target = tmp_path / "checkpoint"
    atomic_folder(target, write_marker("step 1"), if_exists="replace")
    atomic_folder(target, write_marker("step 2"), if_exists="replace")
    assert (target / "marker.txt").read_text() == "step 2"
    assert leftovers(tmp_path) == []


def test_an_unknown_if_exists_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match="'error', 'keep' or 'replace'"):
        atomic_folder(tmp_path / "x", write_marker(""), if_exists="overwrite")
