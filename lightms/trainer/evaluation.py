"""Validation, test and predict: one pass of an evaluation hook over its data, and the public entry points.

Mixed into `Trainer` through `TrainingLoop` (fit runs `_eval_loop` for its validation and sanity check).
Each hook runs as a compiled `EvalStep` built at its first batch; logged values reach the
loggers and `callback_metrics` at the pass's end.
"""

from typing import Any, Dict, List

from lightms.engine.eval_step import EvalStep, module_metrics
from lightms.module.cell import LightningCell
from lightms.trainer.data import DataSource, eval_source

EVAL_HOOKS = {"validation": "validation_step", "test": "test_step", "predict": "predict_step"}


class EvaluationLoop:
    """The evaluation half of `Trainer` (a mixin: `_run`, `_call` and the rest come from `TrainingLoop`)."""

    def validate(self, model: LightningCell, dataloaders=None, datamodule=None) -> List[Dict[str, float]]:
        """Runs validation_step over the data; returns `[metrics]` as Lightning does."""
        return self._evaluate("validate", "validation", model, dataloaders, datamodule)

    def test(self, model: LightningCell, dataloaders=None, datamodule=None) -> List[Dict[str, float]]:
        """Runs test_step over the data; returns `[metrics]` as Lightning does."""
        return self._evaluate("test", "test", model, dataloaders, datamodule)

    def predict(self, model: LightningCell, dataloaders=None, datamodule=None) -> List[Any]:
        """Runs predict_step over the data; returns the list of per-batch outputs."""
        self._check_model(model)
        source = eval_source(self, "predict", datamodule, dataloaders)
        source.check_whole(self.world_size)
        outputs: List[Any] = []
        self._run("predict", model, lambda: outputs.extend(self._eval_loop("predict", source,
                                                                          self.limit_predict_batches)))
        return outputs

    def _check_model(self, model) -> None:
        if not isinstance(model, LightningCell):
            raise TypeError(f"Trainer expects a lightms.LightningCell, got {type(model).__name__}.")

    def _evaluate(self, entry: str, stage: str, model, dataloaders, datamodule) -> List[Dict[str, float]]:
        self._check_model(model)
        if not callable(getattr(model, EVAL_HOOKS[stage], None)):
            raise NotImplementedError(f"Trainer.{entry} needs {type(model).__name__}.{EVAL_HOOKS[stage]}(batch, "
                                      "batch_idx).")
        source = eval_source(self, entry, datamodule, dataloaders)
        source.check_whole(self.world_size)
        limit = self.limit_val_batches if stage == "validation" else self.limit_test_batches
        results: List[Dict[str, float]] = []
        self._run(entry, model, lambda: results.append(self._eval_loop(stage, source, limit)))
        return results

    def _eval_loop(self, stage: str, source: DataSource, limit):
        """Runs one pass of validation, test or predict. Returns metrics, or outputs for predict."""
        metrics = self._metrics
        with self._binding.evaluating():
            self.num_eval_batches = source.batch_count(limit)
            metrics.start_epoch(stage)
            for metric in module_metrics(self.model):
                metric.clear()  # e.g. updates of the sanity check do not count
            self._call(f"on_{stage}_start")  # also while sanity checking, as Lightning does
            self._call(f"on_{stage}_epoch_start")
            outputs = []
            for batch in source.batches(limit):
                self._call(f"on_{stage}_batch_start", batch.data, batch.index)
                if stage not in self._eval_steps:
                    self._eval_steps[stage] = self._build_eval_step(stage, batch)
                output = self._eval_steps[stage](batch)
                if stage == "predict":
                    outputs.append(output)
                self._call(f"on_{stage}_batch_end", output, batch.data, batch.index)
            reported = not self.sanity_checking and stage != "predict"
            if reported:
                metrics.end_epoch(stage)  # before the hook: its callbacks see the epoch values, as in Lightning
            self._call(f"on_{stage}_epoch_end")
            results: Dict[str, float] = {}
            if reported:
                logged = metrics.epoch_ended()
                if self.state.stage == "fit":
                    self._logger_write(logged)
                results = {name: value for name, value in metrics.callback_metrics.items()
                           if name in self._stage_names(stage)}
            self._call(f"on_{stage}_end")
        return outputs if stage == "predict" else results

    def _build_eval_step(self, stage: str, batch) -> EvalStep:
        hook = EVAL_HOOKS[stage]
        step = EvalStep(self.model, stage, hook, batch, self._metrics.host[stage], self._binding, self.compile,
                        self.precision.autocast, self._explainer(hook))
        if step.logs is not None:
            self._metrics.device[stage] = step.logs
        return step

    def _stage_names(self, stage: str) -> set:
        names = set()
        device = self._metrics.device.get(stage)
        options = list(device.options) if device is not None else []
        options += list(self._metrics.host[stage].options.values())
        for opt in options:
            names.update(opt.reported_names().values())
            names.add(opt.name)
        return names


__all__ = ["EVAL_HOOKS", "EvaluationLoop"]
