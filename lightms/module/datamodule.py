"""`LightningDataModule`: the data half of a run, as in Lightning."""


class LightningDataModule:
    """Groups the data preparation and the loaders of a run.

    Override `prepare_data` (download, once), `setup(stage)` (split, per stage) and
    the `*_dataloader` methods, each returning a batched `mindspore.dataset.Dataset`
    or any re-iterable object yielding batches.
    """

    def __init__(self):
        self.trainer = None

    def prepare_data(self) -> None:
        """Downloads or writes data to disk; called once before `setup`."""

    def setup(self, stage: str) -> None:
        """Builds the datasets for `stage` ("fit", "validate", "test" or "predict")."""

    def teardown(self, stage: str) -> None:
        """Releases what `setup` built."""

    def train_dataloader(self):
        """Returns the training batches."""
        raise NotImplementedError(f"{type(self).__name__}.train_dataloader is not implemented.")

    def val_dataloader(self):
        """Returns the validation batches, or None for no validation."""
        return None

    def test_dataloader(self):
        """Returns the test batches."""
        raise NotImplementedError(f"{type(self).__name__}.test_dataloader is not implemented.")

    def predict_dataloader(self):
        """Returns the batches to predict on."""
        raise NotImplementedError(f"{type(self).__name__}.predict_dataloader is not implemented.")
