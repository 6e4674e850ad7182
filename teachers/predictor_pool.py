"""A pool of Paddle Inference predictors for one serving model folder (one predictor per serving thread).

Predictors are not thread-safe; ``run`` borrows one for the duration of a call. oneDNN on CPU, the GPU only
when asked for and paddle is compiled with CUDA.

Example::

    pool = PredictorPool(PredictorOptions(model_dir="serving_server", size=2))
    out = pool.run({"img": images}, ["save_infer_model/scale_0.tmp_1"])   # {name: array}
"""
from __future__ import annotations

import glob
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from .errors import PredictorTimeout
from .lod_checks import fetch_lod

__all__ = ["ModelFilesError", "PredictorOptions", "PredictorPool", "PredictorTimeout", "find_model_files"]

logger = logging.getLogger(__name__)


class ModelFilesError(ValueError):
    """The serving folder holds no inference model this pool can load."""


@dataclass
class PredictorOptions:
    """How to build the predictors. ``gpu_ids`` empty means CPU."""

    model_dir: str
    size: int = 1
    gpu_ids: list[int] = field(default_factory=list)
    use_mkl: bool = True
    ir_optim: bool = True
    mem_optim: bool = True
    math_threads: int = 1
    precision: str = "fp32"
    gpu_mem_mb: int = 256
    quiet: bool = True   # False: Paddle's glog INFO lines (e.g. "--- Running IR pass [name]") reach stderr


# Paddle 3 (PIR) models are ``model.json`` + ``params.pdiparams`` in a serving folder (teachers.export writes them).
_KNOWN_LAYOUTS = (("model.pdmodel", "params.pdiparams"), ("model.json", "params.pdiparams"),
                  ("__model__", "__params__"))


def find_model_files(model_dir: str) -> tuple[str, Optional[str]]:
    """(model file, params file or None for one file per parameter) inside a serving folder.

    Looked for in this order: ``model.pdmodel`` (legacy program) or ``model.json`` (paddle 3 PIR program) with
    ``params.pdiparams``; ``__model__`` (+ ``__params__``); one ``*.pdmodel`` or one ``*.json`` with its
    ``*.pdiparams``. Raises ModelFilesError naming the folder when none is there.

    Raises:
        ModelFilesError: no inference model in ``model_dir``.
    """
    for model, params in _KNOWN_LAYOUTS:
        if os.path.exists(os.path.join(model_dir, model)):
            params_path = os.path.join(model_dir, params)
            return os.path.join(model_dir, model), params_path if os.path.exists(params_path) else None
    for pattern in ("*.pdmodel", "*.json"):
        models = sorted(glob.glob(os.path.join(model_dir, pattern)))
        if len(models) != 1:
            continue
        params = os.path.splitext(models[0])[0] + ".pdiparams"
        others = glob.glob(os.path.join(model_dir, "*.pdiparams"))
        if not os.path.exists(params) and len(others) == 1:
            params = others[0]
        if os.path.exists(params):
            return models[0], params
    raise ModelFilesError(f"no inference model in {model_dir!r}: expected model.pdmodel or model.json (paddle 3) "
                          f"+ params.pdiparams, __model__ (+ __params__), or one *.pdmodel / *.json with its "
                          f"*.pdiparams")


def _cpu_options(config, options: PredictorOptions) -> None:
    """oneDNN and threads; paddle 3 renamed the oneDNN switches to ``enable_onednn*`` (2.6 has ``enable_mkldnn*``)."""
    config.disable_gpu()
    if options.use_mkl:
        (getattr(config, "enable_onednn", None) or config.enable_mkldnn)()
        if options.precision == "bf16":
            (getattr(config, "enable_onednn_bfloat16", None) or config.enable_mkldnn_bfloat16)()
    config.set_cpu_math_library_num_threads(options.math_threads)


def _config(options: PredictorOptions, gpu_id: Optional[int]):
    from distill_base.paddle_compat import import_paddle, paddle_major

    paddle = import_paddle("the teacher server's predictors")
    from paddle import inference

    model_file, params_file = find_model_files(options.model_dir)
    pir_model = model_file.endswith(".json")
    if pir_model and paddle_major(paddle) < 3:
        raise ModelFilesError(f"{model_file} is a paddle 3 (PIR) model; paddle {paddle.__version__} cannot load it "
                              f"(install paddle 3, or export the model from a legacy .pdmodel program)")
    if params_file and os.path.getsize(params_file) > 0:
        config = inference.Config(model_file, params_file)
    elif os.path.basename(model_file) == "__model__":
        config = inference.Config(options.model_dir)  # one file per parameter
    else:
        config = inference.Config()  # a model without parameters
        config.set_prog_file(model_file)
    if gpu_id is not None:
        config.enable_use_gpu(options.gpu_mem_mb, gpu_id)
    else:
        _cpu_options(config, options)
    config.switch_ir_optim(options.ir_optim)
    if options.mem_optim and pir_model:
        # Paddle Inference 3.x fails to create a PIR-model predictor with memory optimization on
        # ("Not find predictor_id 0 and pass_name memory_optimize_pass"); PIR plans memory itself.
        logger.debug("memory optimization is not available for PIR model %s; left off", model_file)
    elif options.mem_optim:
        config.enable_memory_optim()
    if options.quiet:
        config.disable_glog_info()
    return config


class PredictorPool:
    """``size`` predictors sharing one model; ``run`` is thread-safe and waits (up to ``timeout``) while all
    are busy. ``oldest_run_seconds()`` tells a watchdog how long the longest run in progress has taken."""

    def __init__(self, options: PredictorOptions):
        from distill_base.paddle_compat import import_paddle

        import_paddle("teachers.predictor_pool")
        from paddle import inference

        self.options = options
        self._idle: queue.SimpleQueue = queue.SimpleQueue()   # C-implemented: cheaper than queue.Queue per run
        gpu_ids = options.gpu_ids or [None]
        first_by_device: dict = {}
        self._handles: dict[int, tuple[dict, dict]] = {}
        for i in range(max(1, options.size)):
            gpu_id = gpu_ids[i % len(gpu_ids)]
            if gpu_id in first_by_device:
                predictor = first_by_device[gpu_id].clone()  # shares the weights, quick
            else:
                predictor = inference.create_predictor(_config(options, gpu_id))
                first_by_device[gpu_id] = predictor
            self._idle.put(predictor)
            self._handles[id(predictor)] = ({}, {})   # input / output handles by name, made once (they stay valid)
        probe = next(iter(first_by_device.values()))
        self.input_names: list[str] = list(probe.get_input_names())
        self.output_names: list[str] = list(probe.get_output_names())
        self.size = max(1, options.size)
        self._runs: dict[int, float] = {}   # id of a run in progress -> its monotonic start
        self._runs_lock = threading.Lock()

    def oldest_run_seconds(self) -> float:
        """Seconds the longest predictor run in progress has taken so far (0 when none runs)."""
        with self._runs_lock:
            starts = list(self._runs.values())
        return time.monotonic() - min(starts) if starts else 0.0

    def run(self, feeds: Mapping[str, np.ndarray], fetch_names: Sequence[str],
            lods: Optional[Mapping[str, list]] = None, timeout: Optional[float] = 60.0
            ) -> dict[str, tuple[np.ndarray, list]]:
        """Run one batch; returns {fetch name: (array, lod)} (lod empty when the output has none).

        Raises PredictorTimeout when no predictor is free within ``timeout`` seconds (None: wait forever).

        Raises:
            PredictorTimeout: no predictor free within ``timeout`` seconds.
        """
        try:
            predictor = self._idle.get(timeout=timeout)
        except queue.Empty:
            raise PredictorTimeout(f"no predictor free within {timeout:g}s (all {self.size} busy)") from None
        token = object()
        with self._runs_lock:
            self._runs[id(token)] = time.monotonic()
        try:
            inputs, outputs = self._handles[id(predictor)]
            for name, array in feeds.items():
                handle = inputs.get(name) or inputs.setdefault(name, predictor.get_input_handle(name))
                handle.reshape(list(array.shape))
                handle.copy_from_cpu(np.ascontiguousarray(array))
                if lods and lods.get(name):
                    handle.set_lod([list(lods[name])])
            predictor.run()
            result = {}
            for name in fetch_names:
                handle = outputs.get(name) or outputs.setdefault(name, predictor.get_output_handle(name))
                array = handle.copy_to_cpu()
                result[name] = (array, fetch_lod(handle.lod(), array.shape[0] if array.ndim else 0, name))
            return result
        finally:
            with self._runs_lock:
                self._runs.pop(id(token), None)
            self._idle.put(predictor)
