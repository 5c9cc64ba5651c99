"""`TQDMProgressBar`: epoch, batch counts, it/s and every `prog_bar=True` value."""

import sys
import time
from typing import Optional

from tqdm.auto import tqdm

from lightms.callbacks.callback import Callback


class TQDMProgressBar(Callback):
    """Shows a tqdm bar for training, validation, test and predict.

    Logged values live on the device; the bar reads them only when it redraws
    (at most every `mininterval` seconds and at epoch ends), and only when some
    name was logged with `prog_bar=True`, so most steps pay no device-to-host copy.

    As in Lightning, one training bar serves the whole fit: each epoch resets it and
    names the epoch, so the terminal keeps one line, the last epoch's; `leave=True`
    leaves every epoch's finished bar instead.

    Args:
        refresh_rate: Advance the bar every this many batches; 0 disables the bar.
        mininterval: Fewest seconds between two reads of the logged values.
        leave: Leave each epoch's finished training bar in the terminal (a new bar per epoch).

    Raises:
        ValueError: If refresh_rate is not an int >= 0, or leave not a bool.
    """

    order = 1000  # after callbacks that log, so the bar shows their values

    def __init__(self, refresh_rate: int = 1, mininterval: float = 0.1, leave: bool = False):
        if isinstance(refresh_rate, bool) or not isinstance(refresh_rate, int) or refresh_rate < 0:
            raise ValueError(f"TQDMProgressBar(refresh_rate=...) must be an int >= 0, got {refresh_rate!r}.")
        if not isinstance(leave, bool):
            raise ValueError(f"TQDMProgressBar(leave=...) must be True or False, got {leave!r}.")
        self.refresh_rate = refresh_rate
        self.mininterval = mininterval
        self.leave = leave
        self._bars = {}
        self._done = {}  # bar key -> batches done, also those not yet shown
        self._last_read = 0.0
        self._last_draw = 0.0

    def _open(self, key: str, total: Optional[int], desc: str, position: int, leave: bool) -> None:
        if self.refresh_rate == 0:
            return
        self._bars[key] = tqdm(total=total, desc=desc, position=position, leave=leave, file=sys.stdout,
                               dynamic_ncols=True, mininterval=self.mininterval, unit="it")

    def _advance(self, key: str, trainer, batch_idx: int) -> None:
        bar = self._bars.get(key)
        if bar is None:
            return
        done, before = batch_idx + 1, self._done.get(key, bar.n)
        self._done[key] = done  # shown at the latest when the bar closes or the epoch ends
        if done // self.refresh_rate == before // self.refresh_rate:
            return  # no multiple of refresh_rate passed (a sunk chunk's hook may pass one without landing on it)
        # tqdm is told only when it may redraw: between two compiled steps every Python call costs
        # several times its isolated time, and tqdm would skip the redraw anyway.
        now = time.monotonic()
        if now - self._last_draw < self.mininterval:
            return
        self._last_draw = now
        bar.update(batch_idx + 1 - bar.n)
        if now - self._last_read >= self.mininterval:
            self._last_read = now
            bar.set_postfix(self._format(trainer.progress_bar_metrics), refresh=False)

    def _show_done(self, key: str, trainer=None):
        """Brings a bar up to the batches done and, given the trainer, the logged values; returns it or None."""
        bar = self._bars.get(key)
        if bar is not None:
            bar.update(self._done.pop(key, bar.n) - bar.n)  # batches since the last redraw
            if trainer is not None:
                bar.set_postfix(self._format(trainer.progress_bar_metrics), refresh=False)
        return bar

    def _close(self, key: str, trainer=None) -> None:
        bar = self._show_done(key, trainer)
        if bar is not None:
            del self._bars[key]
            bar.close()

    @staticmethod
    def _format(metrics):
        return {name: f"{value:.4g}" for name, value in metrics.items()}

    # ---- training -------------------------------------------------------------
    def on_train_epoch_start(self, trainer, module):
        description = f"Epoch {trainer.current_epoch}"
        bar = self._bars.get("train")
        if bar is None:
            self._open("train", trainer.num_training_batches, description, 0, True)
        else:  # the fit's bar, kept from the last epoch (leave=False)
            bar.set_description(description, refresh=False)
            bar.reset(total=trainer.num_training_batches)  # redraws: 0/total under the new name

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._advance("train", trainer, batch_idx)

    def on_train_epoch_end(self, trainer, module):
        if self.leave:
            self._close("train", trainer)
        else:
            bar = self._show_done("train", trainer)
            if bar is not None:
                bar.refresh()

    def on_train_end(self, trainer, module):
        self._close("train")

    # ---- evaluation -------------------------------------------------------------
    def _eval_start(self, key, trainer, desc):
        nested = "train" in self._bars
        # Left on screen only when it is the run's only bar (validate, test, predict), as in Lightning.
        self._open(key, trainer.num_eval_batches, desc, 1 if nested else 0, not nested and not trainer.sanity_checking)

    def on_validation_epoch_start(self, trainer, module):
        self._eval_start("eval", trainer, "Sanity checking" if trainer.sanity_checking else "Validation")

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self._advance("eval", trainer, batch_idx)

    def on_validation_epoch_end(self, trainer, module):
        self._close("eval")

    def on_test_epoch_start(self, trainer, module):
        self._eval_start("eval", trainer, "Testing")

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self._advance("eval", trainer, batch_idx)

    def on_test_epoch_end(self, trainer, module):
        self._close("eval")

    def on_predict_epoch_start(self, trainer, module):
        self._eval_start("eval", trainer, "Predicting")

    def on_predict_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self._advance("eval", trainer, batch_idx)

    def on_predict_epoch_end(self, trainer, module):
        self._close("eval")

    def on_exception(self, trainer, module, exception):
        for key in list(self._bars):
            self._close(key)
