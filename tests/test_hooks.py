"""Hook dispatch: only overriding callbacks and module hooks run; hooks added during a run count."""

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


def test_the_training_batch_hooks_build_no_batch_when_no_receiver_reads_it(monkeypatch):
    # A sunk chunk's list of batches costs host time per chunk; it is built only when some
    # receiver's code reads `batch`, and then every receiver gets it.
    from lightms.callbacks import TQDMProgressBar
    from lightms.trainer.hooks import receivers_of
    from lightms.trainer.sinking import Chunk

    class Reads(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append(len(batch))

    class IgnoresIt(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(batch_idx)

    class ForwardsAll(Callback):
        def on_train_batch_end(self, *args):
            pass

    model = fresh_model()
    start, end = "on_train_batch_start", "on_train_batch_end"
    assert not receivers_of([IgnoresIt(), TQDMProgressBar()], model, start).reads_batch
    assert not receivers_of([IgnoresIt(), TQDMProgressBar()], model, end).reads_batch
    assert receivers_of([Reads()], model, end).reads_batch
    assert receivers_of([ForwardsAll()], model, end).reads_batch  # cannot tell: counts as a read
    function_set = Callback()
    function_set.on_train_batch_end = lambda trainer, module, outputs, batch, batch_idx: batch
    assert receivers_of([function_set], model, end).reads_batch
    function_set.on_train_batch_end = lambda trainer, module, outputs, batch, batch_idx: batch_idx
    assert not receivers_of([function_set], model, end).reads_batch
    model.on_train_batch_start = lambda batch, batch_idx: batch  # on the module instance
    assert receivers_of([], model, start).reads_batch

    class ModuleReads(type(model)):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            seen.append(len(batch))

        def on_train_batch_start(self, batch, batch_idx):
            seen.append(batch_idx)

    assert receivers_of([], fresh_model(cls=ModuleReads), end).reads_batch
    assert not receivers_of([], fresh_model(cls=ModuleReads), start).reads_batch

    class StaticReads(type(model)):
        @staticmethod
        def on_train_batch_end(outputs, batch, batch_idx):
            return batch

    class FrameReader(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            import sys
            return sys._getframe().f_locals["batch"]

    assert receivers_of([], fresh_model(cls=StaticReads), end).reads_batch
    assert receivers_of([FrameReader()], model, end).reads_batch
    assert receivers_of([], model, "on_train_epoch_end").reads_batch  # other hooks: always

    built, seen = [], []
    make = Chunk.hook_batches
    monkeypatch.setattr(Chunk, "hook_batches", lambda self: built.append(1) or make(self))
    x, y = make_data(48)
    quiet_trainer(max_epochs=1, sink_size=4, callbacks=[IgnoresIt()]).fit(fresh_model(), batches_of(x, y, 8))
    assert built == [] and seen == [0, 4]
    quiet_trainer(max_epochs=1, sink_size=4, callbacks=[IgnoresIt(), Reads()]).fit(fresh_model(),
                                                                                  batches_of(x, y, 8))
    assert len(built) == 2 and seen == [0, 4, 0, 4, 4, 2]  # chunks of 4 and 2 batches
    seen.clear()  # the module's own hooks, seen through the run's graph-callable shadows of its methods
    quiet_trainer(max_epochs=1, sink_size=4).fit(fresh_model(cls=ModuleReads), batches_of(x, y, 8))
    assert len(built) == 4 and seen == [0, 4, 4, 2]

    class ModuleIgnores(type(model)):
        def on_train_batch_start(self, batch, batch_idx):
            seen.append(batch_idx)

    class SetsAHookLater(Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:
                module.on_train_batch_end = lambda outputs, batch, batch_idx: seen.append(len(batch))

    seen.clear()
    quiet_trainer(max_epochs=2, sink_size=4, callbacks=[SetsAHookLater()]).fit(fresh_model(cls=ModuleIgnores),
                                                                              batches_of(x, y, 8))
    assert len(built) == 6 and seen == [0, 4, 0, 4, 4, 2]  # lists built in the second epoch only

    class AddsAReaderAtTheStart(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 4:
                trainer.callbacks.append(Reads())

    seen.clear()
    quiet_trainer(max_epochs=1, sink_size=4, callbacks=[AddsAReaderAtTheStart()]).fit(fresh_model(),
                                                                                      batches_of(x, y, 8))
    assert len(built) == 7 and seen == [2]  # the reader added before the second chunk's end gets its list
