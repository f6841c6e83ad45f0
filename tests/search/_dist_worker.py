"""A worker of tests/search/test_distributed.py, run under torchrun (or alone, WORLD_SIZE unset): a few
iterations of a tiny search in float64, its end state written to OUT/rank<r>.pt.

Usage: python _dist_worker.py SPACE ORDER BACKEND SYNC_BN OUT [die] [method=NAME], or python _dist_worker.py ckpt OUT
(SPACE cnn|rnn, ORDER first|second, BACKEND reference|cpu, SYNC_BN 0|1; 'die': rank 1 exits after its first
weight step)."""
import os
import sys

import torch

from pynas import _backend
from pynas.search import distributed

CNN = dict(num_train=32, batch_size=8, init_channels=2, layers=2, steps_per_epoch=2, epochs=1, seed=3)
RNN = dict(max_tokens=20000, emsize=8, nhid=8, nhidlast=8, batch_size=4, bptt=6, epochs=1, steps_per_epoch=3,
           eval_batch_size=2, seed=3)


def build(space, unrolled, backend, method="darts"):
    if space == "cnn":
        from pynas.search.cnn import CNNSearch, CNNSearchConfig

        cfg = CNNSearchConfig.for_method(method, **CNN, unrolled=unrolled, backend=backend, partial_channels=2,
                                         warmup_epochs=0)
        s = CNNSearch(cfg, progress=False, log=lambda _: None)
        s.data.images = s.data.images.double()
    else:
        from pynas.search.rnn import RNNSearch, RNNSearchConfig

        cfg = RNNSearchConfig.for_method(method, **RNN, unrolled=unrolled, backend=backend)
        if method == "ess":
            cfg.ess_m, cfg.ess_nodes = 2, 2
        s = RNNSearch(cfg, progress=False, log=lambda _: None)
    s.model.double()
    return s


def checkpoint_after_one_epoch(out):
    """A 2-epoch float32 CNN search stopped after its first epoch, its checkpoint in OUT (rank 0 writes it)."""
    from pynas.search.cnn import CNNSearch, CNNSearchConfig

    torch.set_num_threads(1)
    with distributed.joined("cpu", timeout_s=120.0, sync_bn=True):
        cfg = CNNSearchConfig(**{**CNN, "epochs": 2}, backend="reference")
        CNNSearch(cfg, save_dir=out, progress=False, log=lambda _: None).run(until=1)


def main():
    if sys.argv[1] == "ckpt":
        return checkpoint_after_one_epoch(sys.argv[2])
    space, order, backend, sync_bn, out = sys.argv[1:6]
    extra = sys.argv[6:]
    die = "die" in extra
    method = next((a.split("=", 1)[1] for a in extra if a.startswith("method=")), "darts")
    torch.set_num_threads(1)
    with distributed.joined("cpu", timeout_s=20.0 if die else 120.0, sync_bn=sync_bn == "1") as group:
        s = build(space, order == "second", backend, method)
        if die and group.rank == 1:
            os._exit(3)
        with _backend.use_backend(s.cfg.backend):
            s.train_epoch(0)
        rank = group.rank if group is not None else 0
        state = {"model": s.model.state_dict(), "alphas": [a.detach() for a in s.model.arch_parameters()],
                 "backend": s.cfg.backend}
        torch.save(state, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
