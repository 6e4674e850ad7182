"""Pantheon-compatible multi-process distillation: ``Teacher`` and ``Student`` with the API of PaddleSlim's Pantheon.

Teachers run in their own processes and send knowledge to the student online (authenticated TCP, JSON headers and
raw numpy buffers, no pickle) or offline (the project's knowledge files); the student merges the knowledge of
several teachers (``sum`` / ``mean`` for shared keys) and re-batches it to its own batch size.

Example::

    from distill_reader.pantheon import Student, Teacher

    student = Student(merge_strategy={"result": "mean"})     # token from $DISTILL_PANTHEON_TOKEN
    student.register_teacher(in_address="127.0.0.1:8080")
    student.register_teacher(in_path="teacher2_knowledge")
    student.start()
    for batch in student.get_knowledge_generator(batch_size=32)():
        ...
"""
from .knowledge_merge import KnowledgeMismatch
from .student import Student, TeacherDisconnected
from .teacher import StudentDisconnected, Teacher
from .transport import AuthenticationError, ConnectionLost, ForkedConnectionError, PantheonError, ProtocolError

__all__ = [
    "AuthenticationError",
    "ConnectionLost",
    "ForkedConnectionError",
    "KnowledgeMismatch",
    "PantheonError",
    "ProtocolError",
    "Student",
    "StudentDisconnected",
    "Teacher",
    "TeacherDisconnected",
]
