"""Paddle is the user's choice: the parts that do not need it import without it, the others say how to get it.

A subprocess hides paddle (a ``sys.meta_path`` finder that refuses ``paddle`` and its submodules), as on a machine
where neither the paddlepaddle nor the paddlepaddle-gpu wheel is installed.
"""
import json
import subprocess
import sys
import textwrap

from tests.support.procs import REPO_ROOT

BLOCKER = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoPaddle(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "paddle" or name.startswith("paddle."):
                raise ImportError(f"No module named {name!r} (hidden by the test)")
            return None

    sys.meta_path.insert(0, NoPaddle())
""")

PADDLE_FREE = ["distill_reader", "distill_reader.distill_reader", "distill_reader.client", "distill_reader.pipeline",
               "distill_reader.teacher_pool", "distill_reader.workers", "distill_reader.worker_process",
               "distill_reader.worker_messages", "distill_reader.memfd", "distill_reader.offline_cache",
               "distill_reader.knowledge", "distill_base.serving_config", "distill_base.tensor_codec",
               "distill_reader.pantheon", "distill_reader.pantheon.student", "distill_reader.pantheon.knowledge_files",
               "discovery", "discovery.arguments", "discovery.reconciler", "discovery.student", "discovery.share",
               "discovery.register",
               "discovery.teacher_registration", "teachers.export", "teachers.predictor_pool", "teachers.serve"]


def _run(body: str) -> dict:
    code = BLOCKER + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_reader_client_knowledge_discovery_and_pantheon_student_import_without_paddle():
    result = _run(f"""
        import importlib
        for name in {PADDLE_FREE!r}:
            importlib.import_module(name)
        from distill_reader import DistillReader
        from distill_reader.pantheon import Student
        print(json.dumps({{"paddle_loaded": sorted(m for m in sys.modules if m.split(".")[0] == "paddle"),
                          "reader": DistillReader.__name__, "student": Student.__name__}}))
    """)
    assert result == {"paddle_loaded": [], "reader": "DistillReader", "student": "Student"}


def test_parts_needing_paddle_raise_an_import_error_naming_both_extras():
    result = _run("""
        errors = {}
        def attempt(label, fn):
            try:
                fn()
                errors[label] = None
            except ImportError as exc:
                errors[label] = str(exc)
        attempt("dist", lambda: __import__("distill_reader.dist"))
        from teachers.export import inference_model_to_serving
        attempt("export", lambda: inference_model_to_serving("some_model_dir"))
        from teachers.predictor_pool import PredictorOptions, PredictorPool
        attempt("predictors", lambda: PredictorPool(PredictorOptions(model_dir="serving_server")))
        from teachers.serve import main
        attempt("serve", lambda: main(["--model", "serving_server"]))
        print(json.dumps(errors))
    """)
    assert set(result) == {"dist", "export", "predictors", "serve"}
    for label, message in result.items():
        assert message is not None, f"{label} did not raise ImportError"
        assert "needs PaddlePaddle" in message, message
        assert "distill-reader[cpu]" in message and "distill-reader[gpu]" in message, message
        assert "paddlepaddle-gpu" in message, message
