"""What a predictor run can fail with, and which ``err_no`` each failure becomes (``teachers.inference``).

- ``PredictorTimeout`` (6000): no predictor answered within ``--predict_timeout``; ``WorkerTimeout`` is the kind
  where the run itself took too long and its worker process was killed (and is replaced).
- ``WorkerLost`` (10000, transient): the worker process died (a signal, an exit) while it held the request.
- ``ModelRejectedInput`` (5000): the model refused this request's input (an id past an embedding, a shape its
  operators cannot take); the message names the feeds and quotes Paddle.
- ``WorkerLoadError``: a worker could not load the model (start-up fails with it, in one line).

Example::

    try:
        outputs = pool.run(feeds, fetch)
    except ModelRejectedInput as exc:
        answer = error_response(5000, str(exc))
"""
from __future__ import annotations


class PredictorTimeout(TimeoutError):
    """No predictor became free (or answered) within the time allowed (``--predict_timeout``)."""


class WorkerTimeout(PredictorTimeout):
    """A run took longer than ``--predict_timeout``: its worker process was killed and is being replaced."""


class WorkerLost(RuntimeError):
    """The predictor worker process died while it held the request (transient: another run may succeed)."""


class ModelRejectedInput(ValueError):
    """The model refused the request's input; the request's fault, not the server's."""


class WorkerLoadError(RuntimeError):
    """A predictor worker process could not load the model; the message is one line saying why."""


# Whole-batch failures: re-running the requests of a merged batch one by one would not tell them apart.
BATCH_FAILURES = (PredictorTimeout, WorkerLost)
