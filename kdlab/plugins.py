"""The user's own code, without editing kdlab: modules whose import registers losses, methods, models, datasets.

Three ways in, all ending in ``kdlab.registry.register`` calls made by the user's module:

* the config key ``imports: [my_pkg.my_losses, ./my_method.py]``: a module name (found on ``sys.path``) or a
  ``.py`` file (a path relative to the config file; absolute once loaded). Imported before the config is
  validated, so ``method: {name: my_method}`` resolves.
* the CLI flag ``kdlab --import MODULE`` (repeatable, before the command): the same, for every command
  (``kdlab list methods`` shows the plugin's), file paths relative to the working directory.
* the entry-point group ``kdlab.plugins`` of installed packages: each entry names a module (imported) or a
  function (imported and called with no arguments). They load once per process, right after kdlab's
  built-ins, at the first registry lookup (``kdlab.registry._load_builtins``).

A module that cannot be imported is one ``KdlabError`` line naming it and where it was named (``imports[1]``,
``--import``, the entry point) before any work. Every import done here is remembered (``loaded()``), so the
processes of ``kdlab run --workers N`` and the Ray tasks of ``--executor ray`` repeat them (``load_all``)
before they build a run. ``imports`` is not part of a run's identity (``RunSpec.identity``): which module
registered a name is like PYTHONPATH, while the name and its options, which are in the identity, say what ran.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from typing import Any

from kdlab.errors import KdlabError

GROUP = "kdlab.plugins"

_loaded: list[str] = []  # module names and absolute .py paths imported here, in order (repeated in workers)
_files: dict[str, str] = {}  # absolute .py path -> the module name it was imported under
_entry_points_loaded = False


def _is_file(entry: str) -> bool:
    return entry.endswith(".py") or "/" in entry or "\\" in entry or entry.startswith(".")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({Path(exc.filename or '?').name}, line {exc.lineno})"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _module_name(path: Path) -> str:
    """A stable name per file (the same in every worker, so pickled references to its classes resolve)."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    return f"kdlab_plugin_{stem}_{digest}"


def _import_file(path: Path) -> None:
    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before executing: dataclasses and pickle look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    _files[str(path)] = name


def import_one(entry: Any, *, where: str, base_dir: str | Path | None = None) -> str:
    """Import one module name or ``.py`` file; return how to repeat it (the name, or the absolute path).

    ``where`` names the entry in errors (``imports[1]``, ``--import``); ``base_dir`` anchors relative paths
    (the config file's folder; the working directory when None). Importing the same thing twice is a no-op.
    """
    if not isinstance(entry, str) or not entry.strip():
        raise KdlabError(f"{where}: expected a module name (my_pkg.my_losses) or a .py file path "
                         f"(./my_method.py), got {entry!r}")
    entry = entry.strip()
    if _is_file(entry):
        path = Path(entry).expanduser()
        if not path.is_absolute():
            path = Path(base_dir or Path.cwd()) / path
        path = path.resolve()
        key = str(path)
        if key not in _files:
            if not path.is_file():
                anchor = "the config file's folder" if base_dir is not None else "the working directory"
                raise KdlabError(f"{where}: cannot import {entry}: no file {path}; fix the path (relative paths "
                                 f"start at {anchor})")
            try:
                _import_file(path)
            except Exception as exc:  # the user's code: any error it raises is the reason
                raise KdlabError(f"{where}: cannot import {entry}: {_reason(exc)}; fix that module "
                                 "(try `python " + key + "`)") from None
    else:
        key = entry
        if entry not in sys.modules:
            try:
                importlib.import_module(entry)
            except ModuleNotFoundError as exc:
                hint = ("install it or add its folder to PYTHONPATH" if exc.name and entry.startswith(exc.name)
                        else "install what it needs")
                raise KdlabError(f"{where}: cannot import {entry}: {_reason(exc)}; {hint}, or name a file: "
                                 f"./{entry.replace('.', '/')}.py") from None
            except Exception as exc:
                raise KdlabError(f"{where}: cannot import {entry}: {_reason(exc)}; fix that module "
                                 f"(try `python -c 'import {entry}'`)") from None
    if key not in _loaded:
        _loaded.append(key)
    return key


def load_imports(entries: Any, *, base_dir: str | Path | None = None, key: str = "imports") -> list[str] | None:
    """Import a config's ``imports`` list; return it with file paths made absolute (None stays None)."""
    if entries is None:
        return None
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list):
        raise KdlabError(f"{key}: expected a list of module names or .py files, e.g. [my_pkg.losses, ./my_method.py]"
                         f", got {entries!r}")
    return [import_one(entry, where=f"{key}[{i}]", base_dir=base_dir) for i, entry in enumerate(entries)]


def load_flag(modules: list[str] | None) -> None:
    """The CLI's ``--import MODULE`` flags (file paths relative to the working directory)."""
    for module in modules or []:
        import_one(module, where=f"--import {module}")


def add_import_flag(parser) -> None:
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a module or .py file first, for the losses, methods, models and datasets it "
                             "registers (repeatable; also the config key imports: [...])")


def loaded() -> list[str]:
    """What this process imported here, in order: handed to worker processes and Ray tasks."""
    return list(_loaded)


def search_paths() -> list[str]:
    """The ``sys.path`` folders the imported module names were found in (for a Ray task's PYTHONPATH)."""
    out: list[str] = []
    for entry in _loaded:
        if entry in _files:
            continue
        top = sys.modules.get(entry.split(".")[0])
        origin = getattr(top, "__file__", None)
        if origin:
            folder = Path(origin).parent
            folder = folder.parent if Path(origin).name == "__init__.py" else folder
            if str(folder) not in out:
                out.append(str(folder))
    return out


def load_all(entries: list[str]) -> None:
    """Repeat a parent's imports (``loaded()``) in a worker, before it builds or runs anything."""
    for entry in entries:
        import_one(entry, where="imports")


def load_entry_points() -> None:
    """Import every installed ``kdlab.plugins`` entry point, once per process (called by the registry)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True  # first: a plugin that looks a name up while it loads must not recurse here
    for ep in importlib.metadata.entry_points(group=GROUP):
        dist = getattr(getattr(ep, "dist", None), "name", None)
        where = f"entry point {ep.name} = {ep.value}" + (f" (package {dist})" if dist else "")
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type):
                obj()
        except Exception as exc:
            raise KdlabError(f"{GROUP} {where}: cannot import it: {_reason(exc)}; fix or uninstall that "
                             "package") from None
