"""Reference Lion optimizer in PyTorch, for the `plugin_lion` test.

The rule is Algorithm 2 of Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"
(arXiv:2302.06675), written here from the paper, independently of the Rust plugin:

    c     = beta1 * m + (1 - beta1) * g
    theta = theta - lr * (sign(c) + wd * theta)      # decoupled weight decay
    m     = beta2 * m + (1 - beta2) * g

Usage: lion_ref.py IN.safetensors SPEC.json OUT.safetensors

IN holds the initial parameters (`param.<name>`) and, for every step t, the inputs `x.<t>` and
targets `y.<t>` of the loss mean((x @ w.T + b - y)^2). SPEC is
{"steps": T, "betas": [b1, b2], "groups": [{"params": [...], "lr": .., "weight_decay": ..}]}.
OUT receives every parameter after every step: `<name>.<t>` for t = 1..T.
"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file


class Lion(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                c = beta1 * m + (1 - beta1) * g
                p.mul_(1 - lr * wd)
                p.add_(torch.sign(c), alpha=-lr)
                m.mul_(beta2).add_(g, alpha=1 - beta2)


def main():
    inputs = load_file(sys.argv[1])
    with open(sys.argv[2]) as f:
        spec = json.load(f)
    params = {
        k[len("param."):]: v.clone().requires_grad_(True)
        for k, v in inputs.items()
        if k.startswith("param.")
    }
    groups = [
        dict(
            params=[params[n] for n in g["params"]],
            lr=g["lr"],
            weight_decay=g["weight_decay"],
        )
        for g in spec["groups"]
    ]
    opt = Lion(groups, betas=tuple(spec["betas"]))
    out = {}
    for t in range(spec["steps"]):
        opt.zero_grad()
        x, y = inputs[f"x.{t}"], inputs[f"y.{t}"]
        loss = ((x @ params["w"].T + params["b"] - y) ** 2).mean()
        loss.backward()
        opt.step()
        for n, p in params.items():
            out[f"{n}.{t + 1}"] = p.detach().clone()
    save_file(out, sys.argv[3])


if __name__ == "__main__":
    main()
