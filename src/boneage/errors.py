"""Every error boneage raises on purpose, in one place at the bottom of the package; each message names the file or
field and what was expected."""

from __future__ import annotations

from collections.abc import Sequence


class BoneAgeError(RuntimeError):
    """Base of the package's runtime errors that the CLI reports as one line (bad values are ValueErrors)."""


class ConfigError(ValueError):
    """A configuration value or file is invalid."""


class ModelLoadError(BoneAgeError):
    """A model file or folder cannot be used (missing, wrong checksum, or its runtime is not installed)."""


class ModelFolderError(ModelLoadError):
    """A model folder is missing files, has a bad checksum or does not describe its model."""


class PretrainedWeightsError(BoneAgeError):
    """Pretrained weights could not be found or do not fit the backbone."""


class ExportError(BoneAgeError):
    """Export failed or the exported model does not match PyTorch."""


class ImageReadError(ValueError):
    """An image file could not be decoded into a usable radiograph."""


class ImageTooLargeError(ImageReadError):
    """An image declares more pixels (frames x rows x columns) than the limit: refused before it is decoded."""


class DataValidationError(ValueError):
    """The labels, split or image folder are not usable; ``problems`` lists every one found."""

    def __init__(self, source: str, problems: Sequence[str]):
        self.source = source
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{source}: {len(self.problems)} problem(s)\n{shown}{more}")
