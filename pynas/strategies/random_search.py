"""Plain random search over the DARTS spaces: the control of the DARTS paper (Liu, Simonyan and Yang, ICLR 2019,
Sections 3.2-3.3, Tables 1 and 2).

Sample ``n_samples`` architectures uniformly from the space (the paper: 24 cells on CIFAR-10, 8 on PTB), train the
network of each briefly from scratch, keep the one with the best **validation** score and report it; it is then
trained fully with the evaluation protocol (``pynas train``). The paper trains each candidate for the "short
period" it uses to pick among its own four DARTS runs, 100 epochs on CIFAR-10 and 300 on PTB; the defaults here
are shorter (``epochs``: 10 for the CNN, 20 for the RNN): set ``epochs`` to 100 / 300 for the paper's.

Sampling (shared with random search with weight sharing, Li and Talwalkar, UAI 2019; :func:`sample_cnn_genotype`,
:func:`sample_rnn_genotype`): in a CNN cell every node takes 2 distinct predecessors, uniformly, and 2 operations
drawn with replacement from the candidates ('none' only with ``allow_none``; the plain baseline leaves it out);
in the RNN cell every node takes 1 predecessor and 1 activation other than 'none', uniformly.
:func:`cnn_arch_to_onehot` / :func:`rnn_arch_to_onehot` turn a genotype into the one-hot architecture tensors of
the search networks.

Training and scoring each candidate: the evaluation-phase trainers (:mod:`pynas.train.cnn`,
:mod:`pynas.train.rnn`) with the settings of ``train``, for ``epochs`` epochs. The test split is never used:

* CNN: the candidates train on the first images of the training split and are scored on its last
  ``valid_portion`` (no augmentation, eval mode), the accuracy after the last epoch; the test images are not even
  loaded (:class:`CNNCandidateTraining`). Higher is better.
* RNN: the corpus's validation text, which pynas.rnn.data keeps apart from the test text; the score is the best
  validation perplexity of the training (the trainer keeps the best weights, NT-ASGD as in the evaluation); the
  test text is not evaluated (:class:`RNNCandidateTraining`). Lower is better.

Ties go to the lower index; a score that is not finite ranks last. Every candidate trains with the same
training seed (``seed``), so the scores differ by architecture, not by initialisation; the genotypes are all
sampled up front from ``random.Random(seed)``, so they do not depend on the training.

The run folder: ``random_search.json`` (the settings, every default filled in, and the sampled genotypes),
``candidate_<i>/`` (candidate i's training: its ``genotype.json``, ``checkpoint.pt`` after every epoch,
``metrics.csv``), ``results.jsonl`` (one JSON line per finished candidate, appended with flush and fsync) and at
the end ``genotype.json`` (the best candidate's cells). A killed run resumes from its folder
(:func:`run_random_search` with ``resume``): the candidates of ``results.jsonl`` are not trained again (a last
line cut by the kill is dropped), an unfinished one continues exactly from its checkpoint, the settings are the
saved ones (only ``device`` and ``backend`` may change).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..cnn.data import ImageData
from ..cnn.genotypes import Genotype
from ..cnn.genotypes import from_json as cnn_from_json
from ..cnn.genotypes import to_json as cnn_to_json
from ..cnn.operations import OPS, PRIMITIVES
from ..rnn import genotypes as rnn_genotypes
from ..search.checkpoint import CHECKPOINT_NAME, remove_stale_temporaries
from ..search.config import (_is_int, check_flag, check_number, check_optional_int, check_place, check_positive_int,
                             check_seed)
from ..train.cnn import CNNTrainConfig, CNNTraining, load_split
from ..train.rnn import RNNTrainConfig, RNNTraining

RNNGenotype = rnn_genotypes.Genotype
RNN_PRIMITIVES = rnn_genotypes.PRIMITIVES

SPACES = ("cnn", "rnn")
DEFAULT_SAMPLES = {"cnn": 24, "rnn": 8}  # the DARTS paper's
DEFAULT_EPOCHS = {"cnn": 10, "rnn": 20}  # per candidate; the paper's "short period" is PAPER_EPOCHS
PAPER_EPOCHS = {"cnn": 100, "rnn": 300}
DEFAULT_VALID_PORTION = 0.1  # CNN: the share of the training images held out for scoring
METRIC = {"cnn": "val_acc", "rnn": "val_ppl"}
#: the trainer settings the search sets itself (not in ``train``)
SEARCH_FIELDS = ("genotype", "epochs", "steps_per_epoch", "seed", "device", "backend")
STATE_NAME = "random_search.json"
RESULTS_NAME = "results.jsonl"
GENOTYPE_NAME = "genotype.json"
STATE_FORMAT, STATE_VERSION = "pynas-random-search", 1


# ----------------------------------------------------------------------------- sampling
def _check_rng(rng) -> None:
    if not isinstance(rng, random.Random):
        raise ValueError(f"rng: expected a random.Random, got {type(rng).__name__}")


def _check_primitives(primitives, known, space: str) -> List[str]:
    if isinstance(primitives, (str, bytes)) or not isinstance(primitives, Sequence) or not primitives:
        raise ValueError(f"primitives: expected a non-empty list of {space} op names, got {primitives!r}")
    names = list(primitives)
    for name in names:
        if not isinstance(name, str) or name not in known:
            raise ValueError(f"primitives: {name!r} is not a {space} op (known: {', '.join(known)})")
    if len(set(names)) != len(names):
        raise ValueError(f"primitives: an op is listed twice in {names}")
    return names


def sample_cnn_genotype(rng: random.Random, steps: int = 4, multiplier: int = 4,
                        primitives: Sequence[str] = PRIMITIVES, allow_none: bool = False) -> Genotype:
    """A CNN genotype drawn uniformly from the DARTS space: for each node i (0-based) of the normal cell, then of
    the reduction cell, 2 distinct predecessors from the i + 2 states before it (``rng.sample``) and for each an
    op drawn with replacement from ``primitives`` ('none' only with ``allow_none``: Li and Talwalkar's CNN
    sampler includes it; pynas's evaluation network and genotype files take it as a zero input); concat: the last
    ``multiplier`` states. The genes list, node by node, the two (op, input) pairs in the order drawn."""
    _check_rng(rng)
    check_positive_int("steps", steps)
    check_positive_int("multiplier", multiplier)
    if multiplier > steps:
        raise ValueError(f"multiplier: expected at most steps ({steps}), got {multiplier}")
    names = _check_primitives(primitives, OPS, "cnn")
    check_flag("allow_none", allow_none)
    ops = [p for p in names if allow_none or p != "none"]
    if not ops:
        raise ValueError("primitives: no op to sample (only 'none', and allow_none is False)")

    def cell() -> List[Tuple[str, int]]:
        genes = []
        for i in range(steps):
            for j in rng.sample(range(i + 2), 2):
                genes.append((rng.choice(ops), j))
        return genes

    normal = cell()
    reduce = cell()
    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(normal=normal, normal_concat=concat, reduce=reduce, reduce_concat=list(concat))


def sample_rnn_genotype(rng: random.Random, steps: int = rnn_genotypes.STEPS, concat: int = rnn_genotypes.CONCAT,
                        primitives: Sequence[str] = RNN_PRIMITIVES) -> RNNGenotype:
    """An RNN genotype drawn uniformly from the DARTS space: node i (0-based) takes one predecessor from
    ``range(i + 1)`` and then one activation from ``primitives`` other than 'none'; concat: the last ``concat`` of
    the ``steps + 1`` states, as :func:`pynas.rnn.genotypes.derive` makes it."""
    _check_rng(rng)
    check_positive_int("steps", steps)
    check_positive_int("concat", concat)
    if concat > steps + 1:
        raise ValueError(f"concat: expected at most steps + 1 ({steps + 1}), got {concat}")
    ops = [p for p in _check_primitives(primitives, RNN_PRIMITIVES, "rnn") if p != "none"]
    if not ops:
        raise ValueError("primitives: no activation to sample (only 'none')")
    genes = []
    for i in range(steps):
        j = rng.randrange(i + 1)
        genes.append((rng.choice(ops), j))
    return RNNGenotype(recurrent=genes, concat=list(range(steps + 1))[-concat:])


# ----------------------------------------------------------------------------- one-hot architectures
def _onehot(genes, steps: int, names: List[str], per_node: int, first_inputs: int, what: str) -> torch.Tensor:
    """(E, K) with 1.0 at each gene's (edge, op): node i has i + first_inputs incoming edges, numbered on from the
    edges of the nodes before it."""
    if not isinstance(genes, (list, tuple)) or len(genes) != per_node * steps:
        n = len(genes) if isinstance(genes, (list, tuple)) else genes
        raise ValueError(f"genotype: {what} has {n} genes, expected {per_node * steps} ({per_node} per node, "
                         f"{steps} steps)")
    edges = sum(i + first_inputs for i in range(steps))
    out = torch.zeros(edges, len(names))
    offset = 0
    for i in range(steps):
        for op, j in genes[per_node * i:per_node * (i + 1)]:
            if op not in names:
                raise ValueError(f"genotype: {what} node {i} has op {op!r}, not one of primitives {names}")
            if not _is_int(j) or not 0 <= j < i + first_inputs:
                raise ValueError(f"genotype: {what} node {i} can take a state 0..{i + first_inputs - 1}, got {j!r}")
            out[offset + j, names.index(op)] = 1.0
        offset += i + first_inputs
    return out


def cnn_arch_to_onehot(genotype: Genotype, steps: int = 4,
                       primitives: Sequence[str] = PRIMITIVES) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (normal, reduce) one-hot architecture tensors of a CNN genotype, each (E, K) float32 with
    E = sum_{i < steps} (2 + i) (14 for 4 steps) and K = len(primitives): 1.0 at each chosen (edge, op), 0
    elsewhere; the edge of (node i, input j) is sum_{i' < i} (2 + i') + j, as in the search network's alphas."""
    if not isinstance(genotype, Genotype):
        raise ValueError(f"genotype: expected a CNN Genotype, got {type(genotype).__name__}")
    check_positive_int("steps", steps)
    names = _check_primitives(primitives, OPS, "cnn")
    return (_onehot(genotype.normal, steps, names, 2, 2, "normal"),
            _onehot(genotype.reduce, steps, names, 2, 2, "reduce"))


def rnn_arch_to_onehot(genotype: RNNGenotype, steps: int = rnn_genotypes.STEPS,
                       primitives: Sequence[str] = RNN_PRIMITIVES) -> torch.Tensor:
    """The one-hot architecture tensor of an RNN genotype, (E, K) float32 with E = steps (steps + 1) / 2 (36 for
    8 steps) and K = len(primitives) (5): 1.0 at each chosen (edge, op); the edge of (node i, input j) is
    sum_{i' < i} (i' + 1) + j, as in the search cell's weights."""
    if not isinstance(genotype, RNNGenotype):
        raise ValueError(f"genotype: expected an RNN Genotype, got {type(genotype).__name__}")
    check_positive_int("steps", steps)
    names = _check_primitives(primitives, RNN_PRIMITIVES, "rnn")
    return _onehot(genotype.recurrent, steps, names, 1, 1, "recurrent")


# ----------------------------------------------------------------------------- the candidates' trainers
def split_validation(data: ImageData, valid_portion: float) -> Tuple[ImageData, ImageData]:
    """(the first images, the last ``floor(valid_portion * n)``) of a training split; both non-empty."""
    n = len(data)
    n_valid = int(math.floor(valid_portion * n))
    if n_valid < 1 or n_valid >= n:
        raise ValueError(f"valid_portion: {valid_portion} of {n} training images leaves "
                         f"{'no validation' if n_valid < 1 else 'no training'} image")
    cut = n - n_valid

    def part(sl):
        return ImageData(data.images[sl], data.labels[sl], data.num_classes, data.name, data.augment)

    return part(slice(0, cut)), part(slice(cut, n))


class CNNCandidateTraining(CNNTraining):
    """The CNN trainer with a validation split in place of the test split: it trains on the first images of the
    training split and evaluates the last ``valid_portion`` after every epoch (history keys ``val_loss``,
    ``val_acc``); the test images are never loaded. ``data``: the training split, loaded once by the search
    (None: loaded here)."""

    HELD_OUT = "val"

    def __init__(self, cfg: CNNTrainConfig, save_dir: Optional[str] = None, log: Callable[[str], None] = print,
                 progress: bool = True, genotype: Optional[Genotype] = None,
                 valid_portion: float = DEFAULT_VALID_PORTION, data: Optional[ImageData] = None):
        self.valid_portion, self._data = valid_portion, data
        super().__init__(cfg, save_dir=save_dir, log=log, progress=progress, genotype=genotype)
        self._data = None

    def load_data(self):
        data = self._data if self._data is not None else load_split(self.cfg, True)
        return split_validation(data, self.valid_portion)

    def score(self, result: dict) -> dict:
        return {"score": result["val_acc"], "val_loss": result["val_loss"], "parameters": result["parameters"]}


class RNNCandidateTraining(RNNTraining):
    """The RNN trainer without its final test: the result is the best validation loss and perplexity."""

    def __init__(self, cfg: RNNTrainConfig, save_dir: Optional[str] = None, log: Callable[[str], None] = print,
                 progress: bool = True, genotype: Optional[RNNGenotype] = None, valid_portion=None, data=None):
        super().__init__(cfg, save_dir=save_dir, log=log, progress=progress, genotype=genotype)

    def finish(self) -> dict:
        loss = self.best_val_loss
        ppl = math.exp(min(loss, 50)) if loss is not None else float("nan")
        self.log(f"best validation perplexity {ppl:.2f}")
        return {"val_loss": loss, "val_ppl": ppl, "history": self.history}

    def score(self, result: dict) -> dict:
        return {"score": result["val_ppl"], "val_loss": result["val_loss"],
                "parameters": sum(p.numel() for p in self.model.parameters())}


TRAINING = {"cnn": CNNCandidateTraining, "rnn": RNNCandidateTraining}
TRAIN_CONFIG = {"cnn": CNNTrainConfig, "rnn": RNNTrainConfig}


# ----------------------------------------------------------------------------- settings
@dataclass
class RandomSearchConfig:
    """Settings of a plain random search; None picks the space's default (see the module docstring)."""

    space: str = "cnn"  # 'cnn' or 'rnn'
    n_samples: Optional[int] = None  # candidates (None: 24 for cnn, 8 for rnn, the DARTS paper's)
    seed: int = 0  # the sampler's (random.Random(seed)) and every candidate's training seed
    epochs: Optional[int] = None  # per candidate (None: 10 cnn / 20 rnn; the paper's short period: 100 / 300)
    steps_per_epoch: Optional[int] = None  # cap on a candidate's training iterations per epoch (None: a full pass)
    valid_portion: Optional[float] = None  # cnn: share of the training images held out for scoring (None: 0.1)
    # the other settings of each candidate's training: a dict of CNNTrainConfig / RNNTrainConfig fields, or such a
    # config (its genotype, epochs, steps_per_epoch, seed, device and backend are the search's); None: their defaults
    train: Optional[Any] = None
    device: str = "cpu"
    backend: str = "auto"


def _train_settings(cfg: RandomSearchConfig) -> Dict[str, Any]:
    """Every setting of a candidate's training but those the search sets (SEARCH_FIELDS), ``train`` applied."""
    config_cls = TRAIN_CONFIG[cfg.space]
    fields = [f.name for f in dataclasses.fields(config_cls) if f.name not in SEARCH_FIELDS]
    settings = {name: getattr(config_cls(), name) for name in fields}
    train = cfg.train
    if train is None:
        return settings
    if isinstance(train, (CNNTrainConfig, RNNTrainConfig)):
        if not isinstance(train, config_cls):
            raise ValueError(f"train: a {cfg.space} search trains with a {config_cls.__name__}, got a "
                             f"{type(train).__name__}")
        return {name: getattr(train, name) for name in fields}
    if not isinstance(train, dict):
        raise ValueError(f"train: expected a dict of {config_cls.__name__} settings or a {config_cls.__name__}, "
                         f"got {type(train).__name__}")
    for key, value in train.items():
        if key in SEARCH_FIELDS:
            raise ValueError(f"train: {key!r} is a setting of the search itself (RandomSearchConfig.{key})"
                             if key != "genotype" else "train: 'genotype' is what the search samples")
        if key not in settings:
            raise ValueError(f"train: {key!r} is not a setting of {config_cls.__name__} (known: {', '.join(fields)})")
        settings[key] = value
    return settings


def resolve_config(cfg: RandomSearchConfig) -> RandomSearchConfig:
    """A checked copy of ``cfg`` with every default filled in and ``train`` as the full dict of the candidates'
    other training settings; a ValueError names the first bad setting."""
    if not isinstance(cfg, RandomSearchConfig):
        raise ValueError(f"cfg: expected a RandomSearchConfig, got {type(cfg).__name__}")
    if cfg.space not in SPACES:
        raise ValueError(f"space: expected 'cnn' or 'rnn', got {cfg.space!r}")
    space = cfg.space
    check_optional_int("n_samples", cfg.n_samples)
    check_seed(cfg.seed)
    check_optional_int("epochs", cfg.epochs)
    check_optional_int("steps_per_epoch", cfg.steps_per_epoch)
    check_place(cfg)
    valid_portion = cfg.valid_portion
    if space == "cnn":
        if valid_portion is None:
            valid_portion = DEFAULT_VALID_PORTION
        valid_portion = check_number("valid_portion", valid_portion, 0.0, 1.0, low_open=True, high_open=True)
    elif valid_portion is not None:
        raise ValueError(f"valid_portion: the rnn space scores on the corpus's own validation text; leave it None, "
                         f"got {valid_portion!r}")
    out = RandomSearchConfig(space=space, n_samples=cfg.n_samples or DEFAULT_SAMPLES[space], seed=cfg.seed,
                             epochs=cfg.epochs or DEFAULT_EPOCHS[space], steps_per_epoch=cfg.steps_per_epoch,
                             valid_portion=valid_portion, train=_train_settings(cfg), device=cfg.device,
                             backend=cfg.backend)
    if space == "cnn" and out.train.get("num_test") is not None:
        raise ValueError("num_test: a random search never uses the test split; leave train['num_test'] unset")
    trainer_cfg = candidate_config(out, 0)
    TRAINING[space].check_config(trainer_cfg, check_genotype=False)
    if space == "cnn":  # the split, checked before any image is loaded
        n = trainer_cfg.num_train or (10000 if trainer_cfg.data == "shapes10" else 50000)
        n_valid = int(math.floor(valid_portion * n))
        if n_valid < 1 or n_valid >= n:
            raise ValueError(f"valid_portion: {valid_portion} of {n} training images leaves "
                             f"{'no validation' if n_valid < 1 else 'no training'} image")
    return out


def candidate_config(cfg: RandomSearchConfig, index: int):
    """The training settings of candidate ``index`` of a resolved search (:func:`resolve_config`)."""
    return TRAIN_CONFIG[cfg.space](genotype=f"candidate_{index}", epochs=cfg.epochs,
                                   steps_per_epoch=cfg.steps_per_epoch, seed=cfg.seed, device=cfg.device,
                                   backend=cfg.backend, **cfg.train)


def sample_genotypes(cfg: RandomSearchConfig) -> list:
    """The ``n_samples`` genotypes of a search, drawn in order from ``random.Random(seed)``."""
    rng = random.Random(cfg.seed)
    sample = sample_cnn_genotype if cfg.space == "cnn" else sample_rnn_genotype
    return [sample(rng) for _ in range(cfg.n_samples)]


def best_candidate(scores: Sequence[Optional[float]], space: str) -> int:
    """The index of the best score: the highest accuracy (cnn) or the lowest perplexity (rnn); ties to the lower
    index; a score that is None or not finite ranks last."""
    if space not in SPACES:
        raise ValueError(f"space: expected 'cnn' or 'rnn', got {space!r}")
    if not scores:
        raise ValueError("scores: no candidate to choose from")
    sign = -1.0 if space == "cnn" else 1.0

    def key(i):
        s = scores[i]
        ok = isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
        return (0, sign * s, i) if ok else (1, 0.0, i)

    return min(range(len(scores)), key=key)


def _genotype_json(space: str, genotype) -> str:
    return cnn_to_json(genotype) if space == "cnn" else rnn_genotypes.to_json(genotype)


def _parse_genotype(space: str, data):
    return cnn_from_json(data) if space == "cnn" else rnn_genotypes.from_json(data)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_results(path: str, space: str, genotypes: list) -> Dict[int, dict]:
    """The finished candidates of a ``results.jsonl``, checked against the search's genotypes. A last line that is
    not complete JSON (a write cut by a kill) is dropped, and the file rewritten without it; any other bad line
    is a ValueError."""
    try:
        with open(path, "rb") as fh:
            text = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return {}
    lines = text.split("\n")
    numbered = [(k + 1, line) for k, line in enumerate(lines) if line.strip()]
    records: Dict[int, dict] = {}
    kept: List[str] = []
    for pos, (number, line) in enumerate(numbered):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if pos == len(numbered) - 1:
                continue  # cut by a kill
            raise ValueError(f"resume: {path}: line {number} is not JSON") from None
        where = f"resume: {path}: line {number}"
        if not isinstance(rec, dict) or not _is_int(rec.get("index")) or not 0 <= rec["index"] < len(genotypes):
            raise ValueError(f"{where}: expected a candidate record with an index in [0, {len(genotypes)})")
        i = rec["index"]
        if i in records:
            raise ValueError(f"{where}: candidate {i} is listed twice")
        if rec.get("metric") != METRIC[space] or isinstance(rec.get("score"), bool) or \
                not isinstance(rec.get("score"), (int, float)):
            raise ValueError(f"{where}: expected a {METRIC[space]} score for candidate {i}")
        try:
            same = _genotype_json(space, _parse_genotype(space, rec.get("genotype"))) == \
                _genotype_json(space, genotypes[i])
        except (ValueError, TypeError):
            same = False
        if not same:
            raise ValueError(f"{where}: candidate {i}'s genotype is not the one this search sampled")
        records[i] = rec
        kept.append(line)
    if len(kept) != len(numbered) or (kept and not text.endswith("\n")):
        _write_atomic(path, "".join(line + "\n" for line in kept))
    return records


# ----------------------------------------------------------------------------- the search
class RandomSearch:
    """A plain random search run: build it (or :meth:`resume` one), call :meth:`run`; see
    :func:`run_random_search`."""

    def __init__(self, cfg: RandomSearchConfig, save_dir: Optional[str] = None, log: Callable[[str], None] = print,
                 progress: bool = True):
        self.cfg = resolve_config(cfg)
        self.save_dir, self.log, self.progress = save_dir, log, progress
        self.genotypes = sample_genotypes(self.cfg)
        self.results: Dict[int, dict] = {}
        self.resumed = False
        self._data = None  # the CNN training split, loaded once
        self._folder_ready = False

    # -- the run folder ----------------------------------------------------------
    def state(self) -> dict:
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "config": dataclasses.asdict(self.cfg),
                "genotypes": [json.loads(_genotype_json(self.cfg.space, g)) for g in self.genotypes]}

    @classmethod
    def resume(cls, folder: str, cfg: Optional[RandomSearchConfig] = None, log: Callable[[str], None] = print,
               progress: bool = True) -> "RandomSearch":
        """The search of a run folder with its own settings (``cfg``: only its device and backend are taken), its
        genotypes and its finished candidates."""
        if not isinstance(folder, str) or not folder:
            raise ValueError(f"resume: expected a run folder, got {folder!r}")
        path = os.path.join(folder, STATE_NAME)
        try:
            with open(path, encoding="utf-8") as fh:
                state = json.load(fh)
        except FileNotFoundError:
            raise ValueError(f"resume: {folder} holds no random search (no {STATE_NAME})") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"resume: {path}: cannot be read ({type(exc).__name__}: {exc})") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or \
                state.get("version") != STATE_VERSION or not isinstance(state.get("config"), dict) or \
                not isinstance(state.get("genotypes"), list):
            raise ValueError(f"resume: {path} is not a pynas random search state (version {STATE_VERSION})")
        names = {f.name for f in dataclasses.fields(RandomSearchConfig)}
        unknown = sorted(set(state["config"]) - names)
        if unknown:
            raise ValueError(f"resume: {path}: unknown settings {unknown}")
        saved = RandomSearchConfig(**state["config"])
        if cfg is not None:
            saved.device, saved.backend = cfg.device, cfg.backend
        try:
            search = cls(saved, save_dir=folder, log=log, progress=progress)
        except ValueError as exc:
            raise ValueError(f"resume: {path}: the saved settings are refused: {exc}") from None
        genotypes = state["genotypes"]
        if len(genotypes) != search.cfg.n_samples:
            raise ValueError(f"resume: {path}: {len(genotypes)} genotypes for {search.cfg.n_samples} candidates")
        try:
            search.genotypes = [_parse_genotype(search.cfg.space, g) for g in genotypes]
        except (ValueError, TypeError) as exc:
            raise ValueError(f"resume: {path}: a saved genotype: {exc}") from None
        search.results = read_results(os.path.join(folder, RESULTS_NAME), search.cfg.space, search.genotypes)
        search.resumed = True
        return search

    def _check_folder(self) -> None:
        if self.resumed or not self.save_dir:
            return
        for name in (STATE_NAME, RESULTS_NAME):
            if os.path.exists(os.path.join(self.save_dir, name)):
                raise ValueError(f"save_dir: {self.save_dir} holds a random search already ({name}); resume it "
                                 f"(resume={self.save_dir!r}) or choose another folder")

    def _prepare_folder(self) -> None:
        """Create the run folder and write the state, once, when the first candidate is about to train."""
        if self._folder_ready or not self.save_dir:
            return
        os.makedirs(self.save_dir, exist_ok=True)
        if not self.resumed:
            _write_atomic(os.path.join(self.save_dir, STATE_NAME), json.dumps(self.state(), indent=1) + "\n")
        self._folder_ready = True

    def _append_result(self, record: dict) -> None:
        with open(os.path.join(self.save_dir, RESULTS_NAME), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    # -- the candidates ----------------------------------------------------------
    def _training_data(self):
        cfg = self.cfg
        if cfg.space != "cnn":
            return None
        if self._data is None:
            self._data = load_split(candidate_config(cfg, 0), True)
        return self._data

    def build_candidate(self, index: int):
        """Candidate ``index``'s trainer: new, or resumed from the checkpoint in its folder."""
        cfg, cls = self.cfg, TRAINING[self.cfg.space]
        trainer_cfg = candidate_config(cfg, index)
        folder = os.path.join(self.save_dir, f"candidate_{index}") if self.save_dir else None
        kw = dict(save_dir=folder, log=lambda s: self.log(f"candidate {index}: {s}"), progress=self.progress,
                  genotype=self.genotypes[index], valid_portion=cfg.valid_portion, data=self._training_data())
        path = os.path.join(folder, CHECKPOINT_NAME) if folder else None
        if path is None or not os.path.exists(path):
            return cls(trainer_cfg, **kw)
        ckpt, saved, genotype = cls.read_checkpoint(path, "resume")
        mine = {k: v for k, v in dataclasses.asdict(trainer_cfg).items() if k not in ("device", "backend")}
        theirs = {k: v for k, v in dataclasses.asdict(saved).items() if k not in ("device", "backend")}
        differ = sorted(k for k in mine if mine[k] != theirs.get(k))
        if differ:
            raise ValueError(f"resume: {path} is not the training of candidate {index} of this search (its "
                             f"{', '.join(differ)} differ)")
        if _genotype_json(cfg.space, genotype) != _genotype_json(cfg.space, self.genotypes[index]):
            raise ValueError(f"resume: {path} trains another genotype than candidate {index}'s")
        run = cls(trainer_cfg, **kw)
        run.load_state(ckpt, path)
        self.log(f"candidate {index}: resuming after epoch {run.epoch} of {trainer_cfg.epochs}")
        return run

    def train_candidate(self, index: int) -> dict:
        """Train (or finish training) candidate ``index``; returns its record."""
        space = self.cfg.space
        run = self.build_candidate(index)
        self._prepare_folder()
        if run.save_dir:
            os.makedirs(run.save_dir, exist_ok=True)
            remove_stale_temporaries(run.save_dir)
            _write_atomic(os.path.join(run.save_dir, GENOTYPE_NAME),
                          _genotype_json(space, self.genotypes[index]) + "\n")
        result = run.run()
        history = result["history"]
        return {"index": index, "genotype": json.loads(_genotype_json(space, self.genotypes[index])),
                "metric": METRIC[space], **run.score(result), "epochs": len(history),
                "seconds": sum(float(h.get("seconds", 0.0)) for h in history)}

    # -- the run -----------------------------------------------------------------
    def run(self) -> dict:
        """Train every candidate not finished yet, then pick the best by validation; returns
        {"genotype": the best's genotype (JSON dict), "candidates": the records by index, "best": its index}."""
        cfg = self.cfg
        n, metric = cfg.n_samples, METRIC[cfg.space]
        self._check_folder()
        self.log(f"random search ({cfg.space}): {n} candidates, {cfg.epochs} epoch(s) each, seed {cfg.seed}"
                 + (f", {len(self.results)} finished before" if self.results else ""))
        for i in range(n):
            if i in self.results:
                rec = self.results[i]
                self.log(f"candidate {i} ({i + 1}/{n}): finished before, {metric} {rec['score']:.4f}")
                continue
            record = self.train_candidate(i)
            self.results[i] = record
            if self.save_dir:
                self._append_result(record)
            self.log(f"candidate {i} ({i + 1}/{n}): {metric} {record['score']:.4f} time {record['seconds']:.1f}s "
                     f"genotype {json.dumps(record['genotype'])}")
        candidates = [self.results[i] for i in range(n)]
        best = best_candidate([r["score"] for r in candidates], cfg.space)
        genotype = _genotype_json(cfg.space, self.genotypes[best])
        if self.save_dir:
            self._prepare_folder()
            _write_atomic(os.path.join(self.save_dir, GENOTYPE_NAME), genotype + "\n")
        self.log(f"best: candidate {best}, {metric} {candidates[best]['score']:.4f}, genotype {genotype}")
        return {"genotype": json.loads(genotype), "candidates": candidates, "best": best}


def run_random_search(cfg: Optional[RandomSearchConfig], save_dir: Optional[str] = None,
                      resume: Optional[str] = None, log: Callable[[str], None] = print,
                      progress: bool = True) -> dict:
    """Run a plain random search, or resume one from its run folder (``resume``; it continues in that folder, with
    its saved settings, only ``cfg``'s device and backend taken); returns {genotype, candidates, best}."""
    if resume is None:
        if cfg is None:
            raise ValueError("cfg: a new random search needs its settings (a RandomSearchConfig)")
        return RandomSearch(cfg, save_dir=save_dir, log=log, progress=progress).run()
    if save_dir is not None and os.path.abspath(save_dir) != os.path.abspath(resume):
        raise ValueError(f"save_dir: a resumed random search continues in its own folder ({resume}), got {save_dir}")
    return RandomSearch.resume(resume, cfg, log=log, progress=progress).run()
