"""The seed's XGBoost ensemble on CNN features, without its leaks.

Protocol (written into ``ensemble.json``):

1. XGBoost is fit on the CNN's features (pooled backbone features + sex embedding) of the **train** split.
2. The validation split is cut in two halves, stratified by stage x sex: the blend weight
   ``w * CNN + (1 - w) * XGBoost`` is chosen on the **calibration** half only.
3. Every number reported as a result (CNN alone, XGBoost alone, the fitted blend and the seed's fixed 0.7/0.3
   blend) is measured on the other, **evaluation** half, which the ensemble used neither for fitting nor for
   selection. The CNN's own best epoch was chosen on the whole val split, so every number here is still a
   validation figure; only the withheld holdout gives a test result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from boneage.backends.torch import TorchPredictor
from boneage.dataset import BoneAgeDataset
from boneage.explain import extract_features
from boneage.labels import make_split, read_labels, read_split

SEED_WEIGHT = 0.7  # the seed's hand-fixed CNN weight


def _mae(truth: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.abs(predicted - truth).mean())


def fit_blend_weight(truth: np.ndarray, cnn: np.ndarray, xgb: np.ndarray, grid: int = 101) -> float:
    """The CNN weight in [0, 1] (steps of 1/(grid-1)) that minimises MAE of ``w*cnn + (1-w)*xgb``."""
    weights = np.linspace(0.0, 1.0, grid)
    errors = [_mae(truth, w * cnn + (1 - w) * xgb) for w in weights]
    return float(weights[int(np.argmin(errors))])


def _features(predictor: TorchPredictor, table: pd.DataFrame, batch_size: int, workers: int) -> tuple[np.ndarray, ...]:
    loader = DataLoader(BoneAgeDataset(table, predictor.contract), batch_size=batch_size, num_workers=workers)
    return extract_features(predictor.model, loader, with_output=True)  # the CNN's own prediction from the same pass


def fit_ensemble(
    labels: str | Path,
    images: str | Path,
    split: str | Path,
    output: str | Path,
    model_dir: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 2,
    xgb_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit XGBoost on train features, the blend weight on half of val, and score on the other half.

    Writes ``xgboost.json`` (the booster) and ``ensemble.json`` (weight, protocol, metrics) to ``output``.
    """
    try:
        from xgboost import XGBRegressor
    except ImportError as err:
        raise ImportError("the XGBoost ensemble needs xgboost: pip install 'boneage[ensemble]'") from err

    predictor = TorchPredictor.load(model_dir)
    if predictor.task != "regression":
        raise ValueError("the XGBoost ensemble blends bone-age regressions; this model is a stage classifier")
    table = read_labels(labels, images)
    table = table.merge(read_split(split, table), on="id")
    train = table[table["split"] == "train"].reset_index(drop=True)
    val = table[table["split"] == "val"].reset_index(drop=True)
    halves = make_split(val, fractions=(0.5, 0.5, 0.0), seed=seed)  # "train" = calibration, "val" = evaluation
    calibration = val[halves["split"].to_numpy() == "train"].reset_index(drop=True)
    evaluation = val[halves["split"].to_numpy() == "val"].reset_index(drop=True)

    train_x, train_y, _, train_cnn = _features(predictor, train, batch_size, num_workers)
    params = {
        "n_estimators": 400,
        "max_depth": 4,
        "learning_rate": 0.05,
        "subsample": 0.8,
        "colsample_bytree": 0.5,
        "random_state": seed,
        "n_jobs": 2,
    }
    params.update(xgb_params or {})
    booster = XGBRegressor(**params).fit(train_x, train_y)

    parts = {}
    for name, part in (("calibration", calibration), ("evaluation", evaluation)):
        x, y, male, cnn = _features(predictor, part, batch_size, num_workers)
        parts[name] = {"y": y, "male": male, "cnn": cnn, "xgb": booster.predict(x)}
    cal = parts["calibration"]
    weight = fit_blend_weight(cal["y"], cal["cnn"], cal["xgb"])
    ev = parts["evaluation"]
    results = {
        "cnn": _mae(ev["y"], ev["cnn"]),
        "xgboost": _mae(ev["y"], ev["xgb"]),
        f"blend_fitted_w{weight:.2f}": _mae(ev["y"], weight * ev["cnn"] + (1 - weight) * ev["xgb"]),
        "blend_seed_w0.70": _mae(ev["y"], SEED_WEIGHT * ev["cnn"] + (1 - SEED_WEIGHT) * ev["xgb"]),
    }
    summary = {
        "protocol": __doc__.split("Protocol (written into ``ensemble.json``):")[1].strip(),
        "model": str(predictor.model_dir),
        "cnn_weight": weight,
        "n_train": len(train),
        "n_calibration": len(calibration),
        "n_evaluation": len(evaluation),
        "train_mae_cnn_in_sample": _mae(train_y, train_cnn),
        "calibration_mae": {"cnn": _mae(cal["y"], cal["cnn"]), "xgboost": _mae(cal["y"], cal["xgb"])},
        "evaluation_mae_months": results,
        "xgboost_params": params,
    }
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    booster.save_model(output / "xgboost.json")
    (output / "ensemble.json").write_text(json.dumps(summary, indent=2))
    pd.DataFrame({"y": ev["y"], "male": ev["male"], "cnn": ev["cnn"], "xgboost": ev["xgb"]}).to_csv(
        output / "evaluation_half_predictions.csv", index=False
    )
    return summary
