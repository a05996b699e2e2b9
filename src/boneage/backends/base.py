"""The predictor interface every backend implements, and the one prediction loop they share.

A backend turns a file into a model input (:meth:`Predictor.preprocess`) and a batch of inputs into ages, stages and
refusal scores (:meth:`Predictor.predict_batch`, NumPy in and out); :meth:`Predictor.predict_files` does the rest the
same way for all: decoding in worker threads while the previous batch runs, error rows for unreadable files or an
unknown sex, and each row filled by :func:`boneage.rows.finish_row`. So both backends give the same CSV.
"""

from __future__ import annotations

import abc
import importlib.util
import logging
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from boneage.config import DataConfig
from boneage.errors import ImageReadError
from boneage.model_folder import PLAIN_VIEW
from boneage.rows import finish_row, new_row, row_checks

logger = logging.getLogger(__name__)

# Images per forward pass when predicting files. Small batches are as fast on a CPU (onnxruntime) or faster (PyTorch)
# and hold a fraction of the activations: with the shipped model, batch 4 vs 32 measured 1.07x / 1.50x the images/s at
# 440 / 956 MiB instead of 1,958 / 1,535 MiB peak RSS (onnxruntime / PyTorch; bench/bench_batch.py, BENCHMARKS.md).
PREDICT_BATCH_SIZE = 4


def importable(name: str) -> bool:
    """Whether a module can be imported, checked without importing it (PyTorch takes seconds); a module blocked in
    ``sys.modules`` (set to None) is not."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class Predictor(abc.ABC):
    """A loaded model on one runtime, with its folder's description and data contract.

    Attributes:
        model_dir: the model folder, or the ``.onnx`` file it was loaded from.
        description: the folder's ``config.json`` (an exported file's copy of it).
        contract: the data contract (input size, channels, normalisation).
        task: ``regression`` or ``classification``.
        threshold: the refusal score's limit, or None when the model has no refusal check.
        presentation: the inverted/turned checks (:func:`boneage.model_folder.presentation_checks`) or None.
        tta_hflip: average each prediction with that of the mirrored image.
        tta_views: the (degrees, zoom) views averaged (:func:`boneage.model_folder.tta_views`); ``[(0.0, 1.0)]``
            reads the image as it is.
    """

    model_dir: Path
    description: dict[str, Any]
    contract: DataConfig
    task: str
    threshold: float | None
    presentation: dict[str, Any] | None
    tta_hflip: bool
    tta_views: list[tuple[float, float]]

    @property
    def half_width(self) -> float | None:
        """The calibrated prediction-interval half-width (months), if the model carries one."""
        value = self.description.get("uncertainty", {}).get("half_width_months")
        return float(value) if value is not None else None

    @abc.abstractmethod
    def preprocess(self, path: str | Path) -> np.ndarray:
        """File -> (C, S, S) float32 model input.

        Raises:
            ImageReadError: the file cannot be read as a radiograph.
        """

    def _view_outputs(
        self,
        images: Any,
        plain: Any,
        run: Callable[[Any], Any],
        view: Callable[[Any, float, float], Any],
        mirror: Callable[[Any], Any],
    ) -> list[Any]:
        """The outputs to average, one per test-time view (each averaged with its mirror when ``tta_hflip``), on
        either backend's arrays: ``run`` maps inputs to outputs, ``view(images, degrees, zoom)`` makes a view,
        ``mirror`` flips inputs left to right, and ``plain`` is the output for the images as they are when it was
        computed with their refusal score (else None)."""
        outputs = []
        for angle, zoom in self.tta_views:
            if (angle, zoom) == PLAIN_VIEW and plain is not None:
                inputs, output = images, plain
            else:
                inputs = view(images, angle, zoom)
                output = run(inputs)
            if self.tta_hflip:
                output = 0.5 * (output + run(mirror(inputs)))
            outputs.append(output)
        return outputs

    @abc.abstractmethod
    def predict_batch(self, images: np.ndarray, male: np.ndarray) -> dict[str, np.ndarray | None]:
        """(B, C, S, S) model inputs and (B,) sex (1 = male) -> ``months`` (NaN for a classifier), ``stage``,
        ``score`` (None without a refusal check) and, with the presentation checks, ``inverted``, ``inverse_score``,
        ``turns`` and ``turned_score`` (:func:`boneage.presentation.check`); all NumPy."""

    def _load(self, path: Path) -> tuple[np.ndarray | None, str | None]:
        """One file's model input, or the message of its error row: whatever goes wrong with one file stays that
        file's problem, and the batch goes on."""
        try:
            return self.preprocess(path), None
        except (ImageReadError, ImportError) as err:
            return None, str(err)
        except Exception as err:  # a decoder's own failure: the row names the file, the log keeps the type
            logger.debug("%s: %s while reading", path, type(err).__name__)
            return None, f"{path}: cannot be read as an image ({err or 'unknown failure'})"

    def predict_files(
        self,
        paths: list[Path],
        sexes: list[bool | None],
        batch_size: int = PREDICT_BATCH_SIZE,
        num_workers: int | None = None,
        progress: bool = False,
        ages: list[float | None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield one result row per path, in order; unreadable files and unknown sex give an error row.

        The next batch is decoded in ``num_workers`` threads (default: 2 from 16 files on) while this one runs, so at
        most two batches of images are in memory. With a chronological age for a file (``ages``), its row also
        carries BA - CA, the SDS and the call (:func:`boneage.clinical.compare_ages`).
        """
        from tqdm.auto import tqdm

        workers = num_workers if num_workers is not None else (0 if len(paths) < 16 else 2)
        batches = [list(range(i, min(i + batch_size, len(paths)))) for i in range(0, len(paths), batch_size)]
        pool = ThreadPoolExecutor(workers) if workers > 0 else None

        def submit(batch: list[int]) -> list[Future] | None:
            return [pool.submit(self._load, paths[i]) for i in batch] if pool else None

        pending = submit(batches[0]) if batches else None
        try:
            with tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress or len(paths) < 10) as bar:
                for k, batch in enumerate(batches):
                    loaded = [f.result() for f in pending] if pending else [self._load(paths[i]) for i in batch]
                    pending = submit(batches[k + 1]) if pool and k + 1 < len(batches) else None
                    rows = {i: new_row(paths[i], sexes[i], error) for i, (_, error) in zip(batch, loaded)}
                    ready = [(i, image) for i, (image, _) in zip(batch, loaded) if "status" not in rows[i]]
                    if ready:
                        images = np.stack([image for _, image in ready])
                        male = np.asarray([int(bool(sexes[i])) for i, _ in ready], dtype=np.int64)
                        result = self.predict_batch(images, male)
                        for j, (i, _) in enumerate(ready):
                            finish_row(
                                rows[i],
                                float(result["months"][j]),
                                int(result["stage"][j]),
                                threshold=self.threshold,
                                half_width=self.half_width,
                                chronological_age=ages[i] if ages is not None else None,
                                **row_checks(result, j),
                            )
                    yield from (rows[i] for i in batch)
                    bar.update(len(batch))
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)
