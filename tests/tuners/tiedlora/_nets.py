"""Small nets for Tied-LoRA tests: a stack with two layer shapes, and a parallel sum (loss linear in each branch)."""

import torch
from torch import nn


class Stack(nn.Module):
    """lin0, lin1, lin2: 8 -> 8 (one tied group "8x8"); proj: 8 -> 5 (group "5x8"); head 5 -> 3 (not adapted)."""

    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.lin2 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.proj = nn.Linear(8, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        for lin in (self.lin0, self.lin1, self.lin2):
            x = torch.tanh(lin(x))
        return self.head(torch.tanh(self.proj(x)))


class Parallel(nn.Module):
    """y = b0(x) + b1(x) + b2(x): the branches' contributions to any gradient add up exactly."""

    def __init__(self):
        super().__init__()
        self.b0, self.b1, self.b2 = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x):
        return self.b0(x) + self.b1(x) + self.b2(x)


STACK_TARGETS = ["lin0", "lin1", "lin2", "proj"]


def build(cls=Stack, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return cls().to(dtype).eval()


def inputs(dtype=torch.float64, n=8, batch=4, seed=3):
    return torch.randn(batch, n, generator=torch.Generator().manual_seed(seed)).to(dtype)
