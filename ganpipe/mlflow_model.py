"""The registered generator, as MLflow "models from code".

MLflow stores this file as the model's code and the package `ganpipe/networks` beside it as
`ganpipe_generator.networks` (versions registered before it was a package carry a single
`ganpipe_generator/networks.py`, and their own copy of this file); the weights travel as
safetensors. Loading therefore needs `mlflow`, `torch` and `safetensors`, never ganpipe, and
unpickles nothing.

Input: a DataFrame with one row per sample: `seed` (int) and, for conditional models, `label`
(int). Optional params: `truncation` (float > 0: latent values beyond it are redrawn from the
same seed). Output: uint8 N x H x W x C images, or float N x D vectors in data units.
Same rows, same output.

Super-resolution generators (spec.image_to_image) take a DataFrame with a column `image`: encoded
PNG or JPEG (any format PIL reads) bytes, or a Hugging Face image struct {"bytes": ...}, one
image of any size per row. Optional param `tile` (input pixels per tile side). Output: a list with
one uint8 H*scale x W*scale x K array per row, K the input's channels (ganpipe_generator.networks.
upscale: greyscale stays greyscale, alpha is upscaled bicubically and kept). Large images run in
overlapping tiles with bounded memory. An image that cannot be decoded or processed is a
ValueError naming its row. Decoding needs Pillow, which registered super-resolution models list.
"""

from __future__ import annotations

import importlib
import io
import json
import sys
from types import ModuleType

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel
from safetensors.torch import load_file


def own_module(name: str) -> ModuleType:
    """This model's shipped `ganpipe_generator` module `name`. MLflow puts each loaded model's
    code folder first on sys.path, but Python imports a package once per process: a process that
    already loaded another version (other code, or the single-module layout of older versions)
    would hand this model that version's modules. So forget them and import ours now; each model
    keeps the module objects it loaded, and versions of any age serve side by side."""
    for loaded in [m for m in sys.modules if m.split(".")[0] == "ganpipe_generator"]:
        del sys.modules[loaded]
    return importlib.import_module(name)


class GeneratorModel(PythonModel):
    def load_context(self, context) -> None:
        self.networks = own_module("ganpipe_generator.networks")
        with open(context.artifacts["spec"]) as f:
            self.spec = self.networks.NetworkSpec.from_json(json.load(f))
        self.generator = self.networks.build_generator(self.spec)
        self.generator.load_state_dict(load_file(context.artifacts["weights"]))
        self.generator.eval()
        # Imported now, beside the package it belongs to (another model may load in between).
        self.upscale = importlib.import_module("ganpipe_generator.networks.upscale") \
            if self.spec.image_to_image else None

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        if self.upscale is not None:
            return self.super_resolve(model_input, params)
        if "seed" not in model_input.columns:
            raise ValueError("input needs a 'seed' column (one row per sample)")
        seeds = [int(s) for s in model_input["seed"]]
        labels = None
        if self.spec.conditional:
            if "label" not in model_input.columns:
                raise ValueError(f"conditional model: input needs a 'label' column (0..{self.spec.num_classes - 1})")
            labels = [int(v) for v in model_input["label"]]
            bad = [v for v in labels if not 0 <= v < self.spec.num_classes]
            if bad:
                raise ValueError(f"labels {bad[:5]} outside 0..{self.spec.num_classes - 1}")
        truncation = float((params or {}).get("truncation") or 0.0)
        if truncation < 0 or not np.isfinite(truncation):
            raise ValueError(f"params.truncation must be a positive number (or 0: off), got {truncation}")
        if not seeds:  # keep the output's shape and dtype for an empty request
            shape = (0, *self.spec.sample_shape[1:], self.spec.sample_shape[0]) if self.spec.is_image \
                else (0, *self.spec.sample_shape)
            return np.zeros(shape, np.uint8 if self.spec.is_image else np.float32)
        with torch.inference_mode():
            out = self.networks.generate(self.generator, self.spec, seeds, labels, truncation=truncation or None)
        return out.numpy()

    def super_resolve(self, model_input: pd.DataFrame, params: dict | None) -> list[np.ndarray]:
        from PIL import Image

        upscale = self.upscale
        if "image" not in model_input.columns:
            raise ValueError("input needs an 'image' column: encoded PNG or JPEG bytes, one image per row")
        tile = int((params or {}).get("tile") or upscale.DEFAULT_TILE)
        if tile < 1:
            raise ValueError(f"params.tile must be a positive number of pixels, got {tile}")
        outputs = []
        for row, value in enumerate(model_input["image"]):
            try:
                data = value.get("bytes") if isinstance(value, dict) else value
                if not isinstance(data, (bytes, bytearray, memoryview)):
                    raise TypeError(f"expected encoded image bytes, got {type(data).__name__}")
                with Image.open(io.BytesIO(bytes(data))) as image:
                    array = upscale.image_array(image)
                with torch.inference_mode():
                    outputs.append(upscale.super_resolve_image(self.generator, self.spec, array, tile))
            except Exception as exc:  # noqa: BLE001 - any failure is reported with the row it belongs to
                raise ValueError(f"row {row}: cannot super-resolve this image ({type(exc).__name__}: "
                                 f"{str(exc)[:300]})") from None
        return outputs


mlflow.models.set_model(GeneratorModel())
