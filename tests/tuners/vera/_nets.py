"""A small MLP with layers of different shapes (so the shared projections are sliced), built the same way here and
in upstream subprocesses (its source is `NET_SOURCE`)."""

NET_SOURCE = '''
import torch
from torch import nn


class MultiShapeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 12)
        self.lin2 = nn.Linear(12, 6, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.lin0(x))
        h = torch.tanh(self.lin1(h))
        return self.head(torch.tanh(self.lin2(h)))


def build_net(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return MultiShapeNet().to(dtype).eval()
'''

_namespace: dict = {}
exec(compile(NET_SOURCE, "<multishape-net>", "exec"), _namespace)
MultiShapeNet = _namespace["MultiShapeNet"]
build_net = _namespace["build_net"]
TARGETS = ["lin0", "lin1", "lin2"]


def inputs(dtype=None, seed=3, batch=4):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 10, generator=g)
    return x if dtype is None else x.to(dtype)
