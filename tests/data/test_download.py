"""``vitlens download``: miniature archives served from 127.0.0.1, never the network.

Each test builds a small TinyImageNet-200 zip or CUB-200-2011 tgz in the official layout, serves it from a
local ``http.server`` (with HTTP Range, or one that ignores it, drops the connection, or answers 404), and
injects the archive's own MD5 where the published one would be checked.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import tarfile
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from vitlens import cli
from vitlens.data import download as dl
from vitlens.data import resolve_inputs
from vitlens.errors import DownloadError, OutputError, UsageError

WNIDS = ["n02000002", "n01000001"]  # not sorted, like the real wnids.txt


def _jpeg(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (shade, 40, 200 - shade)).save(buffer, format="JPEG")
    return buffer.getvalue()


def tiny_imagenet_files() -> dict[str, bytes]:
    """A miniature ``tiny-imagenet-200/``: 3 val images, 2 train images per class, boxes everywhere."""
    top = "tiny-imagenet-200"
    files = {
        f"{top}/wnids.txt": ("\n".join(WNIDS) + "\n").encode(),
        f"{top}/words.txt": b"n01000001\tgoldfish, Carassius auratus\nn02000002\ttabby, tabby cat\nn09999999\tunused\n",
    }
    annotations = []
    for i, wnid in enumerate([WNIDS[0], WNIDS[1], WNIDS[0]]):
        files[f"{top}/val/images/val_{i}.JPEG"] = _jpeg(10 * i)
        annotations.append(f"val_{i}.JPEG\t{wnid}\t{i}\t1\t{20 + i}\t30\n")
    files[f"{top}/val/val_annotations.txt"] = "".join(annotations).encode()
    for wnid in WNIDS:
        boxes = []
        for i in range(2):
            files[f"{top}/train/{wnid}/images/{wnid}_{i}.JPEG"] = _jpeg(50 + i)
            boxes.append(f"{wnid}_{i}.JPEG\t0\t{i}\t63\t63\n")
        files[f"{top}/train/{wnid}/{wnid}_boxes.txt"] = "".join(boxes).encode()
    files[f"{top}/test/images/test_0.JPEG"] = _jpeg(99)  # the unlabelled test split of the real archive
    return files


def cub_files() -> dict[str, bytes]:
    """A miniature ``CUB_200_2011/`` (2 classes, 4 images: 2 train, 2 test) and the archive's top-level
    ``attributes.txt``."""
    top = "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    files = {"attributes.txt": b"1 has_bill_shape::curved\n",
             f"{top}/classes.txt": "".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)).encode()}
    images, labels, split, boxes = [], [], [], []
    for image_id in range(1, 5):
        name = classes[image_id % 2]
        relpath = f"{name}/{name.split('.')[1]}_{image_id:04d}.jpg"
        files[f"{top}/images/{relpath}"] = _jpeg(image_id)
        images.append(f"{image_id} {relpath}\n")
        labels.append(f"{image_id} {image_id % 2 + 1}\n")
        split.append(f"{image_id} {image_id % 2}\n")
        boxes.append(f"{image_id} 1.0 2.0 10.0 8.0\n")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split), ("bounding_boxes.txt", boxes)):
        files[f"{top}/{name}"] = "".join(lines).encode()
    return files


def make_zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        # folder entries for the plain members (the unsafe ones of the traversal tests are named as they are)
        plain = [name for name in files if "/" in name and ".." not in name and ":" not in name]
        folders = sorted({name.rsplit("/", 1)[0] + "/" for name in plain})
        for folder in folders:
            zf.writestr(folder, b"")
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def make_tgz(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buffer.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ------------------------------------------------------------------------------------------ the server
class Server:
    """A local HTTP server of ``files`` (path -> bytes) that honours ``Range: bytes=N-``, unless told to ignore
    it, to drop the connection after ``drop_after`` bytes (``drop_times`` responses), or to answer 404."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None, int]] = []  # (path, Range header, status)
        self.ignore_range = False
        self.drop_after: int | None = None
        self.drop_times = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the http.server name)
                body = server.files.get(self.path.lstrip("/"))
                asked = self.headers.get("Range")
                if body is None:
                    server.requests.append((self.path, asked, 404))
                    self.send_error(404)
                    return
                start = 0
                if asked and not server.ignore_range:
                    start = int(asked.split("=")[1].split("-")[0])
                    if start >= len(body):
                        server.requests.append((self.path, asked, 416))
                        self.send_error(416)
                        return
                status = 206 if start else 200
                server.requests.append((self.path, asked, status))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                payload = body[start:]
                if server.drop_times > 0 and server.drop_after is not None:
                    server.drop_times -= 1
                    payload = payload[: server.drop_after]  # then the connection closes: a dropped transfer
                self.wfile.write(payload)
                self.wfile.flush()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    serving = Server()
    yield serving
    serving.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def serve(server: Server, monkeypatch, name: str, data: bytes) -> None:
    """Serve ``data`` as the dataset's archive, from VITLENS_DOWNLOAD_BASE, with its own MD5 in the table."""
    archive = dl.ARCHIVES[name]
    server.files[archive.filename] = data
    monkeypatch.setitem(dl.ARCHIVES, name, replace(archive, md5=md5(data)))
    monkeypatch.setenv(dl.BASE_ENV, server.url)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------ the table
def test_the_table_holds_the_official_archives_and_published_checksums():
    tin, cub = dl.ARCHIVES["tinyimagenet"], dl.ARCHIVES["cub200"]
    assert (tin.url, tin.md5, tin.filename, tin.folder) == (
        "http://cs231n.stanford.edu/tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de",
        "tiny-imagenet-200.zip", "tiny-imagenet-200")
    assert (cub.url, cub.md5, cub.filename, cub.folder) == (
        "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz", "97eceeb196236b17998738112f37df78",
        "CUB_200_2011.tgz", "CUB_200_2011")


# ------------------------------------------------------------------------------------------ success
def test_tinyimagenet_download_verify_extract_and_layout(server, tmp_path):
    data = make_zip(tiny_imagenet_files())
    server.files["tiny-imagenet-200.zip"] = data
    dest = tmp_path / "data"
    result = dl.download_dataset("tinyimagenet", dest, base_url=server.url, md5=md5(data), progress=False)
    root = dest / "tiny-imagenet-200"
    assert result.downloaded and result.bytes == len(data)
    assert result.root == str(root) and result.spec == f"tinyimagenet:{root}"
    assert result.images == {"val": 3, "train": 4}
    val = resolve_inputs([result.spec])
    assert [s.key for s in val] == ["val_0", "val_1", "val_2"]
    assert val[1].label_name == "goldfish, Carassius auratus" and val[1].boxes == ((1.0, 1.0, 22.0, 31.0),)
    assert all(s.boxes for s in resolve_inputs([f"{result.spec}:train"]))
    # the archive is gone once extracted, nothing temporary is left, the marker is in the dataset folder
    assert leftovers(dest) == ["tiny-imagenet-200"]
    assert (root / dl.MARKER).is_file() and (root / "test" / "images" / "test_0.JPEG").is_file()
    assert server.requests == [("/tiny-imagenet-200.zip", None, 200)]


def test_cub200_from_a_tgz_with_the_files_beside_the_dataset_folder(server, tmp_path):
    data = make_tgz(cub_files())
    server.files["CUB_200_2011.tgz"] = data
    result = dl.download_dataset("cub200", tmp_path, base_url=server.url + "/", md5=md5(data), progress=False)
    assert result.images == {"test": 2, "train": 2}
    assert result.spec == f"cub200:{tmp_path / 'CUB_200_2011'}"
    samples = resolve_inputs([result.spec])
    assert [s.label_name for s in samples] == ["Black footed Albatross"] * 2
    assert samples[0].boxes == ((1.0, 2.0, 11.0, 10.0),)
    assert leftovers(tmp_path) == ["CUB_200_2011", "attributes.txt"]


def test_the_second_run_is_a_no_op_even_offline(server, tmp_path, monkeypatch, capsys):
    serve(server, monkeypatch, "tinyimagenet", make_zip(tiny_imagenet_files()))
    dest = tmp_path / "data"
    assert cli.main(["download", "tinyimagenet", str(dest), "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"tinyimagenet: downloaded tiny-imagenet-200.zip (0.0 MB), md5 verified, extracted to "
                             f"{dest / 'tiny-imagenet-200'}")
    assert out[1:] == ["layout checked: 3 val, 4 train images, each with its box",
                       f"use: tinyimagenet:{dest / 'tiny-imagenet-200'}"]
    before = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    monkeypatch.setenv(dl.BASE_ENV, closed_port_url())  # nothing is fetched: the server is not even asked
    assert cli.main(["download", "tinyimagenet", str(dest), "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"tinyimagenet: already downloaded and verified in {dest / 'tiny-imagenet-200'}; nothing to do",
                   "layout checked: 3 val, 4 train images, each with its box",
                   f"use: tinyimagenet:{dest / 'tiny-imagenet-200'}"]
    assert len(server.requests) == 1
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == before


def test_the_progress_bars_go_to_stderr(server, tmp_path, monkeypatch, capsys):
    serve(server, monkeypatch, "cub200", make_tgz(cub_files()))
    assert cli.main(["download", "cub200", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "CUB_200_2011.tgz" in captured.err and "extracting" in captured.err
    assert captured.out.splitlines()[-1] == f"use: cub200:{tmp_path / 'CUB_200_2011'}"


# ------------------------------------------------------------------------------------------ resume
def test_a_truncated_transfer_is_resumed_by_the_next_run(server, tmp_path):
    data = make_zip(tiny_imagenet_files())
    server.files["tiny-imagenet-200.zip"] = data
    server.drop_after, server.drop_times = 1000, 1
    kwargs = {"base_url": server.url, "md5": md5(data), "progress": False}
    with pytest.raises(DownloadError) as info:
        dl.download_dataset("tinyimagenet", tmp_path, retries=0, **kwargs)
    assert str(info.value) == (f"the connection to {server.url[7:]} dropped after 1,000 of {len(data):,} bytes of "
                               f"tiny-imagenet-200.zip: run the same command again to resume")
    assert leftovers(tmp_path) == ["tiny-imagenet-200.zip.part"]  # nothing extracted
    assert (tmp_path / "tiny-imagenet-200.zip.part").read_bytes() == data[:1000]
    result = dl.download_dataset("tinyimagenet", tmp_path, **kwargs)
    assert result.images == {"val": 3, "train": 4}
    assert server.requests == [("/tiny-imagenet-200.zip", None, 200), ("/tiny-imagenet-200.zip", "bytes=1000-", 206)]
    assert leftovers(tmp_path) == ["tiny-imagenet-200"]


def test_a_dropped_connection_is_resumed_within_the_run(server, tmp_path):
    data = make_zip(tiny_imagenet_files())
    server.files["tiny-imagenet-200.zip"] = data
    server.drop_after, server.drop_times = 700, 2
    dl.download_dataset("tinyimagenet", tmp_path, base_url=server.url, md5=md5(data), progress=False)
    assert [r[1:] for r in server.requests] == [(None, 200), ("bytes=700-", 206), ("bytes=1400-", 206)]
    assert leftovers(tmp_path) == ["tiny-imagenet-200"]


def test_a_connection_that_keeps_dropping_is_one_line_and_keeps_the_part(server, tmp_path, monkeypatch, capsys):
    data = make_tgz(cub_files())
    serve(server, monkeypatch, "cub200", data)
    server.drop_after, server.drop_times = 100, 10
    assert cli.main(["download", "cub200", str(tmp_path / "d"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"vitlens: error: the connection to {server.url[7:]} dropped after 400 of {len(data):,} "
                          f"bytes of CUB_200_2011.tgz: run the same command again to resume")
    assert len(server.requests) == 4  # the first try and 3 retries, each resuming the last
    assert leftovers(tmp_path / "d") == ["CUB_200_2011.tgz.part"]
    server.drop_times = 0
    assert cli.main(["download", "cub200", str(tmp_path / "d"), "--quiet"]) == 0
    assert server.requests[-1][1:] == ("bytes=400-", 206)
    assert leftovers(tmp_path / "d") == ["CUB_200_2011", "attributes.txt"]


def test_a_server_that_ignores_range_restarts_from_zero(server, tmp_path):
    data = make_zip(tiny_imagenet_files())
    server.files["tiny-imagenet-200.zip"] = data
    server.ignore_range = True
    (tmp_path / "tiny-imagenet-200.zip.part").write_bytes(b"x" * 500)  # not the archive's first bytes
    result = dl.download_dataset("tinyimagenet", tmp_path, base_url=server.url, md5=md5(data), progress=False)
    assert result.images == {"val": 3, "train": 4}
    assert server.requests == [("/tiny-imagenet-200.zip", "bytes=500-", 200)]  # asked to resume, got it all


def test_a_complete_part_is_verified_without_downloading_again(server, tmp_path):
    data = make_zip(tiny_imagenet_files())
    server.files["tiny-imagenet-200.zip"] = data
    (tmp_path / "tiny-imagenet-200.zip.part").write_bytes(data)
    dl.download_dataset("tinyimagenet", tmp_path, base_url=server.url, md5=md5(data), progress=False)
    assert server.requests == [("/tiny-imagenet-200.zip", f"bytes={len(data)}-", 416)]
    assert leftovers(tmp_path) == ["tiny-imagenet-200"]


# ------------------------------------------------------------------------------------------ failures
def test_a_wrong_checksum_is_one_line_and_removes_the_file(server, tmp_path, monkeypatch, capsys):
    data = make_zip(tiny_imagenet_files())
    serve(server, monkeypatch, "tinyimagenet", data)
    monkeypatch.setitem(dl.ARCHIVES, "tinyimagenet", replace(dl.ARCHIVES["tinyimagenet"], md5="0" * 32))
    dest = tmp_path / "data"
    assert cli.main(["download", "tinyimagenet", str(dest), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"vitlens: error: tiny-imagenet-200.zip from {server.url[7:]} has md5 {md5(data)}, "
                            f"expected {'0' * 32}: a corrupt download, removed; run the command again\n")
    assert captured.out == ""
    assert not dest.exists()  # created for the download, empty again: removed
    (tmp_path / "keep").mkdir()  # a folder that existed before stays, empty
    with pytest.raises(DownloadError, match="a corrupt download, removed"):
        dl.download_dataset("tinyimagenet", tmp_path / "keep", md5="1" * 32, progress=False)
    assert leftovers(tmp_path / "keep") == []


def test_an_unreachable_server_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    base = closed_port_url()
    monkeypatch.setenv(dl.BASE_ENV, base)
    assert cli.main(["download", "cub200", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vitlens: error: cannot download {base}/CUB_200_2011.tgz: {base[7:]} is unreachable (")
    assert err.endswith("); check the network, or set VITLENS_DOWNLOAD_BASE to a mirror\n") and err.count("\n") == 1
    assert leftovers(tmp_path) == []


def test_an_http_error_is_one_line(server, tmp_path):
    with pytest.raises(DownloadError) as info:
        dl.download_dataset("tinyimagenet", tmp_path / "d", base_url=server.url, progress=False)
    assert str(info.value) == f"cannot download {server.url}/tiny-imagenet-200.zip: HTTP 404 Not Found"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("member", ["../evil.txt", "tiny-imagenet-200/../../evil.txt", "/tmp/evil.txt",
                                    "C:/evil.txt", "..\\evil.txt"])
def test_path_traversal_members_are_refused(server, tmp_path, member):
    files = tiny_imagenet_files()
    files[member] = b"outside"
    data = make_zip(files) if member[0] != "/" else make_tgz(files)
    name = "tinyimagenet" if member[0] != "/" else "cub200"
    archive = dl.ARCHIVES[name]
    server.files[archive.filename] = data
    dest = tmp_path / "a" / "b"
    with pytest.raises(DownloadError) as info:
        dl.download_dataset(name, dest, base_url=server.url, md5=md5(data), progress=False)
    assert str(info.value) == (f"{archive.filename}: member '{member}' has an absolute path or '..': refused "
                               f"(removed)")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "a" / "evil.txt").exists()
    assert leftovers(tmp_path / "a") == []  # nothing extracted, the archive removed, the empty folder too


def test_links_in_an_archive_are_refused(server, tmp_path):
    data = make_tgz(cub_files(), links={"CUB_200_2011/images.txt.lnk": "/etc/passwd"})
    server.files["CUB_200_2011.tgz"] = data
    with pytest.raises(DownloadError, match=r"^CUB_200_2011.tgz: member 'CUB_200_2011/images.txt.lnk' is a link or "
                                            r"a device: refused \(removed\)$"):
        dl.download_dataset("cub200", tmp_path / "d", base_url=server.url, md5=md5(data), progress=False)
    assert leftovers(tmp_path) == []


def test_a_truncated_archive_with_a_matching_checksum_is_unreadable(server, tmp_path):
    data = make_tgz(cub_files())[:300]  # cut, with the checksum of what is left
    server.files["CUB_200_2011.tgz"] = data
    with pytest.raises(DownloadError, match=r"^CUB_200_2011.tgz is not a readable archive \(.*\): removed$"):
        dl.download_dataset("cub200", tmp_path / "d", base_url=server.url, md5=md5(data), progress=False)
    assert leftovers(tmp_path) == []


def test_an_archive_without_the_expected_layout_leaves_nothing(server, tmp_path):
    files = tiny_imagenet_files()
    del files["tiny-imagenet-200/val/images/val_1.JPEG"]
    data = make_zip(files)
    server.files["tiny-imagenet-200.zip"] = data
    (tmp_path / "other.txt").write_text("kept")
    with pytest.raises(DownloadError, match=r"^tiny-imagenet-200.zip is not the layout tinyimagenet: reads: 1 listed "
                                            r"val images are missing \(first: val/images/val_1.JPEG\) \(removed\)$"):
        dl.download_dataset("tinyimagenet", tmp_path, base_url=server.url, md5=md5(data), progress=False)
    assert leftovers(tmp_path) == ["other.txt"]

    files = tiny_imagenet_files()
    files["tiny-imagenet-200/train/n01000001/n01000001_boxes.txt"] = b"n01000001_0.JPEG\t0\t0\t9\t9\n"
    data = make_zip(files)
    server.files["tiny-imagenet-200.zip"] = data
    with pytest.raises(DownloadError, match=r"reads: 1 train images have no box \(first: train/n01000001/images/"
                                            r"n01000001_1.JPEG\) \(removed\)$"):
        dl.download_dataset("tinyimagenet", tmp_path, base_url=server.url, md5=md5(data), progress=False)

    data = make_zip({"something-else/readme.txt": b"x"})
    server.files["tiny-imagenet-200.zip"] = data
    with pytest.raises(DownloadError, match=r"^tiny-imagenet-200.zip does not unpack to tiny-imagenet-200/"):
        dl.download_dataset("tinyimagenet", tmp_path, base_url=server.url, md5=md5(data), progress=False)
    assert leftovers(tmp_path) == ["other.txt"]


def test_usage_mistakes(tmp_path):
    with pytest.raises(UsageError, match=r"^unknown dataset 'imagenet': vitlens download takes tinyimagenet or "
                                         r"cub200$"):
        dl.download_dataset("imagenet", tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a directory$"):
        dl.download_dataset("cub200", tmp_path / "file")
    (tmp_path / "CUB_200_2011").mkdir()
    with pytest.raises(OutputError, match=r"CUB_200_2011' exists and was not written by vitlens download: use it as "
                                          r"it is \(cub200:.*CUB_200_2011\) or remove it to download again$"):
        dl.download_dataset("cub200", tmp_path)


def test_a_damaged_existing_download_is_reported(server, tmp_path):
    data = make_zip(tiny_imagenet_files())
    server.files["tiny-imagenet-200.zip"] = data
    dl.download_dataset("tinyimagenet", tmp_path, base_url=server.url, md5=md5(data), progress=False)
    (tmp_path / "tiny-imagenet-200" / "wnids.txt").unlink()
    with pytest.raises(DownloadError, match=r"tiny-imagenet-200' is not the layout tinyimagenet: reads: .* missing "
                                            r"wnids.txt; remove it to download again$"):
        dl.download_dataset("tinyimagenet", tmp_path, base_url=server.url, md5=md5(data), progress=False)
    with pytest.raises(OutputError, match=r"holds another download \(md5 .*\): remove it to download again$"):
        dl.download_dataset("tinyimagenet", tmp_path, md5="2" * 32, progress=False)
