"""Regularized (aging) evolution with progressive dynamic hurdles, and its random-search control.

Regularized evolution (Real et al., AAAI 2019; ``regularized_evolution.ipynb``): a population of ``population``
models, each trained and scored; every cycle ``sample_size`` members are drawn **with replacement**, the fittest
is the parent, one mutation of it is the child, the child is trained and scored and joins the population, and
the **oldest** member leaves, whatever its fitness. The answer is the best model of the whole history.

Progressive dynamic hurdles (So, Le and Liang, ICML 2019, the Evolved Transformer): budgets ``<s0, s1, ...>``
(steps). Every model trains s0 steps first. After the first ``hurdle_every`` models (the initial population
counts) hurdle h0 is set, once, to the mean stage-0 fitness of all models so far; after the next
``hurdle_every``, h1 to the mean stage-1 fitness of the models that reached stage 1; and so on, one hurdle per
budget but the last. A model whose latest fitness (after stage k) is **greater than** h_k trains s_{k+1} more
steps, continuing from its checkpoint, and is scored again; below a hurdle it keeps its fitness and stops.
Selection compares each model's latest fitness. A hurdle is never set from no model (it waits).

The control (``method='random'``): the same loop, budgets and hurdles, with each child drawn afresh from the
space instead of mutated.

Parallel trials: each round makes ``parallel`` children from the population as it stands (their parents drawn
in order), trains them at once through the executor, then lets them join one by one in order, each promotion
stage of the round again at once. With ``parallel = 1`` this is the sequential algorithm. Every decision comes
from ``random.Random(seed)`` and the trial results, so a run replays exactly: a resumed run takes the stored
result of each finished trial (:class:`pynas.search.trials.TrialStore`) and trains only the rest.

Spaces (:class:`Space`): the DARTS CNN space (a genotype's evaluation network on ``shapes10``, fitness its
validation accuracy: :mod:`pynas.cnn.trial`) and the sublayer orders of a Transformer language model (fitness
minus its validation loss: :mod:`pynas.sublayers.trial`). Mutations: CNN, one op of one cell's node changed to
another, or one input changed to another earlier state (a node's two inputs stay distinct); sublayers, two
different sublayers swapped (the same counts, the same parameters).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

from ..search.config import check_positive_int, check_seed
from ..search.trials import EXECUTORS, Trial, TrialStore, make_executor, run_trials, settings_file

METHODS = ("evolution", "random")


# ---- spaces -------------------------------------------------------------------------------------------------


class Space:
    """A search space for trials: ``sample(rng)`` and ``mutate(genotype, rng)`` on genotype strings, the trial
    function ``train(genotype, start, end, checkpoint, seed, cfg)`` and its settings ``cfg``, ``describe``."""

    name = ""
    cfg: Any = None
    DEFAULT_BUDGETS: Tuple[int, ...] = ()

    def sample(self, rng: random.Random) -> str:
        raise NotImplementedError

    def mutate(self, genotype: str, rng: random.Random) -> str:
        raise NotImplementedError

    def train(self) -> Callable:
        raise NotImplementedError

    def describe(self, genotype: str) -> str:
        return genotype

    def show(self, fitness: Optional[float]) -> str:
        """A fitness as the logs and tables print it."""
        return "nan" if fitness is None else f"{fitness:.4f}"


def mutate_cnn(genotype, rng: random.Random, ops: Sequence[str]):
    """One random change of a CNN genotype: in the normal or the reduction cell (equally likely), one node's
    (op, input) pair gets another op from ``ops`` or another input (an earlier state the node's other pair does
    not read: a node's two inputs stay distinct); node 0 has only two possible inputs, so there the change is
    always an op."""
    from ..cnn.genotypes import Genotype

    cells = {"normal": list(genotype.normal), "reduce": list(genotype.reduce)}
    which = rng.choice(("normal", "reduce"))
    genes = cells[which]
    at = rng.randrange(len(genes))
    node = at // 2
    op, inp = genes[at]
    other = genes[at ^ 1][1]
    inputs = [j for j in range(node + 2) if j not in (inp, other)]
    if inputs and rng.random() < 0.5:
        genes[at] = (op, rng.choice(inputs))
    else:
        genes[at] = (rng.choice([o for o in ops if o != op]), inp)
    return Genotype(normal=cells["normal"], normal_concat=list(genotype.normal_concat), reduce=cells["reduce"],
                    reduce_concat=list(genotype.reduce_concat))


class CNNSpace(Space):
    """The DARTS CNN space: genotypes as JSON (:func:`pynas.cnn.genotypes.to_json`), sampled as random search samples
    them (:func:`pynas.strategies.random_search.sample_cnn_genotype`, no 'none')."""

    name = "cnn"
    DEFAULT_BUDGETS = (30, 120)  # methods.md's CPU experiment: fitness after 30 / 150 steps, one hurdle

    def __init__(self, cfg=None):
        from ..cnn.trial import CNNTrialConfig

        self.cfg = cfg if cfg is not None else CNNTrialConfig()
        self.cfg.check()
        from ..cnn.operations import PRIMITIVES

        self.ops = [p for p in PRIMITIVES if p != "none"]

    def sample(self, rng):
        from ..cnn.genotypes import to_json
        from .random_search import sample_cnn_genotype

        return to_json(sample_cnn_genotype(rng))

    def mutate(self, genotype, rng):
        from ..cnn.genotypes import from_json, to_json

        return to_json(mutate_cnn(from_json(genotype), rng, self.ops))

    def train(self):
        from ..cnn.trial import train_genotype

        return train_genotype

    def describe(self, genotype):
        from ..cnn.genotypes import from_json

        g = from_json(genotype)
        return "normal " + " ".join(f"{o}<{j}" for o, j in g.normal) + " | reduce " + \
            " ".join(f"{o}<{j}" for o, j in g.reduce)


def mutate_order(order: str, rng: random.Random) -> str:
    """Two positions holding different sublayers swapped (same counts; ``order`` must hold both kinds)."""
    s_at = [i for i, c in enumerate(order) if c == "s"]
    f_at = [i for i, c in enumerate(order) if c == "f"]
    if not s_at or not f_at:
        raise ValueError(f"order: a swap needs both kinds of sublayer, got {order!r}")
    i, j = rng.choice(s_at), rng.choice(f_at)
    chars = list(order)
    chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


class SublayerSpace(Space):
    """Orders of n self-attention (s) and n feed-forward (f) sublayers (:mod:`pynas.sublayers`), sampled uniformly;
    the parameter count is the same for all of them."""

    name = "sublayers"
    DEFAULT_BUDGETS = (150, 450)

    def __init__(self, n: int = 4, cfg=None):
        from ..sublayers.trial import SublayerTrialConfig

        check_positive_int("n", n)
        self.n = n
        self.cfg = cfg if cfg is not None else SublayerTrialConfig()
        self.cfg.check()

    def sample(self, rng):
        from ..sublayers.orders import random_balanced

        return random_balanced(rng, self.n)

    def mutate(self, genotype, rng):
        return mutate_order(genotype, rng)

    def train(self):
        from ..sublayers.trial import train_order

        return train_order

    def show(self, fitness):
        """Minus the validation loss, printed as the perplexity ``exp(-fitness)``."""
        return "nan" if fitness is None else f"ppl {math.exp(-fitness):.2f}"


# ---- the search -------------------------------------------------------------------------------------------


@dataclass
class EvolutionConfig:
    """Settings of an evolution (or its random control). Defaults: the regularized-evolution notebook's population
    100, sample 10 and 1000 cycles; budgets and hurdles are per space (the CLI's defaults are small)."""

    method: str = "evolution"
    population: int = 100
    sample_size: int = 10
    cycles: int = 1000  # children after the initial population
    budgets: Optional[Tuple[int, ...]] = None  # steps of each stage (None: the space's DEFAULT_BUDGETS)
    hurdle_every: Optional[int] = None  # models between hurdles (None: the population size)
    parallel: int = 1  # children trained at once per round
    seed: int = 0
    executor: str = "inprocess"
    ray_address: Optional[str] = None
    num_cpus: Optional[int] = None  # of a local Ray cluster (None: all)

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("population", "sample_size", "parallel"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("cycles", self.cycles, minimum=0)
        if self.hurdle_every is not None:
            check_positive_int("hurdle_every", self.hurdle_every)
        if self.budgets is not None:
            if not isinstance(self.budgets, (list, tuple)) or not self.budgets:
                raise ValueError(f"budgets: expected a non-empty list of step counts, got {self.budgets!r}")
            for b in self.budgets:
                if not isinstance(b, int) or isinstance(b, bool) or b < 1:
                    raise ValueError(f"budgets: expected positive step counts, got {list(self.budgets)}")
        check_seed(self.seed)
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor: expected one of {', '.join(EXECUTORS)}, got {self.executor!r}")


@dataclass
class Model:
    """A candidate of the search: its genotype, parent, fitness after each stage reached."""

    candidate: int
    genotype: str
    parent: Optional[int]
    fitness: List[Optional[float]] = field(default_factory=list)

    @property
    def latest(self) -> float:
        f = self.fitness[-1] if self.fitness else None
        return -math.inf if f is None else f


class Evolution:
    """One search (module docstring): ``run()`` to the end, resumable from its folder.

    The folder: ``evolution.json`` (the settings and the space), ``trials.jsonl`` (one line per finished trial),
    ``candidates/`` (each candidate's checkpoint after each stage), ``results.json`` (the hurdles, the best
    candidates) and ``fitness.png`` / ``.svg`` (fitness against trial order with the hurdles, where matplotlib
    is installed)."""

    def __init__(self, cfg: EvolutionConfig, space: Space, folder: str, log: Callable[[str], None] = print):
        cfg.check()
        if cfg.budgets is None:
            cfg = dataclasses.replace(cfg, budgets=tuple(space.DEFAULT_BUDGETS))
        self.cfg, self.space, self.folder, self.log = cfg, space, folder, log
        self.steps = [sum(cfg.budgets[:k + 1]) for k in range(len(cfg.budgets))]
        if self.steps[-1] > space.cfg.total_steps:
            raise ValueError(f"budgets: they add up to {self.steps[-1]} steps, beyond the trials' schedule "
                             f"(total_steps = {space.cfg.total_steps})")
        os.makedirs(folder, exist_ok=True)
        settings_file(os.path.join(folder, "evolution.json"), self._settings())
        self.store = TrialStore(os.path.join(folder, "trials.jsonl"))
        self.models: List[Model] = []
        self.hurdles: List[float] = []
        self.trained = 0  # trials run by this process (the others came from the store)
        self.order: List[dict] = []  # every trial record, in the search's order
        self.population: List[Model] = []

    @classmethod
    def resume(cls, folder: str, log: Callable[[str], None] = print, executor: str = "inprocess",
               ray_address: Optional[str] = None, num_cpus: Optional[int] = None) -> "Evolution":
        """The search of ``folder`` with its saved settings (only how the trials run may change)."""
        path = os.path.join(folder, "evolution.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resume: no evolution.json in {folder}")
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
        try:
            settings = dict(saved["settings"], budgets=tuple(saved["settings"]["budgets"]), executor=executor,
                            ray_address=ray_address, num_cpus=num_cpus)
            space = make_space(saved["space"], saved["space_settings"], saved.get("space_size"))
            cfg = EvolutionConfig(**settings)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"resume: {path} is not the settings file of a pynas evolution ({exc})") from None
        return cls(cfg, space, folder, log)

    # -- settings --------------------------------------------------------------------------------------------
    def _settings(self) -> dict:
        cfg = dataclasses.asdict(self.cfg)
        cfg["budgets"] = list(cfg["budgets"])
        for k in ("executor", "ray_address", "num_cpus"):  # how the trials run does not change the search
            cfg.pop(k)
        return {"settings": cfg, "space": self.space.name, "space_settings": dataclasses.asdict(self.space.cfg),
                "space_size": getattr(self.space, "n", None)}


    # -- the loop ---------------------------------------------------------------------------------------------
    def _trial_seed(self, candidate: int) -> int:
        return (self.cfg.seed * 1_000_003 + candidate) % (2 ** 31)

    def _run(self, executor, trials: List[Trial], extra: List[dict]) -> List[dict]:
        """The records of ``trials``: from the store where there, the rest through the executor."""
        def count(i: int, rec: dict) -> None:
            self.trained += 1

        recs = run_trials(self.store, executor, self.space.train(), trials, self.folder, self.space.cfg, extra, count)
        for r in recs:
            self.order.append(r)
            self._log_trial(r)
        return recs

    def _log_trial(self, r: dict) -> None:
        fit = self.space.show(r["fitness"])
        self.log(f"trial {len(self.order)}: candidate {r['candidate']} stage {r['stage']} steps {r['end']} "
                 f"fitness {fit} ({r.get('seconds', 0.0):.1f} s) {self.space.describe(r['genotype'])}")

    def _promote(self, executor, models: List[Model]) -> None:
        """Stages 1.. for the models of a round, each stage's promotions at once."""
        for k in range(len(self.cfg.budgets) - 1):
            if k >= len(self.hurdles):
                return
            up = [m for m in models if len(m.fitness) == k + 1 and m.latest > self.hurdles[k]]
            if not up:
                return
            trials = [Trial(m.candidate, m.genotype, self.steps[k], self.steps[k + 1], k + 1,
                            self._trial_seed(m.candidate)) for m in up]
            for m, r in zip(up, self._run(executor, trials, [{"parent": m.parent, "hurdle": self.hurdles[k]}
                                                             for m in up])):
                m.fitness.append(r["fitness"])

    def _set_hurdles(self) -> None:
        every = self.cfg.hurdle_every or self.cfg.population
        k = len(self.hurdles)
        while k < len(self.cfg.budgets) - 1 and len(self.models) >= every * (k + 1):
            reached = [m.fitness[k] for m in self.models if len(m.fitness) > k and m.fitness[k] is not None]
            if not reached:
                return
            self.hurdles.append(sum(reached) / len(reached))
            self.log(f"hurdle {k}: {self.space.show(self.hurdles[k])} (mean stage-{k} fitness of {len(reached)} "
                     f"models)")
            k += 1

    def _add(self, executor, children: List[Model]) -> None:
        trials = [Trial(c.candidate, c.genotype, 0, self.steps[0], 0, self._trial_seed(c.candidate))
                  for c in children]
        for c, r in zip(children, self._run(executor, trials, [{"parent": c.parent} for c in children])):
            c.fitness.append(r["fitness"])
        self._promote(executor, children)
        self.models += children

    def run(self) -> dict:
        cfg = self.cfg
        rng = random.Random(cfg.seed)
        executor = make_executor(cfg.executor, cfg.ray_address, cfg.num_cpus, getattr(self.space.cfg, "threads", 1))
        t0 = time.perf_counter()
        try:
            population = self.population = []  # the living models, oldest first
            # the initial population, in rounds of `parallel`
            while len(self.models) < cfg.population:
                n = min(cfg.parallel, cfg.population - len(self.models))
                children = [Model(len(self.models) + i, self.space.sample(rng), None) for i in range(n)]
                self._add(executor, children)
                population += children
                self._set_hurdles()
            made = 0
            while made < cfg.cycles:
                n = min(cfg.parallel, cfg.cycles - made)
                children = []
                for i in range(n):
                    cand = len(self.models) + i
                    if cfg.method == "random":
                        children.append(Model(cand, self.space.sample(rng), None))
                        continue
                    drawn = [rng.choice(population) for _ in range(cfg.sample_size)]
                    parent = max(drawn, key=lambda m: m.latest)  # ties: the first drawn
                    children.append(Model(cand, self.space.mutate(parent.genotype, rng), parent.candidate))
                self._add(executor, children)
                for c in children:
                    population.append(c)
                    population.pop(0)  # aging: the oldest leaves
                made += n
                self._set_hurdles()
                best = max(self.models, key=lambda m: (m.latest, len(m.fitness)))
                self.log(f"after {len(self.models)} models: best candidate {best.candidate} fitness "
                         f"{self.space.show(best.fitness[-1])} ({len(best.fitness)} stages) "
                         f"{self.space.describe(best.genotype)}")
        finally:
            executor.close()
        result = self.results(time.perf_counter() - t0)
        with open(os.path.join(self.folder, "results.json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1, sort_keys=True)
        self._plot()
        return result

    def results(self, seconds: float = 0.0) -> dict:
        """The hurdles, every model (ranked: latest fitness, then the longer trained, then the earlier) and the best."""
        ranked = sorted(self.models, key=lambda m: (-m.latest, -len(m.fitness), m.candidate))
        rows = [{"candidate": m.candidate, "genotype": m.genotype, "parent": m.parent, "fitness": m.fitness,
                 "stages": len(m.fitness), "steps": self.steps[len(m.fitness) - 1]} for m in ranked]
        return {"method": self.cfg.method, "space": self.space.name, "hurdles": self.hurdles, "models": rows,
                "best": rows[0] if rows else None, "trials": len(self.order), "trained_here": self.trained,
                "seconds": seconds}

    def _plot(self) -> None:
        try:
            from ..plot import plot_trials
        except ImportError:
            return
        try:
            plot_trials(self.order, self.hurdles, os.path.join(self.folder, "fitness.png"),
                        title=f"{self.cfg.method} on {self.space.name}")
        except ImportError:
            pass


def make_space(name: str, settings: Optional[dict] = None, n: Optional[int] = None) -> Space:
    """The space called ``name`` ('cnn' or 'sublayers') with its trial settings (a dict of the config's fields)."""
    if name == "cnn":
        from ..cnn.trial import CNNTrialConfig

        return CNNSpace(CNNTrialConfig(**(settings or {})))
    if name == "sublayers":
        from ..sublayers.trial import SublayerTrialConfig

        return SublayerSpace(4 if n is None else n, SublayerTrialConfig(**(settings or {})))
    raise ValueError(f"space: expected cnn or sublayers, got {name!r}")


def table(result: dict, top: int = 10, space: Optional[Space] = None) -> str:
    """The best ``top`` models of a result as text: rank, candidate, fitness per stage, steps, genotype."""
    space = space if space is not None else Space()
    show, describe = space.show, space.describe
    lines = [f"{'rank':>4} {'cand':>5} {'steps':>6}  fitness per stage        genotype"]
    for i, row in enumerate(result["models"][:top]):
        fits = ", ".join(show(f) for f in row["fitness"])
        lines.append(f"{i + 1:>4} {row['candidate']:>5} {row['steps']:>6}  {fits:<23}  {describe(row['genotype'])}")
    return "\n".join(lines)
