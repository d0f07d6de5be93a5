"""data.download: archives in the real formats, generated here, served from 127.0.0.1 (good, corrupted, cut)."""
import gzip
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
import typing

import numpy as np
import pytest

from kdlab.data import download as downloads
from kdlab.data.cifar import cifar10, cifar100
from kdlab.data.idx import fashion_mnist, mnist
from kdlab.errors import KdlabError


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``; honours ``Range`` when ``server.ranges``; sends only the first
    ``server.cut`` bytes of a body (then closes) while ``server.cut`` is set."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        name = self.path.lstrip("/")
        self.server.requests.append((name, self.headers.get("Range")))
        body = self.server.files.get(name)
        if body is None:
            self.send_error(404)
            return
        start = 0
        wanted = self.headers.get("Range")
        if wanted and self.server.ranges:
            start = int(wanted.split("=")[1].rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if self.server.cut is not None:
            payload = payload[:self.server.cut]
            self.close_connection = True
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.ranges, httpd.cut = {}, [], True, None
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(downloads.BASE_URL_ENV, f"http://127.0.0.1:{httpd.server_address[1]}/")
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _publish(server, monkeypatch, dataset, files, *, digests=("md5",)):
    """Serve ``files`` and make their digests the 'published' ones (the table the code checks)."""
    server.files.update(files)
    table = {name: {d: hashlib.new(d, body).hexdigest() for d in digests} for name, body in files.items()}
    monkeypatch.setitem(downloads.CHECKSUMS, dataset, table)


def _cifar_tar(folder, batches):
    """A tar.gz like cifar-10-python.tar.gz: ``folder/`` holding pickled batch dicts (bytes keys, uint8 data)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo(folder)
        info.type = tarfile.DIRTYPE
        archive.addfile(info)
        for name, batch in batches.items():
            content = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _cifar10_archive():
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 7]}
    batches["batches.meta"] = {b"label_names": [b"x"] * 10}
    return _cifar_tar("cifar-10-batches-py", batches), batches


def _idx(array):
    return gzip.compress(struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                         + array.astype(">u1").tobytes())


def _mnist_files():
    rng = np.random.default_rng(1)
    return {
        "train-images-idx3-ubyte.gz": _idx(rng.integers(0, 256, (6, 28, 28))),
        "train-labels-idx1-ubyte.gz": _idx(np.arange(6) % 10),
        "t10k-images-idx3-ubyte.gz": _idx(rng.integers(0, 256, (3, 28, 28))),
        "t10k-labels-idx1-ubyte.gz": _idx(np.array([3, 1, 4])),
    }


def _leftovers(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_cifar10_downloads_verifies_and_loads(tmp_path, server, monkeypatch):
    archive, batches = _cifar10_archive()
    _publish(server, monkeypatch, "cifar10", {"cifar-10-python.tar.gz": archive}, digests=("md5", "sha256"))
    root = tmp_path / "data"  # does not exist yet: created
    data = cifar10(root=root, cache_dir=tmp_path, download=True)
    assert data.x_train.shape == (10, 3, 32, 32) and data.y_test.tolist() == [1, 7]
    first = batches["data_batch_1"][b"data"][0]
    assert float(data.x_train[0, 2, 31, 31]) == pytest.approx(first[3071] / 255)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # no archive, no staging left
    # Already there: no second request.
    count = len(server.requests)
    cifar10(root=root, cache_dir=tmp_path, download=True)
    assert len(server.requests) == count


def test_cifar100_download(tmp_path, server, monkeypatch):
    rng = np.random.default_rng(2)
    batch = lambda n: {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": list(range(n)),  # noqa: E731
                       b"coarse_labels": [0] * n}
    _publish(server, monkeypatch, "cifar100",
             {"cifar-100-python.tar.gz": _cifar_tar("cifar-100-python", {"train": batch(4), "test": batch(2)})})
    data = cifar100(root=tmp_path, cache_dir=tmp_path, download=True)
    assert data.num_classes == 100 and data.y_train.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("dataset, loader, folder", [("mnist", mnist, "MNIST"),
                                                     ("fashion_mnist", fashion_mnist, "FashionMNIST")])
def test_mnist_gz_files_download(tmp_path, server, monkeypatch, dataset, loader, folder):
    _publish(server, monkeypatch, dataset, _mnist_files())
    data = loader(root=tmp_path, cache_dir=tmp_path, download=True)
    assert data.x_train.shape == (6, 1, 28, 28) and data.y_test.tolist() == [3, 1, 4]
    assert sorted(p.name for p in (tmp_path / folder / "raw").iterdir()) == sorted(_mnist_files())
    assert _leftovers(tmp_path)[0] == folder  # nothing but the dataset folder


def test_files_already_in_root_are_not_downloaded(tmp_path, server, monkeypatch):
    for name, body in _mnist_files().items():
        (tmp_path / name).write_bytes(body)
    data = mnist(root=tmp_path, cache_dir=tmp_path, download=True)
    assert data.x_train.shape[0] == 6 and server.requests == []


def test_checksum_mismatch_is_one_line_and_leaves_nothing(tmp_path, server, monkeypatch):
    archive, _ = _cifar10_archive()
    _publish(server, monkeypatch, "cifar10", {"cifar-10-python.tar.gz": archive})
    corrupted = bytearray(archive)
    corrupted[len(corrupted) // 2] ^= 0xFF
    server.files["cifar-10-python.tar.gz"] = bytes(corrupted)
    with pytest.raises(KdlabError, match=r"cifar-10-python.tar.gz: checksum mismatch \(md5 [0-9a-f]{32}, published") as error:
        cifar10(root=tmp_path, cache_dir=tmp_path, download=True)
    assert "\n" not in str(error.value)
    assert _leftovers(tmp_path) == []
    # The real table is what is checked when the test does not replace it: the published MD5.
    monkeypatch.setitem(downloads.CHECKSUMS, "cifar10", {"cifar-10-python.tar.gz": {"md5": "c58f30108f718f92721af3b95e74349a"}})
    with pytest.raises(KdlabError, match="published c58f30108f718f92721af3b95e74349a"):
        cifar10(root=tmp_path, cache_dir=tmp_path, download=True)


@pytest.mark.parametrize("ranges", [True, False])
def test_server_stopping_mid_file_then_a_rerun_succeeds(tmp_path, server, monkeypatch, ranges):
    archive, _ = _cifar10_archive()
    _publish(server, monkeypatch, "cifar10", {"cifar-10-python.tar.gz": archive})
    server.ranges, server.cut = ranges, len(archive) // 3
    with pytest.raises(KdlabError, match=r"cifar-10-python.tar.gz: download stopped after \d+ .*rerun to resume"):
        cifar10(root=tmp_path, cache_dir=tmp_path, download=True)
    assert not (tmp_path / "cifar-10-batches-py").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".kdlab-extract")]
    server.cut = None
    data = cifar10(root=tmp_path, cache_dir=tmp_path, download=True)
    assert data.x_train.shape[0] == 10
    assert server.requests[-1][1] == (f"bytes={len(archive) // 3}-")  # resumed where it stopped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py"]


def test_archive_with_an_unsafe_member_is_refused(tmp_path, server, monkeypatch):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("../evil")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    _publish(server, monkeypatch, "cifar10", {"cifar-10-python.tar.gz": buffer.getvalue()})
    with pytest.raises(KdlabError, match="unsafe archive member '../evil'"):
        cifar10(root=tmp_path / "root", cache_dir=tmp_path, download=True)
    assert not (tmp_path / "evil").exists() and _leftovers(tmp_path / "root") == []


def test_missing_file_on_server_and_no_root(tmp_path, server, monkeypatch):
    with pytest.raises(KdlabError, match=r"/train-images-idx3-ubyte.gz: HTTP 404 Not Found; check the URL"):
        mnist(root=tmp_path, cache_dir=tmp_path, download=True)
    assert _leftovers(tmp_path) == []
    with pytest.raises(KdlabError, match="data.root: data.download needs a folder"):
        mnist(root=None, cache_dir=tmp_path, download=True)


def test_download_option_is_a_checked_config_key():
    from kdlab.config.entries import entry_parameters

    for name in ("cifar10", "cifar100", "mnist", "fashion_mnist"):
        annotation, default = entry_parameters("dataset", name)["download"]
        assert typing.get_args(annotation)[0] is bool and default is False


def test_concurrent_downloads_into_one_root_fetch_once(tmp_path, server, monkeypatch):
    archive, _ = _cifar10_archive()
    _publish(server, monkeypatch, "cifar10", {"cifar-10-python.tar.gz": archive})
    results, errors = [], []

    def load():
        try:
            results.append(downloads.fetch("cifar10", tmp_path))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and results == [tmp_path / "cifar-10-batches-py"] * 3
    assert len(server.requests) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py"]
