"""``distill_reader.dist``: PaddleSlim's name for in-process distillation, kept for its users.

The code lives in ``distill_reader.inprocess``: a folder named ``dist/`` is what setuptools, wheel and most
``.gitignore`` files take for build output. This module only re-exports ``distill_reader.inprocess``'s public names,
so that PaddleSlim-style code keeps working unchanged.

Example::

    from distill_reader import dist                        # as ``from paddleslim import dist``
    dist.merge(teacher_program, student_program, {"y": "x"}, paddle.CPUPlace())
    loss = dist.functional.kl_div_loss(student_logits, teacher_logits, temperature=4.0)
"""
from .inprocess import *  # noqa: F403 - the alias re-exports every public name
from .inprocess import __all__  # noqa: F401
