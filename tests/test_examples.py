"""The README's examples reach their targets."""

import importlib.util
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def run_example(name: str, argv):
    """Runs `examples/<name>.py`'s main(argv) and returns what it returns.

    The example is loaded as a real module (not runpy's): MindSpore's graph parser resolves
    names through sys.modules.
    """
    module_name = f"{name}_example"
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        return module.main(argv)
    finally:
        del sys.modules[module_name]
        sys.modules.pop("digits_example", None)  # dp_digits loads digits under this name


def test_digits_example_reaches_95_percent(tmp_path):
    accuracy = run_example("digits", ["--root", str(tmp_path)])
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
    fraction, covered = run_example("gan", ["--quick", "--root", str(tmp_path)])
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

    results = run_example("dp_digits", ["--epochs", "5", "--root", str(tmp_path)])
    private, plain = results["private"], results["plain"]
    assert private["accuracy"] > 0.8 and plain["accuracy"] > 0.9  # learned, with and without privacy
    # 1437 training digits, reshuffled into 22 batches of 64 each epoch: each step samples 64/1437 of them.
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(64 / 1437, dp_accounting.GaussianDpEvent(1.1)),
                       private["steps"])
    assert private["steps"] == 5 * 22
    assert private["epsilon"] == accountant.get_epsilon(1e-5)
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"))
    events.Reload()
    assert [e.step for e in events.Scalars("epsilon")] == [22 * n for n in range(1, 6)]
