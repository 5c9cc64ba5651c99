"""`ModelSummary`: a table of the module's layers and parameter counts at fit start."""

from typing import List, Tuple

from lightms.callbacks.callback import Callback


def summarize(module, max_depth: int = 1) -> Tuple[List[Tuple[str, str, int]], int, int]:
    """Returns ([(name, type, parameter count)], trainable count, non-trainable count)."""
    rows = []
    for name, cell in module.cells_and_names():
        depth = name.count(".") + 1
        if not name or depth > max_depth:
            continue
        count = sum(int(p.size) for p in cell.get_parameters())
        rows.append((name, type(cell).__name__, count))
    trainable = sum(int(p.size) for p in module.trainable_params())
    frozen = sum(int(p.size) for p in module.untrainable_params())
    return rows, trainable, frozen


def _human(count: int) -> str:
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return str(count)


class ModelSummary(Callback):
    """Prints the module's sub-cells (down to `max_depth`) and parameter counts when fit starts.

    Args:
        max_depth: How deep to list nested cells; 0 prints only the totals.
    """

    def __init__(self, max_depth: int = 1):
        self.max_depth = max_depth

    def on_fit_start(self, trainer, module):
        print(self.format(module))

    def format(self, module) -> str:
        """Returns the summary table as text."""
        rows, trainable, frozen = summarize(module, self.max_depth)
        width = max([len(r[0]) for r in rows] + [4])
        kind = max([len(r[1]) for r in rows] + [4])
        lines = [f"  | {'Name':<{width}} | {'Type':<{kind}} | Params", "-" * (width + kind + 20)]
        lines += [f"{i:<2}| {n:<{width}} | {t:<{kind}} | {_human(c)}" for i, (n, t, c) in enumerate(rows)]
        lines += ["-" * (width + kind + 20), f"{_human(trainable)} trainable params",
                  f"{_human(frozen)} non-trainable params", f"{_human(trainable + frozen)} total params"]
        return "\n".join(lines)
