"""cl_tasks.staging in-process: safe opens, protected files, temp + rename, path mapping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cl_tasks.runner import JobError
from cl_tasks.staging import JobFiles, Protected


@pytest.fixture
def root(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "album").mkdir(parents=True)
    (data / "album" / "a.png").write_bytes(b"photo a")
    (data / "media_store.db").write_bytes(b"SQLite format 3\0")
    (data / "venvs" / "m").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "a.png").write_bytes(b"secret")
    return data


def job_files(root: Path, roles: dict[str, str] | None = None) -> JobFiles:
    protected = Protected((root / "media_store.db",), (root / "venvs",))
    return JobFiles(root, root.parent / "scratch" / "1", "/job/1", protected, roles or {})


def scratch_of(files: JobFiles, inside: str) -> Path:
    return files.host / inside.removeprefix("/job/1/")


def test_inputs_are_copied_in_and_outputs_placed_with_a_rename(root: Path) -> None:
    files = job_files(root)
    staged = files.stage({"input_paths": ["album/a.png"], "output_paths": ["new/b.png"], "width": 3})
    assert staged["width"] == 3 and staged["input_paths"] == ["/job/1/in/input_paths/0/a.png"]
    assert scratch_of(files, staged["input_paths"][0]).read_bytes() == b"photo a"
    # When the runner writes its output and the worker places it
    scratch_of(files, staged["output_paths"][0]).write_bytes(b"resized")
    files.place_outputs()
    # Then it is in place, with no temporary file left, and the result names it as given
    assert (root / "new" / "b.png").read_bytes() == b"resized"
    assert os.listdir(root / "new") == ["b.png"]
    assert files.for_output({"processed_files": staged["output_paths"]}) == {"processed_files": ["new/b.png"]}
    message = files.for_message(f"input image {staged['input_paths'][0]} is corrupt")
    assert message == f"input image {root / 'album' / 'a.png'} is corrupt"
    files.clean()
    assert not files.host.exists()


def test_a_folder_swapped_for_a_symlink_before_the_output_lands_is_refused(root: Path) -> None:
    files = job_files(root)
    staged = files.stage({"input_paths": ["album/a.png"], "output_paths": ["album/b.png"]})
    scratch_of(files, staged["output_paths"][0]).write_bytes(b"resized")
    # When the output folder is swapped for a symlink to outside during the job
    (root / "album").rename(root / "album.orig")
    (root / "album").symlink_to(root.parent / "outside")
    # Then placing the output fails, and nothing is written outside
    with pytest.raises(JobError, match="is a symlink or not a folder now"):
        files.place_outputs()
    assert sorted(os.listdir(root.parent / "outside")) == ["a.png"]


def test_an_input_swapped_after_the_check_is_not_followed(root: Path) -> None:
    files = job_files(root)
    files._collect({"input_paths": ["album/a.png"]})  # checked: album/a.png is a plain file
    (root / "album" / "a.png").unlink()
    (root / "album" / "a.png").symlink_to(root.parent / "outside" / "a.png")
    os.makedirs(files.host)
    with (
        pytest.raises(JobError, match="became a symlink after it was checked"),
        files._open_root() as root_fd,
    ):
        files._stage_one(root_fd, files._files[0], files._protected.identities())


@pytest.mark.parametrize(
    "path", ["media_store.db", "media_store.db-wal", "album/../media_store.db", "venvs/m/x.png"]
)
def test_protected_outputs_are_refused_before_the_runner_starts(root: Path, path: str) -> None:
    with pytest.raises(JobError, match="jobs may not read or write it"):
        job_files(root).stage({"output_paths": [path]})
    assert (root / "media_store.db").read_bytes() == b"SQLite format 3\0"


def test_appended_outputs_are_added_to_the_end(root: Path) -> None:
    (root / "ledger.txt").write_text("one\n")
    files = job_files(root, {"ledger_path": "append"})
    staged = files.stage({"ledger_path": "ledger.txt"})
    scratch_of(files, staged["ledger_path"]).write_text("two\n")
    files.place_outputs()
    assert (root / "ledger.txt").read_text() == "one\ntwo\n"


def test_a_symlink_as_the_runners_output_is_refused(root: Path) -> None:
    files = job_files(root)
    staged = files.stage({"output_paths": ["b.png"]})
    scratch_of(files, staged["output_paths"][0]).symlink_to(root / "media_store.db")
    with pytest.raises(JobError, match="is a symlink or unreadable"):
        files.place_outputs()
    assert not (root / "b.png").exists()
