"""distill-reader: service-based knowledge distillation for PaddlePaddle.

``DistillReader`` wraps a student's data generator and appends the predictions of remote teachers
(Paddle Serving endpoints) to every sample. ``distill_reader.dist`` holds in-process distillation
(program merge and distillation losses).

Example::

    from distill_reader import DistillReader
    dr = DistillReader(ins=["img", "label"], predicts=["prediction"])
    dr.set_fixed_teacher("127.0.0.1:9292")
    train_reader = dr.set_sample_list_generator(train_reader)
"""
# numpy must be imported before paddle (paddle 2.6.2's libpaddle.so exports zlib symbols, see README).
import numpy  # noqa: F401

__version__ = "0.1.0"

_READER_NAMES = ("DistillReader", "DistillReaderError", "AllTeachersDownError", "TeacherAnswerInvalid",
                 "TeacherRequestRefused", "TeacherAuthRefused", "ReaderClosedError")
__all__ = [*_READER_NAMES, "__version__"]


def __getattr__(name):
    # Lazy, so that `import distill_reader.client` does not import the reader's machinery.
    if name in _READER_NAMES:
        from . import reader

        return getattr(reader, name)
    if name == "dist":
        import importlib

        return importlib.import_module(".dist", __name__)
    raise AttributeError(f"module 'distill_reader' has no attribute {name!r}")
