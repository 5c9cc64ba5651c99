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


def test_gan_example_learns_the_ring_of_gaussians(tmp_path, capsys):
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "gan.py")
    spec = importlib.util.spec_from_file_location("gan_example", path)
    gan = importlib.util.module_from_spec(spec)
    sys.modules["gan_example"] = gan
    try:
        spec.loader.exec_module(gan)
        fraction, covered = gan.main(["--quick", "--root", str(tmp_path)])
    finally:
        del sys.modules["gan_example"]
    # Seeded data, noise and weights: the quick run (3000 steps) reaches 0.84 and all 8 modes.
    assert fraction > 0.75 and covered == 8
    line = [text for text in capsys.readouterr().out.splitlines() if "within 3 std of a mode" in text][-1]
    assert f"a mode: {fraction:.2f}; modes covered: 8 of 8 (3000 steps" in line
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"))
    events.Reload()
    assert {"loss_d", "loss_g"} <= set(events.Tags()["scalars"])
    for tag in ("loss_d", "loss_g"):
        scalars = events.Scalars(tag)
        assert [e.step for e in scalars] == list(range(20, 3001, 20))
        assert all(0.0 < e.value < 10.0 for e in scalars)


def test_dp_digits_example_trains_privately_and_reports_the_accountants_epsilon(tmp_path):
    import dp_accounting

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "dp_digits.py")
    spec = importlib.util.spec_from_file_location("dp_digits_example", path)
    example = importlib.util.module_from_spec(spec)
    sys.modules["dp_digits_example"] = example
    try:
        spec.loader.exec_module(example)
        results = example.main(["--epochs", "5", "--root", str(tmp_path)])
    finally:
        del sys.modules["dp_digits_example"]
        sys.modules.pop("digits_example", None)
    private, plain = results["private"], results["plain"]
    assert private["accuracy"] > 0.8 and plain["accuracy"] > 0.9  # learned, with and without privacy
    # 1437 training digits in 22 full batches of 64: each step samples 1/22 of the data.
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(1 / 22, dp_accounting.GaussianDpEvent(1.1)),
                       private["steps"])
    assert private["steps"] == 5 * 22
    assert private["epsilon"] == accountant.get_epsilon(1e-5)
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"))
    events.Reload()
    assert [e.step for e in events.Scalars("epsilon")] == [22 * n for n in range(1, 6)]
