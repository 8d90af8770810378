"""Reference for tests/peft_methods.rs `adalora_allocation_matches_peft_s_rank_allocator`: feeds
fixed parameter values and gradients (the formula below, repeated in the test) to PEFT's
RankAllocator for 6 steps and prints the kept triplets per module after each step.

Run: "$(scripts/pyenv | tail -n1)" tests/reference/adalora_allocator.py   (PEFT 0.21.2 printed the
values pasted into the test)"""
import math, torch
from torch import nn
from peft import AdaLoraConfig
from peft.tuners.adalora.layer import RankAllocator
R, IN = 4, 16
OUTS = [16, 8, 16, 8]  # layer0 q, layer0 v, layer1 q, layer1 v of the tiny test model
def val(kind, m, i, j, step=0):
    return math.sin(1.0 + 0.37 * i + 0.11 * j + 1.7 * m + 2.3 * kind + 1.3 * step * (1 + m)) * (1.0 + 0.1 * kind)
class Mod(nn.Module):
    def __init__(self, m, out):
        super().__init__()
        self.lora_A = nn.ParameterDict({"default": nn.Parameter(torch.tensor([[val(0, m, i, j) for j in range(IN)] for i in range(R)]))})
        self.lora_B = nn.ParameterDict({"default": nn.Parameter(torch.tensor([[val(1, m, i, j) for j in range(R)] for i in range(out)]))})
        self.lora_E = nn.ParameterDict({"default": nn.Parameter(torch.tensor([[val(2, m, i, 0)] for i in range(R)]))})
root = nn.Module()
root.mods = nn.ModuleList([Mod(m, o) for m, o in enumerate(OUTS)])
cfg = AdaLoraConfig(init_r=R, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=6, target_modules=["q_proj"])
ra = RankAllocator(root, cfg, "default")
for step in range(6):
    for m, mod in enumerate(root.mods):
        for kind, name in enumerate(["lora_A", "lora_B", "lora_E"]):
            p = getattr(mod, name)["default"]
            p.grad = torch.tensor([[val(kind + 3, m, i, j, step + 1) for j in range(p.shape[1])] for i in range(p.shape[0])])
    budget, pattern = ra.update_and_allocate(root, step, force_mask=(step == 5))
    if step == 5: ra.reset_ipt()
    flags = None if pattern is None else [pattern[f"mods.{m}.lora_E.default"] for m in range(len(OUTS))]
    print(step, budget, flags)
