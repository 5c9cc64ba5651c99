"""The README's main example reaches its accuracy target."""

import importlib.util
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "digits.py")


def test_digits_example_reaches_95_percent(tmp_path):
    # A real module (not runpy's): MindSpore's graph parser resolves names through sys.modules.
    spec = importlib.util.spec_from_file_location("digits_example", EXAMPLE)
    digits = importlib.util.module_from_spec(spec)
    sys.modules["digits_example"] = digits
    try:
        spec.loader.exec_module(digits)
        accuracy = digits.main(["--root", str(tmp_path)])
    finally:
        del sys.modules["digits_example"]
    assert accuracy >= 0.95
    log_dir = tmp_path / "lightning_logs" / "version_0"
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert {"train_loss", "val_acc", "lr-Adam"} <= set(events.Tags()["scalars"])
    checkpoints = os.listdir(log_dir / "checkpoints")
    assert len(checkpoints) == 1 and checkpoints[0].startswith("epoch=")
    best = max(e.value for e in events.Scalars("val_acc"))
    assert checkpoints[0].endswith(f"val_acc={best:.4f}.ckpt")
