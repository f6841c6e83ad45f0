"""The search loop's weight step (clip_grad_norm_ + SGD momentum/weight decay) with torch's three SGD kernels.

Usage: python benchmarks/weight_step.py  (1 thread; DARTS CNN search network C=8, 5 layers: 889 tensors)
"""
import torch, time
from torch import nn
from pynas.cnn import Network
torch.set_num_threads(1)
model = Network(8, 10, 5, nn.CrossEntropyLoss())
params = list(model.parameters())
for p in params: p.grad = torch.randn_like(p)
def bench(opt, n=30):
    for _ in range(5):
        nn.utils.clip_grad_norm_(params, 5.0); opt.step()
    s=time.perf_counter()
    for _ in range(n):
        nn.utils.clip_grad_norm_(params, 5.0); opt.step()
    return (time.perf_counter()-s)/n*1e3
for name, kw in [("foreach", dict(foreach=True)), ("for-loop", dict(foreach=False)), ("fused", dict(fused=True))]:
    try:
        opt = torch.optim.SGD(params, 0.025, momentum=0.9, weight_decay=3e-4, **kw)
        print(name, f"{bench(opt):.2f} ms", len(params), "tensors")
    except Exception as e:
        print(name, "unavailable:", e)
