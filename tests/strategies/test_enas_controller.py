"""The ENAS controller and its REINFORCE step (pynas.strategies.enas_controller): teacher-forced log-probs,
entropies and their gradients against a plain functional reference written here, seeded sampling, the baseline
and the Adam update against a hand computation, exact resume, a learning sanity check, clear errors."""
from __future__ import annotations

import copy
import io
import math
import random

import pytest
import torch

from pynas.rnn.genotypes import Genotype, from_json, to_json
from pynas.strategies.enas_controller import ACTIVATIONS, Controller, Reinforce, ppl_reward

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the reference: the semantics of the module docstring, with functional ops only ------------------------------

def _lstm(x, h, c, P):
    gates = x @ P["lstm.weight_ih"].t() + P["lstm.bias_ih"] + h @ P["lstm.weight_hh"].t() + P["lstm.bias_hh"]
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def reference(ctl: Controller, genotype: Genotype, temperature, tanh_constant, penalty: bool):
    """(log_prob, entropy, [logits of every decision]) for ``genotype`` under ``ctl``'s parameters."""
    P = dict(ctl.named_parameters())
    hidden = P["g"].shape[1]
    acts = list(ctl.activations)

    def shape(logits):
        if temperature is not None:
            logits = logits / temperature
        if tanh_constant is not None:
            logits = tanh_constant * torch.tanh(logits)
        return logits

    log_prob = torch.zeros((), dtype=P["g"].dtype)
    entropy = torch.zeros((), dtype=P["g"].dtype)
    all_logits = []

    def choose(logits, k):
        nonlocal log_prob, entropy
        all_logits.append(logits.detach())
        logp = logits - torch.logsumexp(logits, dim=0)
        log_prob = log_prob + logp[k]
        entropy = entropy - (torch.exp(logp) * logp).sum()

    h = torch.zeros(1, hidden, dtype=P["g"].dtype)
    c = torch.zeros(1, hidden, dtype=P["g"].dtype)
    h, c = _lstm(P["g"], h, c, P)
    anchors = [h]
    n = len(genotype.recurrent)
    for i, (act, j) in enumerate(genotype.recurrent):
        if i > 0:
            scores = []
            for a in anchors:
                u = torch.tanh(a[0] @ P["w_attn_1.weight"].t() + h[0] @ P["w_attn_2.weight"].t())
                scores.append((P["v_attn.weight"][0] * u).sum())
            logits = shape(torch.stack(scores))
            if penalty:
                logits = logits - torch.tensor([(i + 1 - jj) ** 2 / 6.0 for jj in range(i + 1)], dtype=h.dtype)
            choose(logits, j)
            h, c = _lstm(anchors[j] / (0.1 + (i + 1 - j)), h, c, P)
        k = acts.index(act)
        choose(shape(P["w_soft.weight"] @ h[0] + P["w_soft.bias"]), k)
        if i < n - 1:
            h, c = _lstm(P["embedding.weight"][k].unsqueeze(0), h, c, P)
            anchors.append(h)
    return log_prob, entropy, all_logits


def random_genotype(rng: random.Random, steps: int, acts=ACTIVATIONS) -> Genotype:
    return Genotype(recurrent=[(rng.choice(acts), rng.randint(0, i)) for i in range(steps)],
                    concat=list(range(1, steps + 1)))


def _grads(out, params):
    gs = torch.autograd.grad(out, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


CONFIGS = [
    dict(steps=8, hidden=12),
    dict(steps=5, hidden=7, temperature=None),
    dict(steps=5, hidden=7, tanh_constant=None),
    dict(steps=6, hidden=9, temperature=None, tanh_constant=None, distance_penalty=False),
    dict(steps=4, hidden=6, temperature=1.3, tanh_constant=1.1, activations=["relu", "tanh"]),
    dict(steps=1, hidden=5),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_log_prob_entropy_and_gradients_match_reference(cfg):
    torch.manual_seed(11)
    ctl = Controller(**cfg).double()
    temperature = cfg.get("temperature", 5.0)
    tanh_constant = cfg.get("tanh_constant", 2.5)
    penalty = cfg.get("distance_penalty", True)
    names, params = zip(*ctl.named_parameters())
    assert set(names) == {"lstm.weight_ih", "lstm.weight_hh", "lstm.bias_ih", "lstm.bias_hh", "g",
                          "embedding.weight", "w_soft.weight", "w_soft.bias", "w_attn_1.weight",
                          "w_attn_2.weight", "v_attn.weight"}
    rng = random.Random(cfg["steps"] * 100 + cfg["hidden"])
    for _ in range(4):
        geno = random_genotype(rng, cfg["steps"], ctl.activations)
        lp, ent = ctl.log_prob_of(geno)
        lp_ref, ent_ref, _ = reference(ctl, geno, temperature, tanh_constant, penalty)
        assert lp.dim() == 0 and ent.dim() == 0 and lp.requires_grad and ent.requires_grad
        torch.testing.assert_close(lp, lp_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ent, ent_ref, rtol=1e-12, atol=1e-12)
        for out, out_ref in ((lp, lp_ref), (ent, ent_ref)):
            for name, g, g_ref in zip(names, _grads(out, params), _grads(out_ref, params)):
                torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12, msg=name)


def test_init_is_uniform_and_seeded():
    torch.manual_seed(0)
    a = Controller(steps=3, hidden=20)
    torch.manual_seed(0)
    b = Controller(steps=3, hidden=20)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        assert p.abs().max() <= 0.1 and p.abs().max() > 0.05, name


def test_greedy_takes_the_argmax_of_every_decision():
    torch.manual_seed(4)
    ctl = Controller(steps=6, hidden=16, temperature=1.0, tanh_constant=None).double()
    with torch.no_grad():
        for p in ctl.parameters():
            p.mul_(20.0)  # spread the logits so the argmax is clear
    geno = ctl.greedy()
    _, _, logits = reference(ctl, geno, 1.0, None, True)
    decisions = [geno.recurrent[0][0]]
    for act, j in geno.recurrent[1:]:
        decisions += [j, act]
    for logit, chosen in zip(logits, decisions):
        k = chosen if isinstance(chosen, int) else ctl.activations.index(chosen)
        assert k == int(torch.argmax(logit))


# -- sampling ------------------------------------------------------------------------------------------------------

def test_sample_is_seeded_valid_and_consistent():
    torch.manual_seed(2)
    ctl = Controller(steps=8, hidden=16, temperature=None, tanh_constant=None)
    with torch.no_grad():
        for p in ctl.parameters():
            p.mul_(10.0)  # non-uniform policies
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(123)
        runs.append([ctl.sample(gen) for _ in range(25)])
    seen = set()
    for (g1, lp1, ent1), (g2, lp2, ent2) in zip(*runs):
        assert g1 == g2 and torch.equal(lp1, lp2) and torch.equal(ent1, ent2)
        assert g1.concat == list(range(1, 9)) and len(g1.recurrent) == 8
        for i, (act, j) in enumerate(g1.recurrent):
            assert act in ACTIVATIONS and isinstance(j, int) and 0 <= j <= i
        assert from_json(to_json(g1)) == g1
        assert lp1.dim() == 0 and lp1.requires_grad and ent1.requires_grad
        lp, ent = ctl.log_prob_of(g1)
        torch.testing.assert_close(lp1, lp, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ent1, ent, rtol=1e-6, atol=1e-6)
        seen.add(to_json(g1))
    assert len(seen) > 5
    # Without a generator: torch's global RNG.
    torch.manual_seed(9)
    a = [ctl.sample()[0] for _ in range(5)]
    torch.manual_seed(9)
    assert a == [ctl.sample()[0] for _ in range(5)]


def test_sample_frequencies_follow_the_policy():
    torch.manual_seed(5)
    ctl = Controller(steps=2, hidden=8, temperature=None, tanh_constant=None)
    with torch.no_grad():
        ctl.w_soft.bias.copy_(torch.tensor([1.0, 0.0, -1.0, 0.5]))
    genos = [Genotype(recurrent=[(a, 0), (b, j)], concat=[1, 2]) for a in ACTIVATIONS for b in ACTIVATIONS
             for j in range(2)]
    with torch.no_grad():
        probs = {to_json(g): math.exp(ctl.log_prob_of(g)[0].item()) for g in genos}
    assert abs(sum(probs.values()) - 1.0) < 1e-5
    gen = torch.Generator().manual_seed(0)
    n = 4000
    counts = dict.fromkeys(probs, 0)
    with torch.no_grad():
        for _ in range(n):
            counts[to_json(ctl.sample(gen)[0])] += 1
    for key, p in probs.items():
        assert abs(counts[key] / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, key


# -- REINFORCE -----------------------------------------------------------------------------------------------------

def test_ppl_reward():
    assert ppl_reward(math.log(80.0)) == pytest.approx(1.0, rel=1e-12)
    assert ppl_reward(0.0, c=5.0) == 5.0
    assert ppl_reward(2.0, c=10) == pytest.approx(10 * math.exp(-2.0), rel=1e-12)


def test_baseline_sequence_by_hand():
    torch.manual_seed(1)
    ctl = Controller(steps=3, hidden=8)
    rl = Reinforce(ctl, lr=1e-3, baseline_decay=0.9, entropy_weight=0.0)
    gen = torch.Generator().manual_seed(1)
    expected = [(1.0, 1.0, 0.0), (0.0, 0.9, -0.9), (0.5, 0.86, -0.36), (2.0, 0.974, 1.026)]
    for reward, b, adv in expected:
        _, lp, ent = ctl.sample(gen)
        out = rl.step(lp, ent, reward)
        assert out["reward"] == reward and out["adjusted"] == reward
        assert out["baseline"] == pytest.approx(b, abs=1e-12)
        assert out["advantage"] == pytest.approx(adv, abs=1e-12)
        assert out["loss"] == pytest.approx(-lp.item() * adv, rel=1e-6, abs=1e-9)
    assert rl.baseline == pytest.approx(0.974, abs=1e-12) and rl.steps_done == 4


@pytest.mark.parametrize("grad_clip", [None, 0.05])
def test_step_is_one_adam_step_on_the_reinforce_loss(grad_clip):
    torch.manual_seed(3)
    ctl = Controller(steps=4, hidden=10).double()
    ref = copy.deepcopy(ctl)
    lr, decay, ew, (b1, b2), eps = 0.02, 0.8, 0.05, (0.9, 0.999), 1e-8
    rl = Reinforce(ctl, lr=lr, baseline_decay=decay, entropy_weight=ew, grad_clip=grad_clip)
    params = list(ref.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(8)
    b = None
    clipped = False
    for t, reward in enumerate([0.3, 0.8, 0.1, 0.6, 0.9, 0.2], start=1):
        geno, lp, ent = ctl.sample(gen)
        out = rl.step(lp, ent, reward)
        lp_ref, ent_ref = ref.log_prob_of(geno)
        r = reward + ew * ent_ref.item()
        b = r if b is None else decay * b + (1 - decay) * r
        adv = r - b
        grads = torch.autograd.grad(-lp_ref * adv, params)
        norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
        if grad_clip is not None and norm > grad_clip:
            clipped = True
            grads = [g * (grad_clip / (norm + 1e-6)) for g in grads]
        with torch.no_grad():
            for p, g, m_, v_ in zip(params, grads, m, v):
                m_.mul_(b1).add_((1 - b1) * g)
                v_.mul_(b2).add_((1 - b2) * g * g)
                p.sub_(lr / (1 - b1 ** t) * m_ / (torch.sqrt(v_ / (1 - b2 ** t)) + eps))
        assert out["adjusted"] == pytest.approx(r, rel=1e-12) and out["baseline"] == pytest.approx(b, rel=1e-12)
        assert out["advantage"] == pytest.approx(adv, abs=1e-12)
        assert out["loss"] == pytest.approx(-lp_ref.item() * adv, rel=1e-9, abs=1e-12)
        assert out["grad_norm"] == pytest.approx(norm, rel=1e-9, abs=1e-12)
        for (name, p), q in zip(ctl.named_parameters(), params):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=name)
    assert clipped == (grad_clip is not None)


def test_state_dict_resumes_exactly():
    def run(ctl, rl, gen, rewards):
        for reward in rewards:
            _, lp, ent = ctl.sample(gen)
            rl.step(lp, ent, reward)

    torch.manual_seed(6)
    ctl = Controller(steps=4, hidden=10)
    rl = Reinforce(ctl, lr=0.01, grad_clip=1.0)
    gen = torch.Generator().manual_seed(6)
    run(ctl, rl, gen, [0.2, 0.5, 0.4])
    buf = io.BytesIO()
    torch.save({"reinforce": rl.state_dict(), "gen": gen.get_state()}, buf)
    run(ctl, rl, gen, [0.9, 0.1, 0.7])

    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    torch.manual_seed(99)
    ctl2 = Controller(steps=4, hidden=10)
    rl2 = Reinforce(ctl2, lr=0.01, grad_clip=1.0)
    rl2.load_state_dict(saved["reinforce"])
    gen2 = torch.Generator()
    gen2.set_state(saved["gen"])
    run(ctl2, rl2, gen2, [0.9, 0.1, 0.7])
    for (name, p), q in zip(ctl.named_parameters(), ctl2.parameters()):
        assert torch.equal(p, q), name
    assert rl2.baseline == rl.baseline and rl2.steps_done == rl.steps_done == 6

    other = Reinforce(Controller(steps=4, hidden=10), lr=0.02, grad_clip=1.0)
    with pytest.raises(ValueError, match=r"^state: expected settings"):
        other.load_state_dict(saved["reinforce"])
    with pytest.raises(ValueError, match=r"^state:"):
        other.load_state_dict({"baseline": 1.0})


# -- the sanity check ----------------------------------------------------------------------------------------------

# Node 1 takes s0 against the distance prior; nodes 2 and 3 take the latest state. With lr 5e-3 and 1000 steps, 20 of
# 20 seeds (0..19, generator seed 100 + seed) passed both checks when this was written, 19 of 20 after 750 steps.
# (Targets with a skip of one state, e.g. node 2 -> 1, learn slower: a few seeds saturate every candidate's tanh and
# stay on the distance prior.)
TARGET = Genotype(recurrent=[("relu", 0), ("sigmoid", 0), ("tanh", 2), ("identity", 3)], concat=[1, 2, 3, 4])
SANITY_LR = 5e-3
SANITY_STEPS = 1000


def _match_fraction(geno: Genotype) -> float:
    """The fraction of the 7 decisions (node 0's activation; each later node's input and activation) as TARGET's."""
    hits = int(geno.recurrent[0][0] == TARGET.recurrent[0][0])
    for (act, j), (t_act, t_j) in zip(geno.recurrent[1:], TARGET.recurrent[1:]):
        hits += int(act == t_act) + int(j == t_j)
    return hits / 7


def test_controller_learns_a_fixed_target():
    torch.manual_seed(0)
    ctl = Controller(steps=4, hidden=32)
    rl = Reinforce(ctl, lr=SANITY_LR, baseline_decay=0.95)
    gen = torch.Generator().manual_seed(100)
    rewards = []
    for _ in range(SANITY_STEPS):
        geno, lp, ent = ctl.sample(gen)
        rewards.append(_match_fraction(geno))
        rl.step(lp, ent, rewards[-1])
    assert ctl.greedy() == TARGET
    assert sum(rewards[-50:]) / 50 > 0.8
    assert sum(rewards[:50]) / 50 < 0.6


# -- errors --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, name", [
    (dict(steps=0), "steps"), (dict(steps=2.0), "steps"), (dict(hidden=0), "hidden"), (dict(hidden=True), "hidden"),
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(tanh_constant=0), "tanh_constant"),
    (dict(distance_penalty=1), "distance_penalty"), (dict(activations=[]), "activations"),
    (dict(activations=["relu", "relu"]), "activations"), (dict(activations="relu"), "activations"),
])
def test_bad_controller_arguments(kw, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        Controller(**kw)


@pytest.mark.parametrize("kw, name", [
    (dict(baseline_decay=1.0), "baseline_decay"), (dict(baseline_decay=-0.1), "baseline_decay"),
    (dict(lr=0.0), "lr"), (dict(entropy_weight=float("inf")), "entropy_weight"), (dict(grad_clip=0.0), "grad_clip"),
])
def test_bad_reinforce_arguments(kw, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        Reinforce(Controller(steps=2, hidden=4), **kw)


def test_bad_step_and_reward_arguments():
    ctl = Controller(steps=2, hidden=4)
    rl = Reinforce(ctl)
    _, lp, ent = ctl.sample(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"^log_prob: expected"):
        rl.step(lp.detach(), ent, 1.0)
    with pytest.raises(ValueError, match=r"^reward: expected"):
        rl.step(lp, ent, float("nan"))
    with pytest.raises(ValueError, match=r"^valid_loss: expected"):
        ppl_reward(-1.0)
    with pytest.raises(ValueError, match=r"^c: expected"):
        ppl_reward(1.0, c=0.0)


@pytest.mark.parametrize("recurrent, concat", [
    ([("relu", 0), ("tanh", 2), ("relu", 0)], [1, 2, 3]),     # node 1 can take 0..1
    ([("relu", 1), ("tanh", 0), ("relu", 0)], [1, 2, 3]),     # node 0 takes state 0
    ([("relu", 0), ("tanh", -1), ("relu", 0)], [1, 2, 3]),
    ([("relu", 0), ("tanh", True), ("relu", 0)], [1, 2, 3]),
    ([("relu", 0), ("none", 0), ("relu", 0)], [1, 2, 3]),     # 'none' is not a candidate
    ([("relu", 0), ("gelu", 0), ("relu", 0)], [1, 2, 3]),
    ([("relu", 0), ("tanh", 0)], [1, 2]),                     # 2 genes for 3 steps
    ([("relu", 0), ("tanh", 0), ("relu", 0)], [0, 1, 2]),
])
def test_log_prob_of_rejects_genotypes_outside_the_space(recurrent, concat):
    ctl = Controller(steps=3, hidden=4)
    with pytest.raises(ValueError, match=r"^genotype: expected"):
        ctl.log_prob_of(Genotype(recurrent=recurrent, concat=concat))
