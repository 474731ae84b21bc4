"""Datasets of the example jobs, with no download: all of it ships with installed packages.

Pure: numpy only (no ray, no torch, not even scikit-learn's code: its data file is read directly). A dataset factory ``f(seed=..., **kwargs)`` returns a
:class:`Dataset`; the training loop asks it for the samples of a step by index (``batch(indices)``), so the
data order stays the batch arithmetic's business (``tidal.training.batching``), the same on every worker count.

- :func:`digits`: scikit-learn's bundled 8x8 digits (1797 images, 10 classes).
- :func:`stdlib_docs`: byte-level language-model windows over the docstrings of Python's standard library
  (about 1 MB of ASCII text shipped with every Python).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

KIND_CLASSIFICATION = "classification"
KIND_LANGUAGE_MODEL = "language_model"


@dataclass(frozen=True)
class Dataset:
    """Train and test samples, addressable by index.

    Attributes:
        kind: ``classification`` (targets ``[n]``) or ``language_model`` (targets ``[n, block]``).
        input_shape: shape of one input, without the batch dimension (for the serving manifest).
        labels: class names, for classification.
    """

    kind: str
    input_shape: tuple[int, ...]
    num_samples: int
    num_test_samples: int
    labels: list[str] | None = None
    _train: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    _test: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    _corpus: np.ndarray | None = field(default=None, repr=False)
    _block: int = 0
    _stride: int = 0
    _test_offset: int = 0

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets of the train samples at ``indices``."""
        if self._train is not None:
            x, y = self._train
            return x[indices], y[indices]
        return self._windows(np.asarray(indices) * self._stride)

    def test_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The whole test set, in order, ``batch_size`` samples at a time."""
        for a in range(0, self.num_test_samples, batch_size):
            idx = np.arange(a, min(a + batch_size, self.num_test_samples))
            if self._test is not None:
                x, y = self._test
                yield x[idx], y[idx]
            else:
                yield self._windows(self._test_offset + idx * self._block)

    def _windows(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self._corpus is not None
        offs = starts[:, None] + np.arange(self._block + 1)[None, :]
        w = self._corpus[offs].astype(np.int64)
        return w[:, :-1], w[:, 1:]


def digits(seed: int = 0, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled digits: 64 features scaled to [0, 1], 10 classes; a fixed stratified split.

    The CSV ships inside scikit-learn; it is read with numpy without importing scikit-learn (and SciPy),
    which saves every training worker about 2 s of CPU at each (re)start. The split uses ``split_seed``
    (not the job's seed), so jobs with different seeds test on the same images: 1438 train, 359 test.
    """
    del seed  # the data itself does not depend on the job's seed; its order does (tidal.training.batching)
    raw = np.loadtxt(_sklearn_data_file("digits.csv.gz"), delimiter=",")
    x = (raw[:, :-1] / 16.0).astype(np.float32)
    y = raw[:, -1].astype(np.int64)
    rng = np.random.Generator(np.random.PCG64(split_seed))
    test_idx = []
    for c in range(10):
        members = np.flatnonzero(y == c)
        test_idx.extend(rng.permutation(members)[: int(round(test_fraction * len(members)))].tolist())
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test_idx] = True
    return Dataset(
        kind=KIND_CLASSIFICATION,
        input_shape=(64,),
        num_samples=int((~is_test).sum()),
        num_test_samples=int(is_test.sum()),
        labels=[str(c) for c in range(10)],
        _train=(x[~is_test], y[~is_test]),
        _test=(x[is_test], y[is_test]),
    )


def _sklearn_data_file(name: str) -> Path:
    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-learn is not installed: the digits data ships with it")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the scikit-learn installation")
    return path


# Pure-Python standard library modules whose docstrings make the corpus. Fixed and sorted, so the corpus
# is the same on every machine with the same Python; no GUI or optional C modules (they may be missing).
STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio.events", "asyncio.streams", "asyncio.tasks", "base64", "bisect",
    "calendar", "cmd", "codecs", "collections", "concurrent.futures", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email.message", "email.utils",
    "enum", "filecmp", "fnmatch", "fractions", "functools", "getopt", "gettext", "glob", "graphlib", "gzip",
    "heapq", "hmac", "html.parser", "http.client", "http.cookies", "http.server", "imaplib", "importlib",
    "inspect", "io", "ipaddress", "itertools", "json", "json.decoder", "linecache", "locale", "logging",
    "logging.config", "logging.handlers", "mailbox", "mimetypes", "netrc", "numbers", "operator", "optparse",
    "os", "pathlib", "pdb", "pickle", "platform", "plistlib", "poplib", "pprint", "pydoc", "queue", "random",
    "re", "reprlib", "runpy", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib",
    "socket", "socketserver", "statistics", "string", "subprocess", "symtable", "sysconfig", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing",
    "unittest", "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "xml.etree.ElementTree", "zipfile",
)  # fmt: skip


def stdlib_corpus(modules: tuple[str, ...] = STDLIB_MODULES) -> bytes:
    """The docstrings of ``modules`` and their public members, ASCII only, in a fixed order (~1 MB)."""
    parts: list[str] = []
    for name in sorted(set(modules)):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        parts.append(inspect.getdoc(mod) or "")
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(doc)
            if inspect.isclass(obj):
                for mname, member in sorted(vars(obj).items()):
                    if not mname.startswith("_") and callable(member):
                        mdoc = inspect.getdoc(member)
                        if mdoc:
                            parts.append(mdoc)
    return "\n\n".join(p for p in parts if p).encode("ascii", "ignore")


def stdlib_docs(
    seed: int = 0, block_size: int = 64, stride: int = 16, test_fraction: float = 0.05, max_bytes: int | None = None
) -> Dataset:
    """Byte-level LM windows over the standard library's docstrings (vocabulary 128).

    Train sample ``i`` is the window starting at byte ``i * stride`` of the first ``1 - test_fraction``
    of the corpus; the test set is the rest, cut into non-overlapping windows.
    Example: 1 MB, block 64, stride 16 -> about 59,000 train windows and 780 test windows.
    """
    del seed
    corpus = np.frombuffer(stdlib_corpus(), dtype=np.uint8)
    if max_bytes is not None:
        corpus = corpus[:max_bytes]
    split = int(len(corpus) * (1 - test_fraction))
    num_train = (split - block_size - 1) // stride + 1
    num_test = (len(corpus) - split - 1) // block_size
    if num_train <= 0 or num_test <= 0:
        raise ValueError(f"corpus of {len(corpus)} bytes is too small for block_size={block_size}")
    return Dataset(
        kind=KIND_LANGUAGE_MODEL,
        input_shape=(block_size,),
        num_samples=num_train,
        num_test_samples=num_test,
        _corpus=corpus,
        _block=block_size,
        _stride=stride,
        _test_offset=split,
    )
