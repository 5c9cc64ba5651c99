"""Fault injection: kill training runs at random moments and check that nothing is lost.

A child process trains a small model with a checkpoint every optimizer step. The
parent kills it (SIGKILL or SIGTERM) at random moments, checks that every checkpoint
on disk loads (CRC included), resumes with `ckpt_path="last"` and checks that the
resumed run ends with the parameters of an uninterrupted run (to 1e-6). A file-size
limit in a child (`resource.setrlimit(RLIMIT_FSIZE)`, the way a full disk fails a
write) must leave the previous checkpoints as they were and no partial file. A soak
run measures resident memory and compiled graphs over many steps with checkpointing on.

    python benchmarks/faults.py                      # 200 kills, 40 SIGTERMs, the disk check, a 20k-step soak
    python benchmarks/faults.py --kills 20 --terms 5 --soak-steps 2000   # a quick look

`tests/test_faults.py` runs a few seeds of the same trials in CI.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's lightms, also when run as a script

import lightms  # noqa: E402
from lightms.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightms.checkpoint import read_checkpoint  # noqa: E402
from mindspore import nn  # noqa: E402

EPOCHS = 4
# Each configuration trains 4 epochs of 12 batches; a checkpoint after every optimizer step (every chunk when sunk).
# "large" makes each checkpoint about 10 MB, so that kills often land inside a write.
CONFIGS = {
    "accumulate": {"trainer": {"accumulate": 2}, "every": 1, "width": 16, "steps": 24},  # windows of 2 micro-batches
    "sinking": {"trainer": {"sink_size": 3}, "every": 3, "width": 16, "steps": 48},  # chunks of 3
    "large": {"trainer": {}, "every": 1, "width": 100_000, "steps": 48},  # 10 MB checkpoints
}
STARTED = "started"  # written by the child after its first checkpoint (compiling is over)


class FaultModel(lightms.LightningCell):
    """An 8-`width`-1 MLP with Adam: stateful enough that a wrong resume shows in the parameters."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.net = nn.SequentialCell(nn.Dense(8, width), nn.Tanh(), nn.Dense(width, 1))

    def construct(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self(x) - y) ** 2).mean()
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", ((self(x) - y) ** 2).mean())

    def configure_optimizers(self):
        return nn.Adam(self.trainable_params(), learning_rate=1e-2)


def data():
    """(train, val): 12 and 2 batches of 8, seeded."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((112, 8)).astype(np.float32)
    y = (x @ rng.standard_normal((8, 1))).astype(np.float32)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 112, 8)]
    return batches[:12], batches[12:]


class Marker(Callback):
    """Writes `<folder>/started` once the first checkpoint is written, and sends a signal where asked.

    Args:
        folder: The run's folder.
        signal_at: None, "validation:N" (SIGTERM during the first validation at or after optimizer
            step N), or "on_train_end" (SIGTERM there: after the last training step).
    """

    order = 300  # after the ModelCheckpoint

    def __init__(self, folder, signal_at=None):
        self.folder, self.signal_at, self.sent = folder, signal_at, False

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        marker = os.path.join(self.folder, STARTED)
        if checkpoints(self.folder) and not os.path.exists(marker):
            with open(marker, "w") as handle:
                handle.write(str(time.time()))

    def _send(self):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_batch_end(self, trainer, module, *args):
        if self.signal_at and self.signal_at.startswith("validation:") and not trainer.sanity_checking \
                and trainer.global_step >= int(self.signal_at.split(":")[1]):
            self._send()

    def on_train_end(self, trainer, module):
        if self.signal_at == "on_train_end":
            self._send()


def checkpoint_folder(folder):
    return os.path.join(folder, "checkpoints")


def train(folder, config, resume=True, max_steps=-1, signal_at=None):
    """Trains (resuming from the newest checkpoint in `folder` if any); returns the final parameters."""
    os.makedirs(folder, exist_ok=True)
    lightms.seed_everything(0)
    settings = CONFIGS[config]
    model = FaultModel(settings["width"])
    callback = ModelCheckpoint(dirpath=checkpoint_folder(folder), every_n_train_steps=settings["every"],
                               save_top_k=2, save_last=True)
    trainer = lightms.Trainer(max_epochs=EPOCHS, max_steps=max_steps, seed=0, logger=False,
                              enable_progress_bar=False, num_sanity_val_steps=0, default_root_dir=folder,
                              callbacks=[callback, Marker(folder, signal_at)], **settings["trainer"])
    has_checkpoint = bool(checkpoints(folder))
    train_data, val_data = data()
    trainer.fit(model, train_data, val_data, ckpt_path="last" if resume and has_checkpoint else None)
    return {p.name: p.asnumpy().copy() for p in model.trainable_params()}


def checkpoints(folder):
    """The checkpoint files in a run's folder (not the hidden temporaries of writes in progress)."""
    where = checkpoint_folder(folder)
    if not os.path.isdir(where):
        return []
    return sorted(os.path.join(where, name) for name in os.listdir(where)
                  if name.endswith(".ckpt") and not name.startswith("."))


def temporaries(folder):
    where = checkpoint_folder(folder)
    return sorted(name for name in os.listdir(where) if name.startswith(".")) if os.path.isdir(where) else []


def check_checkpoints(folder):
    """Loads every checkpoint in `folder`; returns (how many loaded, [(path, error)], the newest loop step)."""
    loaded, broken, newest = 0, [], -1
    for path in checkpoints(folder):
        try:
            _, meta = read_checkpoint(path)
        except (ValueError, OSError) as error:
            broken.append((path, str(error)))
            continue
        loaded += 1
        newest = max(newest, meta["loop"]["global_step"])
    return loaded, broken, newest


def same_parameters(got, expected, atol=1e-6):
    return set(got) == set(expected) and all(np.allclose(got[k], expected[k], atol=atol, rtol=0) for k in expected)


def start_child(folder, config, signal_at=None, file_limit=None, max_steps=-1):
    """Starts `train` in a child process (a fresh interpreter, as a real run)."""
    command = [sys.executable, os.path.abspath(__file__), "child", folder, config, "--max-steps", str(max_steps)]
    if signal_at:
        command += ["--signal-at", signal_at]
    if file_limit:
        command += ["--file-limit", str(file_limit)]
    environment = dict(os.environ, GLOG_v="3")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment, text=True)


def wait_started(folder, child, timeout=120.0):
    """Waits until the child wrote its first checkpoint (or exited); returns whether it did."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(os.path.join(folder, STARTED)):
            return True
        if child.poll() is not None:
            return False
        time.sleep(0.005)
    raise TimeoutError(f"the child training in {folder} did not start in {timeout} s")


def child_main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("config")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--signal-at")
    parser.add_argument("--file-limit", type=int)
    args = parser.parse_args(argv)
    if args.file_limit:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.file_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    parameters = train(args.folder, args.config, max_steps=args.max_steps, signal_at=args.signal_at)
    np.savez(os.path.join(args.folder, "final.npz"), **parameters)


def final_parameters(folder):
    path = os.path.join(folder, "final.npz")
    if not os.path.exists(path):
        return None
    with np.load(path) as saved:
        return {key: saved[key] for key in saved.files}


class Counts:
    """What the trials saw, printed at the end."""

    def __init__(self):
        self.values = {"kills": 0, "kills before training started": 0, "runs that ended before their kill": 0,
                       "sigterms": 0, "sigterm exits 143": 0, "checkpoints checked": 0, "temporaries left by kills": 0,
                       "temporaries removed by the next run": 0, "resumes": 0, "resumes exact": 0,
                       "files lost": 0, "unloadable checkpoints": 0, "full-disk checks": 0, "full-disk checks clean": 0}
        self.problems = []

    def add(self, name, count=1):
        self.values[name] += count

    def problem(self, text):
        self.problems.append(text)
        print("PROBLEM:", text, flush=True)


def inspect_after_kill(folder, counts, newest_before):
    """Checks a killed run's folder; returns the newest checkpointed step."""
    loaded, broken, newest = check_checkpoints(folder)
    counts.add("checkpoints checked", loaded + len(broken))
    counts.add("unloadable checkpoints", len(broken))
    for path, error in broken:
        counts.problem(f"{path} does not load: {error}")
    if newest < newest_before:
        counts.add("files lost")
        counts.problem(f"{folder}: the newest checkpoint went back from step {newest_before} to {newest}")
    counts.add("temporaries left by kills", len(temporaries(folder)))
    return newest


def kill_trial(folder, config, rng, counts, signum=signal.SIGKILL, signal_at=None, train_seconds=1.0, early=0.1):
    """Starts a child on `folder` (resuming what is there), kills it at a random moment, checks the folder.

    A fraction `early` of the kills land in the first 3 s (importing, compiling, restoring); the
    others within the training left after the child's first checkpoint (`train_seconds` for a whole
    run, scaled by the steps left after the newest checkpoint).

    Returns:
        Whether the child ran to the end (no kill landed).
    """
    newest_before = check_checkpoints(folder)[2]
    left = temporaries(folder)
    marker = os.path.join(folder, STARTED)
    if os.path.exists(marker):
        os.remove(marker)
    child = start_child(folder, config, signal_at=signal_at)
    if signal_at is None:
        if rng.random() < early:
            time.sleep(rng.uniform(0.0, 3.0))
            started = os.path.exists(marker)
        else:
            started = wait_started(folder, child)
            remaining = 1.0 - max(newest_before, 0) / CONFIGS[config]["steps"]
            time.sleep(rng.uniform(0.0, train_seconds * remaining))
        if child.poll() is None:
            child.send_signal(signum)
            counts.add("kills" if signum == signal.SIGKILL else "sigterms")
            if not started:
                counts.add("kills before training started")
    _, stderr = child.communicate(timeout=300)
    if left and started_or_done(folder):
        removed = [name for name in left if name not in temporaries(folder)]
        counts.add("temporaries removed by the next run", len(removed))
        if len(removed) != len(left):
            counts.problem(f"{folder}: temporaries {sorted(set(left) - set(removed))} were not removed")
    if signum == signal.SIGTERM or signal_at:
        if signal_at:
            counts.add("sigterms")
        if child.returncode == 128 + signal.SIGTERM:
            counts.add("sigterm exits 143")
            named = [path for path in checkpoints(folder) if path in stderr]
            if "lightms: SIGINT/SIGTERM received" not in stderr or not named:
                counts.problem(f"{folder}: exit 143 without lightms's message naming a checkpoint: {stderr[-500:]}")
        elif child.returncode not in (0, -signal.SIGTERM):  # -15: the signal came before or after fit
            counts.problem(f"{folder}: SIGTERM gave exit code {child.returncode}: {stderr[-2000:]}")
    elif child.returncode not in (0, -signal.SIGKILL):
        counts.problem(f"{folder}: the child failed with exit code {child.returncode}: {stderr[-2000:]}")
    inspect_after_kill(folder, counts, newest_before)
    finished = child.returncode == 0
    if finished and signal_at is None:
        counts.add("runs that ended before their kill")
    return finished


def started_or_done(folder):
    return os.path.exists(os.path.join(folder, STARTED)) or os.path.exists(os.path.join(folder, "final.npz"))


def check_resume(folder, config, reference, counts, in_process=False):
    """Resumes from "last" to the end; counts whether it matches the uninterrupted run."""
    counts.add("resumes")
    if in_process:
        got = train(folder, config)
    else:
        child = start_child(folder, config)
        _, stderr = child.communicate(timeout=300)
        if child.returncode != 0:
            counts.problem(f"{folder}: the resume failed ({child.returncode}): {stderr[-2000:]}")
            return False
        got = final_parameters(folder)
    if same_parameters(got, reference):
        counts.add("resumes exact")
        return True
    counts.problem(f"{folder}: the resumed run's parameters differ from the uninterrupted run's")
    return False


def full_disk_trial(folder, config, reference, counts, in_process=False):
    """Trains 5 steps, then resumes under a file-size limit smaller than a checkpoint: the first save must fail
    cleanly (previous files byte for byte, no partial or temporary file); then resumes for real."""
    counts.add("full-disk checks")
    if in_process:
        train(folder, config, max_steps=5, resume=False)
    else:
        start_child(folder, config, max_steps=5).communicate(timeout=300)
    before = {path: open(path, "rb").read() for path in checkpoints(folder)}
    size = min(len(content) for content in before.values())
    child = start_child(folder, config, file_limit=size // 2)
    _, stderr = child.communicate(timeout=300)
    after = {path: open(path, "rb").read() for path in checkpoints(folder)}
    clean = True
    if child.returncode == 0 or "Could not write the checkpoint" not in stderr:
        counts.problem(f"{folder}: a full disk did not fail with lightms's message (exit {child.returncode}): "
                       f"{stderr[-1500:]}")
        clean = False
    if after != before:
        counts.problem(f"{folder}: the failed save changed the checkpoints: {sorted(set(after) ^ set(before))}")
        clean = False
    if temporaries(folder):
        counts.problem(f"{folder}: the failed save left {temporaries(folder)}")
        clean = False
    counts.add("full-disk checks clean", int(clean))
    check_resume(folder, config, reference, counts, in_process)


def reference_parameters(root, config):
    """The uninterrupted run's final parameters, and how long its training took after the first chunk."""
    folder = os.path.join(root, f"reference-{config}")
    child = start_child(folder, config)
    _, stderr = child.communicate(timeout=300)
    if child.returncode != 0:
        raise RuntimeError(f"the reference run failed: {stderr[-3000:]}")
    with open(os.path.join(folder, STARTED)) as handle:
        started = float(handle.read())
    return final_parameters(folder), time.time() - started


def rss_kib():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


class Soak(Callback):
    """Samples resident memory and compiled graphs every 1000 optimizer steps."""

    def __init__(self):
        self.samples = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step % 1000 == 0 and trainer.state.window == 0:
            self.samples.append((trainer.global_step, rss_kib(), lightms.compiled_graph_count()))


def soak(root, steps):
    """Trains `steps` optimizer steps with a checkpoint every 10; returns the RSS slope and compiles after warm-up."""
    folder = os.path.join(root, "soak")
    sampler = Soak()
    lightms.seed_everything(0)
    train_data, val_data = data()
    trainer = lightms.Trainer(max_steps=steps, max_epochs=-1, logger=False, enable_progress_bar=False,
                              num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=500,
                              check_val_every_n_epoch=None, accumulate=2,
                              callbacks=[ModelCheckpoint(dirpath=checkpoint_folder(folder), every_n_train_steps=10,
                                                         save_top_k=2, save_last=True), sampler])
    start = time.time()
    trainer.fit(FaultModel(), train_data, val_data)
    seconds = time.time() - start
    warm = [sample for sample in sampler.samples if sample[0] >= 2000]  # after warm-up
    x = np.array([s for s, _, _ in warm], np.float64) / 1000
    rss = np.array([r for _, r, _ in warm], np.float64)
    slope = float(np.polyfit(x, rss, 1)[0]) if len(warm) >= 2 else float("nan")
    return {"steps": steps, "seconds": round(seconds, 1), "rss_kib_first": int(rss[0]) if len(rss) else None,
            "rss_kib_last": int(rss[-1]) if len(rss) else None, "rss_slope_kib_per_1k_steps": round(slope, 2),
            "compiles_after_warmup": warm[-1][2] - warm[0][2] if warm else None}


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=200, help="SIGKILLs at random moments")
    parser.add_argument("--terms", type=int, default=40, help="SIGTERMs at random moments")
    parser.add_argument("--chain", type=int, default=4, help="kills of one run before it resumes to the end")
    parser.add_argument("--soak-steps", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the counts here")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    counts = Counts()
    root = tempfile.mkdtemp(prefix="lightms-faults-")
    started = time.time()
    references = {config: reference_parameters(root, config) for config in CONFIGS}
    trial = 0

    def run_chain(kind, name, total, signum):
        """Chains of up to `--chain` kills of one run, each resumed, until `total` signals landed."""
        nonlocal trial
        while counts.values[name] < total:
            config = list(CONFIGS)[trial % len(CONFIGS)]
            reference, seconds = references[config]
            folder = os.path.join(root, f"{kind}-{trial}")
            trial += 1
            for _ in range(args.chain):
                if counts.values[name] >= total or kill_trial(folder, config, rng, counts, signum,
                                                              train_seconds=seconds):
                    break
            check_resume(folder, config, reference, counts)
            print(f"{time.time() - started:7.0f} s  {kind}: {counts.values[name]}/{total}", flush=True)

    run_chain("kill", "kills", args.kills, signal.SIGKILL)
    run_chain("term", "sigterms", args.terms, signal.SIGTERM)
    for config in CONFIGS:  # SIGTERM where random moments rarely land
        reference, _ = references[config]
        for signal_at in ("validation:3", "on_train_end"):
            folder = os.path.join(root, f"term-{signal_at.replace(':', '')}-{config}")
            kill_trial(folder, config, rng, counts, signal.SIGTERM, signal_at=signal_at)
            check_resume(folder, config, reference, counts)
        full_disk_trial(os.path.join(root, f"disk-{config}"), config, reference, counts)
    soak_figures = soak(root, args.soak_steps) if args.soak_steps else {}
    print()
    for name, value in counts.values.items():
        print(f"{name:40s} {value}")
    for name, value in soak_figures.items():
        print(f"soak {name:35s} {value}")
    print(f"problems: {len(counts.problems)}; {time.time() - started:.0f} s; folders under {root}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"counts": counts.values, "soak": soak_figures, "problems": counts.problems}, handle, indent=1)
    return 1 if counts.problems else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child_main(sys.argv[2:])
    else:
        sys.exit(main(sys.argv[1:]))
