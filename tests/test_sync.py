"""Sync planning on synthetic file lists: no image, no model, no database; the disk is a dict."""

import os
from pathlib import Path

import pytest

from btsearch.indexers.stored_files import StoredFiles, resolve_path
from btsearch.ingest.sync import FoundFiles, find_files, plan_sync


class FakeDisk:
    """Files as {path: (size, mtime, content hash)}; `stat` and `hash_file` read it, and count the hashing."""

    def __init__(self, files):
        self.files = files
        self.hashed = []

    def stat(self, path):
        if path not in self.files:
            raise FileNotFoundError(2, "No such file or directory", path)
        size, mtime, _ = self.files[path]
        return _Stat(size, mtime)

    def hash_file(self, path):
        self.hashed.append(path)
        content = self.files[path][2]
        if content is None:
            raise PermissionError(13, "Permission denied", path)
        return content


class _Stat:
    def __init__(self, size, mtime):
        self.st_size, self.st_mtime = size, mtime


def stored(rows):
    """StoredFiles from (id, path, size, mtime, hash) tuples."""
    if not rows:
        return StoredFiles.from_rows([], [], [], [], [])
    ids, paths, sizes, mtimes, hashes = zip(*rows)
    return StoredFiles.from_rows(ids, paths, sizes, mtimes, hashes)


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    return resolve_path(folder)


def plan(root, disk, rows, keep_missing=False, roots=None):
    return plan_sync(
        FoundFiles(sorted(disk.files)), stored(rows), roots or [root], keep_missing, stat=disk.stat, hash_file=disk.hash_file
    )


def test_new_unchanged_touched_and_changed_files(root):
    a, b, c, d = (f"{root}/{name}.jpg" for name in "abcd")
    disk = FakeDisk({a: (10, 1.0, "ha"), b: (20, 5.0, "hb"), c: (30, 9.0, "new-c"), d: (40, 1.0, "hd")})
    rows = [(0, a, 10, 1.0, "ha"), (1, b, 20, 2.0, "hb"), (2, c, 30, 3.0, "hc")]
    result = plan(root, disk, rows)
    assert result.todo == [c, d]  # c changed (its hash differs), d is new
    assert result.replaced == [2] and result.replaced_paths == {c}
    assert result.touched == [(1, {"size": 20, "mtime": 5.0})]  # b: new mtime, same content
    assert result.unchanged == 2  # a by its facts, b by its hash
    assert result.removed == [] and result.moved == 0 and result.skipped == []
    assert sorted(disk.hashed) == [b, c]  # a is judged by size and mtime alone; d has no row to compare


def test_gone_files_are_removed_only_under_the_roots(root, tmp_path):
    kept, gone = f"{root}/kept.jpg", f"{root}/sub/gone.jpg"
    elsewhere = resolve_path(tmp_path) + "/photos2/x.jpg"  # a sibling folder whose name starts like the root's
    disk = FakeDisk({kept: (1, 1.0, "k")})
    rows = [(0, kept, 1, 1.0, "k"), (1, gone, 2, 1.0, "g"), (2, elsewhere, 3, 1.0, "e")]
    assert plan(root, disk, rows).removed == [1]
    assert plan(root, disk, rows, keep_missing=True).removed == []


def test_a_moved_file_keeps_its_row(root):
    old, new = f"{root}/2023/beach.jpg", f"{root}/2024/beach.jpg"
    disk = FakeDisk({new: (500, 7.0, "same")})
    result = plan(root, disk, [(4, old, 500, 1.0, "same")])
    assert result.touched == [(4, {"size": 500, "mtime": 7.0, "path": new})]
    assert result.moved == 1 and result.todo == [] and result.removed == []


def test_a_new_file_of_a_gone_files_size_but_other_content_is_new(root):
    old, new = f"{root}/old.jpg", f"{root}/new.jpg"
    disk = FakeDisk({new: (500, 7.0, "other")})
    result = plan(root, disk, [(4, old, 500, 1.0, "same")])
    assert result.todo == [new] and result.removed == [4] and result.moved == 0


def test_rows_without_a_hash_are_never_taken_for_moved_files(root):
    old, new = f"{root}/old.jpg", f"{root}/new.jpg"
    disk = FakeDisk({new: (500, 7.0, "h")})
    result = plan(root, disk, [(4, old, 500, 1.0, None)])
    assert result.todo == [new] and result.removed == [4] and disk.hashed == []


def test_one_gone_row_follows_at_most_one_new_file(root):
    old, copy1, copy2 = f"{root}/old.jpg", f"{root}/copy1.jpg", f"{root}/copy2.jpg"
    disk = FakeDisk({copy1: (5, 2.0, "x"), copy2: (5, 3.0, "x")})
    result = plan(root, disk, [(9, old, 5, 1.0, "x")])
    assert [item for item, _ in result.touched] == [9] and result.moved == 1
    assert len(result.todo) == 1 and result.removed == []


def test_files_that_cannot_be_read_are_skipped_with_the_reason(root):
    vanished, locked, fine = f"{root}/vanished.jpg", f"{root}/locked.jpg", f"{root}/fine.jpg"
    disk = FakeDisk({locked: (3, 2.0, None), fine: (4, 1.0, "f")})
    found = FoundFiles([fine, locked, vanished])  # `vanished` was listed, then deleted before planning
    result = plan_sync(found, stored([(0, locked, 3, 1.0, "old")]), [root], stat=disk.stat, hash_file=disk.hash_file)
    reasons = {str(item.path): item.reason for item in result.skipped}
    assert reasons == {vanished: "No such file or directory", locked: "Permission denied"}
    assert result.todo == [fine] and result.removed == []  # an unreadable file's row stays


def test_find_files_skips_names_that_cannot_be_stored(tmp_path):
    (tmp_path / "good.jpg").write_bytes(b"x")
    bad = os.fsencode(tmp_path) + b"/bad-\xff.jpg"
    with open(bad, "wb") as f:
        f.write(b"x")
    (tmp_path / "notes.txt").write_text("not an image")
    found = find_files([tmp_path])
    assert found.paths == [resolve_path(tmp_path / "good.jpg")]
    assert [item.reason for item in found.skipped] == ["the file name is not valid UTF-8"]
    assert os.fsencode(found.skipped[0].path) == bad


def test_resolve_path_follows_links_and_keeps_dangling_ones(tmp_path):
    target = tmp_path / "target.jpg"
    target.write_bytes(b"x")
    (tmp_path / "link.jpg").symlink_to(target)
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    assert resolve_path(tmp_path / "link.jpg") == str(target.resolve())
    assert resolve_path(tmp_path / "dangling.jpg") == str(Path(resolve_path(tmp_path)) / "dangling.jpg")
