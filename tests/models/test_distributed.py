"""Two ranks (gloo) each holding half a batch reach the single-process codebook EMA and perplexities,
with ONE all-reduce per training forward (the reference issues 2 per codebook + 2 per perplexity + 1)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spidr_fast import SpidR, SpidRConfig
from tests.models.test_padding import TINY

FIELDS = dict(TINY, encoder_dropout=0.0, encoder_attention_dropout=0.0)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 8000, generator=g), torch.rand(4, 24, generator=g).argsort(-1)[:, :10].sort(-1).values


def worker(rank: int, world: int, port: int, state: dict, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = []
    real_all_reduce = dist.all_reduce
    dist.all_reduce = lambda *a, **k: calls.append(1) or real_all_reduce(*a, **k)
    model = SpidR(SpidRConfig(**FIELDS))
    model.load_state_dict(state)
    waveforms, mask_indices = inputs()
    half = slice(2 * rank, 2 * rank + 2)
    losses, ppl = model.train()(waveforms[half], mask_indices=mask_indices[half])
    torch.save({"losses": losses, "ppl": ppl, "buffers": dict(model.codebooks.state_dict()), "calls": len(calls)},
               out / f"rank{rank}.pt")  # fmt: skip
    dist.barrier()  # tear down together (gloo aborted a rank now and then otherwise)
    dist.destroy_process_group()


def test_two_ranks_equal_one(tmp_path: Path) -> None:
    model = SpidR(SpidRConfig(**FIELDS))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    waveforms, mask_indices = inputs()
    losses, ppl = model.train()(waveforms, mask_indices=mask_indices)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, state, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    torch.testing.assert_close(torch.cat([r["losses"] for r in ranks]), losses, atol=1e-5, rtol=1e-5)
    for r in ranks:
        assert r["calls"] == 1
        for name in ("target_ppl", "pred_ppl"):
            torch.testing.assert_close(r["ppl"][name], ppl[name], atol=1e-5, rtol=1e-5)
        for name, value in model.codebooks.state_dict().items():
            torch.testing.assert_close(r["buffers"][name], value, atol=1e-5, rtol=1e-5)
