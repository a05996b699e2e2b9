"""Runtimes behind one interface (:class:`boneage.backends.base.Predictor`): onnxruntime (:mod:`.onnx`, no PyTorch
needed) and PyTorch (:mod:`.torch`). :func:`boneage.predict.load_predictor` picks one for a model."""
