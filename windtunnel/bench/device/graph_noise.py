"""How far apart two runs of the GPU trainer test's population land (tests/test_trainer_gpu.py):
eager vs eager, graph vs graph, eager vs graph, at the test's old lrs (0.01-0.03) and its new ones.

    bash windtunnel/bench/device/gpu.sh py windtunnel/bench/device/graph_noise.py
"""
import sys
sys.path.insert(0, "tests")
import torch
from helpers import tiny_trial
from windtunnel.config.trial import with_overrides
from windtunnel.trainer import Population

def run(graph, lr):
    cfgs = [with_overrides(tiny_trial(), {"train.device": "cuda", "model.kernels": "triton", "model.n_heads": 1, "train.seed": k,
                                          "optim.lr": lr * (k + 1), "train.cuda_graph": graph}) for k in range(3)]
    pop = Population(cfgs)
    losses = [pop.train_step(pop.lr_factors()).tolist() for _ in range(6)]
    pop._remove({1: ("pruned", "test")})
    losses += [pop.train_step(pop.lr_factors()).tolist() for _ in range(6)]
    return losses

def maxrel(a, b):
    return max(max(abs(x - y) / abs(y) for x, y in zip(u, v)) for u, v in zip(a, b))

for lr in (0.01, 0.003):
    e1, e2, g1, g2 = run(False, lr), run(False, lr), run(True, lr), run(True, lr)
    print(f"lr {lr}: eager-eager {maxrel(e1, e2):.2e}  graph-graph {maxrel(g1, g2):.2e}  eager-graph {maxrel(g1, e1):.2e} {maxrel(g2, e2):.2e}")
    print("  last losses eager", [round(x, 3) for x in e1[-1]], "first", [round(x, 3) for x in e1[0]])
