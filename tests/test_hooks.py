"""Hook dispatch: only overriding callbacks and module hooks run; hooks added during a run count."""

import numpy as np

from lightms.callbacks import Callback
from conftest import batches_of, fresh_model, make_data, quiet_trainer


def test_only_hooks_that_do_something_are_called_and_instance_hooks_count():
    # The trainer skips callbacks and module hooks that keep the no-op default; a function set
    # on the module instance, or on a callback instance, is not a default and must run.
    class Counting(Callback):
        def on_train_epoch_end(self, trainer, module):
            ends.append("callback")

    ends, batch_ends = [], []
    model = fresh_model()
    model.on_train_epoch_end = lambda: ends.append("module instance")
    silent = Callback()
    silent.on_train_batch_end = lambda trainer, module, outputs, batch, batch_idx: batch_ends.append(batch_idx)
    x, y = make_data(32)
    quiet_trainer(max_epochs=2, callbacks=[Counting(), silent]).fit(model, batches_of(x, y, 16))
    assert ends == ["callback", "module instance"] * 2
    assert batch_ends == [0, 1, 0, 1]


def test_hooks_added_during_a_run_are_called_from_then_on():
    calls = []

    class Late(Callback):
        def on_train_epoch_end(self, trainer, module):
            calls.append("late")

    class Adder(Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 0:
                module.on_train_epoch_end = lambda: calls.append("module instance")
                trainer.callbacks.append(Late())

    x, y = make_data(32)
    quiet_trainer(max_epochs=2, callbacks=[Adder()]).fit(fresh_model(), batches_of(x, y, 16))
    assert calls == ["late", "module instance"] * 2  # order 0 runs before the module


def test_a_sunk_chunks_batches_are_built_only_when_a_hook_reads_them(monkeypatch):
    # A sunk chunk's batches cost host time per chunk: the hooks get a sequence that builds each when read.
    from lightms.trainer.chunks import SunkBatches

    made = []
    get = SunkBatches.__getitem__
    monkeypatch.setattr(SunkBatches, "__getitem__", lambda self, index: made.append(index) or get(self, index))
    seen = []

    class IgnoresIt(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append((type(batch), len(batch), batch_idx))

    x, y = make_data(48)
    batches = batches_of(x, y, 8)
    quiet_trainer(max_epochs=1, sink_size=4, callbacks=[IgnoresIt()]).fit(fresh_model(), batches)
    assert seen == [(SunkBatches, 4, 0), (SunkBatches, 2, 4)] and made == []  # nothing built

    class Reads(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append([(bx.asnumpy().copy(), by.asnumpy().copy()) for bx, by in batch])

    seen.clear()
    quiet_trainer(max_epochs=1, sink_size=4, callbacks=[Reads()]).fit(fresh_model(), batches)
    assert made == [0, 1, 2, 3, 4, 0, 1, 2]  # each batch built when read (iteration ends at IndexError)
    read = [pair for chunk in seen for pair in chunk]
    assert len(read) == 6
    for (bx, by), (ex, ey) in zip(read, batches):
        np.testing.assert_array_equal(bx, ex)
        np.testing.assert_array_equal(by, ey)


def test_a_sunk_chunks_batches_a_hook_keeps_never_change():
    kept = []

    class Keeps(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            kept.append(batch)  # read only after the fit, when later chunks have filled the buffers

    x, y = make_data(96)
    batches = batches_of(x, y, 8)  # 12 batches: 4 chunks of 3
    quiet_trainer(max_epochs=1, sink_size=3, callbacks=[Keeps()]).fit(fresh_model(), batches)
    read = [(bx.asnumpy(), by.asnumpy()) for chunk in kept for bx, by in chunk]
    assert len(read) == 12
    for (bx, by), (ex, ey) in zip(read, batches):
        np.testing.assert_array_equal(bx, ex)
        np.testing.assert_array_equal(by, ey)
