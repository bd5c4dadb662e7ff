"""The roofline predictor's per-class times beside a profile's measured ones, to calibrate its efficiencies.

Reads `profile_step.py`'s JSON (measured ms per step in `roofline.CLASSES`, the profiled batch shapes and
the device) and predicts, with `roofline.predict`, the same steps on the detected device: each profiled
batch shape once, weighted by the profiled steps that used it. Writes, per class, the predicted and the
measured ms per step and their ratio measured / predicted (> 1: the class runs slower than predicted, its
efficiency in `roofline.EFFICIENCY` is too optimistic). A device the table does not have (a CPU, an L40S)
is predicted as `DEFAULT_DEVICE`, and the JSON's `note` says so.

    python bench/profile_roofline.py DIR/profile.json --out DIR/roofline_vs_profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline
from train_throughput import PRESETS

from spidr_fast.devices import lookup as lookup_device

DEFAULT_DEVICE = "H100"


def roofline_device(name: str) -> tuple[str, str | None]:
    """The device to predict for, given a profiled device's name (e.g. "NVIDIA H100 PCIe" -> "H100 PCIe", from
    spidr_fast/devices.py, the table `roofline` reads), and a note when it is unknown and falls back."""
    known = lookup_device(name)
    if known is not None:
        return known.name, None
    return DEFAULT_DEVICE, (
        f"{name!r} is not in spidr_fast/devices.py (the devices bench/roofline.py predicts for): predicted for "
        f"{DEFAULT_DEVICE}, the default; the ratios then say nothing about the efficiencies"
    )


def side_by_side(profile: dict[str, Any], predict: Callable[..., dict[str, float]] = roofline.predict) -> dict:
    """Predicted and measured ms per step per class, and measured / predicted, for `profile`'s batches."""
    device, note = roofline_device(str(profile.get("device", "unknown")))
    fields, _, _ = PRESETS[profile["config"]]
    config = _config(fields)
    variant = "spidr_fast" if profile.get("compiled") else "spidr_fast:eager"
    steps = sum(b["steps"] for b in profile["batches"])
    predicted = dict.fromkeys(roofline.CLASSES, 0.0)
    for b in profile["batches"]:
        ms = predict(config, device, variant, b["size"], b["samples"] / 16_000)
        for cls in roofline.CLASSES:
            predicted[cls] += ms.get(cls, 0.0) * b["steps"] / steps
    measured = profile["by_model_class"]
    rows = [
        {
            "class": cls,
            "predicted_ms": predicted[cls],
            "measured_ms": measured.get(cls, 0.0),
            "ratio": measured.get(cls, 0.0) / predicted[cls] if predicted[cls] > 0 else None,
        }
        for cls in roofline.CLASSES
    ]
    total_p, total_m = sum(predicted.values()), sum(measured.values())
    return {
        "benchmark": "roofline_vs_profile",
        "roofline_device": device,
        "measured_device": profile.get("device"),
        "timeline": profile.get("timeline"),
        "note": note,
        "config": profile["config"],
        "variant": variant,
        "batches": profile["batches"],
        "efficiencies": {k: v for k, (v, _) in roofline.EFFICIENCY.items()},
        "by_class": rows,
        "total": {"predicted_ms": total_p, "measured_ms": total_m, "ratio": total_m / total_p if total_p else None},
    }


def _config(fields: dict[str, Any]) -> Any:
    from spidr_fast import SpidRConfig

    return SpidRConfig(**fields)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path, help="profile_step.py's JSON")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if not args.profile.is_file():
        raise SystemExit(f"profile {args.profile}: no such file (run bench/profile_step.py first)")
    profile = json.loads(args.profile.read_text(encoding="utf-8"))
    for key in ("config", "batches", "by_model_class"):
        if key not in profile:
            raise SystemExit(f"profile {args.profile}: no {key!r} (written by an older bench/profile_step.py?)")
    result = side_by_side(profile)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if result["note"]:
        print("note:", result["note"])
    for r in result["by_class"]:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        print(f"{r['class']:>18}: predicted {r['predicted_ms']:8.2f} ms  measured {r['measured_ms']:8.2f} ms  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
