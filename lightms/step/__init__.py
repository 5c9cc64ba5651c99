"""The compiled step builder: train and eval graphs, gradient transforms, graph-callable methods."""

from lightms.step.eval_step import EvalStep
from lightms.step.gradients import ClipGradNorm, ClipGradValue, GradientPipeline
from lightms.step.train_step import LoopCounters, TrainStep

__all__ = ["EvalStep", "ClipGradNorm", "ClipGradValue", "GradientPipeline", "LoopCounters", "TrainStep"]
