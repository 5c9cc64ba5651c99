"""The module API: `LightningCell`, `LightningDataModule` and what `self.log` writes to."""

from lightms.module.cell import LightningCell
from lightms.module.datamodule import LightningDataModule

__all__ = ["LightningCell", "LightningDataModule"]
