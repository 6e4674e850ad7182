"""Tensor codec, serving config files and feed preparation: the encodings every other part relies on."""
import numpy as np
import pytest
from google.protobuf import json_format, text_format

from distill_base.proto import general_model_config_pb2 as config_pb2
from distill_base.proto import general_model_service_pb2 as service_pb2
from distill_base.serving_config import ConfigError, ServingConfig, VarSpec, stream_name
from distill_base.tensor_codec import TensorCodecError, decode_tensor, encode_tensor, is_raw
from distill_reader.feeds import FeedError, prepare_feed

NUMERIC = ["float32", "float64", "int64", "int32", "int16", "int8", "uint8", "float16", "bool",
           "complex64", "complex128"]


@pytest.mark.parametrize("dtype", NUMERIC)
@pytest.mark.parametrize("raw", [True, False])
def test_round_trip_every_numeric_type(dtype, raw):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 2, 5)) * 50).astype(dtype)
    if np.dtype(dtype).kind == "c":
        array = array + 1j * array[::-1]
    tensor = encode_tensor(array, name="x", alias_name="img", raw=raw)
    assert tensor.name == "x" and tensor.alias_name == "img"
    assert list(tensor.shape) == [3, 2, 5]
    decoded = decode_tensor(service_pb2.Tensor.FromString(tensor.SerializeToString()))
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


def test_typed_form_uses_paddle_serving_fields():
    """A real Paddle Serving server reads float32/int64/int32 from the typed fields, never tensor_content."""
    f = encode_tensor(np.array([[1.5, -2.0]], "float32"), name="x", raw=False)
    assert list(f.float_data) == [1.5, -2.0] and not f.tensor_content and f.elem_type == 1
    i = encode_tensor(np.array([[7], [8]], "int64"), name="label", raw=False)
    assert list(i.int64_data) == [7, 8] and i.elem_type == 0
    i32 = encode_tensor(np.array([3], "int32"), name="n", raw=False)
    assert list(i32.int_data) == [3] and i32.elem_type == 2
    # uint8 has no typed field in Paddle Serving: it always travels as raw bytes.
    u8 = encode_tensor(np.array([[1, 2, 255]], "uint8"), name="pix", raw=False)
    assert u8.tensor_content == bytes([1, 2, 255]) and u8.elem_type == 7
    assert not is_raw(f) and is_raw(encode_tensor(np.zeros(2, "float32"), name="x", raw=True))


def test_decode_json_request_as_the_real_client_sends_it():
    body = {"fetch_var_names": ["price"], "log_id": 7,
            "tensor": [{"float_data": [0.5, -1.25, 3.0], "shape": [1, 3], "elem_type": 1, "name": "x",
                        "alias_name": "x"}]}
    request = json_format.ParseDict(body, service_pb2.Request())
    np.testing.assert_array_equal(decode_tensor(request.tensor[0]), np.array([[0.5, -1.25, 3.0]], "float32"))


def test_element_count_mismatch_names_the_tensor():
    tensor = service_pb2.Tensor(name="x", alias_name="img", elem_type=1, shape=[2, 3], float_data=[1.0] * 5)
    with pytest.raises(TensorCodecError, match=r"tensor 'img': shape \[2, 3\] needs 6 elements, .* 5"):
        decode_tensor(tensor)
    ragged = service_pb2.Tensor(name="x", elem_type=1, shape=[1], tensor_content=b"\x00" * 6)
    with pytest.raises(TensorCodecError, match="6 bytes, not a multiple of float32"):
        decode_tensor(ragged)


def test_unsupported_types_are_named():
    with pytest.raises(TensorCodecError, match="elem_type 6"):
        decode_tensor(service_pb2.Tensor(name="b", elem_type=6, shape=[1], tensor_content=b"\x00\x00"))
    with pytest.raises(TensorCodecError, match="tensor 'u'.*uint64"):
        encode_tensor(np.zeros(2, "uint64"), name="u")


def _config() -> ServingConfig:
    return ServingConfig(
        feeds=(VarSpec("img", "img", 1, (1, 28, 28)), VarSpec("words", "words", 0, (-1,), is_lod_tensor=True)),
        fetches=(VarSpec("softmax_0.tmp_0", "prediction", 1, (10,)),))


def test_config_save_writes_text_and_stream_twins(tmp_path):
    path = _config().save(str(tmp_path / "serving_conf"), "serving_client_conf.prototxt")
    text = open(path).read()
    assert 'feed_var {\n  name: "img"\n  alias_name: "img"' in text
    assert "fetch_type: 1" in text and "shape: 10" in text
    stream = config_pb2.GeneralModelConfig.FromString(
        open(tmp_path / "serving_conf" / stream_name("serving_client_conf.prototxt"), "rb").read())
    assert stream == text_format.Parse(text, config_pb2.GeneralModelConfig())
    loaded = ServingConfig.load(str(tmp_path / "serving_conf"))  # a folder works too
    assert loaded.feeds == _config().feeds and loaded.fetches == _config().fetches
    assert loaded.fetch("prediction").name == "softmax_0.tmp_0"
    assert loaded.fetch("softmax_0.tmp_0").alias_name == "prediction"
    assert loaded.feed("img").dtype == np.float32


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ServingConfig.load(str(tmp_path / "nope.prototxt"))
    with pytest.raises(ConfigError, match="no serving_client_conf.prototxt"):
        ServingConfig.load(str(tmp_path))
    bad = tmp_path / "bad.prototxt"
    bad.write_text("feed_var { nme: 1 }")
    with pytest.raises(ConfigError, match="not a GeneralModelConfig"):
        ServingConfig.load(str(bad))
    with pytest.raises(ConfigError, match=r"unknown fetch 'logits'.*\['prediction'\]"):
        _config().fetch("logits")


def test_config_with_an_elem_type_without_dtype_is_a_config_error_naming_the_var(tmp_path):
    """Found by fuzzing (issue 26): elem_type 6 (bfloat16) loaded, then TensorCodecError at the first use."""
    conf = tmp_path / "serving_client_conf.prototxt"
    conf.write_text('feed_var { name: "x" alias_name: "x" feed_type: 1 shape: 3 }\n'
                    'fetch_var { name: "y" alias_name: "prob" fetch_type: 6 shape: 1 }\n')
    with pytest.raises(ConfigError, match=r"fetch 'prob' in .*serving_client_conf.prototxt.*: elem_type 6 is not"):
        ServingConfig.load(str(conf))


def test_prepare_feed_reshapes_and_casts():
    spec = _config().feed("img")
    flat = np.arange(2 * 784, dtype="float64").reshape(2, 784)
    ready = prepare_feed(spec, flat, batch_size=2)
    assert ready.shape == (2, 1, 28, 28) and ready.dtype == np.float32
    np.testing.assert_array_equal(ready.reshape(2, 784), flat.astype("float32"))
    lod = prepare_feed(_config().feed("words"), [3, 4, 5], batch_size=2)
    assert lod.dtype == np.int64 and lod.tolist() == [3, 4, 5]


def test_prepare_feed_wrong_element_count_names_feed_and_shapes():
    spec = _config().feed("img")
    with pytest.raises(FeedError, match=r"feed 'img': got shape \[2, 780\].*expects \[1, 28, 28\] per sample"):
        prepare_feed(spec, np.zeros((2, 780), "float32"), batch_size=2)
    with pytest.raises(FeedError, match="feed 'img': cannot convert"):
        prepare_feed(spec, np.array([["a"] * 784]), batch_size=1)


# Paddle Serving 0.9's field for each dtype, written out here (not taken from the encoder's own table) from its
# general_model_service.proto and client: the typed repeated field, or tensor_content for types without one.
PADDLE_SERVING_FIELD = {
    "int64": (0, "int64_data"), "float32": (1, "float_data"), "int32": (2, "int_data"),
    "float64": (3, "float64_data"), "int16": (4, "tensor_content"), "float16": (5, "tensor_content"),
    "uint8": (7, "tensor_content"), "int8": (8, "tensor_content"), "bool": (9, "bool_data"),
    "complex64": (10, "complex64_data"), "complex128": (11, "complex128_data"),
}


@pytest.mark.parametrize("dtype", sorted(PADDLE_SERVING_FIELD))
def test_typed_form_field_and_elem_type_match_paddle_serving(dtype):
    elem_type, field = PADDLE_SERVING_FIELD[dtype]
    array = (np.arange(6).reshape(2, 3) % 2).astype(dtype)
    tensor = encode_tensor(array, name="x", raw=False)
    assert tensor.elem_type == elem_type
    data_fields = {f.name for f, _ in tensor.ListFields()} - {"name", "alias_name", "elem_type", "shape"}
    assert data_fields == {field}, data_fields     # the data sits in that field and in no other
    if field == "tensor_content":
        assert tensor.tensor_content == array.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    elif np.dtype(dtype).kind == "c":
        assert list(getattr(tensor, field)) == array.reshape(-1).view(array.real.dtype).tolist()
    else:
        assert list(getattr(tensor, field)) == array.reshape(-1).tolist()
    # the decoder reads the same field: a message built by hand the Paddle Serving way decodes to the array
    by_hand = service_pb2.Tensor(name="x", elem_type=elem_type, shape=[2, 3])
    if field == "tensor_content":
        by_hand.tensor_content = tensor.tensor_content
    else:
        getattr(by_hand, field).extend(getattr(tensor, field))
    np.testing.assert_array_equal(decode_tensor(by_hand), array)


@pytest.mark.parametrize("shape,message", [
    ([2**31 - 1] * 3, "needs 9903520300447984150353281023 elements"),   # past int64: no wrap-around
    ([-1, -1], "negative dimension"),
    ([2, -3], "negative dimension"),
])
def test_shapes_that_cannot_be_are_refused_by_name(shape, message):
    tensor = service_pb2.Tensor(name="x", alias_name="img", elem_type=1, shape=shape, float_data=[1.0] * 4)
    with pytest.raises(TensorCodecError, match=f"tensor 'img'.*{message}"):
        decode_tensor(tensor)
