"""The trainer's FLOP count (spidr_fast/train/flops.py): grouped-conv weight gradients and CPU attention
counted as the hand formulas say (torch's own counter has the first `groups` times too high)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from spidr_fast.train.flops import count_step_flops, step_flop_counter

B, C, K, G, T = 2, 32, 5, 4, 20  # a grouped conv: 32 -> 32 channels, kernel 5, 4 groups
T_OUT = T - K + 1
CONV = 2 * B * C * (C // G) * K * T_OUT  # one pass: every output takes C/G * K multiply-adds


def _grouped_conv_step(counter: FlopCounterMode) -> None:
    conv = nn.Conv1d(C, C, K, groups=G, bias=False)
    x = torch.randn(B, C, T, requires_grad=True)
    with counter:
        conv(x).sum().backward()


def test_grouped_conv_forward_input_and_weight_gradient_each_cost_one_pass() -> None:
    counter = step_flop_counter()
    _grouped_conv_step(counter)
    assert CONV == 81_920
    assert counter.get_total_flops() == 3 * CONV  # forward, grad_input, grad_weight
    torch_counter = FlopCounterMode(display=False)
    _grouped_conv_step(torch_counter)
    # torch's formula takes the weight gradient as a dense (C_in x C_out) conv: `groups` times too much
    assert torch_counter.get_total_flops() == 2 * CONV + G * CONV


class _ConvModel(nn.Module):
    """The trainer's calling convention, (waveforms, mask_indices) -> (losses, metrics), around a grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv1d(1, C, 1, bias=False)  # 2 B C T forward, 2 B C T weight gradient, no input gradient
        self.conv = nn.Conv1d(C, C, K, groups=G, bias=False)

    def forward(self, waveforms: Tensor, *, mask_indices: Tensor) -> tuple[Tensor, dict]:
        y = self.conv(self.proj(waveforms.unsqueeze(1)))
        return y.flatten(1).gather(1, mask_indices), {}


def test_trainer_count_has_the_grouped_weight_gradient_once() -> None:
    torch.manual_seed(0)
    flops = count_step_flops(_ConvModel(), torch.randn(B, T), torch.zeros(B, 3, dtype=torch.long), torch.float32)
    assert flops == 2 * (2 * B * C * T) + 3 * CONV


def test_cpu_attention_is_counted() -> None:
    b, h, t, d = 1, 2, 8, 4
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
    counter = step_flop_counter()
    with counter:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    pair = 2 * b * h * t * t * d  # one (t, d) x (d, t) product per head
    # forward: scores and output (2 products); backward: scores recomputed, dP, dV, dQ, dK (5)
    assert counter.get_total_flops() == 7 * pair
