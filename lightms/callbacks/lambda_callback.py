"""`LambdaCallback`: a callback from plain functions, one per hook."""

from lightms.callbacks.callback import Callback


class LambdaCallback(Callback):
    """Builds a callback from keyword arguments `hook_name=function`.

    Example: `LambdaCallback(on_train_epoch_end=lambda trainer, module: print(trainer.current_epoch))`.

    Raises:
        ValueError: If a keyword is not a Callback hook name.
    """

    def __init__(self, **hooks):
        known = {name for name in dir(Callback) if name.startswith("on_") or name in ("setup", "teardown")}
        unknown = sorted(set(hooks) - known)
        if unknown:
            raise ValueError(f"LambdaCallback got unknown hooks {unknown}; known hooks: {sorted(known)}")
        for name, function in hooks.items():
            setattr(self, name, function)
