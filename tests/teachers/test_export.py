"""teachers.export: Paddle Serving folder layout from every save route, configs, CLI, errors."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

from distill_base.paddle_compat import keep_mode, legacy_ir, paddle_major, pir_enabled
from distill_base.proto import general_model_config_pb2 as config_pb2
from distill_base.serving_config import ServingConfig
from teachers.export import ExportError, inference_model_to_serving, main, save_model
from teachers.predictor_pool import PredictorOptions, PredictorPool
from tests.support.procs import REPO_ROOT
from tests.support.teacher import (
    build_mnist_cnn,
    mnist_like_images,
    reference_predict,
    save_jit_model,
    save_static_model,
)


def paddle_module():
    import paddle

    return paddle


def _predict_dir(model_dir: str, images: np.ndarray) -> np.ndarray:
    pool = PredictorPool(PredictorOptions(model_dir=model_dir, size=1))
    return pool.run({pool.input_names[0]: images}, pool.output_names[:1])[pool.output_names[0]][0]


def _source_predict(path_prefix: str, images: np.ndarray) -> np.ndarray:
    from paddle import inference

    pir = os.path.exists(path_prefix + ".json")  # paddle 3 saves PIR programs as .json
    config = inference.Config(path_prefix + (".json" if pir else ".pdmodel"), path_prefix + ".pdiparams")
    config.disable_glog_info()
    predictor = inference.create_predictor(config)
    predictor.get_input_handle(predictor.get_input_names()[0]).copy_from_cpu(images)
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()


def _check_layout(server_dir: str, client_dir: str, model_file: str = "") -> ServingConfig:
    """The serving folders; ``model_file`` defaults to what the running paddle saves (PIR on paddle 3)."""
    model_file = model_file or ("model.json" if pir_enabled(paddle_module()) else "model.pdmodel")
    assert sorted(os.listdir(server_dir)) == sorted([model_file, "params.pdiparams", "serving_server_conf.prototxt",
                                                     "serving_server_conf.stream.prototxt"])
    assert sorted(os.listdir(client_dir)) == ["serving_client_conf.prototxt", "serving_client_conf.stream.prototxt"]
    for folder, name in ((server_dir, "serving_server_conf"), (client_dir, "serving_client_conf")):
        text = config_pb2.GeneralModelConfig()
        with open(os.path.join(folder, f"{name}.prototxt")) as f:
            text_format.Parse(f.read(), text)
        stream = config_pb2.GeneralModelConfig()
        with open(os.path.join(folder, f"{name}.stream.prototxt"), "rb") as f:
            stream.ParseFromString(f.read())
        assert text == stream
    server, client = ServingConfig.load(server_dir), ServingConfig.load(client_dir)
    assert server.feeds == client.feeds and server.fetches == client.fetches
    feed = client.feed("img")
    assert (feed.name, feed.elem_type, feed.shape, feed.is_lod_tensor) == ("img", 1, (1, 28, 28), False)
    fetch = client.fetch("prediction")
    assert (fetch.elem_type, fetch.shape, fetch.is_lod_tensor) == (1, (10,), False)
    return client


def test_static_route_layout_and_predictions(teacher_model, tmp_path):
    config = _check_layout(teacher_model.server_dir, teacher_model.client_dir)
    assert config.fetch_names == ["prediction"]
    images = mnist_like_images(8, seed=3)
    src = save_static_model(str(tmp_path / "again"))  # same seed: same weights as the fixture's source
    expected = _source_predict(os.path.join(src, "model"), images)
    got = reference_predict(teacher_model.server_dir, images)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got.shape == (8, 10)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_jit_route_layout_and_predictions(teacher_model_jit, tmp_path):
    _check_layout(teacher_model_jit.server_dir, teacher_model_jit.client_dir)
    images = mnist_like_images(4, seed=4)
    src_prefix = os.path.join(os.path.dirname(teacher_model_jit.server_dir), "jit_model", "inference")
    np.testing.assert_allclose(_predict_dir(teacher_model_jit.server_dir, images),
                               _source_predict(src_prefix, images), atol=1e-6)


def test_jit_path_prefix_and_default_aliases(teacher_model_jit, tmp_path):
    prefix = os.path.join(os.path.dirname(teacher_model_jit.server_dir), "jit_model", "inference")
    feeds, fetches = inference_model_to_serving(prefix, str(tmp_path / "s"), str(tmp_path / "c"))
    assert feeds == ["img"]
    assert len(fetches) == 1 and fetches[0] == ServingConfig.load(str(tmp_path / "c")).fetches[0].name


@pytest.mark.parametrize("combined", [True, False], ids=["__model__+__params__", "__model__+one-file-per-param"])
def test_old_layouts(tmp_path, combined):
    import paddle

    with keep_mode(paddle), legacy_ir(paddle):  # the layouts of paddle 1.x/2.x programs, also made on paddle 3
        _save_old_layout(paddle, tmp_path, combined)
    feeds, fetches = inference_model_to_serving(str(tmp_path / "old"), str(tmp_path / "s"), str(tmp_path / "c"),
                                                fetch_alias_names="prediction")
    assert (feeds, fetches) == (["img"], ["prediction"])
    _check_layout(str(tmp_path / "s"), str(tmp_path / "c"), "model.pdmodel")
    images = mnist_like_images(4, seed=6)
    np.testing.assert_allclose(_predict_dir(str(tmp_path / "s"), images),
                               _source_predict(str(tmp_path / "new" / "model"), images), atol=1e-6)


def _save_old_layout(paddle, tmp_path, combined: bool) -> None:
    main_prog, startup, img, prediction = build_mnist_cnn(seed=5)
    scope = paddle.static.Scope()
    exe = paddle.static.Executor(paddle.CPUPlace())
    old = tmp_path / "old"
    old.mkdir()
    with paddle.static.scope_guard(scope):
        exe.run(startup)
        (old / "__model__").write_bytes(paddle.static.serialize_program([img], [prediction], program=main_prog))
        if combined:
            (old / "__params__").write_bytes(
                paddle.static.serialize_persistables([img], [prediction], exe, program=main_prog))
        else:
            paddle.static.io.save_vars(exe, str(old), main_prog, predicate=paddle.static.io.is_persistable)
        paddle.static.save_inference_model(str(tmp_path / "new" / "model"), [img], [prediction], exe,
                                           program=main_prog)


def test_save_model_from_program(tmp_path):
    import paddle

    main_prog, startup, img, prediction = build_mnist_cnn(seed=0)
    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope):
        paddle.static.Executor(paddle.CPUPlace()).run(startup)
        feeds, fetches = save_model(str(tmp_path / "serving_server"), str(tmp_path / "serving_client"),
                                    {"image": img}, {"prediction": prediction}, main_prog)
    paddle.disable_static()
    assert (feeds, fetches) == (["image"], ["prediction"])
    config = ServingConfig.load(str(tmp_path / "serving_client"))
    assert config.feed("image").name == "img"
    images = mnist_like_images(3, seed=7)
    # Same seed as the session teacher_model: same weights, same answers.
    src = save_static_model(str(tmp_path / "src"))
    np.testing.assert_allclose(_predict_dir(str(tmp_path / "serving_server"), images),
                               _source_predict(os.path.join(src, "model"), images), atol=1e-6)


def test_cli_help_and_convert(teacher_model, tmp_path):
    helped = subprocess.run([sys.executable, "-m", "teachers.export", "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0
    for flag in ("--dirname", "--serving_server", "--serving_client", "--model_filename", "--params_filename",
                 "--fetch_alias_names"):
        assert flag in helped.stdout
    src = os.path.join(os.path.dirname(teacher_model.server_dir), "inference_model")
    model_file = next(n for n in os.listdir(src) if n.startswith("model.") and n != "model.pdiparams")
    assert main(["--dirname", src, "--serving_server", str(tmp_path / "s"), "--serving_client", str(tmp_path / "c"),
                 "--model_filename", model_file, "--params_filename", "model.pdiparams",
                 "--fetch_alias_names", "prediction"]) == 0
    assert ServingConfig.load(str(tmp_path / "c")).fetch_names == ["prediction"]
    assert main(["--dirname", str(tmp_path / "nowhere")]) == 2


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ExportError, match="nowhere"):
        inference_model_to_serving(str(tmp_path / "nowhere"), str(tmp_path / "s"), str(tmp_path / "c"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match=r"0 \*\.pdmodel"):
        inference_model_to_serving(str(empty), str(tmp_path / "s"), str(tmp_path / "c"))
    src = save_static_model(str(tmp_path / "m"))
    with pytest.raises(ExportError, match="2 fetch alias names"):
        inference_model_to_serving(src, str(tmp_path / "s"), str(tmp_path / "c"), fetch_alias_names="a,b")


def test_parameter_free_model_exports_and_missing_params_are_named(tmp_path):
    """No *.pdiparams next to the model: fine for a model without parameters; otherwise the error says what is
    missing (it said "cannot tell which *.pdiparams belongs" for none at all)."""
    import paddle

    with keep_mode(paddle), legacy_ir(paddle):
        paddle.enable_static()
        main_program, startup = paddle.static.Program(), paddle.static.Program()
        with paddle.static.program_guard(main_program, startup):
            x = paddle.static.data("x", [None, 4], "float32")
            y = paddle.nn.functional.relu(x) * 2.0
        exe = paddle.static.Executor(paddle.CPUPlace())
        exe.run(startup)
        paddle.static.save_inference_model(str(tmp_path / "free" / "model"), [x], [y], exe, program=main_program)
    assert os.listdir(tmp_path / "free") == ["model.pdmodel"]
    inference_model_to_serving(str(tmp_path / "free"), str(tmp_path / "s"), str(tmp_path / "c"))
    x_in = np.array([[-1, 2, -3, 4]], "float32")
    np.testing.assert_array_equal(_predict_dir(str(tmp_path / "s"), x_in), [[0, 4, 0, 8]])

    src = save_static_model(str(tmp_path / "cnn"))
    with_params = [n for n in os.listdir(src) if n.endswith(".pdiparams")]
    os.remove(os.path.join(src, with_params[0]))
    with pytest.raises(ExportError, match=r"no \*\.pdiparams next to it: if the model has parameters, give its "
                                          r"file as params_filename"):
        inference_model_to_serving(src, str(tmp_path / "s2"), str(tmp_path / "c2"))


def test_legacy_pdmodel_exports_and_serves_on_every_line(tmp_path):
    """A .pdmodel program (what paddle 2.6 saves) exports as model.pdmodel and predicts the same, on 2.6 and 3.x."""
    import paddle

    with keep_mode(paddle), legacy_ir(paddle):
        src = save_static_model(str(tmp_path / "legacy"), seed=2)
    assert sorted(os.listdir(src)) == ["model.pdiparams", "model.pdmodel"]
    inference_model_to_serving(src, str(tmp_path / "s"), str(tmp_path / "c"), fetch_alias_names="prediction")
    _check_layout(str(tmp_path / "s"), str(tmp_path / "c"), "model.pdmodel")
    images = mnist_like_images(5, seed=8)
    np.testing.assert_allclose(_predict_dir(str(tmp_path / "s"), images),
                               _source_predict(os.path.join(src, "model"), images), atol=1e-6)


def test_pir_model_exports_as_model_json(tmp_path):
    """Paddle 3 PIR models (``inference.json`` + ``.pdiparams``) are copied as model.json + params.pdiparams."""
    import paddle

    if paddle_major(paddle) < 3:
        pytest.skip(f"paddle {paddle.__version__} cannot build PIR programs (they came with paddle 3)")
    from distill_base.paddle_compat import pir_ir

    with keep_mode(paddle), pir_ir(paddle):
        src = save_jit_model(str(tmp_path / "jit"), seed=3)
    assert sorted(os.listdir(src)) == ["inference.json", "inference.pdiparams"]
    feeds, fetches = inference_model_to_serving(src, str(tmp_path / "s"), str(tmp_path / "c"),
                                                fetch_alias_names="prediction")
    assert (feeds, fetches) == (["img"], ["prediction"])
    _check_layout(str(tmp_path / "s"), str(tmp_path / "c"), "model.json")
    with open(os.path.join(src, "inference.json"), "rb") as a, open(str(tmp_path / "s" / "model.json"), "rb") as b:
        assert a.read() == b.read()
    images = mnist_like_images(5, seed=9)
    np.testing.assert_allclose(_predict_dir(str(tmp_path / "s"), images),
                               _source_predict(os.path.join(src, "inference"), images), atol=1e-6)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dygraph", "static"])
def test_export_keeps_paddles_mode(teacher_model, tmp_path, dynamic):
    import paddle

    src = os.path.join(os.path.dirname(teacher_model.server_dir), "inference_model")
    try:
        paddle.disable_static() if dynamic else paddle.enable_static()
        inference_model_to_serving(src, str(tmp_path / "s"), str(tmp_path / "c"))
        assert paddle.in_dynamic_mode() is dynamic
    finally:
        paddle.disable_static()


def test_model_files_are_replaced_atomically(teacher_model, tmp_path):
    """Re-exporting over a folder writes new files and renames them in: the old files' contents are never cut."""
    src = os.path.join(os.path.dirname(teacher_model.server_dir), "inference_model")
    server = tmp_path / "s"
    inference_model_to_serving(src, str(server), str(tmp_path / "c"))
    model_file = next(n for n in os.listdir(server) if n.startswith("model."))
    before = {}
    for name in (model_file, "params.pdiparams"):
        os.link(server / name, tmp_path / f"old_{name}")  # a reader holding the old file sees it whole
        before[name] = (server / name).read_bytes()
    inference_model_to_serving(src, str(server), str(tmp_path / "c"))
    for name, data in before.items():
        assert (tmp_path / f"old_{name}").read_bytes() == data
        assert os.stat(server / name).st_ino != os.stat(tmp_path / f"old_{name}").st_ino
    assert not [n for n in os.listdir(server) if n.endswith(".tmp")]


def test_pir_fetches_take_the_output_names_paddle_keeps_and_unnamed_ones_say_how_to_name_them(tmp_path, caplog):
    """PIR names data and parameter values only: an output that is one keeps its name; a computed output stays
    fetch_name_N with a warning naming its op and --fetch_alias_names (no warning when aliases are given)."""
    import paddle

    if paddle_major(paddle) < 3:
        pytest.skip(f"paddle {paddle.__version__} cannot save PIR programs (they came with paddle 3)")

    class Two(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.fc = paddle.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x), x  # a computed output and a data value

    with keep_mode(paddle):
        paddle.disable_static()
        paddle.jit.save(Two(), str(tmp_path / "two" / "inference"),
                        input_spec=[paddle.static.InputSpec([None, 4], "float32", "features")])
    with caplog.at_level(logging.WARNING, logger="teachers.export"):
        feeds, fetches = inference_model_to_serving(str(tmp_path / "two"), str(tmp_path / "s"), str(tmp_path / "c"))
    assert (feeds, fetches) == (["features"], ["features", "fetch_name_0"])  # sorted by alias
    warned = [r.getMessage() for r in caplog.records if "fetch_name_0" in r.getMessage()]
    assert len(warned) == 1 and "pd_op." in warned[0] and "--fetch_alias_names" in warned[0], warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="teachers.export"):
        _, fetches = inference_model_to_serving(str(tmp_path / "two"), str(tmp_path / "s2"), str(tmp_path / "c2"),
                                                fetch_alias_names="logits,echo")
    assert fetches == ["echo", "logits"]
    assert not [r for r in caplog.records if "--fetch_alias_names" in r.getMessage()]
