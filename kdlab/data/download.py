"""Downloading a dataset's published files, checked against their published checksums, extracted atomically.

``fetch(dataset, root)`` brings the files of ``SOURCES[dataset]`` into ``root`` unless they are there:

* each file is streamed to ``root/.kdlab-download/<file>.part``; a ``.part`` left by an interrupted run is
  resumed with an HTTP Range request (a server that ignores Range sends the whole file, which restarts it);
* the complete file is checked against every digest ``CHECKSUMS`` gives for it (MD5 and/or SHA-256); a
  mismatch deletes it and raises one line;
* the files are unpacked (tar.gz) or placed (MNIST's .gz, which the IDX reader reads as they are) in a
  fresh temporary folder under ``root``, which is then renamed to its final name: a reader sees the whole
  folder or none of it, never a half-extracted one.

The canonical URLs and the MD5s are the ones torchvision publishes. ``KDLAB_DATA_URL`` replaces the base
URL of every dataset (a mirror, or the tests' local server): a file is fetched from ``$KDLAB_DATA_URL/<file>``.
Concurrent runs (``--workers``) downloading into one root take turns on a lock file, and the second finds
the folder in place.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kdlab.errors import KdlabError

BASE_URL_ENV = "KDLAB_DATA_URL"
_STAGING = ".kdlab-download"
_CHUNK = 1 << 20
_TIMEOUT_S = 60


@dataclass(frozen=True)
class Source:
    """Where a dataset's files come from and where they end up under data.root.

    files: the file names, fetched from ``base_url + name``; folder: the folder (relative to root) the
    loader reads, created whole; unpack: "tar" (each file is a tar.gz holding ``folder``) or "copy"
    (the files themselves go into ``folder``).
    """

    base_url: str
    files: tuple[str, ...]
    folder: str
    unpack: str


_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz")

SOURCES = {
    "cifar10": Source("https://www.cs.toronto.edu/~kriz/", ("cifar-10-python.tar.gz",), "cifar-10-batches-py", "tar"),
    "cifar100": Source("https://www.cs.toronto.edu/~kriz/", ("cifar-100-python.tar.gz",), "cifar-100-python", "tar"),
    "mnist": Source("https://ossci-datasets.s3.amazonaws.com/mnist/", _MNIST_FILES, "MNIST/raw", "copy"),
    "fashion_mnist": Source("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", _MNIST_FILES,
                            "FashionMNIST/raw", "copy"),
}

# The published digests, by dataset and file (torchvision's tables). Tests replace entries with the digests of
# the archives they generate; a file may list "md5", "sha256" or both, and every one listed is checked.
CHECKSUMS: dict[str, dict[str, dict[str, str]]] = {
    "cifar10": {"cifar-10-python.tar.gz": {"md5": "c58f30108f718f92721af3b95e74349a"}},
    "cifar100": {"cifar-100-python.tar.gz": {"md5": "eb9058c3a382ffc7106e4002c42a8d85"}},
    "mnist": {
        "train-images-idx3-ubyte.gz": {"md5": "f68b3c2dcbeaaa9fbdd348bbdeb94873"},
        "train-labels-idx1-ubyte.gz": {"md5": "d53e105ee54ea40749a09fcbcd1e9432"},
        "t10k-images-idx3-ubyte.gz": {"md5": "9fb629c4189551a2d022fa330f9573f3"},
        "t10k-labels-idx1-ubyte.gz": {"md5": "ec29112dd5afa0611ce80d1b7f02629c"},
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": {"md5": "8d4fb7e6c68d591d4c3dfef9ec88bf0d"},
        "train-labels-idx1-ubyte.gz": {"md5": "25c81989df183df01b3e8a0aad5dffbe"},
        "t10k-images-idx3-ubyte.gz": {"md5": "bef4ecab320f06d8554ea6380940ec79"},
        "t10k-labels-idx1-ubyte.gz": {"md5": "bb300cfdad3c16e7a12a480ee83cd310"},
    },
}


def fetch(dataset: str, root: Path | None) -> Path:
    """Make ``root/<folder>`` of ``dataset`` exist, downloading and unpacking it if it does not; returns it.

    The caller checks first whether the files are already where its loader looks (e.g. directly in root).
    """
    source = SOURCES[dataset]
    if root is None:
        raise KdlabError(f"data.root: data.download needs a folder to download {dataset!r} into; set data.root")
    root = Path(root).expanduser()
    target = root / source.folder
    if target.is_dir():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KdlabError(f"data.root: cannot create {root} ({error.strerror or error}); choose a writable folder") from None
    staging = root / _STAGING
    try:
        with _locked(staging):
            if target.is_dir():  # another process finished it while this one waited
                return target
            staging.mkdir(exist_ok=True)  # one that failed meanwhile removed it
            base = os.environ.get(BASE_URL_ENV) or source.base_url
            paths = [_download(dataset, base.rstrip("/") + "/" + name, staging / name) for name in source.files]
            try:
                _install(paths, target, source)
            finally:  # verified or not, a whole file is not kept: a rerun fetches it again
                for path in paths:
                    path.unlink(missing_ok=True)
    finally:
        if not any(staging.glob("*.part")):  # only a partial download (to resume) stays behind
            shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def _locked(staging: Path):
    """Hold the lock file in ``staging`` (created). A process that finishes removes the folder: one
    that created it again meanwhile (a lost race) just makes it once more."""
    for _ in range(10):
        staging.mkdir(exist_ok=True)
        try:
            handle = open(staging / "lock", "a+b")
            break
        except FileNotFoundError:
            continue
    else:  # pragma: no cover - ten lost races in a row
        raise KdlabError(f"{staging}: cannot create the download lock; check that nothing else removes it")
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock; the temp-folder-and-rename still holds
        with handle:
            yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(dataset: str, url: str, path: Path) -> Path:
    """Stream ``url`` to ``path`` (resuming ``path.part``), verify its digests; returns ``path``."""
    if path.is_file():  # downloaded and verified by an earlier, interrupted run
        return path
    part = path.with_name(path.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    print(f"kdlab: downloading {url}" + (f" (resuming at {have} bytes)" if have else ""), file=sys.stderr)
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            resumed = have and response.status == 206
            length = response.headers.get("Content-Length")
            expected = int(length) + (have if resumed else 0) if length is not None else None
            with open(part, "ab" if resumed else "wb") as out:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # the .part is already whole (or longer than the file): start over
            part.unlink(missing_ok=True)
            return _download(dataset, url, path)
        raise KdlabError(f"{url}: HTTP {error.code} {error.reason}; check the URL ({BASE_URL_ENV} overrides the "
                         "base) or download the file by hand into data.root") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", None) or error
        got = part.stat().st_size if part.exists() else 0
        raise KdlabError(f"{url}: download stopped after {got} bytes ({reason}); rerun to resume it "
                         "(nothing was extracted)") from None
    got = part.stat().st_size
    if expected is not None and got != expected:
        raise KdlabError(f"{url}: download stopped after {got} of {expected} bytes; rerun to resume it "
                         "(nothing was extracted)")
    _verify(dataset, url, part)
    part.replace(path)
    return path


def _verify(dataset: str, url: str, part: Path) -> None:
    wanted = CHECKSUMS.get(dataset, {}).get(PurePosixPath(url).name, {})
    if not wanted:
        part.unlink(missing_ok=True)
        raise KdlabError(f"{url}: no published checksum for this file; download it by hand into data.root")
    digests = {name: hashlib.new(name) for name in wanted}
    with open(part, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            for digest in digests.values():
                digest.update(chunk)
    for name, value in wanted.items():
        got = digests[name].hexdigest()
        if got != value.lower():
            part.unlink(missing_ok=True)
            raise KdlabError(f"{url}: checksum mismatch ({name} {got}, published {value}); the file was deleted: "
                             "rerun to download it again, or check the mirror set in "
                             f"{BASE_URL_ENV}")


def _install(paths: list[Path], target: Path, source: Source) -> None:
    """Unpack or place ``paths`` into a temp folder beside ``target``'s parent, then rename it into place."""
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".kdlab-extract-", dir=parent))
    try:
        if source.unpack == "tar":
            for path in paths:
                _untar(path, scratch)
            built = scratch / PurePosixPath(source.folder).name
            if not built.is_dir():
                raise KdlabError(f"{paths[0]}: the archive holds no {PurePosixPath(source.folder).name}/ folder; "
                                 "it is not the published archive, check the mirror")
        else:
            built = scratch / "files"
            built.mkdir()
            for path in paths:
                shutil.copyfile(path, built / path.name)
        try:
            built.rename(target)
        except OSError:
            if not target.is_dir():  # not a lost race with another process: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _untar(path: Path, into: Path) -> None:
    """Extract the regular files and folders of a tar.gz; refuse links and paths leaving ``into``."""
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive.getmembers():
                parts = PurePosixPath(member.name).parts
                if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
                    raise KdlabError(f"{path}: unsafe archive member {member.name!r}; the file is not the "
                                     "published archive, check the mirror")
            archive.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except (tarfile.TarError, EOFError, OSError) as error:
        raise KdlabError(f"{path}: not a readable tar.gz ({error}); it was deleted, rerun to download it again") from None
