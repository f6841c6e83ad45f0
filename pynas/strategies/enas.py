"""ENAS (Pham et al., ICML 2018) on the DARTS RNN space: a controller samples cells, shared weights train on them.

"ENAS on the DARTS space" (docs/methods.md): the shared weights are those of the DARTS RNN evaluation model whose
cell's genotype is swapped per batch (:func:`pynas.strategies.rsws.rnn_model`: only the sampled edges computed);
the controller (:class:`pynas.strategies.enas_controller.Controller`, an LSTM) samples for each node its
predecessor and activation. Each epoch:

1. **Shared weights**: the RNN search's weight loop (pynas/search/rnn.py) over the training half, each batch on a
   cell sampled from the controller (no gradient to it), SGD with DARTS's RNN settings (lr 20, clip 0.25).
2. **Controller**: ``enas_controller_steps`` REINFORCE steps (:class:`~pynas.strategies.enas_controller.Reinforce`),
   each on one sampled cell whose reward is ``80 / ppl`` on one validation batch of ``bptt`` steps drawn at random
   from the architecture half (eval mode: no dropout; a zero hidden state), plus the entropy bonus, against the
   moving-average baseline.

The derived cell (:func:`enas_select`, after the last epoch): ``enas_derive_samples`` cells sampled from the
controller, each scored by its reward on the same fixed batch of the architecture half, the best one.

Defaults as the PyTorch port of ENAS (``carpedm20/ENAS-pytorch``) where DARTS's RNN search does not fix them: batch
64, 150 epochs, 2000 controller steps per epoch, controller Adam lr 3.5e-4, moving-average decay 0.95, entropy
weight 1e-4, temperature 5, tanh constant 2.5, 100 controller units, 100 derive samples. The controller lives in
the model (``model.controller``, so its weights are in the checkpoint's ``model``), the baseline in the buffer
``model.enas_baseline`` (NaN before the first step), Adam's state as the checkpoint's ``arch_optimizer``: a resumed
search continues exactly.
"""
from __future__ import annotations

import math
import random
from typing import List, Optional

import torch

from .enas_controller import Controller, Reinforce, ppl_reward

#: The RNN search's settings where ENAS's (PyTorch port's) differ from DARTS's.
RNN_DEFAULTS = dict(batch_size=64, epochs=150)


def _seed(cfg, epoch: int, purpose: int) -> int:
    return (cfg.seed * 1000003 + epoch * 7919 + purpose) % (2 ** 63)


def _model_class():
    from .rsws import _rnn_model_class

    class ENASRNNModel(_rnn_model_class()):
        """The shared-weight model with the controller; its genotype is the derived cell once selected, before
        that the controller's greedy cell."""

        def genotype(self):
            return self.final_genotype if self.final_genotype is not None else self.controller.greedy()

    return ENASRNNModel


def enas_model(ntokens: int, cfg, seed: int):
    """The shared-weight model (:func:`pynas.strategies.rsws.rnn_model`) holding the controller (seeded from
    ``seed + 1``) as ``controller`` and the REINFORCE baseline as the buffer ``enas_baseline``."""
    from .rsws import rnn_model

    model = rnn_model(ntokens, cfg, seed, _model_class())
    model.final_genotype = None
    torch.manual_seed(seed + 1)
    model.controller = Controller(steps=len(model.rnns[0].genotype.recurrent), hidden=cfg.enas_hidden,
                                  temperature=cfg.enas_temperature, tanh_constant=cfg.enas_tanh_constant)
    model.register_buffer("enas_baseline", torch.tensor(float("nan"), dtype=torch.float64))
    return model


def shared_parameters(model) -> List[torch.nn.Parameter]:
    """The weights the weight optimizer steps: every parameter but the controller's."""
    mine = {id(p) for p in model.controller.parameters()}
    return [p for p in model.parameters() if id(p) not in mine]


class ENASArchitect:
    """The controller's training (``optimizer``: its Adam, saved as the checkpoint's ``arch_optimizer``)."""

    def __init__(self, model, cfg):
        self.model, self.cfg = model, cfg
        self.reinforce = Reinforce(model.controller, lr=cfg.enas_controller_lr, baseline_decay=cfg.enas_baseline_decay,
                                   entropy_weight=cfg.enas_entropy_weight)
        self.optimizer = self.reinforce.optimizer

    def sampler(self, epoch: int):
        """The cells of an epoch's weight steps: a function drawing the next from the controller (no gradient)."""
        g = torch.Generator().manual_seed(_seed(self.cfg, epoch, 1))
        controller = self.model.controller

        def draw():
            with torch.no_grad():
                return controller.sample(g)[0]
        return draw

    def reward(self, genotype, data, start: int) -> float:
        """80 / ppl of ``genotype`` on the ``bptt`` steps of ``data`` from ``start`` (eval mode, zero hidden state)."""
        from ..rnn.data import get_batch

        model, cfg = self.model, self.cfg
        x, y = get_batch(data, start, cfg.bptt)
        was = model.training
        model.eval()
        try:
            model.set_arch(genotype)
            with torch.no_grad():
                loss, _ = model._loss(model.init_hidden(data.size(1)), x, y)
        finally:
            model.train(was)
        return ppl_reward(float(loss), cfg.enas_reward_c)

    def sample_reward(self, search, genotype, rng: random.Random) -> float:
        """A controller step's reward: on ``bptt`` steps of the architecture half from a start drawn from ``rng``."""
        data = search.search_data
        start = rng.randrange(0, max(data.size(0) - 1 - self.cfg.bptt, 0) + 1)
        return self.reward(genotype, data, start)

    def select_reward(self, search, genotype) -> float:
        """A derive sample's score: the reward on the first ``bptt`` steps of the architecture half."""
        return self.reward(genotype, search.search_data, 0)

    def controller_phase(self, search, epoch: int) -> dict:
        """``enas_controller_steps`` REINFORCE steps; returns the epoch's controller figures."""
        cfg, model = self.cfg, self.model
        rng = random.Random(_seed(cfg, epoch, 2))
        g = torch.Generator().manual_seed(_seed(cfg, epoch, 3))
        b = float(model.enas_baseline)
        self.reinforce.baseline = None if math.isnan(b) else b
        rewards, entropies = [], []
        model.controller.train()
        try:
            for _ in range(cfg.enas_controller_steps):
                genotype, log_prob, entropy = model.controller.sample(g)
                r = self.sample_reward(search, genotype, rng)
                self.reinforce.step(log_prob, entropy, r)
                rewards.append(r)
                entropies.append(float(entropy.detach()))
        finally:
            for p in model.controller.parameters():
                p.grad = None  # no stale gradient in the weight step's clipping
            model.set_arch(model.genotype())  # the epoch's validation scores the controller's greedy cell
        model.enas_baseline.fill_(float("nan") if self.reinforce.baseline is None else self.reinforce.baseline)
        n = max(len(rewards), 1)
        return {"controller_reward": sum(rewards) / n, "controller_entropy": sum(entropies) / n,
                "controller_baseline": float(model.enas_baseline)}


def enas_select(search) -> dict:
    """The derived cell: ``enas_derive_samples`` controller samples scored by their reward on the first ``bptt``
    steps of the architecture half; the highest reward wins (ties: the earlier sample)."""
    from ..rnn.genotypes import to_json

    cfg, model = search.cfg, search.model
    g = torch.Generator().manual_seed(_seed(cfg, cfg.epochs, 4))
    top = []
    for i in range(cfg.enas_derive_samples):
        with torch.no_grad():
            genotype = model.controller.sample(g)[0]
        top.append({"sample": i, "genotype": to_json(genotype),
                    "reward": search.architect.select_reward(search, genotype)})
    best = max(top, key=lambda r: (r["reward"], -r["sample"]))
    enas_load_final(search, {"samples": len(top), "top": top, "best": best["sample"]})
    search.log(f"enas selection: {len(top)} cells sampled from the controller, scored on one batch of the "
               f"architecture half; best sample {best['sample']} reward {best['reward']:.4f} genotype "
               f"{best['genotype']}")
    return {"samples": len(top), "top": top, "best": best["sample"]}


def enas_load_final(search, record: Optional[dict]) -> None:
    """Take the selection back (from :func:`enas_select` or a checkpoint): the model's genotype becomes it."""
    from ..rnn.genotypes import from_json
    from .rsws import _best_of

    if record is None:
        return
    best = _best_of(record)
    search.model.final_genotype = from_json(best["genotype"])
    search.model.set_arch(search.model.final_genotype)
