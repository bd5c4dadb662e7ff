"""Export a training checkpoint to the reference's released format: `spidr-fast export CKPT OUT.pt`.

CKPT is a `step_N.pt` file or a sharded `step_N/` folder of a spidr_fast run (the run's
`train_config.json` gives the model config), or any `{"model": state_dict}` file with a
`config.json` beside it. OUT.pt gets `{"model": state_dict}` and `config.json` beside it: it loads
with `spidr_fast.load_model(OUT.pt)` and the reference's `build_model(checkpoint=OUT.pt, model_type=...)`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def export(checkpoint: str | Path, out: str | Path, model_type: str | None = None) -> Path:
    # Imported here: `spidr-fast export --help` does not load torch.
    from spidr_fast.checkpoint import build_model, load_state_dict_strict, save_model
    from spidr_fast.config import model_config_from_dict
    from spidr_fast.train.checkpoint import read_model_state

    state, train_cfg = read_model_state(checkpoint)
    checkpoint = Path(checkpoint)
    if train_cfg is not None:
        fields, model_type = train_cfg["model"], model_type or train_cfg["run"]["model_type"]
    elif (checkpoint.parent / "config.json").is_file():
        fields = json.loads((checkpoint.parent / "config.json").read_text(encoding="utf-8"))
    else:
        raise FileNotFoundError(f"no train_config.json of a run, nor config.json, found for {checkpoint}")
    model = build_model(model_config_from_dict(fields, model_type))
    load_state_dict_strict(model, state, str(checkpoint))
    return save_model(model, out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="step_N.pt, a sharded step_N/ folder, or a {'model': ...} file")
    parser.add_argument("out", help="output .pt (config.json is written beside it)")
    parser.add_argument("--model-type", choices=["spidr", "dinosr"], default=None)


def main(args: argparse.Namespace) -> int:
    path = export(args.checkpoint, args.out, args.model_type)
    print(f"wrote {path} and {path.parent / 'config.json'}")
    return 0
