"""Reading the user's code: whether every log runs each step, and naming a graph failure a `log_dict` caused."""

import functools
import inspect

import pytest
from mindspore import nn

from lightms import LightningCell
from lightms.step.binding import explain_graph_failure
from conftest import TinyRegressor, batches_of, fresh_model, make_data, quiet_trainer

MINDSPORE_SAID = RuntimeError("Some graph error.\n\n- C++ Call Stack: (For framework developers)\nframe.cc:1")


def line_of(function, text: str) -> int:
    """The line, in its file, of the first source line of `function` that contains `text`."""
    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, line in enumerate(lines) if text in line)


class KeyUnderIf(TinyRegressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self(x) - y) ** 2).mean()
        logged = {"a": loss}
        if loss > 0.5:
            logged["b"] = loss * 2
        self.log_dict(logged)
        return loss


class UpdateUnderIf(TinyRegressor):
    def training_step(self, batch, batch_idx):
        loss = ((self(batch[0]) - batch[1]) ** 2).mean()
        logged = {"a": loss}
        if loss > 0.5:
            logged.update(b=loss)
        self.log_dict(logged)
        return loss


class ReboundInElse(TinyRegressor):
    def training_step(self, batch, batch_idx):
        loss = ((self(batch[0]) - batch[1]) ** 2).mean()
        if loss > 0.5:
            logged = {"a": loss}
        else:
            logged = {"a": loss, "b": loss}
        self.log_dict(logged)
        return loss


class InAHelper(TinyRegressor):
    def training_step(self, batch, batch_idx):
        loss = ((self(batch[0]) - batch[1]) ** 2).mean()
        self.report(loss)
        return loss

    def report(self, loss):
        logged = {"a": loss}
        if loss > 0.5:
            del logged["a"]
        self.log_dict(logged)


def logged_twice(method):
    @functools.wraps(method)
    def wrapper(self, *args):
        return method(self, *args)
    return wrapper


class Decorated(TinyRegressor):
    @logged_twice
    def training_step(self, batch, batch_idx):
        loss = ((self(batch[0]) - batch[1]) ** 2).mean()
        logged = {"a": loss} if loss > 0.5 else {"a": loss, "b": loss}
        self.log_dict(dictionary=logged)
        return loss


class InConstruct(TinyRegressor):
    def construct(self, x):
        out = self.net(x)
        logged = {}
        if out.mean() > 0:
            logged["mean"] = out.mean()
        self.log_dict(logged)
        return out


class ConstructNotCalled(InConstruct):
    def training_step(self, batch, batch_idx):
        loss = ((self.net(batch[0]) - batch[1]) ** 2).mean()
        self.log("loss", loss)
        return loss


class SameKeys(TinyRegressor):  # values differ by branch, keys do not; a loop over Python values unrolls
    def training_step(self, batch, batch_idx):
        loss = ((self(batch[0]) - batch[1]) ** 2).mean()
        logged = {"a": loss * 2 if loss > 0.5 else loss}
        for name in ("b", "c"):
            logged[name] = loss
        self.log_dict(logged)
        return loss

    def unreached(self, loss):  # training_step never calls it
        logged = {}
        if loss > 0:
            logged["a"] = loss
        self.log_dict(logged)


@pytest.mark.parametrize("cls, method, variable", [
    (KeyUnderIf, "training_step", "logged"), (UpdateUnderIf, "training_step", "logged"),
    (ReboundInElse, "training_step", "logged"), (InAHelper, "report", "logged"),
    (Decorated, "training_step", "dictionary=logged"), (InConstruct, "construct", "logged")])
def test_a_log_dict_of_a_dict_changed_under_a_condition_is_named(cls, method, variable):
    error = explain_graph_failure(cls(), LightningCell, "training_step", MINDSPORE_SAID)
    line = line_of(inspect.unwrap(getattr(cls, method)), f"self.log_dict({variable})")
    assert isinstance(error, TypeError)
    assert str(error).startswith(f"{cls.__name__}.training_step failed as a compiled graph, most likely because "
                                 f"{method} calls self.log_dict(logged) (line {line} of {__file__}) with a dict")
    # MindSpore's own message follows, whole, after lightms's
    assert str(error).endswith(f"MindSpore's error (RuntimeError): {MINDSPORE_SAID}")


def test_no_explanation_when_the_keys_never_change_or_the_log_dict_is_not_reached():
    assert explain_graph_failure(SameKeys(), LightningCell, "training_step", MINDSPORE_SAID) is None
    # construct is read only when a method the hook reaches calls self(...)
    assert explain_graph_failure(ConstructNotCalled(), LightningCell, "training_step", MINDSPORE_SAID) is None


class ValidationKeyUnderIf(TinyRegressor):
    def validation_step(self, batch, batch_idx):
        loss = ((self(batch[0]) - batch[1]) ** 2).mean()
        logged = {"val_a": loss}
        if loss > 0.5:
            logged["val_b"] = loss
        self.log_dict(logged)


class PythonFlag(TinyRegressor):
    """Adds a key under a Python condition, which the graph compiler folds: compiles and logs."""

    extra = True

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self(x) - y) ** 2).mean()
        logged = {"a": loss}
        if self.extra:
            logged["b"] = loss * 2
        self.log_dict(logged, on_epoch=True)
        return loss


@pytest.mark.parametrize("cls, hook", [(KeyUnderIf, "training_step"), (ValidationKeyUnderIf, "validation_step")])
def test_fit_raises_the_named_error_instead_of_mindspores(cls, hook):
    x, y = make_data(16, seed=1)
    with pytest.raises(TypeError) as caught:
        quiet_trainer(max_epochs=1).fit(fresh_model(cls=cls), batches_of(x, y, 8), batches_of(x, y, 8))
    assert str(caught.value).startswith(f"{cls.__name__}.{hook} failed as a compiled graph, most likely because "
                                        f"{hook} calls self.log_dict")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no C++ trace chained


def test_a_dict_changed_under_a_python_condition_compiles_and_logs_every_key():
    x, y = make_data(16, seed=1)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(fresh_model(cls=PythonFlag), batches_of(x, y, 8))
    metrics = trainer.callback_metrics
    assert metrics["b_epoch"] == pytest.approx(2 * metrics["a_epoch"], rel=1e-6)


# ---- logs_unconditionally: whether every self.log that training_step reaches runs on every step ----

class _LogsEveryStep(LightningCell):
    def training_step(self, batch, batch_idx):
        self.log("loss", batch)
        self._log_more(batch)
        return batch

    def _log_more(self, value):
        self.log_dict({"a": value})

    def on_train_batch_end(self, outputs, batch, batch_idx):  # a host hook: its conditions do not matter
        if batch_idx:
            self.log("host", 1.0)


class _LogsUnderIf(LightningCell):
    def training_step(self, batch, batch_idx):
        if batch_idx % 10 == 0:
            self.log("x", batch)
        return batch


class _CallsALoggerUnderIf(_LogsEveryStep):
    def training_step(self, batch, batch_idx):
        if batch_idx % 10 == 0:
            self._log_more(batch)
        return batch


class _LogsInALoop(LightningCell):
    def training_step(self, batch, batch_idx):
        for k in range(2):
            self.log(f"x{k}", batch)
        return batch


class _ReturnsEarly(LightningCell):
    def training_step(self, batch, batch_idx):
        if batch_idx > 3:
            return batch
        self.log("x", batch)
        return batch


class _LogsInAnExpression(LightningCell):
    def training_step(self, batch, batch_idx):
        _ = self.log("x", batch) if batch_idx else None
        return batch


class _PassesLogAround(LightningCell):
    def training_step(self, batch, batch_idx):
        log = self.log
        log("x", batch)
        return batch


class _MixinLogsUnderIf:
    def shared(self, value):
        if value is not None:
            self.log("m", value)


class _FromAMixin(_MixinLogsUnderIf, LightningCell):
    def training_step(self, batch, batch_idx):
        self.shared(batch)
        return batch


class _CallsSuper(_LogsUnderIf):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx)


def _log_for(module, value):
    if value is not None:
        module.log("x", value)


class _PassesItself(LightningCell):
    def training_step(self, batch, batch_idx):
        _log_for(self, batch)
        return self(batch)


class _LogsADictFilledUnderIf(LightningCell):
    def training_step(self, batch, batch_idx):
        metrics = {"loss": batch}
        if batch_idx % 3 == 0:
            metrics["acc"] = batch
        self.log_dict(metrics)
        self.log_dict({"fixed": batch})  # a literal: the same names every time
        return batch


class _LogsInAComprehension(LightningCell):
    def training_step(self, batch, batch_idx):
        _ = [self.log(name, batch) for name in ("a", "b") if batch_idx]
        return batch


def _log_extra_every(n):
    def decorate(step):
        @functools.wraps(step)
        def wrapper(self, batch, batch_idx):
            if batch_idx % n == 0:
                self.log("extra", batch)
            return step(self, batch, batch_idx)
        return wrapper
    return decorate


class _Decorated(LightningCell):
    @_log_extra_every(10)
    def training_step(self, batch, batch_idx):
        self.log("loss", batch)
        return batch


class _LogsThroughAPartial(LightningCell):
    def __init__(self):
        super().__init__()
        self._emit = functools.partial(self.log, prog_bar=True)

    def training_step(self, batch, batch_idx):
        self._emit("loss", batch)
        return batch


class _Tracker:
    def __init__(self, module):
        self.module = module

    def emit(self, value, batch_idx):
        if batch_idx % 2:
            self.module.log("x", value)


class _LogsThroughAHelperObject(LightningCell):
    def __init__(self):
        super().__init__()
        self.tracker = _Tracker(self)

    def training_step(self, batch, batch_idx):
        self.tracker.emit(batch, batch_idx)
        return batch


class _UsesSubCells(LightningCell):
    def __init__(self):
        super().__init__()
        self.dense = nn.Dense(2, 1)
        self.loss_fn = nn.MSELoss()

    def training_step(self, batch, batch_idx):
        loss = self.loss_fn(self.dense(batch), batch.sum(axis=1, keepdims=True))
        self.log_dict({"loss": loss, "scale": self.dense.weight.sum()})
        return loss


@pytest.mark.parametrize("cls, expected", [
    (_LogsEveryStep, True), (_UsesSubCells, True), (_LogsUnderIf, False), (_CallsALoggerUnderIf, False),
    (_LogsInALoop, False), (_ReturnsEarly, False), (_LogsInAnExpression, False), (_PassesLogAround, False),
    (_FromAMixin, False), (_CallsSuper, False), (_PassesItself, False), (_LogsADictFilledUnderIf, False),
    (_LogsInAComprehension, False), (_Decorated, False), (_LogsThroughAPartial, False),
    (_LogsThroughAHelperObject, False)])
def test_logs_unconditionally_reads_the_methods_training_step_reaches(cls, expected):
    from lightms.step.binding import logs_unconditionally

    assert logs_unconditionally(cls(), LightningCell) is expected


def test_logs_unconditionally_answers_false_when_it_cannot_read_the_code():
    from lightms.step.binding import logs_unconditionally

    namespace = {"LightningCell": LightningCell}
    exec("class NoSource(LightningCell):\n"
         "    def training_step(self, batch, batch_idx):\n"
         "        self.log('x', batch)\n"
         "        return batch\n", namespace)
    assert logs_unconditionally(namespace["NoSource"](), LightningCell) is False
    module = _LogsEveryStep()
    module.training_step = lambda batch, batch_idx: batch  # set on the instance: not read
    assert logs_unconditionally(module, LightningCell) is False
