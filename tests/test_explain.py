"""Naming a graph failure a `log_dict` caused, from the user's code (read only after the failure)."""

import functools
import inspect
import os

import pytest

from lightms import LightningCell
from lightms.engine.explain import explain_graph_failure
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


def test_the_compile_report_guard_moves_only_its_own_ranks_new_folder(tmp_path, monkeypatch):
    from lightms._mindspore import GraphDumpGuard

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rank_0").mkdir()  # there before the run (a user's, or another worker's): left alone
    guard = GraphDumpGuard(rank=1)
    (tmp_path / "rank_1" / "om").mkdir(parents=True)
    (tmp_path / "rank_1" / "om" / "analyze_fail.ir").write_text("report")
    moved = guard.tidy()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank_0"]
    assert open(os.path.join(moved, "om", "analyze_fail.ir")).read() == "report"
    assert GraphDumpGuard(rank=0).tidy() is None
