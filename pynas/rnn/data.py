"""Word-level corpora for the DARTS RNN search (a language model, as in the PTB setup of DARTS).

Two corpora are available:

``stdlib`` (the default, no download)
    Built at run time from the docstrings and comments of the Python standard
    library's ``.py`` sources (found via ``sysconfig.get_paths()["stdlib"]``; test
    suites, ``idlelib``, ``lib2to3`` and ``site-packages`` are left out). The files are
    only read with :mod:`ast` and :mod:`tokenize`; no module is ever imported, and
    files that cannot be read or parsed are skipped. Doctest examples, pragmas and
    comment lines that look like code are dropped. Text is normalised the Penn
    Treebank way: lowercase words of letters (apostrophes inside a word are kept:
    ``don't``; accents are stripped), numbers become ``N``, other punctuation is
    dropped, one sentence per line with ``<eos>`` at its end. The
    ``vocab_size - 1`` most frequent tokens are kept (ties broken alphabetically),
    the rest become ``<unk>``. Documents (files) are visited in a fixed order (by the
    CRC-32 of their path relative to the stdlib folder, so a small corpus still samples
    the whole library), collection stops at ``max_tokens`` and each document goes whole
    to train, valid or test so that the splits hold about 90/5/5 % of the tokens. The
    result depends only on the Python installation; nothing is cached on disk. CPython
    3.11 gives about 620k tokens in all (so the default ``max_tokens`` of 1M is not
    reached), with a 10k vocabulary and under 1 % ``<unk>``; building it takes a few
    seconds.

``ptb``
    The Penn Treebank files ``ptb.train.txt``, ``ptb.valid.txt`` and ``ptb.test.txt``
    (Mikolov's preprocessed version) in a directory given with ``--data-dir``.
    Tokenised as the DARTS reference does: every line is split on whitespace and
    ``<eos>`` appended; one dictionary holds the words of the three files in order of
    first appearance (train, then valid, then test).

:func:`batchify` and :func:`get_batch` cut a token stream into the (time, batch)
columns and (input, target) pairs of truncated back-propagation through time.
"""
from __future__ import annotations

import ast
import io
import os
import re
import sysconfig
import tokenize
import unicodedata
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch

EOS = "<eos>"
UNK = "<unk>"
PTB_FILES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)  # train, valid, test (share of tokens)
DEFAULT_MAX_TOKENS = 1_000_000  # the stdlib corpus's default cap
STDLIB_MIN_TOKENS = 1000  # the smallest stdlib corpus built

# Folder names never descended into under the stdlib directory.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib",
                        "lib2to3", "__pycache__"})
# A word: ASCII letters, with apostrophes only between letters; or a number.
_TOKEN_RE = re.compile(r"[a-z]+(?:'[a-z]+)*|[0-9]+(?:[.,][0-9]+)*")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+")
# Comment lines left out: pragmas and lines that look like Python code.
_COMMENT_SKIP_RE = re.compile(
    r"^(?:noqa|type:|pragma|fmt:|pylint:|isort:)|^(?:import |from \S+ import |def |class |"
    r"return\b|raise\b|del |print\(|self\.|assert )|[=(\[{\\]$|\w\(.*\)$| = |==|\.\w+\(",
    re.IGNORECASE)
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": " "})


class Dictionary:
    """A word <-> id mapping; ids are given in order of first addition."""

    def __init__(self) -> None:
        self.word2idx: Dict[str, int] = {}
        self.idx2word: List[str] = []

    def add_word(self, word: str) -> int:
        """Add ``word`` if new; return its id."""
        idx = self.word2idx.get(word)
        if idx is None:
            idx = len(self.idx2word)
            self.word2idx[word] = idx
            self.idx2word.append(word)
        return idx

    def __len__(self) -> int:
        return len(self.idx2word)

    def __contains__(self, word: object) -> bool:
        return word in self.word2idx


@dataclass
class TextCorpus:
    """A tokenised corpus: 1-D int64 token ids per split and the shared dictionary."""

    dictionary: Dictionary
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    name: str

    @property
    def ntokens(self) -> int:
        """Vocabulary size (the language model's number of classes)."""
        return len(self.dictionary)


def _ids(words: List[str], dictionary: Dictionary) -> torch.Tensor:
    return torch.tensor([dictionary.add_word(w) for w in words], dtype=torch.long)


# --------------------------------------------------------------------------- PTB


def _read_ptb_file(path: str) -> List[str]:
    words: List[str] = []
    try:
        with open(path, "r", encoding="utf-8") as f:
            for line in f:
                words.extend(line.split())
                words.append(EOS)
    except UnicodeDecodeError as exc:
        raise ValueError(f"data_dir: {path} is not UTF-8 text ({_decode_error_place(path, exc)}); --data-dir must "
                         f"hold the PTB text files") from None
    if len(words) == words.count(EOS):
        raise ValueError(f"data_dir: {path} holds no tokens")
    return words


def _decode_error_place(path: str, exc: UnicodeDecodeError) -> str:
    """Where a file stops being UTF-8: its line and byte offset (the decoder's own offset is within a chunk)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        raw.decode("utf-8")
    except UnicodeDecodeError as whole:
        bad = raw[whole.start:whole.start + 4]
        line = raw.count(b"\n", 0, whole.start) + 1
        return f"line {line}, byte {whole.start}: {whole.reason} {bad!r}"
    except OSError:
        pass
    return exc.reason


def load_ptb(data_dir: str) -> TextCorpus:
    """Load the Penn Treebank files ``ptb.{train,valid,test}.txt`` from ``data_dir``."""
    if not data_dir:
        raise ValueError("data_dir: --data ptb needs --data-dir")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir: no such directory: {data_dir} (check --data-dir)")
    paths = [os.path.join(data_dir, name) for name in PTB_FILES]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"data_dir: missing {os.path.basename(path)} ({path}); --data-dir must hold "
                f"{', '.join(PTB_FILES)}")
    dictionary = Dictionary()
    train, valid, test = (_ids(_read_ptb_file(p), dictionary) for p in paths)
    return TextCorpus(dictionary, train, valid, test, "ptb")


# ------------------------------------------------------------------------ stdlib


def _stdlib_files(root: str) -> List[str]:
    """Relative paths of the stdlib's ``.py`` files, minus tests and tools, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=None, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    found = [p.replace(os.sep, "/") for p in found]
    return sorted(found)


def _docstrings(tree: ast.AST) -> Iterator[Tuple[int, str]]:
    """(line, text) of the docstrings of the module, its classes and functions (nested too)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield node.body[0].lineno, doc
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            value = getattr(node, field, None)
            if isinstance(value, list):
                stack.extend(c for c in value if isinstance(c, ast.AST))


def _comments(source: str) -> Iterator[Tuple[int, str]]:
    """(line, text) of comment blocks: runs of whole-line comments on consecutive lines, or
    one trailing comment. Pragmas, shebang / coding lines and lines that look like code are left out."""
    block: List[str] = []
    start = last = -1
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        row, col = tok.start
        text = tok.string.lstrip("#").strip()
        whole_line = not tok.line[:col].strip()
        if block and not (whole_line and row == last + 1):
            yield start, "\n".join(block)
            block = []
        if _COMMENT_SKIP_RE.search(text) or (row <= 2 and text.startswith(("!", "-*-"))):
            text = ""  # keeps the block's line numbering; an empty line ends a paragraph
        if not block:
            start = row
        block.append(text)
        last = row
        if not whole_line:
            yield start, "\n".join(block)
            block = []
    if block:
        yield start, "\n".join(block)


def _normalise(text: str) -> List[str]:
    """PTB-style tokens of one sentence: lowercase words, numbers -> ``N``."""
    if not text.isascii():
        text = unicodedata.normalize("NFKD", text.translate(_APOSTROPHES))
        text = text.encode("ascii", "ignore").decode("ascii")  # drop accents and other scripts
    text = text.replace("`", " ").lower()
    return ["N" if t[0].isdigit() else t for t in _TOKEN_RE.findall(text)]


def _sentences(doc: str) -> Iterator[List[str]]:
    """Token lists, one per sentence, of a docstring (doctest examples are left out)."""
    for paragraph in re.split(r"\n\s*\n", doc):
        lines = []
        for line in paragraph.splitlines():
            s = line.strip()
            if s.startswith(">>>"):
                break  # the rest of the paragraph is an interactive example and its output
            lines.append(s)
        for sentence in _SENTENCE_END_RE.split(" ".join(lines)):
            tokens = _normalise(sentence)
            if tokens:
                tokens.append(EOS)
                yield tokens


def _document_tokens(path: str) -> List[str]:
    """Sentence tokens of one source file's docstrings and comments, in line order; empty if the
    file cannot be read, decoded, parsed or tokenised."""
    try:
        with tokenize.open(path) as f:
            source = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=path)
            texts = list(_docstrings(tree))
            texts.extend(_comments(source))
    except (OSError, SyntaxError, ValueError, UnicodeError, RecursionError, MemoryError,
            tokenize.TokenError):
        return []
    texts.sort(key=lambda lt: lt[0])
    tokens: List[str] = []
    for _, text in texts:
        for sentence in _sentences(text):
            tokens.extend(sentence)
    return tokens


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


_HINT = "use a downloaded corpus instead: --data ptb --data-dir DIR"


def _stdlib_documents() -> Tuple[str, List[str]]:
    """The stdlib folder and its documents in visiting order: a fixed, path-hash order, so that a small corpus
    spans the whole library."""
    root = sysconfig.get_paths().get("stdlib")
    if not root or not os.path.isdir(root):
        raise RuntimeError(f"stdlib corpus: the Python standard library folder was not found "
                           f"({root!r}); {_HINT}")
    return root, sorted(_stdlib_files(root), key=lambda p: (zlib.crc32(p.encode("utf-8")), p))


def stdlib_min_tokens(train: int, valid: int, test: int = 0, limit: int = DEFAULT_MAX_TOKENS) -> Optional[int]:
    """The smallest ``max_tokens`` at which the stdlib corpus is made of whole documents and its splits hold at
    least ``train``, ``valid`` and ``test`` tokens (every larger cap has them too); None when even ``limit``
    tokens do not. Documents are read in the corpus's order until the splits are large enough."""
    root, files = _stdlib_documents()
    sizes = [0, 0, 0]
    total = 0
    for rel in files:
        n = len(_document_tokens(os.path.join(root, rel)))
        if not n:
            continue
        if total + n > limit:
            return None
        k = _assign_split(sizes, n)
        sizes[k] += n
        total += n
        if sizes[0] >= train and sizes[1] >= valid and sizes[2] >= test:
            return max(total, STDLIB_MIN_TOKENS)
    return None


def _assign_split(sizes: List[int], n: int) -> int:
    """Split (0 train, 1 valid, 2 test) furthest below its token share once ``n`` tokens are added."""
    total = sum(sizes) + n
    deficits = [frac * total - size for frac, size in zip(SPLIT_FRACTIONS, sizes)]
    return max(range(3), key=lambda k: (deficits[k], -k))


def make_stdlib_corpus(max_tokens: int = DEFAULT_MAX_TOKENS, vocab_size: int = 10000) -> TextCorpus:
    """Build the embedded ``stdlib`` corpus from the standard library's docstrings.

    At most ``max_tokens`` tokens (``<eos>`` included; whole sentences only) and at most
    ``vocab_size`` dictionary entries (``<eos>`` and ``<unk>`` included). Deterministic
    for a given Python installation.
    """
    _check_positive_int("max_tokens", max_tokens)
    if max_tokens < STDLIB_MIN_TOKENS:
        raise ValueError(f"max_tokens: the stdlib corpus needs at least {STDLIB_MIN_TOKENS} tokens, got {max_tokens}")
    _check_positive_int("vocab_size", vocab_size, minimum=3)
    root, files = _stdlib_documents()
    splits: Tuple[List[str], List[str], List[str]] = ([], [], [])
    sizes = [0, 0, 0]
    total = 0
    for rel in files:
        doc = _document_tokens(os.path.join(root, rel))
        if not doc:
            continue
        room = max_tokens - total
        full = len(doc) <= room
        if not full:  # keep whole sentences only
            cut = room
            while cut > 0 and doc[cut - 1] != EOS:
                cut -= 1
            doc = doc[:cut]
            if not doc:
                break
        k = _assign_split(sizes, len(doc))
        splits[k].extend(doc)
        sizes[k] += len(doc)
        total += len(doc)
        if not full or total >= max_tokens:
            break
    if total < STDLIB_MIN_TOKENS:
        raise RuntimeError(f"stdlib corpus: only {total} tokens found in the docstrings under "
                           f"{root}; {_HINT}")

    counts = Counter(splits[0])
    counts.update(splits[1])
    counts.update(splits[2])
    counts.pop(UNK, None)
    kept = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: vocab_size - 1]
    keep = {w for w, _ in kept}
    dictionary = Dictionary()
    tensors = [_ids([w if w in keep else UNK for w in words], dictionary) for words in splits]
    dictionary.add_word(UNK)  # always present, even when nothing was mapped to it
    return TextCorpus(dictionary, tensors[0], tensors[1], tensors[2], "stdlib")


# ------------------------------------------------------------------------ common


def load_corpus(name: str, data_dir: Optional[str] = None, **kw) -> TextCorpus:
    """Load corpus ``name``: ``"stdlib"`` (options ``max_tokens``, ``vocab_size``) or ``"ptb"``."""
    if name == "stdlib":
        return make_stdlib_corpus(**kw)
    if name == "ptb":
        if kw:
            raise ValueError(f"data: --data ptb takes no options, got {sorted(kw)}")
        if not data_dir:
            raise ValueError("data_dir: --data ptb needs --data-dir")
        return load_ptb(data_dir)
    raise ValueError(f"data: unknown corpus {name!r}; expected 'stdlib' or 'ptb'")


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    """Cut a 1-D token stream into ``bsz`` contiguous columns: (N // bsz, bsz); the tail is dropped."""
    _check_positive_int("bsz", bsz)
    if not isinstance(data, torch.Tensor) or data.dim() != 1:
        raise ValueError(f"data: expected a 1-D tensor of token ids, got "
                         f"{tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__}")
    if data.numel() < 2 * bsz:
        raise ValueError(f"data: {data.numel()} tokens are too few for bsz={bsz} "
                         f"(need at least 2 * bsz = {2 * bsz})")
    nbatch = data.numel() // bsz
    return data[: nbatch * bsz].view(bsz, nbatch).t().contiguous()


def get_batch(source: torch.Tensor, i: int, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``source[i:i+T]`` (T, B) and flattened next-token targets (T*B,).

    ``T = min(seq_len, len(source) - 1 - i)``.
    """
    if not isinstance(source, torch.Tensor) or source.dim() != 2:
        raise ValueError("source: expected a 2-D (time, batch) tensor from batchify")
    _check_positive_int("seq_len", seq_len)
    length = source.size(0)
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < length - 1:
        raise ValueError(f"i: expected 0 <= i < {length - 1} (len(source) - 1), got {i!r}")
    t = min(seq_len, length - 1 - i)
    return source[i:i + t], source[i + 1:i + 1 + t].reshape(-1)
