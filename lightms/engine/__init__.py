"""The compiled-step engine: the plan, the training engine and its graphs, evaluation steps, the module binding."""

from lightms.engine.engine import Counters, StepReport, TrainEngine
from lightms.engine.eval_step import EvalStep
from lightms.engine.plan import StepPlan, plan_training

__all__ = ["Counters", "EvalStep", "StepPlan", "StepReport", "TrainEngine", "plan_training"]
