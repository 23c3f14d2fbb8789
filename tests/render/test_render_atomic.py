import os
import stat

import numpy as np
import pytest
from PIL import Image

from vitlens.errors import OutputError
from vitlens.render import save_png_atomic, write_text_atomic


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


def test_save_png_atomic_writes_png_and_creates_dirs(tmp_path):
    img = Image.fromarray(np.arange(60, dtype=np.uint8).reshape(4, 5, 3))
    path = save_png_atomic(img, tmp_path / "a" / "b" / "out.png")
    assert path == tmp_path / "a" / "b" / "out.png"
    with Image.open(path) as back:
        assert back.format == "PNG"
        np.testing.assert_array_equal(np.asarray(back), np.asarray(img))
    assert _leftovers(path.parent) == []


def test_overwrite_leaves_no_temp_files(tmp_path):
    for color in (0, 128, 255):
        save_png_atomic(Image.new("RGB", (3, 3), (color,) * 3), tmp_path / "x.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    with Image.open(tmp_path / "x.png") as back:
        assert back.getpixel((0, 0)) == (255, 255, 255)


def test_permissions_follow_umask_not_tempfile_default(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_png_atomic(Image.new("RGB", (2, 2)), tmp_path / "p.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_directory_under_a_regular_file_is_a_one_line_output_error(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(OutputError) as info:
        save_png_atomic(Image.new("RGB", (2, 2)), tmp_path / "afile" / "x.png")
    msg = str(info.value)
    assert "\n" not in msg and "afile" in msg


def test_failed_replace_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = save_png_atomic(Image.new("RGB", (2, 2), (1, 2, 3)), tmp_path / "keep.png")
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OutputError, match="No space left on device"):
        save_png_atomic(Image.new("RGB", (2, 2), (9, 9, 9)), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.png"]


def test_exception_inside_writer_removes_temp(tmp_path):
    class Exploding:
        def save(self, *args, **kwargs):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_png_atomic(Exploding(), tmp_path / "never.png")
    assert list(tmp_path.iterdir()) == []


def test_write_text_atomic_round_trip(tmp_path):
    path = write_text_atomic(tmp_path / "r.html", "héllo <b>")
    assert path.read_text(encoding="utf-8") == "héllo <b>"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("durable", [True, False])
def test_durable_writes_are_flushed_before_the_rename(tmp_path, monkeypatch, durable):
    events = []
    real_replace = os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync"))
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append("replace"), real_replace(src, dst)))
    write_text_atomic(tmp_path / "t.json", "{}", durable=durable)
    save_png_atomic(Image.new("RGB", (2, 2)), tmp_path / "p.png", photo=True, durable=durable)
    assert events == (["fsync", "replace"] * 2 if durable else ["replace"] * 2)
    assert (tmp_path / "t.json").read_text() == "{}"
    assert _leftovers(tmp_path) == []
