"""Related language-modelling tasks for continual and multi-task architecture search (CAS and MAS, Pasunuru and
Bansal, ACL 2019): several corpora that share one dictionary, so that one model's embedding serves every task.

Embedded tasks (no download): :func:`make_stdlib_tasks`
    Language modelling on disjoint parts of the ``stdlib`` corpus of :mod:`pynas.rnn.data` (the docstrings and
    comments of the Python standard library, read and normalised by that module's own functions). The rule:

    * A document (one ``.py`` file) belongs to the *group* named by the first component of its path under the
      stdlib folder, ``.py`` removed: its top-level package or module (``email/mime/text.py`` -> ``email``,
      ``difflib.py`` -> ``difflib``; see :func:`stdlib_group`). A group never spans two tasks, so no document,
      package or module is in two tasks. The group ``encodings`` is left out (:data:`STDLIB_TASK_SKIP`): its
      generated codec tables, whose comments are lists of character names, hold about 30 % of the corpus's
      tokens and would make one task mostly such lists.
    * Documents are visited in the corpus's fixed order (by the CRC-32 of their relative path, as
      :func:`pynas.rnn.data.make_stdlib_corpus` does). The first non-empty document of a group assigns the group
      to the task that holds the fewest tokens so far (ties: the lowest index), among the tasks not yet full;
      every later document of the group goes to that task. This keeps the tasks' sizes balanced.
    * A task is full at ``max_tokens`` tokens (``<eos>`` included): the document that reaches the cap is cut
      after its last whole sentence that fits, and the task's later documents are skipped (not read). Building
      stops when every task is full or the documents run out.
    * Inside a task each document goes whole to train, valid or test, to the split furthest below its share
      (90/5/5 % of the task's tokens) once the document is added: data.py's rule.

User tasks: :func:`read_text_task` (``train.txt``, ``valid.txt``, ``test.txt`` in a folder) and
:func:`read_tsv_task` (one column of a TSV file). Files are only opened and read as UTF-8 text, never imported or
executed.

The dictionary: the ``vocab_size - 1`` most frequent tokens of the training splits of all the tasks together
(ties broken alphabetically; a literal ``<unk>`` in the text is not counted), with ids in that order, then
``<unk>`` as the last id; every other token (of any split) becomes ``<unk>``. :func:`make_stdlib_tasks` builds it
over its tasks; :func:`tasks_dictionary` (re)builds it over any tasks (user tasks read one by one have their own
dictionaries) and re-encodes them. An :class:`LMTask` has the fields and the ``ntokens`` of
:class:`pynas.rnn.data.TextCorpus`, so it can stand where a corpus is expected.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .data import (EOS, STDLIB_MIN_TOKENS, UNK, Dictionary, _assign_split, _check_positive_int,
                   _decode_error_place, _document_tokens, _normalise, _stdlib_documents)

SPLITS = ("train", "valid", "test")
#: The files of a text task's folder, in split order.
TASK_FILES = ("train.txt", "valid.txt", "test.txt")
#: Groups of the stdlib corpus that no stdlib task holds (see the module docstring).
STDLIB_TASK_SKIP = frozenset({"encodings"})
DEFAULT_TASK_TOKENS = 40_000  # per stdlib task
DEFAULT_TASK_VOCAB = 5000  # the stdlib tasks' shared dictionary, <unk> included

_Documents = Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[str, ...]]


@dataclass
class LMTask:
    """One language-modelling task: 1-D int64 token ids per split, encoded with ``dictionary`` (shared between the
    tasks built together). ``documents``: for a stdlib task, the relative paths (under the stdlib folder) of the
    documents of each split (train, valid, test) in visiting order, the last document of a full task only in
    part; empty for user tasks."""

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    dictionary: Dictionary
    documents: _Documents = ((), (), ())

    @property
    def ntokens(self) -> int:
        """Vocabulary size (the language model's number of classes)."""
        return len(self.dictionary)

    def split(self, name: str) -> torch.Tensor:
        """The split ``"train"``, ``"valid"`` or ``"test"``."""
        if name not in SPLITS:
            raise ValueError(f"name: expected one of {', '.join(SPLITS)}, got {name!r}")
        return getattr(self, name)


# ------------------------------------------------------------------------------------------------ dictionary


def _build_dictionary(train_words: Iterable[List[str]], vocab_size: Optional[int]) -> Dictionary:
    """The shared dictionary of the module docstring over the training word lists (``None``: every word)."""
    counts: Counter = Counter()
    for words in train_words:
        counts.update(words)
    counts.pop(UNK, None)
    kept = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if vocab_size is not None:
        kept = kept[: vocab_size - 1]
    dictionary = Dictionary()
    for word, _ in kept:
        dictionary.add_word(word)
    dictionary.add_word(UNK)
    return dictionary


def _encode(words: List[str], dictionary: Dictionary) -> torch.Tensor:
    unk = dictionary.word2idx[UNK]
    get = dictionary.word2idx.get
    return torch.tensor([get(w, unk) for w in words], dtype=torch.long)


def _check_vocab_size(vocab_size: object) -> Optional[int]:
    if vocab_size is None:
        return None
    return _check_positive_int("vocab_size", vocab_size, minimum=3)


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    return name


def _make_tasks(names: Sequence[str], splits: Sequence[Tuple[List[str], List[str], List[str]]],
                vocab_size: Optional[int], documents: Optional[Sequence[_Documents]] = None) -> List[LMTask]:
    dictionary = _build_dictionary((s[0] for s in splits), vocab_size)
    tasks = []
    for k, (name, words) in enumerate(zip(names, splits)):
        train, valid, test = (_encode(w, dictionary) for w in words)
        docs = documents[k] if documents is not None else ((), (), ())
        tasks.append(LMTask(name, train, valid, test, dictionary, docs))
    return tasks


def tasks_dictionary(tasks: Sequence[LMTask], vocab_size: Optional[int]) -> List[LMTask]:
    """New tasks, the given ones re-encoded with one shared dictionary built over all their training splits.

    The dictionary is the module docstring's: the ``vocab_size - 1`` most frequent training tokens of all the tasks
    together (ties alphabetically; ``None``: every training token), ids in that order, then ``<unk>``. Each task's
    ids are read back to words with its own dictionary first, so a token that was ``<unk>`` stays ``<unk>``; a
    token of any split outside the new dictionary becomes ``<unk>``. Names and ``documents`` are kept; the given
    tasks are not changed.
    """
    if isinstance(tasks, LMTask) or not isinstance(tasks, Sequence) or not tasks:
        raise ValueError(f"tasks: expected a non-empty sequence of LMTask, got {type(tasks).__name__}")
    vocab_size = _check_vocab_size(vocab_size)
    seen = set()
    splits = []
    for i, task in enumerate(tasks):
        if not isinstance(task, LMTask):
            raise ValueError(f"tasks: expected LMTask items, got {type(task).__name__} at position {i}")
        if task.name in seen:
            raise ValueError(f"tasks: expected distinct task names, got {task.name!r} twice")
        seen.add(task.name)
        idx2word = task.dictionary.idx2word
        words = []
        for split in SPLITS:
            ids = task.split(split)
            if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype != torch.long:
                raise ValueError(f"tasks: task {task.name!r} {split}: expected a 1-D int64 tensor of ids, got "
                                 f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
            values = ids.tolist()
            bad = [v for v in values if not 0 <= v < len(idx2word)]
            if bad:
                raise ValueError(f"tasks: task {task.name!r} {split}: id {bad[0]} is outside its dictionary "
                                 f"(size {len(idx2word)})")
            words.append([idx2word[v] for v in values])
        splits.append(tuple(words))
    return _make_tasks([t.name for t in tasks], splits, vocab_size, [t.documents for t in tasks])


# ------------------------------------------------------------------------------------------------ stdlib


def stdlib_group(path: str) -> str:
    """The group of a stdlib document: the first component of its relative path, ``.py`` removed."""
    first = path.replace(os.sep, "/").split("/", 1)[0]
    return first[:-3] if first.endswith(".py") else first


def make_stdlib_tasks(n_tasks: int = 3, max_tokens: int = DEFAULT_TASK_TOKENS,
                      vocab_size: int = DEFAULT_TASK_VOCAB) -> List[LMTask]:
    """``n_tasks`` language-modelling tasks on disjoint groups of the stdlib corpus, with one shared dictionary.

    Tasks ``stdlib-0``, ``stdlib-1``, ...: each at most ``max_tokens`` tokens (``<eos>`` included; whole sentences
    only), the dictionary at most ``vocab_size`` entries (``<unk>`` included). The grouping, balancing and split
    rules are the module docstring's. Deterministic for a given Python installation; nothing is cached.
    """
    _check_positive_int("n_tasks", n_tasks)
    _check_positive_int("max_tokens", max_tokens)
    if max_tokens < STDLIB_MIN_TOKENS:
        raise ValueError(f"max_tokens: a stdlib task needs at least {STDLIB_MIN_TOKENS} tokens, got {max_tokens}")
    _check_positive_int("vocab_size", vocab_size, minimum=3)
    root, files = _stdlib_documents()
    owner: Dict[str, int] = {}
    sizes = [0] * n_tasks
    full = [False] * n_tasks
    split_sizes = [[0, 0, 0] for _ in range(n_tasks)]
    words: List[Tuple[List[str], List[str], List[str]]] = [([], [], []) for _ in range(n_tasks)]
    docs: List[Tuple[List[str], List[str], List[str]]] = [([], [], []) for _ in range(n_tasks)]
    for rel in files:
        if all(full):
            break
        group = stdlib_group(rel)
        if group in STDLIB_TASK_SKIP:
            continue
        k = owner.get(group)
        if k is not None and full[k]:
            continue
        doc = _document_tokens(os.path.join(root, rel))
        if not doc:
            continue
        if k is None:
            k = min((i for i in range(n_tasks) if not full[i]), key=lambda i: (sizes[i], i))
            owner[group] = k
        room = max_tokens - sizes[k]
        if len(doc) >= room:  # this document fills the task: keep its whole sentences that fit
            cut = room
            while cut > 0 and doc[cut - 1] != EOS:
                cut -= 1
            doc = doc[:cut]
            full[k] = True
            if not doc:
                continue
        s = _assign_split(split_sizes[k], len(doc))
        words[k][s].extend(doc)
        docs[k][s].append(rel)
        split_sizes[k][s] += len(doc)
        sizes[k] += len(doc)
    for k in range(n_tasks):
        empty = [SPLITS[s] for s in range(3) if not split_sizes[k][s]]
        if not full[k] and (sizes[k] < STDLIB_MIN_TOKENS or empty):  # the documents ran out
            raise RuntimeError(f"stdlib tasks: task {k} got only {sizes[k]} tokens (train/valid/test "
                               f"{'/'.join(map(str, split_sizes[k]))}) from the docstrings under {root}, at least "
                               f"{STDLIB_MIN_TOKENS} and every split needed; use fewer tasks (n_tasks={n_tasks})")
        if empty:
            raise ValueError(f"max_tokens: task {k}'s {' and '.join(empty)} split is empty at max_tokens={max_tokens} "
                             f"(train/valid/test {'/'.join(map(str, split_sizes[k]))} tokens); raise max_tokens")
    names = [f"stdlib-{k}" for k in range(n_tasks)]
    documents = [tuple(tuple(d) for d in task_docs) for task_docs in docs]
    return _make_tasks(names, words, vocab_size, documents)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ user files


def _line_words(line: str, normalise: bool) -> List[str]:
    return _normalise(line) if normalise else line.split()


def _read_lines(path: str, arg: str) -> Iterable[Tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; ValueError naming ``arg``, the file and the line on bad text."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{arg}: {path} is not UTF-8 text ({_decode_error_place(path, exc)})") from None
    for number, line in enumerate(lines, 1):
        if "\x00" in line:
            raise ValueError(f"{arg}: {path} line {number}: holds a NUL character; expected text")
        yield number, line


def read_text_task(name: str, folder: Union[str, os.PathLike], vocab_size: Optional[int] = None,
                   normalise: bool = False) -> LMTask:
    """A task from ``train.txt``, ``valid.txt`` and ``test.txt`` in ``folder``, read as the Penn Treebank files are.

    Every line (a blank one too) gives its whitespace-separated tokens and then ``<eos>``; with ``normalise`` the
    tokens are instead the stdlib corpus's (lowercase words, numbers -> ``N``, punctuation dropped). The dictionary
    (the module docstring's) is built over ``train.txt`` with at most ``vocab_size`` entries (``None``: every
    training token, and ``<unk>``); other tokens, and a literal ``<unk>``, become ``<unk>``. To share one
    dictionary with other tasks, pass the tasks to :func:`tasks_dictionary`.
    """
    name = _check_name(name)
    vocab_size = _check_vocab_size(vocab_size)
    if not isinstance(folder, (str, os.PathLike)):
        raise ValueError(f"folder: expected a path, got {type(folder).__name__}")
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder: no such directory: {folder}")
    splits = []
    for fname in TASK_FILES:
        path = os.path.join(folder, fname)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"folder: missing {fname} ({path}); a text task's folder must hold "
                                    f"{', '.join(TASK_FILES)}")
        words: List[str] = []
        for _, line in _read_lines(path, "folder"):
            words.extend(_line_words(line, normalise))
            words.append(EOS)
        if len(words) == words.count(EOS):
            raise ValueError(f"folder: {path} holds no tokens")
        splits.append(words)
    return _make_tasks([name], [tuple(splits)], vocab_size)[0]  # type: ignore[list-item]


def read_tsv_task(name: str, path: Union[str, os.PathLike], column: Union[int, str] = 0,
                  header: Optional[bool] = None, vocab_size: Optional[int] = None,
                  normalise: bool = False) -> LMTask:
    """A task from the text column ``column`` of the TSV file ``path``, split by rows into train, valid and test.

    Fields are separated by tabs, without quoting; empty lines are skipped. ``column`` is a 0-based index or, with
    a header row, a name in it; ``header`` says whether the first non-empty line is that header (default: when
    ``column`` is a name). A row gives its cell's whitespace-separated tokens (with ``normalise``, the stdlib
    corpus's tokens) and then ``<eos>``; a row whose cell has no token is skipped. The split, deterministic and
    in file order: each row goes whole to the split furthest below its share (90/5/5 % of the tokens) once the
    row is added (the rule of the stdlib corpus's documents), which spreads valid and test rows through the file
    (for rows of equal length, one row in twenty each: valid rows 6, 26, 46, ..., test rows 13, 33, 53, ...,
    counted from 0 among the text rows, so 14 rows at least). The dictionary is :func:`read_text_task`'s, over the
    train rows.
    """
    name = _check_name(name)
    vocab_size = _check_vocab_size(vocab_size)
    if isinstance(column, bool) or not (isinstance(column, int) and column >= 0
                                        or isinstance(column, str) and column != ""):
        raise ValueError(f"column: expected a 0-based index or a header name, got {column!r}")
    if header is None:
        header = isinstance(column, str)
    elif not isinstance(header, bool):
        raise ValueError(f"header: expected True, False or None, got {header!r}")
    if isinstance(column, str) and not header:
        raise ValueError(f"header: a column given by name ({column!r}) needs the header row, got header=False")
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path: expected a path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no such file: {path}")
    index = column if isinstance(column, int) else -1
    header_pending = header
    rows: List[List[str]] = []
    for number, line in _read_lines(path, "path"):
        line = line.rstrip("\r\n")
        if not line:
            continue
        fields = line.split("\t")
        if header_pending:  # the first non-empty line
            header_pending = False
            if isinstance(column, str):
                if fields.count(column) != 1:
                    found = "twice" if fields.count(column) else "not"
                    raise ValueError(f"column: {column!r} is {found} in the header of {path} (line {number}): "
                                     f"{fields}")
                index = fields.index(column)
            continue
        if index >= len(fields):
            raise ValueError(f"path: {path} line {number}: {len(fields)} column(s), column {column!r} (index {index}) "
                             f"needs at least {index + 1}")
        tokens = _line_words(fields[index], normalise)
        if tokens:
            tokens.append(EOS)
            rows.append(tokens)
    if not rows:
        raise ValueError(f"path: {path} holds no text rows in column {column!r}")
    splits: Tuple[List[str], List[str], List[str]] = ([], [], [])
    sizes = [0, 0, 0]
    for tokens in rows:
        s = _assign_split(sizes, len(tokens))
        splits[s].extend(tokens)
        sizes[s] += len(tokens)
    empty = [SPLITS[s] for s in range(3) if not sizes[s]]
    if empty:
        raise ValueError(f"path: {path} holds {len(rows)} text row(s), too few: the {' and '.join(empty)} split is "
                         f"empty (train/valid/test {'/'.join(map(str, sizes))} tokens)")
    return _make_tasks([name], [splits], vocab_size)[0]

