"""Random search with weight sharing (Li and Talwalkar, UAI 2019; ``liamcli/randomNAS_release``).

Training: every iteration samples one architecture uniformly (:func:`pynas.strategies.random_search.
sample_cnn_genotype`: per node two distinct inputs and two operations drawn with replacement, 'none' included
unless ``allow_none`` is off) and takes one SGD step of the shared weights on a train batch with only that
path. No architecture parameters, no architecture step. ``rsws_path = 'single'`` (the default) computes only the
sampled operations (the fused edge over the selected candidates; edges not sampled are skipped), so only their
BatchNorm statistics move and only they get weight decay's gradient; ``'supernet'`` is the original code's
computation, every operation run under one-hot weights (unsampled operations update their BatchNorm statistics
and, through momentum and weight decay, their weights): the two give different shared weights.

Selection, after the last epoch (:meth:`RSWSMethod.finish`): ``rsws_samples`` architectures (1000) sampled
afresh, each scored with the shared weights in eval mode on ``rsws_eval_batches`` (10) validation batches drawn
from one cycling iterator (so each architecture sees the next batches, as the code's ``evaluate``), the
``rsws_top`` (10) best re-scored on the whole validation half; the best of those is the result. Scores are
errors, 1 - top-1 accuracy; ties go to the earlier sample. The original re-trains the chosen cell from scratch:
``pynas train cnn --genotype <run>/genotype.json``.

Defaults as the code's CNN benchmark: DARTS's search network and weight optimizer (batch 64, lr 0.025 cosine to
0.001, momentum 0.9, wd 3e-4), 100 epochs over the train half. The per-epoch validation scores the last sampled
architecture; the genotype of an epoch's record is that architecture's until the selection has run.
"""
from __future__ import annotations

import random
from typing import List, Optional

import torch

from ..cnn import Network, to_json
from ..cnn.data import batches
from ..cnn.genotypes import Genotype
from ..cnn.model_search import CellWeights
from .base import CNNMethod


def _edge_selection(genotype: Genotype, steps: int, primitives) -> tuple:
    """Per cell type (normal, reduce): the tuple of sampled candidates of every edge (empty where none)."""
    out = []
    for genes in (genotype.normal, genotype.reduce):
        sel: List[set] = [set() for _ in range(sum(2 + i for i in range(steps)))]
        start = 0
        for i in range(steps):
            for op, j in genes[2 * i:2 * i + 2]:
                sel[start + j].add(primitives.index(op))
            start += 2 + i
        out.append([tuple(sorted(s)) for s in sel])
    return tuple(out)


def _best_of(record) -> dict:
    """The selected entry of a selection record read from a checkpoint (ValueError when it is malformed)."""
    if not isinstance(record, dict) or not isinstance(record.get("top"), list):
        raise ValueError("resume: the checkpoint's 'final' is not a selection record")
    best = next((r for r in record["top"] if isinstance(r, dict) and r.get("sample") == record.get("best")), None)
    if best is None or not isinstance(best.get("genotype"), str):
        raise ValueError("resume: the checkpoint's 'final' names no best sample among its 'top'")
    return best


class RSWSNetwork(Network):
    """The DARTS CNN supernet trained one sampled architecture at a time (:meth:`set_arch`); ``path`` 'single' or
    'supernet'. It has no architecture parameters."""

    def __init__(self, *args, path: str = "single", **kwargs):
        super().__init__(*args, **kwargs)
        if path not in ("single", "supernet"):
            raise ValueError(f"rsws_path: expected 'single' or 'supernet', got {path!r}")
        self.path = path
        self._arch = None
        self._arch_parameters = []

    def _method_kwargs(self) -> dict:
        return {"path": self.path}

    def set_arch(self, genotype: Genotype) -> None:
        """The architecture the next forwards compute."""
        from .random_search import cnn_arch_to_onehot

        ref = self.classifier.weight
        normal, reduce = (t.to(device=ref.device, dtype=ref.dtype)
                          for t in cnn_arch_to_onehot(genotype, self._steps, self._primitives))
        self._arch = (genotype, normal, reduce, _edge_selection(genotype, self._steps, self._primitives))

    @property
    def arch(self) -> Optional[Genotype]:
        return None if self._arch is None else self._arch[0]

    def cell_weights(self):
        if self._arch is None:
            raise RuntimeError("arch: no architecture set (RSWSNetwork.set_arch)")
        _, normal, reduce, (sel_normal, sel_reduce) = self._arch
        if self.path == "supernet":
            return normal, reduce
        return CellWeights(normal, selected=sel_normal), CellWeights(reduce, selected=sel_reduce)

    def genotype(self) -> Genotype:
        if self._arch is None:
            raise RuntimeError("arch: no architecture set (RSWSNetwork.set_arch)")
        return self._arch[0]


class RSWSMethod(CNNMethod):
    """Random search with weight sharing on the CNN space."""

    name = "rsws"
    SECOND_ORDER = False
    HAS_ARCH_STEP = False
    SAMPLED_PATHS = True
    DEFAULTS = dict(epochs=100, batch_size=64)

    def __init__(self, search):
        super().__init__(search)
        self._rng = random.Random()
        self.final: Optional[dict] = None

    @staticmethod
    def check_config(cfg) -> None:
        if cfg.track_hessian:
            raise ValueError("track_hessian: random search with weight sharing has no architecture parameters")
        if cfg.rsws_top > cfg.rsws_samples:
            raise ValueError(f"rsws_top: expected at most rsws_samples ({cfg.rsws_samples}), got {cfg.rsws_top}")

    def build_model(self, num_classes, criterion):
        cfg = self.cfg
        model = RSWSNetwork(cfg.init_channels, num_classes, cfg.layers, criterion, path=cfg.rsws_path)
        model.set_arch(self.sample(random.Random(cfg.seed)))
        return model

    def sample(self, rng: random.Random) -> Genotype:
        from .random_search import sample_cnn_genotype

        return sample_cnn_genotype(rng, steps=4, multiplier=4, allow_none=self.cfg.allow_none)  # the search cells' 4 nodes

    def start_epoch(self, epoch):
        # the samples of an epoch depend only on (seed, epoch): a resumed run draws the same ones
        self._rng = random.Random(self.cfg.seed * 1000003 + epoch)
        return {}

    def iteration(self, x, y, xv, yv, lr, epoch):
        self.search.model.set_arch(self.sample(self._rng))
        return self.weight_step(x, y)

    def genotype(self):
        if self.final is not None:
            return self.final["best_genotype"]
        return self.search.model.genotype()

    @torch.no_grad()
    def _error(self, batch_list) -> float:
        model, dev = self.search.model, self.search.device
        correct, seen = 0, 0
        for x, y in batch_list:
            logits = model(x.to(dev))
            correct += int((logits.argmax(1) == y.to(dev)).sum())
            seen += y.shape[0]
        return 1.0 - correct / max(seen, 1)

    def finish(self):
        from ..cnn.genotypes import from_json

        search, cfg = self.search, self.cfg
        model = search.model
        was = model.training
        model.eval()
        rng = random.Random(cfg.seed * 1000003 + 999983)
        archs = [self.sample(rng) for _ in range(cfg.rsws_samples)]

        def cycle():
            epoch = 0
            while True:
                yield from batches(search.data, search.valid_idx, cfg.batch_size, seed=cfg.seed * 7 + epoch)
                epoch += 1

        stream = cycle()
        quick = []
        try:
            for arch in archs:
                model.set_arch(arch)
                quick.append(self._error([next(stream) for _ in range(cfg.rsws_eval_batches)]))
            order = sorted(range(len(archs)), key=lambda i: (quick[i], i))[:cfg.rsws_top]
            full_batches = list(batches(search.data, search.valid_idx, cfg.batch_size, seed=cfg.seed))
            top = []
            for i in order:
                model.set_arch(archs[i])
                top.append({"sample": i, "genotype": to_json(archs[i]), "quick_error": quick[i],
                            "valid_error": self._error(full_batches)})
        finally:
            model.train(was)
        best = min(top, key=lambda r: (r["valid_error"], r["sample"]))
        model.set_arch(from_json(best["genotype"]))
        self.final = {"samples": len(archs), "top": top, "best": best["sample"],
                      "best_genotype": from_json(best["genotype"]), "best_valid_error": best["valid_error"]}
        search.log(f"rsws selection: {len(archs)} architectures scored on {cfg.rsws_eval_batches} validation "
                   f"batches each, the best {len(top)} on the whole validation half; best sample {best['sample']} "
                   f"valid_error {best['valid_error']:.4f} genotype {best['genotype']}")
        return self.final_record()

    def final_record(self) -> Optional[dict]:
        return None if self.final is None else {k: v for k, v in self.final.items() if k != "best_genotype"}

    def load_final(self, record: Optional[dict]) -> None:
        """Take the selection's record from a checkpoint."""
        from ..cnn.genotypes import from_json

        if record is None:
            self.final = None
            return
        best = _best_of(record)
        self.final = {**record, "best_genotype": from_json(best["genotype"])}
        self.search.model.set_arch(self.final["best_genotype"])


# -- the RNN space (the PTB benchmark of the code) ------------------------------------------------------------


#: The RNN search's settings where RSWS's PTB benchmark differs from DARTS's (``--batch_size 64 --epochs 100``).
RNN_DEFAULTS = dict(batch_size=64, epochs=100)


def _rnn_model_class():
    from ..rnn.model_eval import RNNModel

    class RSWSRNNModel(RNNModel):
        """The DARTS RNN evaluation model whose cell's genotype is swapped per batch (:meth:`set_arch`), as the
        code's PTB wrapper does: one shared set of weights, only the sampled cell computed (the evaluation cell
        has no BatchNorm). No architecture parameters."""

        def set_arch(self, genotype) -> None:
            self.rnns[0].genotype = genotype

        def arch_parameters(self):
            return []

        def genotype(self):
            return self.rnns[0].genotype

        def _loss(self, hidden, input, target):
            return self.nll(input, hidden, target)

    return RSWSRNNModel


def rnn_model(ntokens: int, cfg, seed: int, cls=None):
    """The RNN search's shared-weight model, holding a first sample (``random.Random(seed)``); ``cls``: a subclass
    of the class :func:`_rnn_model_class` makes (ENAS's), None for that class."""
    from .random_search import sample_rnn_genotype

    cls = cls if cls is not None else _rnn_model_class()
    return cls(ntokens, cfg.emsize, cfg.nhid, cfg.nhidlast, cfg.dropout, cfg.dropouth, cfg.dropoutx, cfg.dropouti,
               cfg.dropoute, sample_rnn_genotype(random.Random(seed)))


def rnn_epoch_sampler(cfg, epoch: int):
    """The architectures of an epoch's iterations: a function drawing the next (depends on seed and epoch only)."""
    from .random_search import sample_rnn_genotype

    rng = random.Random(cfg.seed * 1000003 + epoch)
    return lambda: sample_rnn_genotype(rng)


def rnn_select(search) -> dict:
    """The selection after the last epoch, as on the CNN space: ``rsws_samples`` fresh samples scored by their
    validation NLL on ``rsws_eval_batches`` chunks of ``bptt`` steps (one cycling stream, from a zero hidden state
    per sample), the best ``rsws_top`` re-scored on the whole validation text; the lowest NLL wins."""
    from ..rnn.data import get_batch
    from ..rnn.genotypes import to_json as rnn_to_json
    from ..rnn.model_search import mean_nll
    from .random_search import sample_rnn_genotype

    cfg, model, data = search.cfg, search.model, search.val_data
    rng = random.Random(cfg.seed * 1000003 + 999983)
    archs = [sample_rnn_genotype(rng) for _ in range(cfg.rsws_samples)]
    starts = list(range(0, data.size(0) - 1, cfg.bptt))
    was = model.training
    model.eval()
    quick, at = [], 0
    try:
        with torch.no_grad():
            for arch in archs:
                model.set_arch(arch)
                hidden = model.init_hidden(data.size(1))
                total, tokens = 0.0, 0
                for _ in range(cfg.rsws_eval_batches):
                    x, y = get_batch(data, starts[at % len(starts)], cfg.bptt)
                    at += 1
                    loss, hidden = model._loss(hidden, x, y)
                    total += float(loss) * y.numel()
                    tokens += y.numel()
                quick.append(total / tokens)
        order = sorted(range(len(archs)), key=lambda i: (quick[i], i))[:cfg.rsws_top]
        top = []
        for i in order:
            model.set_arch(archs[i])
            top.append({"sample": i, "genotype": rnn_to_json(archs[i]), "quick_nll": quick[i],
                        "valid_nll": mean_nll(model, data, cfg.bptt)})
    finally:
        model.train(was)
    best = min(top, key=lambda r: (r["valid_nll"], r["sample"]))
    model.set_arch(archs[best["sample"]])
    search.log(f"rsws selection: {len(archs)} cells scored on {cfg.rsws_eval_batches} validation chunks each, the "
               f"best {len(top)} on the whole validation text; best sample {best['sample']} valid_nll "
               f"{best['valid_nll']:.4f} genotype {best['genotype']}")
    return {"samples": len(archs), "top": top, "best": best["sample"]}


def rnn_load_final(search, record) -> None:
    """Take the selection's record back from a checkpoint (the model set to the selected cell)."""
    from ..rnn.genotypes import from_json as rnn_from_json

    if record is None:
        return
    best = _best_of(record)
    search.model.set_arch(rnn_from_json(best["genotype"]))
