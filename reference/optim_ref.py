#!/usr/bin/env python3
"""Reference optimizers, clipping and schedules for VoltTrain's parity tests.

Usage:
  optim_ref.py adamw IN.safetensors CONFIG.json OUT.safetensors
  optim_ref.py muon  IN.safetensors CONFIG.json OUT.safetensors
  optim_ref.py clip  IN.safetensors CONFIG.json OUT.safetensors
  optim_ref.py sched CONFIG.json

IN holds the initial parameters `param.<name>` and the gradient of every step
`grad.<t>.<name>` (t = 0..steps-1; for `clip`, `grad.<name>`). CONFIG is JSON:

  adamw/muon: {"steps": N, "groups": [{"params": [names], "lr": f, "weight_decay": f}], ...}
    adamw: "betas", "eps", "amsgrad"          -> torch.optim.AdamW (foreach=False)
    muon:  "momentum", "nesterov", "ns_steps", "ns_coefficients", "ns_eps", "scale"
           ("original" | "match_adamw")       -> `Muon` below, one parameter at a time
    optional "lr_factors": [f per step] multiplies every group's lr at that step
  clip:  {"max_norm": f}                      -> torch.nn.utils.clip_grad_norm_
  sched: {"cases": [{"name": transformers function, "kwargs": {...}}], "steps": N}
         (the lr factor of each case at steps 0..N-1, stepping a LambdaLR as a trainer does)

OUT receives the final `param.<name>` (adamw, muon: also the state, `state.<name>.<buffer>`)
or the clipped `grad.<name>` (clip). The last line of standard output is JSON with scalars
(the total norm for clip, the factors for sched).
"""

import json
import math
import sys

import torch
from safetensors.torch import load_file, save_file


def zeropower_via_newtonschulz5(G, steps, coefficients, eps):
    """Keller Jordan's NS5 (github.com/KellerJordan/Muon), in fp32 on one matrix."""
    a, b, c = coefficients
    X = G.float()
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon as Keller Jordan's `muon_update` + `Muon.step`, looping over parameters.

    Parameters of more than two dimensions are flattened to (shape[0], -1). The update scale is
    max(1, rows/cols)**0.5 ("original") or 0.2*sqrt(max(rows, cols)) ("match_adamw", Moonlight).
    """

    def __init__(self, params, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True,
                 ns_steps=5, ns_coefficients=(3.4445, -4.7750, 2.0315), ns_eps=1e-7,
                 scale="original"):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, ns_coefficients=tuple(ns_coefficients), ns_eps=ns_eps,
                        scale=scale)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.reshape(p.shape[0], -1).clone()
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - beta)
                update = g.lerp_(buf, beta) if group["nesterov"] else buf
                update = zeropower_via_newtonschulz5(update, group["ns_steps"],
                                                     group["ns_coefficients"], group["ns_eps"])
                rows, cols = update.shape
                if group["scale"] == "original":
                    scale = max(1, rows / cols) ** 0.5
                elif group["scale"] == "match_adamw":
                    scale = 0.2 * math.sqrt(max(rows, cols))
                else:
                    raise ValueError(f"unknown scale {group['scale']}")
                update = update * scale
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.reshape(p.shape), alpha=-group["lr"])


def load_params(tensors):
    params = {}
    for k, v in tensors.items():
        if k.startswith("param."):
            params[k[len("param."):]] = v.clone().requires_grad_(True)
    return params


def run_optimizer(kind, tensors, cfg):
    params = load_params(tensors)
    groups = [{"params": [params[n] for n in g["params"]], "lr": g["lr"],
               "weight_decay": g["weight_decay"]} for g in cfg["groups"]]
    if kind == "adamw":
        opt = torch.optim.AdamW(groups, betas=tuple(cfg.get("betas", (0.9, 0.999))),
                                eps=cfg.get("eps", 1e-8), amsgrad=cfg.get("amsgrad", False),
                                foreach=False)
    else:
        keys = ["momentum", "nesterov", "ns_steps", "ns_coefficients", "ns_eps", "scale"]
        opt = Muon(groups, **{k: cfg[k] for k in keys if k in cfg})
    base_lrs = [g["lr"] for g in opt.param_groups]
    factors = cfg.get("lr_factors")
    for t in range(cfg["steps"]):
        if factors is not None:
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * factors[t]
        for name, p in params.items():
            key = f"grad.{t}.{name}"
            p.grad = tensors[key].clone() if key in tensors else None
        opt.step()
    out = {f"param.{n}": p.detach().contiguous() for n, p in params.items()}
    by_id = {id(p): n for n, p in params.items()}
    for p, st in opt.state.items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                out[f"state.{by_id[id(p)]}.{k}"] = v.detach().reshape(p.shape).contiguous()
    return out, {}


def run_clip(tensors, cfg):
    grads = {k[len("grad."):]: v for k, v in tensors.items() if k.startswith("grad.")}
    params = []
    for g in grads.values():
        p = torch.zeros_like(g, requires_grad=True)
        p.grad = g.clone()
        params.append(p)
    total = torch.nn.utils.clip_grad_norm_(params, cfg["max_norm"])
    out = {f"grad.{n}": p.grad.contiguous() for n, p in zip(grads, params)}
    return out, {"total_norm": float(total)}


def run_sched(cfg):
    import transformers

    out = []
    for case in cfg["cases"]:
        fn = getattr(transformers, case["name"])
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        sched = fn(opt, **case["kwargs"])
        factors = []
        for _ in range(cfg["steps"]):
            factors.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        out.append(factors)
    return {"factors": out}


def main():
    cmd = sys.argv[1]
    if cmd == "sched":
        with open(sys.argv[2]) as f:
            cfg = json.load(f)
        print(json.dumps(run_sched(cfg)))
        return
    tensors = load_file(sys.argv[2])
    with open(sys.argv[3]) as f:
        cfg = json.load(f)
    torch.manual_seed(0)
    if cmd in ("adamw", "muon"):
        out, scalars = run_optimizer(cmd, tensors, cfg)
    elif cmd == "clip":
        out, scalars = run_clip(tensors, cfg)
    else:
        raise SystemExit(f"unknown command {cmd}")
    save_file(out, sys.argv[4])
    scalars["torch"] = torch.__version__
    print(json.dumps(scalars))


if __name__ == "__main__":
    main()
