"""Files: safe loading and atomic saving of models (:mod:`.files`), ONNX / TorchScript export
checked against PyTorch (:mod:`.export`)."""
