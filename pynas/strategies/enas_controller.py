"""The ENAS controller and its REINFORCE step (Pham, Guan, Zoph, Le and Dean, ICML 2018; the semantics of the
official PTB controller, ``melodyguan/enas`` ``src/ptb/ptb_enas_controller.py``), over pynas's DARTS RNN space.

The space (:mod:`pynas.rnn.genotypes`): a cell of ``steps`` nodes; node i (0-based) takes one predecessor state j
in 0..i (state 0 is s0, the cell's first state; node i's output is state i + 1) and one activation from
:data:`ACTIVATIONS` (the RNN ``PRIMITIVES`` without 'none'). A genotype is ``Genotype(recurrent=[(activation, j)
for each node], concat=[1, ..., steps])``.

The controller (:class:`Controller`) is one ``nn.LSTMCell`` of ``hidden`` units run over the cell's decisions,
in this order: node 0's activation (its predecessor is always state 0), then for each node i >= 1 its predecessor
j, then its activation; ``1 + 2 * (steps - 1)`` decisions. With ``h, c`` the LSTM's output and cell state (zeros
at the start) and ``lstm(x)`` one LSTMCell step that replaces them:

* ``lstm(g)`` with the learned start input ``g`` (1 x hidden); **anchor 0** (state 0's) is this output ``h``.
* Each decision reads the current output ``h``:

  - activation of node i: ``logits = W_soft h + b_soft`` (one per activation), shaped as below; then
    ``lstm(embedding[activation])``; when i < steps - 1 the new ``h`` is **anchor i + 1** (state i + 1's, the
    output of node i). The last node's embedding is not fed: no decision would read it.
  - predecessor of node i >= 1: over the anchors ``a_0 .. a_i`` of states 0..i,
    ``logits_j = v^T tanh(W_1 a_j + W_2 h)`` (W_1, W_2: hidden x hidden without bias; v: hidden, no bias), shaped
    as below, then with ``distance_penalty`` minus ``d_j ** 2 / 6``; then ``lstm(a_j / (0.1 + d_j))`` for the
    chosen j.

  Here ``d_j = i + 1 - j`` is the distance from state j to state i + 1, the state node i produces: the official
  code's ``layer_id - skip_index`` with its layer k read as state k (its layer 0, the first node, is the DARTS
  cell's s0 here). The nearest candidate (j = i) has d = 1, so the penalty is 1/6, 4/6, 9/6, ... going back and
  the fed anchor is divided by 1.1, 2.1, 3.1, ..., as in the official code. (The official repository's current
  PTB controller divides the squared distance by 12; this module uses 6, :data:`DISTANCE_PENALTY_SCALE`.)
* Shaping, for both kinds: ``logits / temperature`` (skipped when ``temperature`` is None), then
  ``tanh_constant * tanh(logits)`` (skipped when ``tanh_constant`` is None); the distance penalty comes after.
* The policy of each decision is ``softmax(logits)``. ``log_prob`` is the sum over the decisions of the chosen
  action's ``log_softmax``; ``entropy`` is the sum over the decisions of the full distribution's entropy
  ``-sum_k p_k log p_k``. Both are 0-d tensors with gradients. (The official code sums the per-sample estimate
  ``-p_a log p_a`` of the chosen action under stop_gradient; here it is the exact entropy, with its gradient.)

All parameters (the LSTMCell's, ``g``, the activation embedding, ``W_soft``/``b_soft``, ``W_1``, ``W_2``, ``v``)
start U(-0.1, 0.1), drawn from torch's global RNG in registration order (seed it before building).

:class:`Reinforce` is the controller's update: the moving-average baseline and ``-log_prob * advantage`` with
Adam, as in the official code (see its docstring); :func:`ppl_reward` is ENAS's reward ``80 / ppl``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..rnn.genotypes import PRIMITIVES, STEPS, Genotype
from ..search.config import _is_int, check_number, check_positive_int

#: The activations a node may take: pynas's RNN candidates without 'none', in their order.
ACTIVATIONS = [p for p in PRIMITIVES if p != "none"]
#: The predecessor logits lose ``d ** 2 / DISTANCE_PENALTY_SCALE`` for a candidate state at distance d.
DISTANCE_PENALTY_SCALE = 6.0
#: The fed anchor of the chosen state at distance d is divided by ``DISTANCE_INPUT_OFFSET + d``.
DISTANCE_INPUT_OFFSET = 0.1


def _optional_positive(name: str, v) -> Optional[float]:
    return None if v is None else check_number(name, v, 0.0, low_open=True, what=" (or None)")


class Controller(nn.Module):
    """The ENAS controller over the DARTS RNN space (the module docstring gives the computation exactly).

    ``steps``: nodes per cell; ``hidden``: the LSTMCell's units; ``temperature`` / ``tanh_constant``: the logit
    shaping (None skips it); ``distance_penalty``: the predecessor logits' bias toward recent states;
    ``activations``: the candidate names, in embedding / ``W_soft`` row order.

    Parameters: ``lstm`` (nn.LSTMCell(hidden, hidden)), ``g`` (1 x hidden), ``embedding``
    (nn.Embedding(len(activations), hidden)), ``w_soft`` (nn.Linear(hidden, len(activations))), ``w_attn_1`` and
    ``w_attn_2`` (nn.Linear(hidden, hidden, bias=False)), ``v_attn`` (nn.Linear(hidden, 1, bias=False)).
    """

    def __init__(self, steps: int = STEPS, hidden: int = 100, temperature: Optional[float] = 5.0,
                 tanh_constant: Optional[float] = 2.5, distance_penalty: bool = True,
                 activations: Sequence[str] = ACTIVATIONS):
        super().__init__()
        self.steps = check_positive_int("steps", steps)
        self.hidden = check_positive_int("hidden", hidden)
        self.temperature = _optional_positive("temperature", temperature)
        self.tanh_constant = _optional_positive("tanh_constant", tanh_constant)
        if not isinstance(distance_penalty, bool):
            raise ValueError(f"distance_penalty: expected True or False, got {distance_penalty!r}")
        self.distance_penalty = distance_penalty
        if (isinstance(activations, str) or not isinstance(activations, Sequence) or not activations
                or not all(isinstance(a, str) and a for a in activations) or len(set(activations)) != len(activations)):
            raise ValueError(f"activations: expected a non-empty sequence of distinct names, got {activations!r}")
        self.activations = list(activations)

        self.lstm = nn.LSTMCell(hidden, hidden)
        self.g = nn.Parameter(torch.empty(1, hidden))
        self.embedding = nn.Embedding(len(self.activations), hidden)
        self.w_soft = nn.Linear(hidden, len(self.activations))
        self.w_attn_1 = nn.Linear(hidden, hidden, bias=False)
        self.w_attn_2 = nn.Linear(hidden, hidden, bias=False)
        self.v_attn = nn.Linear(hidden, 1, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-0.1, 0.1)

    # -- the decisions ----------------------------------------------------------------------------------------

    def _shape(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature is not None:
            logits = logits / self.temperature
        if self.tanh_constant is not None:
            logits = self.tanh_constant * torch.tanh(logits)
        return logits

    def _run(self, mode: str, forced: Optional[List[int]] = None,
             generator: Optional[torch.Generator] = None) -> Tuple[List[int], torch.Tensor, torch.Tensor]:
        """The decisions (``[act_0, j_1, act_1, ..., j_{steps-1}, act_{steps-1}]`` as indices), log_prob, entropy.

        ``mode``: 'sample' (multinomial), 'force' (the actions of ``forced``) or 'greedy' (argmax)."""
        ref = self.g
        h = torch.zeros(1, self.hidden, dtype=ref.dtype, device=ref.device)
        c = torch.zeros_like(h)
        h, c = self.lstm(self.g, (h, c))
        anchors = [h]
        keys = [self.w_attn_1(h)]
        decisions: List[int] = []
        log_probs: List[torch.Tensor] = []
        entropies: List[torch.Tensor] = []

        def decide(logits: torch.Tensor) -> int:
            logits = logits.reshape(-1)
            logp = F.log_softmax(logits, dim=-1)
            if mode == "force":
                k = forced[len(decisions)]
            elif mode == "greedy":
                k = int(torch.argmax(logits).item())
            else:
                probs = logp.detach().exp()
                if generator is not None:
                    probs = probs.to(generator.device)
                k = int(torch.multinomial(probs, 1, generator=generator).item())
            decisions.append(k)
            log_probs.append(logp[k])
            entropies.append(-(logp.exp() * logp).sum())
            return k

        for i in range(self.steps):
            if i > 0:
                query = self.w_attn_2(h)
                scores = self.v_attn(torch.tanh(torch.cat(keys, dim=0) + query)).reshape(-1)
                logits = self._shape(scores)
                dist = torch.arange(i + 1, 0, -1, dtype=ref.dtype, device=ref.device)  # d_j = i + 1 - j
                if self.distance_penalty:
                    logits = logits - dist ** 2 / DISTANCE_PENALTY_SCALE
                j = decide(logits)
                h, c = self.lstm(anchors[j] / (DISTANCE_INPUT_OFFSET + (i + 1 - j)), (h, c))
            k = decide(self._shape(self.w_soft(h)))
            if i < self.steps - 1:
                h, c = self.lstm(self.embedding.weight[k:k + 1], (h, c))
                anchors.append(h)
                keys.append(self.w_attn_1(h))
        return decisions, torch.stack(log_probs).sum(), torch.stack(entropies).sum()

    def _genotype(self, decisions: List[int]) -> Genotype:
        recurrent = [(self.activations[decisions[0]], 0)]
        for i in range(1, self.steps):
            recurrent.append((self.activations[decisions[2 * i]], decisions[2 * i - 1]))
        return Genotype(recurrent=recurrent, concat=list(range(1, self.steps + 1)))

    def decisions_of(self, genotype) -> List[int]:
        """The decision indices of ``genotype`` in the controller's order, ``[act_0, j_1, act_1, ...]``.

        Raises ValueError (argument ``genotype``) unless it has ``steps`` genes ``(activation, j)`` with the
        activation one of :attr:`activations` and ``0 <= j <= i`` for node i, and ``concat == [1, ..., steps]``."""
        rec = getattr(genotype, "recurrent", None)
        concat = getattr(genotype, "concat", None)
        if not isinstance(rec, (list, tuple)) or len(rec) != self.steps:
            raise ValueError(f"genotype: expected a Genotype with {self.steps} recurrent genes, got {genotype!r}")
        out: List[int] = []
        for i, gene in enumerate(rec):
            if not (isinstance(gene, (list, tuple)) and len(gene) == 2):
                raise ValueError(f"genotype: expected (activation, input) pairs, got gene {i} {gene!r}")
            act, j = gene
            if not isinstance(act, str) or act not in self.activations:
                raise ValueError(f"genotype: expected node {i}'s activation in {self.activations}, got {act!r}")
            if not _is_int(j) or not 0 <= j <= i:
                raise ValueError(f"genotype: expected node {i}'s input in 0..{i}, got {j!r}")
            if i > 0:
                out.append(j)
            out.append(self.activations.index(act))
        if (list(concat) if isinstance(concat, (list, tuple)) else None) != list(range(1, self.steps + 1)):
            raise ValueError(f"genotype: expected concat {list(range(1, self.steps + 1))}, got {concat!r}")
        return out

    def sample(self, generator: Optional[torch.Generator] = None) -> Tuple[Genotype, torch.Tensor, torch.Tensor]:
        """A genotype drawn from the policy, with its ``log_prob`` and the summed ``entropy`` (0-d, with grad).

        Each decision is ``torch.multinomial(softmax(logits), 1, generator=generator)``; with a generator the
        probabilities are moved to its device first (a CPU generator samples a CUDA controller on the CPU), without
        one torch's global RNG of the controller's device is used."""
        decisions, log_prob, entropy = self._run("sample", generator=generator)
        return self._genotype(decisions), log_prob, entropy

    def log_prob_of(self, genotype) -> Tuple[torch.Tensor, torch.Tensor]:
        """The ``(log_prob, entropy)`` :meth:`sample` returns when it draws ``genotype`` (its actions teacher-forced:
        the same computation with the actions fixed). Raises ValueError for a genotype outside the space (see
        :meth:`decisions_of`)."""
        _, log_prob, entropy = self._run("force", forced=self.decisions_of(genotype))
        return log_prob, entropy

    @torch.no_grad()
    def greedy(self) -> Genotype:
        """The genotype taking at every decision the argmax of the shaped logits (the first on a tie)."""
        decisions, _, _ = self._run("greedy")
        return self._genotype(decisions)


def ppl_reward(valid_loss: float, c: float = 80.0) -> float:
    """ENAS's reward ``c / ppl = c / exp(valid_loss)`` of a validation cross-entropy (nats per token).

    The official code also caps ``valid_loss`` at 10 first; no cap is applied here."""
    x = check_number("valid_loss", valid_loss, 0.0)
    c = check_number("c", c, 0.0, low_open=True)
    return c * math.exp(-x)


class Reinforce:
    """REINFORCE with a moving-average baseline for a :class:`Controller`, as the official ENAS code trains it.

    One :meth:`step` per sampled architecture::

        r = reward + entropy_weight * entropy                 (a float)
        b = r                                  at the first step (b starts as None),
        b = b - (1 - baseline_decay) * (b - r) after           (= decay * b + (1 - decay) * r)
        advantage = r - b                      (with the UPDATED b, as the official code does)
        loss = -log_prob * advantage           (advantage a constant)

    then ``zero_grad``, ``loss.backward()``, with ``grad_clip`` ``clip_grad_norm_(params, grad_clip)``, and one step
    of ``torch.optim.Adam(controller.parameters(), lr)`` (torch's defaults otherwise: betas (0.9, 0.999), eps 1e-8).
    The first step's advantage is 0: it leaves the parameters as they are but counts as Adam's step 1.
    """

    def __init__(self, controller: Controller, lr: float = 3.5e-4, baseline_decay: float = 0.95,
                 entropy_weight: float = 1e-4, grad_clip: Optional[float] = None):
        if not isinstance(controller, nn.Module):
            raise ValueError(f"controller: expected a Controller, got {controller!r}")
        self.controller = controller
        self.lr = check_number("lr", lr, 0.0, low_open=True)
        self.baseline_decay = check_number("baseline_decay", baseline_decay, 0.0, 1.0, high_open=True)
        self.entropy_weight = check_number("entropy_weight", entropy_weight)
        self.grad_clip = _optional_positive("grad_clip", grad_clip)
        self.optimizer = torch.optim.Adam(controller.parameters(), lr=self.lr)
        self.baseline: Optional[float] = None
        self.steps_done = 0

    def _settings(self) -> Dict[str, Any]:
        return {"lr": self.lr, "baseline_decay": self.baseline_decay, "entropy_weight": self.entropy_weight,
                "grad_clip": self.grad_clip}

    def step(self, log_prob: torch.Tensor, entropy, reward: float) -> Dict[str, float]:
        """One update from a sample's ``log_prob`` and ``entropy`` (:meth:`Controller.sample`) and its ``reward``.

        Returns floats: ``reward``, ``adjusted`` (r), ``baseline`` (b after its update), ``advantage``, ``loss``
        and ``grad_norm`` (the parameters' total gradient 2-norm before any clipping)."""
        if not isinstance(log_prob, torch.Tensor) or log_prob.dim() != 0 or not log_prob.requires_grad:
            raise ValueError(f"log_prob: expected a 0-d tensor with grad, got {log_prob!r}")
        if isinstance(entropy, torch.Tensor):
            if entropy.numel() != 1:
                raise ValueError(f"entropy: expected a 0-d tensor or a number, got {entropy!r}")
            ent = float(entropy.detach().item())
        else:
            ent = check_number("entropy", entropy, what=" (or a 0-d tensor)")
        reward = check_number("reward", reward)
        r = reward + self.entropy_weight * ent
        if self.baseline is None:
            self.baseline = r
        else:
            self.baseline = self.baseline - (1.0 - self.baseline_decay) * (self.baseline - r)
        advantage = r - self.baseline
        loss = -log_prob * advantage
        self.optimizer.zero_grad()
        loss.backward()
        params = [p for p in self.controller.parameters() if p.grad is not None]
        if params:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            grad_norm = float(norm.item())
        else:
            grad_norm = 0.0
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        self.steps_done += 1
        return {"reward": reward, "adjusted": r, "baseline": self.baseline, "advantage": advantage,
                "loss": float(loss.detach().item()), "grad_norm": grad_norm}

    def state_dict(self) -> Dict[str, Any]:
        """Everything a resumed search needs to continue exactly: the controller's weights, Adam's state, the
        baseline (None before the first step), the step count and the settings."""
        return {"controller": self.controller.state_dict(), "optimizer": self.optimizer.state_dict(),
                "baseline": self.baseline, "steps_done": self.steps_done, "settings": self._settings()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (the controller's weights too). Raises ValueError (argument
        ``state``) when it is not such a dict or was saved with other settings (lr, baseline_decay,
        entropy_weight, grad_clip)."""
        keys = {"controller", "optimizer", "baseline", "steps_done", "settings"}
        if not isinstance(state, dict) or not keys <= set(state):
            raise ValueError(f"state: expected a Reinforce.state_dict() with keys {sorted(keys)}, got "
                             f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        if state["settings"] != self._settings():
            raise ValueError(f"state: expected settings {self._settings()}, got {state['settings']}")
        self.controller.load_state_dict(state["controller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = None if state["baseline"] is None else float(state["baseline"])
        self.steps_done = int(state["steps_done"])
