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
