"""distill-reader: service-based knowledge distillation for PaddlePaddle.

``DistillReader`` wraps a student's data generator and appends the predictions of remote teachers
(Paddle Serving endpoints) to every sample. ``distill_reader.inprocess`` holds in-process distillation
(program merge and distillation losses), also importable under PaddleSlim's name ``distill_reader.dist``.

Example::

    from distill_reader import DistillReader
    dr = DistillReader(ins=["img", "label"], predicts=["prediction"])
    dr.set_fixed_teacher("127.0.0.1:9292")
    train_reader = dr.set_sample_list_generator(train_reader)
"""
# numpy must be imported before paddle (paddle 2.6.2's libpaddle.so exports zlib symbols, see README).
import numpy  # noqa: F401

__version__ = "0.1.0"

# Public names -> the module that holds them (relative: in this package; dotted: in distill_base, the ground the
# teacher server shares, re-exported here so that `from distill_reader import ServingConfig` goes on working);
# imported lazily, so that `import distill_reader.client` does not
# import the reader's machinery (nor the reader the client's gRPC stack before it is needed).
_EXPORTS = {
    **dict.fromkeys(("DistillReader", "DistillReaderError", "AllTeachersDownError", "TeacherAnswerInvalid",
                     "TeacherRequestRefused", "TeacherAuthRefused", "ReaderClosedError"), "distill_reader"),
    **dict.fromkeys(("TeacherClient", "TeacherError", "TeacherUnavailable", "TeacherAnswerError", "TeacherAuthError",
                     "TeacherTlsError", "TeacherRequestRejected"), "client"),
    "FeedError": "feeds",
    "ClientSecurity": "distill_base.client_security",
    "PaddingOptionError": "padding",
    **dict.fromkeys(("ServingConfig", "ConfigError"), "distill_base.serving_config"),
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    import importlib

    if name in _EXPORTS:
        module = _EXPORTS[name]
        return getattr(importlib.import_module(module if "." in module else f".{module}", __name__), name)
    if name in ("dist", "inprocess"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'distill_reader' has no attribute {name!r}")
