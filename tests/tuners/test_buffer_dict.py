"""`peft.tuners._buffer_dict.BufferDict`: a dict of registered buffers."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from peft.tuners._buffer_dict import BufferDict


def test_entries_are_buffers_that_follow_the_module():
    holder = nn.Module()
    holder.bd = BufferDict({"b": torch.ones(2), "a": torch.zeros(3)})
    assert list(holder.bd) == ["a", "b"]  # plain dict: sorted keys
    assert [n for n, _ in holder.named_buffers()] == ["bd.a", "bd.b"]
    assert list(holder.parameters()) == []
    holder.double()
    assert holder.bd["b"].dtype == torch.float64
    assert holder.state_dict() == {}  # non-persistent by default


def test_persistent_state_dict_and_order():
    bd = BufferDict(OrderedDict([("z", torch.ones(1)), ("y", torch.full((2,), 2.0))]), persistent=True)
    assert list(bd.keys()) == ["z", "y"]
    assert set(bd.state_dict()) == {"z", "y"}
    other = BufferDict([("x", torch.zeros(1))])
    bd.update(other)
    bd.update({"y": torch.zeros(2)}.items())
    assert list(bd) == ["z", "y", "x"]
    assert torch.equal(bd["y"], torch.zeros(2))
    assert "x" in bd and len(bd) == 3


def test_delete_pop_clear():
    bd = BufferDict({"a": torch.ones(1), "b": torch.ones(2)})
    value = bd.pop("a")
    assert torch.equal(value, torch.ones(1)) and "a" not in bd
    del bd["b"]
    assert len(bd) == 0
    bd["c"] = torch.ones(1)
    bd.clear()
    assert list(bd.items()) == []


def test_bad_input():
    bd = BufferDict()
    with pytest.raises(TypeError):
        bd.update(3)
    with pytest.raises(ValueError, match="length 3"):
        bd.update([("a", torch.ones(1), 1)])
    with pytest.raises(RuntimeError, match="should not be called"):
        bd(torch.ones(1))
