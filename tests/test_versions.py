"""trec.serving.versions and `trec publish` over the session's real export: versions published as
byte-identical copies after every checksum is verified, the CURRENT pointer moved and rolled back
atomically, and each bad input refused in one line naming the path."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from training import run_command, trec_command

from trec.errors import TrecError
from trec.serving.bundle import Bundle
from trec.serving.versions import (current_name, current_path, pointer_stamp, publish, set_current,
                                   versions)


@pytest.fixture(scope="module")
def export(serving_export) -> Path:
    return serving_export["export"]  # tests/conftest.py: read only (published files may be hard links to it)


def files_of(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_publish_twice_move_and_roll_back_the_pointer(export, tmp_path):
    root = tmp_path / "models"
    first = publish(export, root)
    second = publish(export, root, make_current=True)
    assert (first.name, second.name) == ("v0001", "v0002")
    assert current_name(root) == "v0002" and current_path(root) == root / "versions" / "v0002"
    stamp = pointer_stamp(root)
    set_current(root, "v0001")  # roll back
    assert current_name(root) == "v0001" and pointer_stamp(root) != stamp
    listed = versions(root)
    assert [(v.name, v.is_current) for v in listed] == [("v0001", True), ("v0002", False)]
    provenance = listed[0].provenance
    bundle_manifest = export / "bundle" / "manifest.json"
    assert provenance["source"] == str(export.resolve())
    assert provenance["bundle_version"] == json.loads(bundle_manifest.read_text())["version"]
    assert provenance["retriever"]["run_dir"] and provenance["ranker"] is not None
    # Every file of the export, byte for byte, plus the provenance; and it loads like an export.
    published = root / "versions" / "v0001"
    assert files_of(published) == sorted([*files_of(export), "published.json"])
    assert all(filecmp.cmp(export / name, published / name, shallow=False) for name in files_of(export))
    assert Bundle.load(current_path(root), verify=True).version == provenance["bundle_version"]


@pytest.mark.parametrize("corrupt", ["bundle/retriever/weights.pt", "index/shard-0.faiss"])
def test_a_corrupted_export_is_refused_before_anything_is_written(export, tmp_path, corrupt):
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    flip_byte(copy / corrupt)
    root = tmp_path / "models"
    with pytest.raises(TrecError, match="checksum mismatch") as error:
        publish(copy, root, make_current=True)
    assert corrupt in str(error.value) and "\n" not in str(error.value)
    assert not (root / "versions").exists() and not (root / "CURRENT").exists()


@pytest.mark.parametrize("name", ["../x", "", "a/b", ".hidden", "x" * 65, "/abs"])
def test_bad_names_are_refused(export, tmp_path, name):
    with pytest.raises(TrecError, match="is not a version name"):
        publish(export, tmp_path / "models", name)
    assert not (tmp_path / "x").exists() and not (tmp_path / "models" / "versions").exists()


def test_an_existing_name_is_refused(export, tmp_path):
    root = tmp_path / "models"
    publish(export, root, "prod-1.a")
    with pytest.raises(TrecError, match=r"prod-1.a' already exists"):
        publish(export, root, "prod-1.a")
    with pytest.raises(TrecError, match="no published version 'nope'"):
        set_current(root, "nope")


def test_a_missing_or_dangling_pointer_is_one_line(export, tmp_path):
    root = tmp_path / "models"
    with pytest.raises(TrecError, match="not a model root"):
        current_name(root)
    publish(export, root, "a")
    with pytest.raises(TrecError, match=r"CURRENT: no current version; run `trec publish EXPORT --model-root"):
        current_path(root)
    assert pointer_stamp(root) is None
    (root / "CURRENT").write_text(json.dumps({"version": "gone", "updated": "now"}))
    with pytest.raises(TrecError, match="names version 'gone', which is not in"):
        current_name(root)
    (root / "CURRENT").write_text("{")
    with pytest.raises(TrecError, match="CURRENT: invalid JSON"):
        current_name(root)
    (root / "CURRENT").unlink()
    (root / "versions" / "a" / "published.json").write_text("{}")  # its own file: written by publish, not linked
    with pytest.raises(TrecError, match="published.json: missing field 'name'"):
        versions(root)


def test_readers_never_see_a_partial_pointer(export, tmp_path):
    root = tmp_path / "models"
    publish(export, root, "a", make_current=True)
    publish(export, root, "b")
    errors, seen, done = [], set(), threading.Event()

    def flip() -> None:
        try:
            for turn in range(200):
                set_current(root, "ab"[turn % 2])
        finally:
            done.set()

    writer = threading.Thread(target=flip)
    writer.start()
    while not done.is_set():
        try:
            seen.add(current_name(root))
        except Exception as error:  # noqa: BLE001 - any error at all fails the test
            errors.append(error)
    writer.join()
    assert not errors and seen <= {"a", "b"}
    assert [p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".publish.lock"] == []


def test_the_cli(export, tmp_path, capsys):
    """In this process through trec.cli.main (each subprocess would import torch again), and one real exit."""
    from trec.cli import main

    root = tmp_path / "models"

    def trec(*args) -> tuple[int, str, str]:
        status = main(["publish", *map(str, args)])
        out, err = capsys.readouterr()
        return status, out, err

    assert trec(export, "--model-root", root)[1].startswith("published v0001 (bundle ")
    out = trec(export, "--model-root", root, "--current")[1].strip()
    assert out.startswith("published v0002 (bundle ") and out.endswith(f" in {root}, current")
    assert trec("--model-root", root, "--set-current", "v0001")[1].startswith("current v0001 (bundle ")
    table = trec("--model-root", root, "--list")[1].splitlines()
    assert table[0].split() == ["name", "bundle", "published"]
    assert [line.split()[:2] for line in table[1:]] == [["*", "v0001"], ["v0002", table[2].split()[1]]]
    for args, message in (((export, "--model-root", root, "--name", "../x"), "'../x' is not a version name"),
                          (("--model-root", tmp_path / "none", "--list"), "not a model root")):
        status, out, err = trec(*args)
        assert status == 2 and out == "", err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    proc = run_command(trec_command(1, "publish", "--model-root", root, "--list", "--set-current", "v1"), check=False)
    assert proc.returncode == 2 and proc.stdout == "" and "exactly one of EXPORT" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert sorted(os.listdir(root / "versions")) == ["v0001", "v0002"]
