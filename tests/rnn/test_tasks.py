"""Related language-modelling tasks (pynas.rnn.tasks): the stdlib tasks (disjoint groups, balance, shared
dictionary, determinism; the grouping rule on a small library written here), the text and TSV readers on files
written by the tests, the shared dictionary over user tasks, and the errors."""
from __future__ import annotations

import itertools
import os
from collections import Counter

import pytest
import torch

from pynas.rnn import data as rd
from pynas.rnn import tasks as rt
from pynas.rnn.data import EOS, UNK

SMALL = dict(max_tokens=8000, vocab_size=400)


def words_of(task, split):
    return [task.dictionary.idx2word[i] for i in task.split(split).tolist()]


def mapped(words, dictionary):
    return [w if w in dictionary else UNK for w in words]


def deficit_split(sizes, n, fractions=(0.90, 0.05, 0.05)):
    """The split furthest below its share once n tokens are added (ties: the lower index), written out."""
    total = sum(sizes) + n
    best, best_deficit = 0, None
    for k in range(3):
        deficit = fractions[k] * total - sizes[k]
        if best_deficit is None or deficit > best_deficit:
            best, best_deficit = k, deficit
    return best


# ------------------------------------------------------------------------------------------ stdlib tasks


@pytest.fixture(scope="module")
def stdlib_tasks():
    return rt.make_stdlib_tasks()  # the defaults: 3 tasks


@pytest.fixture(scope="module")
def small_tasks():
    return rt.make_stdlib_tasks(3, **SMALL)


def test_stdlib_tasks_default_shape(stdlib_tasks):
    assert [t.name for t in stdlib_tasks] == ["stdlib-0", "stdlib-1", "stdlib-2"]
    for t in stdlib_tasks:
        assert isinstance(t, rt.LMTask)
        for split in rt.SPLITS:
            ids = t.split(split)
            assert ids.dtype == torch.long and ids.dim() == 1 and ids.numel() > 0
        total = sum(t.split(s).numel() for s in rt.SPLITS)
        assert total <= rt.DEFAULT_TASK_TOKENS
        assert total > 0.9 * rt.DEFAULT_TASK_TOKENS  # full: the library has far more than 3 * 40k tokens
        assert t.train.numel() > 0.75 * total
        assert 0.01 * total < t.valid.numel() < 0.15 * total and 0.01 * total < t.test.numel() < 0.15 * total


def test_stdlib_tasks_are_disjoint_by_document_and_group(stdlib_tasks):
    docs = [set(itertools.chain.from_iterable(t.documents)) for t in stdlib_tasks]
    for t, d in zip(stdlib_tasks, docs):
        assert d and sum(len(x) for x in t.documents) == len(d)  # no document in two splits
        assert not {rt.stdlib_group(p) for p in d} & rt.STDLIB_TASK_SKIP
    groups = [{rt.stdlib_group(p) for p in d} for d in docs]
    for a, b in itertools.combinations(range(3), 2):
        assert not docs[a] & docs[b]
        assert not groups[a] & groups[b]


def test_stdlib_tasks_share_one_dictionary_and_ids_are_valid(stdlib_tasks):
    d = stdlib_tasks[0].dictionary
    assert all(t.dictionary is d for t in stdlib_tasks)
    assert len(d) == rt.DEFAULT_TASK_VOCAB and d.idx2word[-1] == UNK and EOS in d
    assert all(t.ntokens == len(d) for t in stdlib_tasks)
    for t in stdlib_tasks:
        for split in rt.SPLITS:
            ids = t.split(split)
            assert int(ids.min()) >= 0 and int(ids.max()) < len(d)
    # ids in order of training frequency over all the tasks together (ties alphabetically), then <unk>
    counts = Counter()
    for t in stdlib_tasks:
        counts.update(words_of(t, "train"))
    counts.pop(UNK)
    assert d.idx2word[:-1] == [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def test_stdlib_task_sizes_are_balanced(stdlib_tasks, small_tasks):
    for ts in (stdlib_tasks, small_tasks):
        totals = [sum(t.split(s).numel() for s in rt.SPLITS) for t in ts]
        trains = [t.train.numel() for t in ts]
        assert max(totals) <= 3 * min(totals) and max(trains) <= 3 * min(trains)


def test_stdlib_tasks_are_deterministic(small_tasks):
    again = rt.make_stdlib_tasks(3, **SMALL)
    assert again[0].dictionary.idx2word == small_tasks[0].dictionary.idx2word
    for a, b in zip(small_tasks, again):
        assert a.name == b.name and a.documents == b.documents
        for split in rt.SPLITS:
            assert torch.equal(a.split(split), b.split(split))


def test_stdlib_tasks_hold_their_documents_text(small_tasks):
    """Each split is its documents' tokens (pynas.rnn.data's reading), in visiting order, mapped to the shared
    dictionary; only the task's last document may be cut (after a whole sentence), and the dictionary is the
    vocab_size - 1 most frequent training tokens."""
    root, order = rd._stdlib_documents()
    rank = {p: i for i, p in enumerate(order)}
    d = small_tasks[0].dictionary
    train_counts = Counter()
    for t in small_tasks:
        last = max(itertools.chain.from_iterable(t.documents), key=rank.__getitem__)
        for split, docs in zip(rt.SPLITS, t.documents):
            assert list(docs) == sorted(docs, key=rank.__getitem__)
            expected = list(itertools.chain.from_iterable(rd._document_tokens(os.path.join(root, p)) for p in docs))
            got = words_of(t, split)
            if last in docs:
                assert 0 < len(got) <= len(expected) and got[-1] == EOS
                expected = expected[:len(got)]
            assert got == mapped(expected, d)
            if split == "train":
                train_counts.update(expected)
    train_counts.pop(UNK, None)
    kept = sorted(train_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:SMALL["vocab_size"] - 1]
    assert d.idx2word == [w for w, _ in kept] + [UNK]


def test_stdlib_group():
    assert rt.stdlib_group("email/mime/text.py") == "email"
    assert rt.stdlib_group("difflib.py") == "difflib"
    assert rt.stdlib_group("encodings/cp1252.py") == "encodings"


def _sentences(word, n_tokens, per=10):
    """A docstring of n_tokens // per sentences, each per - 1 copies of word and its <eos>."""
    return " ".join(" ".join([word] * (per - 1)) + "." for _ in range(n_tokens // per))


# path, word, tokens, tokens per sentence; visited in this order
FAKE_LIBRARY = [
    ("alpha.py", "alpha", 400, 10), ("beta/one.py", "beta", 300, 10), ("gamma.py", "gamma", 100, 10),
    ("beta/two.py", "beta", 300, 10), ("encodings/cp.py", "enc", 500, 10), ("delta.py", "delta", 500, 10),
    ("beta/__init__.py", "beta", 200, 10), ("epsilon/a.py", "epsilon", 50, 10), ("zeta.py", "zeta", 50, 10),
    ("beta/three.py", "beta", 100, 10), ("eta.py", "eta", 150, 15), ("theta.py", "theta", 100, 10),
]


@pytest.fixture
def fake_library(tmp_path, monkeypatch):
    for path, word, n, per in FAKE_LIBRARY:
        f = tmp_path / path
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f'"""{_sentences(word, n, per)}"""\n', encoding="utf-8")
    (tmp_path / "empty.py").write_text("x = 1\n", encoding="utf-8")
    order = [p for p, *_ in FAKE_LIBRARY[:1]] + ["empty.py"] + [p for p, *_ in FAKE_LIBRARY[1:]]
    monkeypatch.setattr(rt, "_stdlib_documents", lambda: (str(tmp_path), order))
    read = []
    real = rt._document_tokens

    def recording(path):
        read.append(os.path.relpath(path, tmp_path).replace(os.sep, "/"))
        return real(path)

    monkeypatch.setattr(rt, "_document_tokens", recording)
    return read


def test_grouping_rule_on_a_small_library(fake_library):
    """Worked by hand: a group goes, at its first non-empty document, to the task with the fewest tokens among the
    tasks not full (ties: the lower index); encodings is skipped; the document reaching the cap is cut after a
    whole sentence; documents of a full task, and every one once all are full, are not read.

    sizes (task 0, task 1): alpha 400 -> 0 (400, 0); beta 300 -> 1 (400, 300); gamma 100 -> 1 (400, 400);
    beta 300 -> 1 (400, 700); delta 500 -> 0 (900, 700); beta 200 -> 1 (900, 900); epsilon 50 -> 0 (tie; 950, 900);
    zeta 50 -> 1 (950, 950); beta/three 100 -> 1, cut to 50: full; eta (sentences of 15) -> 0, cut to 45: full.
    """
    a, b = rt.make_stdlib_tasks(2, max_tokens=1000, vocab_size=50)
    assert a.documents == (("alpha.py", "delta.py"), ("epsilon/a.py",), ("eta.py",))
    assert b.documents == (("beta/one.py", "gamma.py", "beta/two.py", "beta/__init__.py"), ("zeta.py",),
                           ("beta/three.py",))
    assert [len(a.split(s)) for s in rt.SPLITS] == [900, 50, 45]
    assert [len(b.split(s)) for s in rt.SPLITS] == [900, 50, 50]
    assert words_of(a, "test") == ([UNK] * 14 + [EOS]) * 3  # eta: 3 whole sentences of 15; not a training word
    assert words_of(b, "test") == (["beta"] * 9 + [EOS]) * 5
    assert "encodings/cp.py" not in fake_library and "theta.py" not in fake_library
    assert fake_library.count("empty.py") == 1
    # training counts: beta 720, delta 450, alpha 360, <eos> 180, gamma 90; epsilon, zeta, eta are valid / test only
    assert a.dictionary is b.dictionary
    assert a.dictionary.idx2word == ["beta", "delta", "alpha", EOS, "gamma", UNK]
    assert words_of(a, "valid") == ([UNK] * 9 + [EOS]) * 5
    # the splits follow the deficit rule, replayed here
    for task in (a, b):
        sizes = [0, 0, 0]
        for path, split in sorted(((p, k) for k, docs in enumerate(task.documents) for p in docs),
                                  key=lambda pk: [p for p, *_ in FAKE_LIBRARY].index(pk[0])):
            n = {"beta/three.py": 50, "eta.py": 45}.get(path) or next(x[2] for x in FAKE_LIBRARY if x[0] == path)
            assert deficit_split(sizes, n) == split
            sizes[split] += n


def test_small_vocabulary_maps_the_rest_to_unk(fake_library):
    a, b = rt.make_stdlib_tasks(2, max_tokens=1000, vocab_size=4)
    assert a.dictionary.idx2word == ["beta", "delta", "alpha", UNK]
    assert words_of(a, "train")[:10] == ["alpha"] * 9 + [UNK]  # <eos> is not among the 3 most frequent here


def test_stdlib_tasks_errors(fake_library):
    for kw, arg in [(dict(n_tasks=0), "n_tasks"), (dict(n_tasks=True), "n_tasks"),
                    (dict(max_tokens=999), "max_tokens"),
                    (dict(max_tokens=2.5e4), "max_tokens"), (dict(vocab_size=2), "vocab_size"),
                    (dict(vocab_size="10"), "vocab_size")]:
        with pytest.raises(ValueError, match=f"^{arg}: "):
            rt.make_stdlib_tasks(**kw)
    # 3 tasks of 1000 from the small library: task 0 gets alpha, epsilon, zeta, eta (650 tokens) when it runs out
    with pytest.raises(RuntimeError, match=r"^stdlib tasks: task 0 got only 650 tokens \(train/valid/test 600/50/0\)"):
        rt.make_stdlib_tasks(3, max_tokens=1000)
    with pytest.raises(ValueError, match=r"^max_tokens: task 0's test split is empty"):
        rt.make_stdlib_tasks(1, max_tokens=1000)


def test_lm_task_split_name():
    t = rt.LMTask("x", torch.zeros(3, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                  torch.zeros(1, dtype=torch.long), rd.Dictionary())
    assert t.split("valid") is t.valid and t.documents == ((), (), ())
    with pytest.raises(ValueError, match="^name: "):
        t.split("dev")


# ------------------------------------------------------------------------------------------------ text files


def _write_task(folder, train="a b a\nc a\n\n", valid="a d\n", test="<unk> b\n"):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in zip(rt.TASK_FILES, (train, valid, test)):
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_read_text_task_eos_unk_and_dictionary(tmp_path):
    t = rt.read_text_task("mine", _write_task(tmp_path / "t"))
    assert t.name == "mine" and t.documents == ((), (), ())
    # train counts: a 3, <eos> 3 (one per line, the blank one too), b 1, c 1; ties alphabetically ('<' < 'a')
    assert t.dictionary.idx2word == [EOS, "a", "b", "c", UNK]
    assert words_of(t, "train") == ["a", "b", "a", EOS, "c", "a", EOS, EOS]
    assert t.train.tolist() == [1, 2, 1, 0, 3, 1, 0, 0]
    assert words_of(t, "valid") == ["a", UNK, EOS]  # d is not a training word
    assert words_of(t, "test") == [UNK, "b", EOS]  # a literal <unk> is <unk>
    small = rt.read_text_task("mine", str(tmp_path / "t"), vocab_size=3)
    assert small.dictionary.idx2word == [EOS, "a", UNK]
    assert words_of(small, "train") == ["a", UNK, "a", EOS, UNK, "a", EOS, EOS]


def test_read_text_task_normalise_and_crlf(tmp_path):
    folder = tmp_path / "n"
    folder.mkdir()
    (folder / "train.txt").write_bytes("The Cat, 42 cats!\r\nCafé don't\r\n".encode("utf-8"))
    (folder / "valid.txt").write_text("the cat\n", encoding="utf-8")
    (folder / "test.txt").write_text("cats\n", encoding="utf-8")
    t = rt.read_text_task("n", folder, normalise=True)
    assert words_of(t, "train") == ["the", "cat", "N", "cats", EOS, "cafe", "don't", EOS]
    raw = rt.read_text_task("n", folder)
    assert words_of(raw, "train") == ["The", "Cat,", "42", "cats!", EOS, "Café", "don't", EOS]


def test_read_text_task_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="^folder: no such directory"):
        rt.read_text_task("x", tmp_path / "nowhere")
    folder = _write_task(tmp_path / "t")
    os.remove(folder / "valid.txt")
    with pytest.raises(FileNotFoundError, match=r"^folder: missing valid\.txt"):
        rt.read_text_task("x", folder)
    _write_task(folder, test="\n  \n")
    with pytest.raises(ValueError, match=r"^folder: .*test\.txt holds no tokens"):
        rt.read_text_task("x", folder)
    _write_task(folder)
    (folder / "train.txt").write_bytes(b"fine line\nbad \xff byte\n")
    with pytest.raises(ValueError, match=r"^folder: .*train\.txt is not UTF-8 text \(line 2"):
        rt.read_text_task("x", folder)
    (folder / "train.txt").write_bytes(b"ok\nnul \x00 here\n")
    with pytest.raises(ValueError, match=r"^folder: .*train\.txt line 2: holds a NUL"):
        rt.read_text_task("x", folder)
    _write_task(folder)
    for kw, arg in [(dict(name=""), "name"), (dict(name=3), "name"), (dict(vocab_size=2), "vocab_size"),
                    (dict(folder=3), "folder")]:
        args = dict(name="x", folder=folder)
        args.update(kw)
        with pytest.raises(ValueError, match=f"^{arg}: "):
            rt.read_text_task(**args)


# ------------------------------------------------------------------------------------------------- TSV files


def _write_tsv(path, rows=40, header=True):
    lines = ["id\tsentence\tlabel"] if header else []
    lines += [f"{k}\tw{k % 3} row{k} common\tlab" for k in range(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _rows_of(words):
    return [int(w[3:]) for w in words if w.startswith("row")]


def test_read_tsv_task_rows_and_split(tmp_path):
    path = _write_tsv(tmp_path / "d.tsv")
    t = rt.read_tsv_task("tsv", path, column="sentence", vocab_size=None)
    # equal rows of 4 tokens: the deficit rule, replayed here
    sizes, expected = [0, 0, 0], ([], [], [])
    for k in range(40):
        s = deficit_split(sizes, 4)
        sizes[s] += 4
        expected[s].append(k)
    assert expected[1] == [6, 26] and expected[2] == [13, 33]
    d = t.dictionary
    assert _rows_of(words_of(t, "train")) == expected[0]
    assert words_of(t, "valid") == ["w0", UNK, "common", EOS, "w2", UNK, "common", EOS]  # rows 6, 26
    assert words_of(t, "test") == ["w1", UNK, "common", EOS, "w0", UNK, "common", EOS]
    assert "row6" not in d and "row0" in d and "lab" not in d and "sentence" not in d
    # the same by index, with the header skipped
    by_index = rt.read_tsv_task("tsv", str(path), column=1, header=True)
    assert by_index.dictionary.idx2word == d.idx2word
    for split in rt.SPLITS:
        assert torch.equal(by_index.split(split), t.split(split))


def test_read_tsv_task_skips_empty_lines_and_cells(tmp_path):
    path = tmp_path / "e.tsv"
    rows = [f"a{k} b\tx" for k in range(20)]
    rows[3] = "\tx"  # an empty cell: skipped
    text = "\n".join(rows[:10]) + "\n\n\r\n" + "\r\n".join(rows[10:]) + "\r\n"
    path.write_text(text, encoding="utf-8")
    t = rt.read_tsv_task("e", path)  # column 0, no header
    got = [w for split in rt.SPLITS for w in words_of(t, split)]
    assert len(got) == 19 * 3 and got.count(EOS) == 19  # 20 rows, one empty cell, blank lines skipped
    assert "a3" not in t.dictionary and "x" not in t.dictionary and "a0" in t.dictionary
    assert words_of(t, "train")[:9] == ["a0", "b", EOS, "a1", "b", EOS, "a2", "b", EOS]
    assert words_of(t, "train")[9:12] == ["a4", "b", EOS]


def test_read_tsv_task_errors(tmp_path):
    path = _write_tsv(tmp_path / "d.tsv")
    with pytest.raises(FileNotFoundError, match="^path: no such file"):
        rt.read_tsv_task("x", tmp_path / "none.tsv")
    with pytest.raises(FileNotFoundError, match="^path: no such file"):
        rt.read_tsv_task("x", tmp_path)
    with pytest.raises(ValueError, match=r"^column: 'text' is not in the header of .*d\.tsv \(line 1\)"):
        rt.read_tsv_task("x", path, column="text")
    (tmp_path / "dup.tsv").write_text("a\ta\nx\ty\n", encoding="utf-8")
    with pytest.raises(ValueError, match="^column: 'a' is twice in the header"):
        rt.read_tsv_task("x", tmp_path / "dup.tsv", column="a")
    with pytest.raises(ValueError, match=r"^path: .*d\.tsv line 2: 3 column\(s\), column 5"):
        rt.read_tsv_task("x", path, column=5, header=True)
    short = _write_tsv(tmp_path / "short.tsv", rows=13)
    with pytest.raises(ValueError, match=r"^path: .*short\.tsv holds 13 text row\(s\), too few: the test split"):
        rt.read_tsv_task("x", short, column="sentence")
    (tmp_path / "blank.tsv").write_text("h\n\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="^path: .*holds no text rows"):
        rt.read_tsv_task("x", tmp_path / "blank.tsv", column="h")
    (tmp_path / "bad.tsv").write_bytes(b"h\nok\n\xc3\x28\n")
    with pytest.raises(ValueError, match=r"^path: .*bad\.tsv is not UTF-8 text \(line 3"):
        rt.read_tsv_task("x", tmp_path / "bad.tsv", column="h")
    for kw, arg in [(dict(column=-1), "column"), (dict(column=True), "column"), (dict(column=""), "column"),
                    (dict(column=1.0), "column"), (dict(column="sentence", header=False), "header"),
                    (dict(header="yes"), "header"), (dict(vocab_size=0), "vocab_size"), (dict(name=None), "name"),
                    (dict(path=None), "path")]:
        args = dict(name="x", path=path, column=1, header=True)
        args.update(kw)
        with pytest.raises(ValueError, match=f"^{arg}: "):
            rt.read_tsv_task(**args)


# ------------------------------------------------------------------------------------------ shared dictionary


def test_tasks_dictionary_shares_and_re_encodes(tmp_path):
    one = rt.read_text_task("one", _write_task(tmp_path / "1", train="a a a b\n", valid="a b\n", test="b z\n"))
    two = rt.read_text_task("two", _write_task(tmp_path / "2", train="c c b y\n", valid="c\n", test="y a\n"))
    before = [words_of(t, s) for t in (one, two) for s in rt.SPLITS]
    shared = rt.tasks_dictionary([one, two], None)
    d = shared[0].dictionary
    assert shared[1].dictionary is d and one.dictionary is not d
    # training counts over both: a 3, b 2, c 2, <eos> 2, y 1; ties alphabetically ('<' < 'b')
    assert d.idx2word == ["a", EOS, "b", "c", "y", UNK]
    assert [words_of(t, s) for t in shared for s in rt.SPLITS] == before  # z was <unk> already
    assert [t.name for t in shared] == ["one", "two"]
    assert [words_of(t, s) for t in (one, two) for s in rt.SPLITS] == before  # inputs unchanged
    capped = rt.tasks_dictionary(shared, 4)
    assert capped[0].dictionary.idx2word == ["a", EOS, "b", UNK]
    assert words_of(capped[1], "train") == [UNK, UNK, "b", UNK, EOS]
    assert words_of(capped[1], "test") == [UNK, UNK, EOS]  # a was <unk> for task two's own dictionary already


def test_tasks_dictionary_keeps_stdlib_documents(fake_library):
    tasks = rt.make_stdlib_tasks(2, max_tokens=1000, vocab_size=50)
    again = rt.tasks_dictionary(tasks, 50)
    assert [t.documents for t in again] == [t.documents for t in tasks]
    assert again[0].dictionary.idx2word == tasks[0].dictionary.idx2word
    for a, b in zip(tasks, again):
        for split in rt.SPLITS:
            assert torch.equal(a.split(split), b.split(split))


def test_tasks_dictionary_errors(tmp_path):
    one = rt.read_text_task("one", _write_task(tmp_path / "1"))
    for tasks, match in [([], "^tasks: expected a non-empty"), (one, "^tasks: expected a non-empty"),
                         ([one, "two"], "^tasks: expected LMTask items, got str at position 1"),
                         ([one, one], "^tasks: expected distinct task names")]:
        with pytest.raises(ValueError, match=match):
            rt.tasks_dictionary(tasks, None)
    bad = rt.LMTask("bad", torch.tensor([0, 99]), one.valid, one.test, one.dictionary)
    with pytest.raises(ValueError, match="^tasks: task 'bad' train: id 99 is outside its dictionary"):
        rt.tasks_dictionary([bad], None)
    bad = rt.LMTask("bad", one.train.float(), one.valid, one.test, one.dictionary)
    with pytest.raises(ValueError, match="^tasks: task 'bad' train: expected a 1-D int64"):
        rt.tasks_dictionary([bad], None)
    with pytest.raises(ValueError, match="^vocab_size: "):
        rt.tasks_dictionary([one], 1)
