"""Corpora and batching for the RNN search: PTB files, the embedded stdlib corpus, batchify/get_batch."""
import os
import re
import sysconfig
from collections import Counter

import pytest
import torch

from pynas.rnn import data as rd

SMALL = 50_000


# ----------------------------------------------------------------------------- Dictionary


def test_dictionary_ids_in_order_of_first_addition():
    d = rd.Dictionary()
    assert [d.add_word(w) for w in ["b", "a", "b", "c", "a"]] == [0, 1, 0, 2, 1]
    assert d.idx2word == ["b", "a", "c"]
    assert d.word2idx == {"b": 0, "a": 1, "c": 2}
    assert len(d) == 3


# ----------------------------------------------------------------------------------- PTB


def _write_ptb(tmp_path, train=" the cat sat \n a dog\n", valid=" the dog ran\n", test=" new cat\n"):
    for name, text in zip(rd.PTB_FILES, (train, valid, test)):
        (tmp_path / name).write_text(text, encoding="utf-8")
    return str(tmp_path)


def test_load_ptb_dictionary_order_eos_and_round_trip(tmp_path):
    c = rd.load_ptb(_write_ptb(tmp_path))
    assert c.name == "ptb"
    assert c.dictionary.idx2word == ["the", "cat", "sat", "<eos>", "a", "dog", "ran", "new"]
    assert c.ntokens == 8
    words = lambda t: [c.dictionary.idx2word[i] for i in t.tolist()]  # noqa: E731
    assert words(c.train) == ["the", "cat", "sat", "<eos>", "a", "dog", "<eos>"]
    assert words(c.valid) == ["the", "dog", "ran", "<eos>"]
    assert words(c.test) == ["new", "cat", "<eos>"]
    assert c.train.tolist() == [0, 1, 2, 3, 4, 5, 3]
    for t in (c.train, c.valid, c.test):
        assert t.dtype == torch.long and t.dim() == 1


def test_load_ptb_missing_file_names_it(tmp_path):
    d = _write_ptb(tmp_path)
    os.remove(os.path.join(d, "ptb.valid.txt"))
    with pytest.raises(FileNotFoundError, match=r"ptb\.valid\.txt") as e:
        rd.load_ptb(d)
    assert "--data-dir" in str(e.value)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        rd.load_ptb(str(tmp_path / "nowhere"))


def test_load_ptb_empty_file_names_it(tmp_path):
    d = _write_ptb(tmp_path, test="\n  \n")
    with pytest.raises(ValueError, match=r"ptb\.test\.txt"):
        rd.load_ptb(d)


def test_load_corpus_dispatch_and_errors(tmp_path):
    c = rd.load_corpus("ptb", _write_ptb(tmp_path))
    assert c.name == "ptb" and c.ntokens == 8
    with pytest.raises(ValueError, match="data_dir: --data ptb needs --data-dir"):
        rd.load_corpus("ptb")
    with pytest.raises(ValueError, match="data"):
        rd.load_corpus("wikitext")
    with pytest.raises(ValueError, match="max_tokens"):
        rd.load_corpus("stdlib", max_tokens=0)
    s = rd.load_corpus("stdlib", max_tokens=5000, vocab_size=100)
    assert s.name == "stdlib" and s.ntokens <= 100


# -------------------------------------------------------------------------------- stdlib


@pytest.fixture(scope="module")
def small():
    return rd.make_stdlib_corpus(max_tokens=SMALL)


@pytest.fixture(scope="module")
def small_uncapped():
    return rd.make_stdlib_corpus(max_tokens=SMALL, vocab_size=10 ** 9)


def _words(c, t):
    return [c.dictionary.idx2word[i] for i in t.tolist()]


def test_stdlib_corpus_is_deterministic(small):
    again = rd.make_stdlib_corpus(max_tokens=SMALL)
    assert again.dictionary.idx2word == small.dictionary.idx2word
    for a, b in zip((again.train, again.valid, again.test), (small.train, small.valid, small.test)):
        assert torch.equal(a, b)


def test_stdlib_corpus_sizes_and_ids(small):
    sizes = [t.numel() for t in (small.train, small.valid, small.test)]
    total = sum(sizes)
    assert 0.9 * SMALL <= total <= SMALL  # max_tokens respected, and nearly reached
    assert all(n > 0 for n in sizes)
    assert sizes[0] > 0.75 * total and all(0.02 * total < n < 0.12 * total for n in sizes[1:])
    assert small.name == "stdlib"
    assert small.ntokens == len(small.dictionary) <= 10000
    for t in (small.train, small.valid, small.test):
        assert t.dtype == torch.long and t.dim() == 1
        assert 0 <= int(t.min()) and int(t.max()) < small.ntokens
        assert small.dictionary.idx2word[int(t[-1])] == "<eos>"  # whole sentences only


def test_stdlib_corpus_vocabulary_is_ptb_style(small):
    assert "<unk>" in small.dictionary.word2idx and "<eos>" in small.dictionary.word2idx
    word = re.compile(r"[a-z]+(?:'[a-z]+)*")
    for w in small.dictionary.idx2word:
        assert w in ("<unk>", "<eos>", "N") or word.fullmatch(w), w
    assert "N" in small.dictionary.word2idx
    # no empty sentences: <eos> never follows <eos>
    eos = small.dictionary.word2idx["<eos>"]
    for t in (small.train, small.valid, small.test):
        assert not bool(((t[1:] == eos) & (t[:-1] == eos)).any())
        assert int(t[0]) != eos


def test_stdlib_vocab_cap_keeps_most_frequent_ties_alphabetical(small_uncapped):
    cap = 500
    capped = rd.make_stdlib_corpus(max_tokens=SMALL, vocab_size=cap)
    assert capped.ntokens == cap
    streams = [_words(small_uncapped, t) for t in (small_uncapped.train, small_uncapped.valid,
                                                   small_uncapped.test)]
    counts = Counter(w for s in streams for w in s)
    expected = {w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: cap - 1]}
    assert set(capped.dictionary.idx2word) == expected | {"<unk>"}
    assert "<eos>" in expected
    for s, t in zip(streams, (capped.train, capped.valid, capped.test)):
        assert _words(capped, t) == [w if w in expected else "<unk>" for w in s]
    unk = capped.dictionary.word2idx["<unk>"]
    assert bool((capped.train == unk).any())


def test_stdlib_splits_are_prefix_stable_whole_documents(small_uncapped):
    """Documents are visited in a fixed order and each goes whole to one split, so a bigger corpus
    extends each split of a smaller one (the last, possibly cut, document aside)."""
    big = rd.make_stdlib_corpus(max_tokens=2 * SMALL, vocab_size=10 ** 9)
    for a, b in zip((small_uncapped.train, small_uncapped.valid, small_uncapped.test),
                    (big.train, big.valid, big.test)):
        wa, wb = _words(small_uncapped, a), _words(big, b)
        n = len(wa)
        while n and wa[:n] != wb[:n]:  # allow the one truncated last document
            n -= 1
        assert n > 0.5 * len(wa) and n > 0
    assert sum(t.numel() for t in (big.train, big.valid, big.test)) <= 2 * SMALL


def test_assign_split_targets_90_5_5():
    sizes = [0, 0, 0]
    for n in [300, 50, 1000, 20, 80, 400, 60, 700, 90, 30] * 20:
        k = rd._assign_split(sizes, n)
        sizes[k] += n
    total = sum(sizes)
    assert abs(sizes[0] / total - 0.9) < 0.03
    assert all(abs(s / total - 0.05) < 0.02 for s in sizes[1:])


def test_stdlib_max_tokens_respected():
    for m in (1200, 3000, 7777):
        c = rd.make_stdlib_corpus(max_tokens=m, vocab_size=50)
        assert sum(t.numel() for t in (c.train, c.valid, c.test)) <= m
        assert c.ntokens <= 50


@pytest.mark.parametrize("kw, name", [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"),
                                      ({"max_tokens": True}, "max_tokens"), ({"vocab_size": 2}, "vocab_size"),
                                      ({"vocab_size": "10"}, "vocab_size")])
def test_stdlib_bad_arguments(kw, name):
    with pytest.raises(ValueError, match=name):
        rd.make_stdlib_corpus(**kw)


def test_stdlib_missing_or_tiny_library_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(tmp_path / "none")})
    with pytest.raises(RuntimeError, match="--data ptb --data-dir"):
        rd.make_stdlib_corpus()
    (tmp_path / "mod.py").write_text('"""A tiny module."""\n', encoding="utf-8")
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(tmp_path)})
    with pytest.raises(RuntimeError, match="--data ptb --data-dir"):
        rd.make_stdlib_corpus()


def test_stdlib_file_walk_skips_tests_and_tools(tmp_path):
    for rel in ["a.py", "pkg/b.py", "pkg/tests/t.py", "test/x.py", "idlelib/i.py", "lib2to3/l.py",
                "site-packages/s.py", "pkg/__pycache__/b.py", "notes.txt"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x = 1\n")
    assert rd._stdlib_files(str(tmp_path)) == ["a.py", "pkg/b.py"]


def test_document_tokens_normalisation(tmp_path):
    src = '''#!/usr/bin/env python
# -*- coding: utf-8 -*-
"""Don't Panic: 42 apples, 3.5 pears.

Second paragraph?  Yes!

>>> print(1)
1
"""
import os  # noqa: F401

# A comment block that
# goes on over two lines.
# x = compute(y)

def f():
    """Return the Café's value."""
    return 1  # trailing remark
'''
    path = tmp_path / "m.py"
    path.write_text(src, encoding="utf-8")
    got = " ".join(rd._document_tokens(str(path)))
    assert got == ("don't panic N apples N pears <eos> second paragraph <eos> yes <eos> "
                   "a comment block that goes on over two lines <eos> "
                   "return the cafe's value <eos> trailing remark <eos>")
    bad = tmp_path / "bad.py"
    bad.write_text('"""Docs."""\ndef (:\n', encoding="utf-8")
    assert rd._document_tokens(str(bad)) == []
    assert rd._document_tokens(str(tmp_path / "missing.py")) == []


# ---------------------------------------------------------------------------- batching


def test_batchify_hand_computed():
    data = torch.arange(11)
    b = rd.batchify(data, 3)
    assert b.shape == (3, 3) and b.is_contiguous()
    assert b.tolist() == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]  # column j = j-th chunk; 9, 10 dropped
    assert torch.equal(rd.batchify(torch.arange(8), 1), torch.arange(8).view(8, 1))
    assert rd.batchify(torch.arange(4), 2).tolist() == [[0, 2], [1, 3]]


@pytest.mark.parametrize("data, bsz, name", [(torch.arange(10), 0, "bsz"), (torch.arange(10), -1, "bsz"),
                                             (torch.arange(10), 2.0, "bsz"), (torch.arange(5), 3, "data"),
                                             (torch.arange(12).view(3, 4), 2, "data")])
def test_batchify_bad_arguments(data, bsz, name):
    with pytest.raises(ValueError, match=name):
        rd.batchify(data, bsz)


def test_get_batch_hand_computed():
    src = rd.batchify(torch.arange(12), 2)  # [[0, 6], [1, 7], ..., [5, 11]]
    x, y = rd.get_batch(src, 0, 3)
    assert x.tolist() == [[0, 6], [1, 7], [2, 8]]
    assert y.tolist() == [1, 7, 2, 8, 3, 9]
    x, y = rd.get_batch(src, 3, 5)  # T = min(5, 6 - 1 - 3) = 2
    assert x.tolist() == [[3, 9], [4, 10]]
    assert y.tolist() == [4, 10, 5, 11]
    x, y = rd.get_batch(src, 4, 1)
    assert x.shape == (1, 2) and y.tolist() == [5, 11]


@pytest.mark.parametrize("i, seq_len, name", [(5, 2, "i"), (-1, 2, "i"), (0, 0, "seq_len"), (0, -3, "seq_len"),
                                              (1.0, 2, "i")])
def test_get_batch_bad_arguments(i, seq_len, name):
    src = rd.batchify(torch.arange(12), 2)
    with pytest.raises(ValueError, match=name):
        rd.get_batch(src, i, seq_len)


def test_batches_cover_the_stream(small):
    """Walking get_batch over batchify's output predicts every next token of each column."""
    src = rd.batchify(small.valid, 4)
    seen = []
    for i in range(0, src.size(0) - 1, 35):
        x, y = rd.get_batch(src, i, 35)
        assert x.shape[0] * x.shape[1] == y.numel()
        seen.append(y.view(-1, 4))
    assert torch.equal(torch.cat(seen), src[1:])


def test_ptb_invalid_utf8_names_the_file(tmp_path):
    d = _write_ptb(tmp_path)
    bad = os.path.join(d, "ptb.valid.txt")
    with open(bad, "wb") as fh:
        fh.write(b"the dog \xff\xfe ran\n")
    with pytest.raises(ValueError, match=re.escape(bad)) as e:
        rd.load_ptb(d)
    assert "UTF-8" in str(e.value) and "--data-dir" in str(e.value)


@pytest.mark.parametrize("cap", [1, 10, 999])
def test_stdlib_max_tokens_below_the_minimum_names_the_cap(cap):
    with pytest.raises(ValueError, match=r"^max_tokens: .*at least 1000") as e:
        rd.make_stdlib_corpus(max_tokens=cap)
    assert str(cap) in str(e.value)
