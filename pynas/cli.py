"""The ``pynas`` command line: ``pynas search cnn|rnn``, ``pynas train cnn|rnn``, ``pynas eval cnn|rnn``, ``pynas plot``,
``pynas bench``, ``pynas info``."""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from typing import Callable, List, Optional

from .search.cnn import CNNSearchConfig


def _add_order_args(p: argparse.ArgumentParser, d) -> None:
    """First or second order, and the finite-difference radius (both search spaces)."""
    order = p.add_mutually_exclusive_group()
    order.add_argument("--unrolled", "--second-order", dest="unrolled", action="store_true",
                       help="second-order (unrolled) architecture gradient")
    order.add_argument("--first-order", dest="unrolled", action="store_false", help="first order (default)")
    p.set_defaults(unrolled=d.unrolled)
    p.add_argument("--fd-r", type=float, default=d.fd_r, help="finite-difference radius r of the second-order step")


def _add_run_args(p: argparse.ArgumentParser, d, hessian: bool = True) -> None:
    """Seed, length, device, backend, threads, run folder and resume (searches and trainings)."""
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps-per-epoch", type=int, default=None, help="cap on iterations per epoch")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default=None, help="auto, reference, cpu, triton, cuda (default: $PYNAS_BACKEND or auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--save", default=None, help="run folder for checkpoint, log and genotype (default runs/<time>)")
    p.add_argument("--resume", default=None, help="checkpoint file or run folder to continue")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write the per-epoch figures as TensorBoard event files in <run folder>/tensorboard "
                        "(needs the tensorboard package)")
    if hessian:
        _add_hessian_args(p, d)


def _add_hessian_args(p: argparse.ArgumentParser, d) -> None:
    """--track-hessian and DARTS-ES (Zela et al., ICLR 2020; both search spaces)."""
    g = p.add_argument_group("Hessian of the validation loss w.r.t. alpha (Robust-DARTS)")
    g.add_argument("--track-hessian", action="store_true",
                   help="after every epoch, log the dominant eigenvalue of the Hessian of the validation loss w.r.t. "
                        "the architecture parameters (power iteration on exact Hessian-vector products, one fixed "
                        "validation batch); the run's trajectory is unchanged")
    g.add_argument("--hessian-iters", type=int, default=d.hessian_iters, help="power iterations per eigenvalue")
    g.add_argument("--hessian-stop", action="store_true",
                   help="DARTS-ES: stop when the eigenvalue's mean over --hessian-window epochs grew by more than "
                        "1/--hessian-threshold within --hessian-k epochs; keep the genotype of k epochs before "
                        "(needs --track-hessian)")
    g.add_argument("--hessian-window", type=int, default=d.hessian_window, help="DARTS-ES: epochs averaged")
    g.add_argument("--hessian-k", type=int, default=d.hessian_k, help="DARTS-ES: epochs looked back")
    g.add_argument("--hessian-threshold", type=float, default=d.hessian_threshold,
                   help="DARTS-ES: stop when mean(i - k) / mean(i) falls below this")


def _hessian_settings(args) -> dict:
    import dataclasses

    from .search.config import HessianSettings

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(HessianSettings)}


def _add_cnn_net_args(p: argparse.ArgumentParser, d, num_train_help: str) -> None:
    """The data, the network's size and the SGD settings (pynas search cnn and pynas train cnn)."""
    p.add_argument("--data", choices=("shapes10", "cifar10"), default=d.data,
                   help="shapes10: embedded synthetic set (no download); cifar10: python batches from --data-dir")
    p.add_argument("--data-dir", default=None, help="folder with the CIFAR-10 python batches")
    p.add_argument("--num-train", type=int, default=None, help=num_train_help)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--learning-rate", "--lr", type=float, default=d.learning_rate)
    p.add_argument("--learning-rate-min", "--lr-min", type=float, default=d.learning_rate_min)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--init-channels", type=int, default=d.init_channels)
    p.add_argument("--layers", type=int, default=d.layers)


#: The CNN search settings whose default is the method's (given flags override it; unset ones stay None).
_METHOD_SETTINGS = ("epochs", "batch_size", "learning_rate", "learning_rate_min", "momentum", "weight_decay",
                    "grad_clip", "init_channels", "layers", "arch_learning_rate", "arch_weight_decay", "warmup_epochs",
                    "nesterov")
CNN_SEARCH_METHODS = ("darts", "idarts", "pcdarts", "gdas", "rsws", "random")


def _add_cnn_args(p: argparse.ArgumentParser) -> None:
    d = CNNSearchConfig()
    p.add_argument("--method", choices=CNN_SEARCH_METHODS, default="darts",
                   help="darts; idarts (one softmax per node); pcdarts (partial channels, edge normalisation); gdas "
                        "(Gumbel-sampled paths); rsws (random search with weight sharing); random (sample, train "
                        "briefly, keep the best). The settings below default to the method's paper's")
    _add_cnn_net_args(p, d, "images of the training set to use (both halves)")
    p.add_argument("--train-portion", type=float, default=d.train_portion)
    _add_order_args(p, d)
    p.add_argument("--arch-learning-rate", "--arch-lr", type=float, default=d.arch_learning_rate)
    p.add_argument("--arch-weight-decay", type=float, default=d.arch_weight_decay)
    m = p.add_argument_group("the methods' own settings")
    m.add_argument("--warmup-epochs", type=int, help="epochs without architecture steps (pcdarts: 15, others: 0)")
    m.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help="Nesterov momentum of the weight SGD (gdas: on, others: off)")
    m.add_argument("--partial-channels", type=int, default=d.partial_channels, help="pcdarts: K (1/K of the channels)")
    m.add_argument("--tau-max", type=float, default=d.tau_max, help="gdas: the first epoch's temperature")
    m.add_argument("--tau-min", type=float, default=d.tau_min, help="gdas: the last epoch's temperature")
    m.add_argument("--gdas-unselected", choices=("scalar", "drop"), default=d.gdas_unselected,
                   help="gdas: the unselected candidates enter as their hard weights (scalar) or not at all (drop)")
    m.add_argument("--distinct-inputs", action="store_true",
                   help="idarts, gdas: the genotype's two pairs per node on distinct inputs")
    m.add_argument("--rsws-path", choices=("single", "supernet"), default=d.rsws_path,
                   help="rsws: compute only the sampled path (single) or every operation with one-hot weights")
    m.add_argument("--no-none", dest="allow_none", action="store_false", help="rsws: never sample 'none'")
    m.add_argument("--rsws-samples", type=int, default=d.rsws_samples, help="rsws: architectures ranked at the end")
    m.add_argument("--rsws-eval-batches", type=int, default=d.rsws_eval_batches,
                   help="rsws: validation batches per ranked architecture")
    m.add_argument("--rsws-top", type=int, default=d.rsws_top, help="rsws: the best re-scored on the validation half")
    m.add_argument("--samples", type=int, default=None, help="random: architectures sampled and trained (24)")
    m.add_argument("--candidate-epochs", type=int, default=None, help="random: training epochs of each candidate")
    _add_run_args(p, d)
    _add_distributed_args(p)
    p.set_defaults(**{name: None for name in _METHOD_SETTINGS})


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    """Data-parallel searches (pynas.search.distributed): under torchrun, or started here with --nproc."""
    from .search.distributed import DEFAULT_TIMEOUT_S

    g = p.add_argument_group("data-parallel (torch.distributed; run under torchrun, or with --nproc)")
    g.add_argument("--nproc", type=int, default=None,
                   help="start this many processes on this machine through torchrun (each takes an equal share of "
                        "every batch; gloo on CPUs, NCCL on GPUs)")
    g.add_argument("--sync-bn", action="store_true",
                   help="BatchNorm statistics of the global batch (the run then equals one process's); the "
                        "BatchNorms run op by op, on the reference backend. Default: each process's own")
    g.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds a collective may wait before the run ends with an error (a dead process)")


def _add_enas_args(p: argparse.ArgumentParser, d) -> None:
    """The ENAS controller's settings (enas, cas, mas)."""
    g = p.add_argument_group("ENAS: the controller")
    g.add_argument("--enas-controller-steps", type=int, default=d.enas_controller_steps,
                   help="REINFORCE steps per epoch, each on one sampled cell")
    g.add_argument("--enas-derive-samples", type=int, default=d.enas_derive_samples,
                   help="controller samples scored for the derived cell")
    g.add_argument("--enas-controller-lr", type=float, default=d.enas_controller_lr, help="the controller's Adam lr")
    g.add_argument("--enas-entropy-weight", type=float, default=d.enas_entropy_weight,
                   help="entropy bonus added to the reward")
    g.add_argument("--enas-baseline-decay", type=float, default=d.enas_baseline_decay,
                   help="decay of the reward's moving-average baseline")
    g.add_argument("--enas-temperature", type=float, default=d.enas_temperature, help="logits divided by it")
    g.add_argument("--enas-tanh-constant", type=float, default=d.enas_tanh_constant,
                   help="logits squashed to c * tanh(logits)")
    g.add_argument("--enas-hidden", type=int, default=d.enas_hidden, help="the controller LSTM's units")
    g.add_argument("--enas-reward-c", type=float, default=d.enas_reward_c, help="reward = c / validation perplexity")


def _add_lm_args(p: argparse.ArgumentParser, d) -> None:
    """The language model and its weight training (every RNN search)."""
    p.add_argument("--emsize", type=int, default=d.emsize, help="embedding size (= --nhid)")
    p.add_argument("--nhid", type=int, default=d.nhid, help="hidden size")
    p.add_argument("--nhidlast", type=int, default=-1, help="hidden size of the last layer (default: --emsize)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--clip", type=float, default=d.clip, help="gradient clip (weights and the virtual step)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--bptt", type=int, default=d.bptt, help="sequence length")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout of the cell's output")
    p.add_argument("--dropouth", type=float, default=d.dropouth, help="dropout of the hidden states in the cell")
    p.add_argument("--dropoutx", type=float, default=d.dropoutx, help="dropout of the cell's input")
    p.add_argument("--dropouti", type=float, default=d.dropouti, help="dropout of the embedding output")
    p.add_argument("--dropoute", type=float, default=d.dropoute, help="dropout of whole words in the embedding")
    p.add_argument("--alpha", type=float, default=d.alpha, help="activation regularisation")
    p.add_argument("--beta", type=float, default=d.beta, help="temporal activation regularisation")
    p.add_argument("--wdecay", type=float, default=d.wdecay, help="weight decay")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)


def _add_rnn_args(p: argparse.ArgumentParser) -> None:
    from .search.rnn import RNNSearchConfig

    d = RNNSearchConfig()
    p.add_argument("--method", choices=("darts", "idarts", "rsws", "enas", "ess", "random"), default="darts",
                   help="darts; idarts (one softmax per node); rsws (random search with weight sharing: the "
                        "evaluation cell's genotype sampled per batch); enas (an LSTM controller samples the cells, "
                        "trained by REINFORCE); ess (the cell's inputs made by two searched inter-cell DAGs over the "
                        "last --ess-m inputs and hidden states); random (sample cells, train briefly, keep the "
                        "best). --epochs and --batch-size default to the method's")
    p.add_argument("--allow-s0", dest="forbid_s0", action="store_false",
                   help="idarts: nodes after the first may take s0 in the genotype (the author's code never does)")
    p.add_argument("--rsws-samples", type=int, default=d.rsws_samples, help="rsws: cells ranked at the end")
    p.add_argument("--rsws-eval-batches", type=int, default=d.rsws_eval_batches,
                   help="rsws: validation chunks per ranked cell")
    p.add_argument("--rsws-top", type=int, default=d.rsws_top, help="rsws: the best re-scored on the validation text")
    p.add_argument("--ess-m", type=int, default=d.ess_m, help="ess: the history window m of the inter-cell DAGs")
    p.add_argument("--ess-nodes", type=int, default=d.ess_nodes, help="ess: intermediate nodes of each inter-cell DAG")
    p.add_argument("--samples", type=int, default=None, help="random: cells sampled and trained (8)")
    p.add_argument("--candidate-epochs", type=int, default=None, help="random: training epochs of each candidate")
    _add_enas_args(p, d)
    p.add_argument("--data", choices=("stdlib", "ptb"), default=d.data,
                   help="stdlib: embedded word-level corpus built at run time from the Python standard library's "
                        "docstrings and comments (no download); ptb: ptb.{train,valid,test}.txt from --data-dir")
    p.add_argument("--data-dir", default=None, help="folder with ptb.train.txt, ptb.valid.txt, ptb.test.txt")
    p.add_argument("--max-tokens", type=int, default=None, help="stdlib corpus: cap on its size in tokens")
    _add_lm_args(p, d)
    _add_order_args(p, d)
    p.add_argument("--arch-lr", type=float, default=d.arch_lr)
    p.add_argument("--arch-wdecay", type=float, default=d.arch_wdecay)
    _add_run_args(p, d)
    _add_distributed_args(p)
    p.set_defaults(epochs=None, batch_size=None)  # the method's (pynas.search.rnn.RNNSearchConfig.for_method)


def _add_multitask_args(p: argparse.ArgumentParser, kind: str) -> None:
    """pynas search cas|mas: the tasks, the method's own settings, then ENAS's and the language model's."""
    from .search.rnn import RNNSearchConfig
    from .strategies.cas import CASConfig

    d, t = RNNSearchConfig.for_method("enas"), CASConfig()
    g = p.add_argument_group("tasks")
    g.add_argument("--tasks", default=t.tasks,
                   help="stdlib (--n-tasks language-modelling tasks on disjoint parts of the embedded corpus, no "
                        "download) or a comma-separated list of task sources: a folder with train.txt, valid.txt, "
                        "test.txt, or FILE.tsv[:COLUMN] (a 0-based index or a header name)")
    g.add_argument("--n-tasks", type=int, default=t.n_tasks, help="stdlib: how many tasks")
    g.add_argument("--task-tokens", type=int, default=t.task_tokens, help="stdlib: tokens per task")
    g.add_argument("--vocab-size", type=int, default=t.vocab_size, help="the tasks' shared dictionary size")
    g.add_argument("--train-epochs", type=int, default=t.train_epochs,
                   help="epochs of training each searched cell on a task before it is scored")
    g.add_argument("--train-steps-per-epoch", type=int, default=None, help="cap on those epochs' iterations")
    if kind == "cas":
        g = p.add_argument_group("CAS: the weight penalties")
        g.add_argument("--lambda-bs-first", type=float, default=t.lambda_bs_first,
                       help="block sparsity on the first task's weights")
        g.add_argument("--lambda-bs", type=float, default=t.lambda_bs,
                       help="later tasks: block sparsity of the change from the previous task's weights")
        g.add_argument("--lambda-o", type=float, default=t.lambda_o,
                       help="later tasks: orthogonality of the change to the previous task's weights")
        g.add_argument("--no-penalties", dest="penalties", action="store_false",
                       help="the control: the same steps without the penalties")
    else:
        p.add_argument("--no-single-task", dest="single_task", action="store_false",
                       help="skip the single-task searches and the comparison's single-task cells")
    _add_enas_args(p, d)
    _add_lm_args(p, d)
    _add_run_args(p, d, hessian=False)
    p.set_defaults(epochs=None, batch_size=None)


_LM_SETTINGS = ("emsize", "nhid", "lr", "clip", "bptt", "dropout", "dropouth", "dropoutx", "dropouti", "dropoute",
                "alpha", "beta", "wdecay", "eval_batch_size", "seed", "steps_per_epoch", "device", "tensorboard")


def _search_tasks(args) -> int:
    """pynas search cas|mas."""
    _alone("the multi-task searches")
    from . import _backend
    from .search.lm_tasks import saved_config
    from .strategies import cas, mas

    _set_threads(args.threads)
    kind = args.space
    config_cls, check, runner = ((cas.CASConfig, cas.check_config, cas.run_cas) if kind == "cas"
                                 else (mas.MASConfig, mas.check_config, mas.run_mas))
    backend = args.backend if args.backend is not None else _backend.current_backend()
    if args.resume is not None:
        save = args.resume
        cfg = saved_config(config_cls, save, device=args.device, backend=backend)
    else:
        search = {k: getattr(args, k) for k in _LM_SETTINGS}
        search["nhidlast"] = args.emsize if args.nhidlast < 0 else args.nhidlast
        search.update({k: getattr(args, k) for k in ("epochs", "batch_size") if getattr(args, k) is not None})
        search.update({k: getattr(args, k) for k in vars(args) if k.startswith("enas_")})
        search["backend"] = backend
        own = {"penalties": args.penalties, "lambda_bs_first": args.lambda_bs_first, "lambda_bs": args.lambda_bs,
               "lambda_o": args.lambda_o} if kind == "cas" else {"single_task": args.single_task}
        cfg = config_cls(tasks=args.tasks, n_tasks=args.n_tasks, task_tokens=args.task_tokens,
                         vocab_size=args.vocab_size, train_epochs=args.train_epochs,
                         train_steps_per_epoch=args.train_steps_per_epoch, search=search, **own)
        save = args.save or os.path.join("runs", f"search-{kind}-" + time.strftime("%Y%m%d-%H%M%S"))
    check(cfg)
    log = _trial_log(save)
    log(f"pynas search {kind}: run folder {save}; tasks {cfg.tasks}"
        + (f" ({cfg.n_tasks})" if cfg.tasks == "stdlib" else "") + f"; backend {cfg.search.get('backend')}"
        + ("; resuming" if args.resume is not None else ""))
    runner(cfg, save, log, progress=not args.no_progress)
    return 0


def _add_train_cnn_args(p: argparse.ArgumentParser) -> None:
    from .train.cnn import CNNTrainConfig

    d = CNNTrainConfig()
    p.add_argument("--genotype", default=d.genotype,
                   help="genotype JSON file (a search's genotype.json) or a published cell: DARTS_V1, DARTS_V2, DARTS "
                        "(= DARTS_V2)")
    _add_cnn_net_args(p, d, "images of the training split to use")
    p.add_argument("--num-test", type=int, default=None, help="images of the test split to use")
    p.add_argument("--no-auxiliary", dest="auxiliary", action="store_false", help="no auxiliary head")
    p.add_argument("--auxiliary-weight", type=float, default=d.auxiliary_weight)
    p.add_argument("--drop-path-prob", type=float, default=d.drop_path_prob,
                   help="drop path probability at the last epoch (ramped linearly from 0)")
    p.add_argument("--no-cutout", dest="cutout", action="store_false", help="no cutout")
    p.add_argument("--cutout-length", type=int, default=d.cutout_length)
    _add_run_args(p, d, hessian=False)


def _add_train_rnn_args(p: argparse.ArgumentParser) -> None:
    from .train.rnn import RNNTrainConfig

    d = RNNTrainConfig()
    p.add_argument("--genotype", default=d.genotype,
                   help="genotype JSON file (a search's genotype.json) or a published cell: DARTS_V1, DARTS_V2, DARTS "
                        "(= DARTS_V2)")
    p.add_argument("--data", choices=("stdlib", "ptb"), default=d.data,
                   help="stdlib: embedded corpus built at run time (no download); ptb: from --data-dir")
    p.add_argument("--data-dir", default=None, help="folder with ptb.train.txt, ptb.valid.txt, ptb.test.txt")
    p.add_argument("--max-tokens", type=int, default=None, help="stdlib corpus: cap on its size in tokens")
    for name in ("emsize", "nhid", "epochs", "batch_size", "eval_batch_size", "test_batch_size", "bptt", "nonmono"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "clip", "dropout", "dropouth", "dropoutx", "dropouti", "dropoute", "alpha", "beta", "wdecay"):
        p.add_argument("--" + name, type=float, default=getattr(d, name))
    _add_run_args(p, d, hessian=False)


def _add_trial_search_args(p: argparse.ArgumentParser) -> None:
    """How a search by trials runs: seed, executor (in-process or Ray), threads per trial, run folder, resume."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--executor", choices=("inprocess", "ray"), default="inprocess",
                   help="inprocess: one trial after another here; ray: the trials as Ray tasks (pip install "
                        "'pynas[ray]'), on a local cluster or --ray-address")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--parallel", type=int, default=1, help="trials trained at once per round")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of each trial")
    p.add_argument("--save", default=None, help="run folder (default runs/<command>-<time>)")
    p.add_argument("--resume", default=None, help="run folder to continue (its saved settings are used)")
    p.add_argument("--top", type=int, default=10, help="candidates in the final table")


def _add_evolution_args(p: argparse.ArgumentParser) -> None:
    from .cnn.trial import CNNTrialConfig
    from .strategies.evolution import EvolutionConfig

    d, t = EvolutionConfig(), CNNTrialConfig()
    p.add_argument("--space", dest="trial_space", choices=("cnn", "sublayers"), default="cnn",
                   help="cnn: DARTS CNN genotypes, fitness the validation accuracy of the derived network on "
                        "shapes10; sublayers: orders of s and f sublayers, fitness minus the validation loss")
    p.add_argument("--method", choices=("evolution", "random"), default="evolution",
                   help="evolution: regularized evolution with progressive dynamic hurdles; random: its control, "
                        "every child drawn afresh, the same budgets and hurdles")
    p.add_argument("--population", type=int, default=d.population)
    p.add_argument("--sample-size", type=int, default=d.sample_size, help="tournament size (drawn with replacement)")
    p.add_argument("--cycles", type=int, default=d.cycles, help="children after the initial population")
    p.add_argument("--budgets", default=None,
                   help="comma-separated steps of each stage, e.g. 30,120 (default: cnn 30,120; sublayers 150,450)")
    p.add_argument("--hurdle-every", type=int, default=None, help="models between hurdles (default: the population)")
    g = p.add_argument_group("the CNN space's trials (a derived network trained on shapes10)")
    for name in ("init_channels", "layers", "batch_size", "num_train", "num_valid"):
        g.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(t, name))
    g.add_argument("--learning-rate", type=float, default=t.learning_rate)
    _add_sublayer_trial_args(p, "n self-attention and n feed-forward sublayers")
    _add_trial_search_args(p)


def _add_sublayer_trial_args(p: argparse.ArgumentParser, n_help: str) -> None:
    g = p.add_argument_group("the sublayer space's trials (a Transformer language model on the stdlib corpus)")
    g.add_argument("--n", type=int, default=4, help=n_help)
    g.add_argument("--d-model", type=int, default=None)
    g.add_argument("--heads", type=int, default=None)
    g.add_argument("--block", type=int, default=None, help="tokens per sequence")
    g.add_argument("--lr", type=float, default=None, help="Adam's learning rate")


def _sublayer_trial_settings(args) -> dict:
    return {k: getattr(args, k) for k in ("d_model", "heads", "block", "lr") if getattr(args, k) is not None}


def _add_sandwich_args(p: argparse.ArgumentParser) -> None:
    from .strategies.sandwich import FAMILIES, SandwichConfig

    d = SandwichConfig()
    p.add_argument("--steps", type=int, default=d.steps, help="training steps of every order")
    p.add_argument("--families", default=",".join(FAMILIES),
                   help="comma-separated: interleaved (the (sf)^n baseline), sandwich (s^k (sf)^(n-k) f^k), "
                        "balanced (random orders of n s and n f), same_params (random orders of the baseline's "
                        "weight count)")
    p.add_argument("--ks", default=None, help="sandwich coefficients, comma-separated (default 1..n-1)")
    p.add_argument("--random-orders", type=int, default=d.random_orders, help="orders of each random family")
    p.add_argument("--baseline-seeds", type=int, default=d.baseline_seeds, help="seeds of the interleaved baseline")
    _add_sublayer_trial_args(p, "the baseline's sublayer pairs: (sf)^n")
    _add_trial_search_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pynas", description="Fast differentiable architecture search (DARTS).")
    sub = parser.add_subparsers(dest="command", required=True)
    search = sub.add_parser("search", help="run a DARTS search")
    spaces = search.add_subparsers(dest="space", required=True)
    _add_cnn_args(spaces.add_parser("cnn", help="DARTS CNN search space"))
    _add_rnn_args(spaces.add_parser("rnn", help="DARTS RNN search space (word-level language model)"))
    enas = spaces.add_parser("enas", help="ENAS on the DARTS RNN space (= pynas search rnn --method enas)")
    _add_rnn_args(enas)
    enas.set_defaults(method="enas")
    ess = spaces.add_parser("ess", help="ESS on the DARTS RNN space, intra- and inter-cell (= pynas search rnn "
                                        "--method ess)")
    _add_rnn_args(ess)
    ess.set_defaults(method="ess")
    _add_multitask_args(spaces.add_parser("cas", help="continual architecture search: ENAS on tasks in sequence, "
                                                      "the weights carried with CAS's penalties"), "cas")
    _add_multitask_args(spaces.add_parser("mas", help="multi-task architecture search: one ENAS controller and one "
                                                      "model for several tasks, against single-task cells"), "mas")
    _add_evolution_args(spaces.add_parser("evolution", help="search by trials: regularized evolution with "
                                                            "progressive dynamic hurdles (or its random control)"))
    _add_sandwich_args(spaces.add_parser("sandwich", help="sublayer-order search (the sandwich transformer): the "
                                                          "interleaved baseline, sandwich k, random orders"))
    train = sub.add_parser("train", help="train the network of a genotype from scratch and test it")
    train_spaces = train.add_subparsers(dest="space", required=True)
    _add_train_cnn_args(train_spaces.add_parser("cnn", help="the DARTS CNN evaluation network"))
    _add_train_rnn_args(train_spaces.add_parser("rnn", help="the DARTS RNN evaluation language model"))
    ev = sub.add_parser("eval", help="test a trained network")
    ev_spaces = ev.add_subparsers(dest="space", required=True)
    ev_cnn = ev_spaces.add_parser("cnn", help="a network trained by pynas train cnn")
    ev_cnn.add_argument("--checkpoint", required=True, help="checkpoint file or run folder of pynas train cnn")
    ev_cnn.add_argument("--data-dir", default=None, help="folder with the CIFAR-10 python batches (cifar10 runs)")
    ev_cnn.add_argument("--device", default="cpu")
    ev_cnn.add_argument("--batch-size", type=int, default=None)
    ev_cnn.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ev_rnn = ev_spaces.add_parser("rnn", help="a language model trained by pynas train rnn")
    ev_rnn.add_argument("--checkpoint", required=True, help="checkpoint file or run folder of pynas train rnn")
    ev_rnn.add_argument("--data-dir", default=None, help="folder with the PTB files (ptb runs)")
    ev_rnn.add_argument("--device", default="cpu")
    ev_rnn.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    pl = sub.add_parser("plot", help="draw a genotype's cells (SVG with no dependency; PNG with Graphviz or "
                                     "matplotlib)")
    pl.add_argument("genotype", help="genotype JSON file (CNN or RNN) or a published CNN cell (DARTS_V1, DARTS_V2)")
    pl.add_argument("-o", "--output", required=True, help="picture to write: a .svg or .png file")
    prl = sub.add_parser("plot-roofline", help="draw benchmark rows on this machine's roofline (pynas bench "
                                               "--benchmarks roofline; needs matplotlib)")
    prl.add_argument("rows", help="a JSON-lines file of pynas bench rows holding the roofline_fma and roofline_copy rows")
    prl.add_argument("-o", "--output", required=True, help="picture to write: a .png or .svg file")
    pr = sub.add_parser("plot-run", help="draw a run folder's per-epoch curves (metrics.csv; needs matplotlib)")
    pr.add_argument("run", help="run folder of pynas search or pynas train (or its metrics.csv)")
    pr.add_argument("-o", "--output", required=True, help="picture to write: a .png or .svg file")
    sub.add_parser("info", help="backends and build facts")
    bench = sub.add_parser("bench", help="benchmarks: reference vs torch.compile vs pynas, side by side")
    bench.add_argument("--size", choices=("cpu", "gpu", "tiny"), default=None,
                       help="cpu: C=8 L=5 B=16; gpu: the DARTS default C=16 L=8 B=64; tiny: a smoke test "
                            "(default: by --device)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--benchmarks", default=None,
                       help="comma-separated names or groups (search, cnn, rnn, methods, rnn_methods, foreign, "
                            "data_parallel, roofline, mixed_sum, micro); default all")
    bench.add_argument("--providers", default="reference,compiled,pynas",
                       help="comma-separated: reference, compiled, pynas, pynas-<backend>")
    bench.add_argument("--repeats", type=int, default=None)
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    bench.add_argument("--compile-timeout", type=float, default=600.0,
                       help="skip torch.compile (with a note) when its first call takes longer (seconds)")
    bench.add_argument("--out", default=None,
                       help="JSONL file the rows are appended to (default benchmarks/results/<device>.jsonl)")
    bench.add_argument("--no-progress", action="store_true")
    return parser


def _run_folder_path(args, space: str, kind: str = "search") -> str:
    """The run folder: --save, else the folder of --resume, else runs/<kind>-<space>-<time>."""
    if args.save is not None:
        return args.save
    if args.resume is not None:
        return args.resume if os.path.isdir(args.resume) else os.path.dirname(os.path.abspath(args.resume))
    return os.path.join("runs", f"{kind}-{space}-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def _logger(log_path: str) -> Callable[[str], None]:
    """A logger that prints and appends to ``log_path``."""

    def log(line: str) -> None:
        print(line, flush=True)
        try:
            with open(log_path, "a") as fh:
                fh.write(line + "\n")
        except OSError as exc:
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror or str(exc), log_path) from exc
            raise

    return log


def _set_threads(threads) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads: expected a positive integer, got {threads}")
        torch.set_num_threads(threads)


def _run_in_folder(args, save: str, run, header: Callable) -> dict:
    """Make the run folder (its settings, data and checkpoint were checked before), log ``header(run)`` there
    first, run. A new run that fails before its first checkpoint removes what it made (pynas.search.RunFolder)."""
    from .search.loop import LOG_NAME, RunFolder

    folder = RunFolder(save, new_run=args.resume is None)
    try:
        folder.make()
        if not os.path.exists(os.path.join(save, LOG_NAME)):
            folder.own.append(LOG_NAME)
        run.log = log = _logger(os.path.join(save, LOG_NAME))
        log(header(run))
    except BaseException:
        folder.discard_if_unstarted()
        raise
    return folder.run(run, make=False)


def _run_search(args, space: str, cfg, search_cls, config_cls, about: Callable = lambda c: "") -> int:
    """Check the settings, load the data and the checkpoint (all before a run folder is made), run in the
    folder, print the genotype. Under torchrun: join the processes' group; rank 0 alone makes the folder."""
    from .search import distributed
    from .search.loop import prepare_search

    if args.resume is None:
        search_cls.check_config(cfg)
    with distributed.joined(cfg.device, args.dist_timeout, args.sync_bn) as group:
        if group is None and args.sync_bn:
            raise ValueError("sync_bn: --sync-bn needs several processes (torchrun, or --nproc N)")
        cfg.device = distributed.place(cfg.device)
        if group is not None and not group.main:  # no folder, no log, no file: rank 0 writes them
            prepare_search(search_cls, config_cls, cfg, None, args.resume, log=lambda line: None,
                           progress=False).run()
            rc = 0
        else:
            rc = _run_search_main(args, space, cfg, search_cls, config_cls, about, group)
    return rc


def _run_search_main(args, space: str, cfg, search_cls, config_cls, about, group) -> int:
    import json

    import torch

    from .search.loop import prepare_search

    save = _run_folder_path(args, space)
    search = prepare_search(search_cls, config_cls, cfg, save, args.resume, log=print, progress=not args.no_progress)

    def header(run) -> str:
        c = run.cfg
        procs = (f"; {group.world} processes ({'synchronised' if group.sync_bn else 'per-process'} BatchNorm)"
                 if group is not None else "")
        return (f"pynas search {space}: run folder {save}; {about(c)}backend {c.backend}; "
                f"{'second' if c.unrolled else 'first'} order; torch threads {torch.get_num_threads()}{procs}"
                + ("; tracking the Hessian's dominant eigenvalue" if c.track_hessian else ""))

    result = _run_in_folder(args, save, search, header)
    if "early_stop" in result:
        stop = result["early_stop"]
        print(f"early stop after epoch {stop['epoch']}: the genotype of epoch {stop['genotype_epoch']}", flush=True)
    print("genotype: " + json.dumps(result["genotype"]), flush=True)
    return 0


def _search_rnn(args) -> int:
    from . import _backend
    from .search.rnn import RNNSearch, RNNSearchConfig

    _set_threads(args.threads)
    backend = args.backend if args.backend is not None else _backend.current_backend()
    if args.method == "random":
        _alone("--method random (its candidates train one by one)")
        return _random_search(args, "rnn", backend)
    nhidlast = args.emsize if args.nhidlast < 0 else args.nhidlast
    given = {k: getattr(args, k) for k in ("epochs", "batch_size") if getattr(args, k) is not None}
    cfg = RNNSearchConfig.for_method(
        args.method, data=args.data, data_dir=args.data_dir, max_tokens=args.max_tokens, emsize=args.emsize,
        nhid=args.nhid, nhidlast=nhidlast, lr=args.lr, clip=args.clip, **given, bptt=args.bptt, dropout=args.dropout, dropouth=args.dropouth, dropoutx=args.dropoutx,
        dropouti=args.dropouti, dropoute=args.dropoute, alpha=args.alpha, beta=args.beta, wdecay=args.wdecay,
        unrolled=args.unrolled, fd_r=args.fd_r, arch_lr=args.arch_lr, arch_wdecay=args.arch_wdecay,
        eval_batch_size=args.eval_batch_size, seed=args.seed, steps_per_epoch=args.steps_per_epoch,
        device=args.device, backend=backend, tensorboard=args.tensorboard, forbid_s0=args.forbid_s0,
        rsws_samples=args.rsws_samples, rsws_eval_batches=args.rsws_eval_batches, rsws_top=args.rsws_top,
        ess_m=args.ess_m, ess_nodes=args.ess_nodes,
        **{k: getattr(args, k) for k in vars(args) if k.startswith("enas_")}, **_hessian_settings(args))
    return _run_search(args, "rnn", cfg, RNNSearch, RNNSearchConfig, lambda c: f"method {c.method}; data {c.data}; ")


def _search_cnn(args) -> int:
    from . import _backend
    from .search.cnn import CNNSearch

    _set_threads(args.threads)
    backend = args.backend if args.backend is not None else _backend.current_backend()
    if args.method == "random":
        _alone("--method random (its candidates train one by one)")
        return _random_search(args, "cnn", backend)
    given = {name: getattr(args, name) for name in _METHOD_SETTINGS if getattr(args, name) is not None}
    cfg = CNNSearchConfig.for_method(
        args.method, data=args.data, data_dir=args.data_dir, num_train=args.num_train, train_portion=args.train_portion, unrolled=args.unrolled, fd_r=args.fd_r,
        seed=args.seed, steps_per_epoch=args.steps_per_epoch, device=args.device, backend=backend,
        tensorboard=args.tensorboard, partial_channels=args.partial_channels, tau_max=args.tau_max,
        tau_min=args.tau_min, gdas_unselected=args.gdas_unselected, distinct_inputs=args.distinct_inputs,
        rsws_path=args.rsws_path, allow_none=args.allow_none, rsws_samples=args.rsws_samples,
        rsws_eval_batches=args.rsws_eval_batches, rsws_top=args.rsws_top, **given, **_hessian_settings(args))
    return _run_search(args, "cnn", cfg, CNNSearch, CNNSearchConfig, lambda c: f"method {c.method}; ")


def _budgets(text: Optional[str]):
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"budgets: expected comma-separated step counts such as 30,120, got {text!r}") from None


def _trial_log(save: str):
    """A logger that prints each line and appends it to the run folder's log.txt."""
    def log(line: str) -> None:
        print(line, flush=True)
        os.makedirs(save, exist_ok=True)
        with open(os.path.join(save, "log.txt"), "a") as fh:
            fh.write(line + "\n")
    return log


def _search_evolution(args) -> int:
    _alone("evolution")
    import dataclasses

    from .strategies import evolution as ev

    if args.resume is not None:
        save = args.resume
        log = _trial_log(save)
        search = ev.Evolution.resume(save, log, args.executor, args.ray_address, args.num_cpus)
        log(f"pynas search evolution: resuming {save}")
    else:
        budgets = _budgets(args.budgets)
        if args.trial_space == "cnn":
            space = ev.make_space("cnn", {k: getattr(args, k) for k in ("init_channels", "layers", "batch_size",
                                                                        "num_train", "num_valid", "learning_rate")})
        else:
            space = ev.make_space("sublayers", _sublayer_trial_settings(args), args.n)
        budgets = budgets if budgets is not None else space.DEFAULT_BUDGETS
        space.cfg = dataclasses.replace(space.cfg, total_steps=sum(budgets) if budgets else 1, threads=args.threads)
        cfg = ev.EvolutionConfig(method=args.method, population=args.population, sample_size=args.sample_size,
                                 cycles=args.cycles, budgets=budgets, hurdle_every=args.hurdle_every,
                                 parallel=args.parallel, seed=args.seed, executor=args.executor,
                                 ray_address=args.ray_address, num_cpus=args.num_cpus)
        save = args.save or os.path.join("runs", f"evolution-{args.trial_space}-{time.strftime('%Y%m%d-%H%M%S')}")
        log = _trial_log(save)
        log(f"pynas search evolution: {args.method} on {args.trial_space}; run folder {save}; budgets "
            f"{','.join(map(str, budgets))}; population {args.population}, sample {args.sample_size}, "
            f"cycles {args.cycles}; executor {args.executor}")
        search = ev.Evolution(cfg, space, save, log)
    result = search.run()
    log(f"{result['trials']} trials ({result['trained_here']} trained in this run), hurdles "
        f"{', '.join(search.space.show(h) for h in result['hurdles']) or 'none'}, {result['seconds']:.1f} s")
    log(ev.table(result, args.top, search.space))
    log(f"results: {os.path.join(save, 'results.json')}")
    return 0


def _search_sandwich(args) -> int:
    _alone("the sandwich search")
    from .strategies import sandwich as sw

    if args.resume is not None:
        save = args.resume
        log = _trial_log(save)
        search = sw.SandwichSearch.resume(save, log, args.executor, args.ray_address, args.num_cpus, args.parallel)
        log(f"pynas search sandwich: resuming {save}")
    else:
        ks = None
        if args.ks is not None:
            try:
                ks = tuple(int(k) for k in args.ks.split(","))
            except ValueError:
                raise ValueError(f"ks: expected comma-separated integers, got {args.ks!r}") from None
        families = tuple(f.strip() for f in args.families.split(",") if f.strip())
        cfg = sw.SandwichConfig(n=args.n, steps=args.steps, families=families, ks=ks,
                                random_orders=args.random_orders, baseline_seeds=args.baseline_seeds, seed=args.seed,
                                executor=args.executor, ray_address=args.ray_address, num_cpus=args.num_cpus,
                                parallel=args.parallel,
                                trial=dict(_sublayer_trial_settings(args), threads=args.threads))
        save = args.save or os.path.join("runs", f"sandwich-{time.strftime('%Y%m%d-%H%M%S')}")
        log = _trial_log(save)
        log(f"pynas search sandwich: n {args.n}, {args.steps} steps per order, families {','.join(families)}; "
            f"run folder {save}; executor {args.executor}")
        search = sw.SandwichSearch(cfg, save, log)
    result = search.run()
    log(sw.table(result))
    log(f"{len(result['rows'])} orders ({result['trained_here']} trained in this run), {result['seconds']:.1f} s; "
        f"results: {os.path.join(save, 'results.json')}")
    return 0


def _random_search(args, space: str, backend: str) -> int:
    """``--method random``: sample, train each derived network briefly (pynas.train), keep the best by validation
    (pynas.strategies.random_search). The candidates train with the search's data and network flags."""
    import json

    from .strategies.random_search import RandomSearchConfig, run_random_search

    refused = [flag for flag, given in (("--unrolled", args.unrolled), ("--track-hessian", args.track_hessian),
                                        ("--tensorboard", args.tensorboard)) if given]
    if refused:
        raise ValueError(f"method: --method random trains each candidate on its own; {', '.join(refused)} does not "
                         f"apply to it")
    if space == "cnn":
        # the candidates train the evaluation network (pynas train cnn: C=36, 20 layers) unless given otherwise
        train = {"data": args.data, "data_dir": args.data_dir, "num_train": args.num_train}
        train.update({k: getattr(args, k) for k in ("batch_size", "learning_rate", "learning_rate_min", "momentum",
                                                  "weight_decay", "grad_clip", "init_channels", "layers")
                      if getattr(args, k) is not None})
    else:
        train = {k: getattr(args, k) for k in ("data", "data_dir", "max_tokens", "emsize", "nhid", "lr", "clip",
                                               "batch_size", "bptt", "dropout", "dropouth", "dropoutx", "dropouti",
                                               "dropoute", "alpha", "beta", "wdecay", "eval_batch_size")
                 if getattr(args, k) is not None}
    epochs = args.candidate_epochs if args.candidate_epochs is not None else args.epochs
    cfg = RandomSearchConfig(space=space, n_samples=args.samples, seed=args.seed, epochs=epochs,
                             steps_per_epoch=args.steps_per_epoch, train=train, device=args.device, backend=backend)
    save = _run_folder_path(args, space)
    lines: List[str] = []

    def log(line: str) -> None:  # printed; appended to the run folder's log once the search has made it
        print(line, flush=True)
        lines.append(line)
        if os.path.isdir(save):
            with open(os.path.join(save, "log.txt"), "a") as fh:
                fh.write("".join(s + "\n" for s in lines))
            lines.clear()

    log(f"pynas search {space}: method random; run folder {save}; backend {backend}")
    result = run_random_search(cfg, save_dir=save if args.resume is None else None,
                               resume=save if args.resume is not None else None, log=log,
                               progress=not args.no_progress)
    print("genotype: " + json.dumps(result["genotype"] if isinstance(result["genotype"], dict)
                                    else json.loads(result["genotype"])), flush=True)
    return 0


def _run_training(args, space: str, run_cls, cfg, about: str) -> dict:
    """Like a search: settings, data and checkpoint checked before the run folder is made."""
    import torch

    if args.resume is None:
        run_cls.check_config(cfg)
    save = _run_folder_path(args, space, "train")
    run = run_cls.prepare(cfg, save, args.resume, log=print, progress=not args.no_progress)
    return _run_in_folder(args, save, run, lambda r: f"pynas train {space}: run folder {save}; genotype "
                          f"{r.cfg.genotype}; {about}; torch threads {torch.get_num_threads()}")


def _train_rnn(args) -> int:
    _alone("pynas train")
    from . import _backend
    from .train.rnn import RNNTrainConfig, RNNTraining

    _set_threads(args.threads)
    backend = args.backend if args.backend is not None else _backend.current_backend()
    names = ("genotype", "data", "data_dir", "max_tokens", "emsize", "nhid", "epochs", "batch_size",
             "eval_batch_size", "test_batch_size", "bptt", "nonmono", "lr", "clip", "dropout", "dropouth", "dropoutx",
             "dropouti", "dropoute", "alpha", "beta", "wdecay", "seed", "steps_per_epoch", "device", "tensorboard")
    cfg = RNNTrainConfig(backend=backend, **{n: getattr(args, n) for n in names})
    result = _run_training(args, "rnn", RNNTraining, cfg, f"emsize=nhid={cfg.nhid}")
    print(f"test perplexity: {result['test_ppl']:.2f}", flush=True)
    return 0


def _eval_rnn(args) -> int:
    from .train.rnn import evaluate_checkpoint

    _set_threads(args.threads)
    r = evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir, device=args.device)
    print(f"test perplexity: {r['test_ppl']:.2f} (loss {r['test_loss']:.4f}, {r['tokens']} tokens, best weights "
          f"of {r['epoch']} epochs)", flush=True)
    return 0


def _train_cnn(args) -> int:
    _alone("pynas train")
    from . import _backend
    from .train.cnn import CNNTrainConfig, CNNTraining

    _set_threads(args.threads)
    backend = args.backend if args.backend is not None else _backend.current_backend()
    cfg = CNNTrainConfig(
        genotype=args.genotype, data=args.data, data_dir=args.data_dir, num_train=args.num_train,
        num_test=args.num_test, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        learning_rate_min=args.learning_rate_min, momentum=args.momentum, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, init_channels=args.init_channels, layers=args.layers, auxiliary=args.auxiliary,
        auxiliary_weight=args.auxiliary_weight, drop_path_prob=args.drop_path_prob, cutout=args.cutout,
        cutout_length=args.cutout_length, seed=args.seed, steps_per_epoch=args.steps_per_epoch, device=args.device,
        backend=backend, tensorboard=args.tensorboard)
    result = _run_training(args, "cnn", CNNTraining, cfg, f"C={cfg.init_channels} layers={cfg.layers}")
    print(f"test accuracy: {result['test_acc']:.2f} %", flush=True)
    return 0


def _eval_cnn(args) -> int:
    from .train.cnn import evaluate_checkpoint

    _set_threads(args.threads)
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    r = evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir, device=args.device, batch_size=args.batch_size)
    print(f"test accuracy: {r['test_acc']:.2f} % (loss {r['test_loss']:.4f}, {r['images']} images, after epoch "
          f"{r['epoch']}, {r['parameters'] / 1e6:.3f} M weights)", flush=True)
    return 0


def _plot(args) -> int:
    from .plot import plot

    how = plot(args.genotype, args.output)
    print(f"wrote {args.output} ({how})", flush=True)
    return 0


def _plot_run(args) -> int:
    from .plot import plot_run

    panels = plot_run(args.run, args.output)
    print(f"wrote {args.output} ({', '.join(panels)})", flush=True)
    return 0


def _bench(args) -> int:
    import re

    import torch

    from . import bench

    _set_threads(args.threads)
    names = []
    for item in (args.benchmarks.split(",") if args.benchmarks else list(bench.BENCHMARKS)):
        item = item.strip()
        if item == "search":
            names += list(bench.MACRO)
        elif item in ("cnn", "rnn"):
            names += [b for b in bench.MACRO if b.startswith(item + "_")]
        elif item == "methods":
            names += list(bench.METHODS) + list(bench.RNN_METHODS)
        elif item == "rnn_methods":
            names += list(bench.RNN_METHODS)
        elif item == "foreign":
            names += list(bench.FOREIGN)
        elif item == "data_parallel":
            names += list(bench.DATA_PARALLEL)
        elif item == "mixed_sum":
            names += [b for b in bench.MICRO if b.startswith("mixed_sum")]
        elif item == "micro":
            names += list(bench.MICRO)
        elif item == "roofline":
            names += list(bench.ROOFLINE) + list(bench.FLOP_COUNTED)
        elif item:
            names.append(item)
    device = torch.device(args.device)
    cfg = bench.BenchConfig(size=args.size or ("gpu" if device.type == "cuda" else "cpu"), device=args.device,
                            benchmarks=names, providers=[p.strip() for p in args.providers.split(",") if p.strip()],
                            repeats=args.repeats, warmup=args.warmup, compile_timeout=args.compile_timeout)
    out = args.out
    if out is None:
        label = re.sub(r"[^A-Za-z0-9]+", "-", bench.device_name(device)).strip("-").lower()
        out = os.path.join("benchmarks", "results", f"{label}.jsonl")
    bench.check_config(cfg)
    bench.check_output(out)  # before any benchmark runs: an unwritable --out fails at once
    rows = bench.run(cfg, progress=not args.no_progress, on_row=lambda row: bench.append_rows([row], out))
    print(bench.format_table(rows))
    print(f"rows appended to {out}")
    return 0 if all(r["status"] != "error" for r in rows) else 1


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def _os_error_text(exc: OSError) -> str:
    """``path: reason`` of an OSError (both paths of a failed rename)."""
    reason = exc.strerror or _one_line(str(exc)) or type(exc).__name__
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    return f"{' -> '.join(names)}: {reason}" if names else reason


def _alone(what: str) -> None:
    from .search.distributed import world_from_env

    if world_from_env() > 1:
        raise ValueError(f"nproc: {what} runs in one process (start it without torchrun or --nproc); the searches "
                         f"that run data-parallel: pynas search cnn|rnn")


def _launch(argv: List[str], nproc: int) -> int:
    """``--nproc N``: the same command under torchrun (N processes on this machine), its exit status."""
    import subprocess

    if nproc < 1:
        print(f"pynas: error: --nproc: expected a positive integer, got {nproc}", file=sys.stderr)
        return 2
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "pynas", *rest]
    return subprocess.run(cmd).returncode


def main(argv: Optional[List[str]] = None) -> int:
    """Exit status: 0 done; 1 the system refused (a file could not be written or read: the message names the path);
    2 bad settings or input (the message names the setting, the flag or the file); 130 interrupted (Ctrl-C;
    the last checkpoint is intact: resume with --resume)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if getattr(args, "nproc", None) is not None:
        return _launch(argv, args.nproc)
    try:
        if args.command == "info":
            from .info import main as info_main

            return info_main()
        if args.command == "bench":
            return _bench(args)
        if args.command == "search" and args.space == "cnn":
            return _search_cnn(args)
        if args.command == "search" and args.space in ("rnn", "enas", "ess"):
            return _search_rnn(args)
        if args.command == "search" and args.space in ("cas", "mas"):
            return _search_tasks(args)
        if args.command == "search" and args.space == "evolution":
            return _search_evolution(args)
        if args.command == "search" and args.space == "sandwich":
            return _search_sandwich(args)
        if args.command == "plot-run":
            return _plot_run(args)
        if args.command == "plot-roofline":
            from .plot import plot_roofline

            drawn = plot_roofline(args.rows, args.output)
            print(f"wrote {args.output}: {len(drawn)} kernel points ({', '.join(drawn)})")
            return 0
        if args.command == "plot":
            return _plot(args)
        if args.command == "train" and args.space == "cnn":
            return _train_cnn(args)
        if args.command == "eval" and args.space == "cnn":
            return _eval_cnn(args)
        if args.command == "train" and args.space == "rnn":
            return _train_rnn(args)
        if args.command == "eval" and args.space == "rnn":
            return _eval_rnn(args)
    except KeyboardInterrupt:
        print("pynas: interrupted", file=sys.stderr, flush=True)
        return 130
    except OSError as exc:
        if exc.errno is None and exc.filename is None:  # pynas's own (e.g. a missing --data-dir): bad input
            print(f"pynas: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        print(f"pynas: error: {_os_error_text(exc)}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, RuntimeError) as exc:
        print(f"pynas: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    parser.error("unknown command")
    return 2


if __name__ == "__main__":
    sys.exit(main())
