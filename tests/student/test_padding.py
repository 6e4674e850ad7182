"""pad_value / lengths_feeds without a server: every kind of bad option is a PaddingOptionError naming the option
and the feed (the reader's at construction, the config checks at the first epoch), pad values per feed, lengths
feeds filled or checked per sample. The same options through real teachers and workers: test_reader_ragged.py,
test_lod_serving.py."""
from __future__ import annotations

import numpy as np
import pytest

from distill_base.serving_config import ConfigError, ServingConfig, VarSpec
from distill_reader import DistillReader, PaddingOptionError
from distill_reader.errors import DistillReaderError
from distill_reader.feeds import VariableFeedError, prepare_variable_feeds
from distill_reader.padding import Padding
from distill_reader.pipeline import SlotPlan

CONFIG = ServingConfig(feeds=(VarSpec("words", "words", 0, (-1,)), VarSpec("chars", "chars", 0, (-1, 4)),
                              VarSpec("weights", "weights", 1, (-1,)), VarSpec("length", "length", 0, (1,)),
                              VarSpec("half", "half", 5, (-1,)), VarSpec("ids", "ids", 0, (-1,), is_lod_tensor=True)),
                       fetches=(VarSpec("p", "p", 1, (3,)),))

TYPE_ERRORS = [
    ({"pad_value": "7"}, r"pad_value must be a real number .*not '7' \(str\)"),
    ({"pad_value": True}, r"pad_value must be a real number .*not True \(bool\)"),
    ({"pad_value": None}, r"pad_value must be a real number"),
    ({"pad_value": {"words": [0]}}, r"pad_value\['words'\] must be a real number"),
    ({"pad_value": {3: 0}}, r"pad_value: feed names are non-empty strings, not 3"),
    ({"lengths_feeds": ["length"]}, r"lengths_feeds must be a dict \{padded feed: lengths feed\}"),
    ({"lengths_feeds": {"words": 1}}, r"lengths_feeds\['words'\]: feed names are non-empty strings"),
    ({"lengths_feeds": {"words": "words"}}, r"lengths_feeds maps 'words' to itself"),
    ({"lengths_feeds": {"words": "length", "chars": "length"}}, r"'words' and 'chars' both fill the lengths feed"),
    ({"lengths_feeds": {"words": "chars", "chars": "length"}}, r"'chars' is both a padded feed and the lengths feed"),
]

CONFIG_ERRORS = [
    ({"pad_value": 0.5}, r"pad_value = 0.5 does not fit feed 'words' \(int64\): give an integer"),
    ({"pad_value": 2 ** 63}, r"pad_value = 9223372036854775808 does not fit feed 'words'"),
    ({"pad_value": 1e300}, r"pad_value = 1e\+300 does not fit feed 'words'"),
    ({"pad_value": {"half": 1e6}}, r"pad_value\['half'\] = 1000000.0 does not fit feed 'half' \(float16\)"),
    ({"pad_value": {"length": 0}}, r"pad_value: feed 'length' has the fixed per-sample shape \[1\]; only feeds "),
    ({"pad_value": {"ids": 0}}, r"pad_value: feed 'ids' is a LoD tensor"),
    ({"pad_value": {"wrods": 0}}, r"pad_value: 'wrods' is not a feed of the teacher; its feeds are \['words'"),
    ({"lengths_feeds": {"length": "words"}}, r"lengths_feeds: feed 'length' has the fixed per-sample shape"),
    ({"lengths_feeds": {"words": "weights"}}, r"lengths_feeds\['words'\] = 'weights': the lengths feed must hold "
                                              r"one number per sample, but 'weights' is float32 with per-sample "
                                              r"shape \[-1\]"),
    ({"lengths_feeds": {"words": "nope"}}, r"lengths_feeds\['words'\]: 'nope' is not a feed of the teacher"),
]


@pytest.mark.parametrize("options,message", TYPE_ERRORS)
def test_wrong_types_are_refused_at_construction_naming_the_option(options, message):
    with pytest.raises(PaddingOptionError, match=message):
        DistillReader(ins=["words"], predicts=["p"], **options)
    with pytest.raises(ValueError, match=message):   # PaddingOptionError is a ValueError
        Padding.create(**options)


@pytest.mark.parametrize("options,message", CONFIG_ERRORS)
def test_options_that_do_not_fit_the_model_are_refused_naming_the_feed(options, message):
    padding = Padding.create(**options)               # the types are fine
    with pytest.raises(PaddingOptionError, match=message):
        padding.check_config(CONFIG)
    with pytest.raises(PaddingOptionError, match=message):   # the reader's first epoch checks through SlotPlan
        SlotPlan(["words", "chars", "weights", "length", "half", "ids"], ["p"], CONFIG, padding)


def test_values_that_fit():
    Padding.create(pad_value={"words": -1, "weights": float("nan"), "half": 65504.0},
                   lengths_feeds={"words": "length"}).check_config(CONFIG)
    Padding.create(pad_value=7, lengths_feeds={}).check_config(CONFIG)   # a float 7.0 would fit the ints too
    Padding.create(pad_value=7.0).check_config(CONFIG)


def test_pad_value_per_feed_and_lengths_filled():
    words, chars = [np.array([4, 8, 1]), np.array([9])], [np.ones((2, 4)), np.ones((1, 4))]
    weights = [np.array([0.5]), np.array([1.5, 2.5])]
    out = prepare_variable_feeds(CONFIG, {"words": words, "chars": chars, "weights": weights},
                                 pad_value={"words": 7, "weights": -2.5}, lengths_feeds={"words": "length"})
    np.testing.assert_array_equal(out.feeds["words"], [[4, 8, 1], [9, 7, 7]])
    np.testing.assert_array_equal(out.feeds["chars"][1, 1], [0, 0, 0, 0])            # left out: 0
    np.testing.assert_array_equal(out.feeds["weights"], np.array([[0.5, -2.5], [1.5, 2.5]], np.float32))
    assert out.feeds["length"].tolist() == [[3], [1]] and out.feeds["length"].dtype == np.int64
    out = prepare_variable_feeds(CONFIG, {"words": words}, pad_value=5)
    np.testing.assert_array_equal(out.feeds["words"], [[4, 8, 1], [9, 5, 5]])


def test_given_lengths_are_checked_per_sample():
    words = [np.array([4, 8, 1]), np.array([9]), np.array([2, 2])]
    ok = prepare_variable_feeds(CONFIG, {"words": words, "length": [[3], [1], [2]]}, lengths_feeds={"words": "length"})
    assert ok.feeds["length"] == [[3], [1], [2]]                                  # as given, when right
    with pytest.raises(VariableFeedError, match=r"feed 'length', sample 2: length 5, but sample 2 of 'words' has 2 "
                                                r"\(lengths_feeds maps 'words' -> 'length'\)"):
        prepare_variable_feeds(CONFIG, {"words": words, "length": [[3], [1], [5]]}, lengths_feeds={"words": "length"})
    with pytest.raises(VariableFeedError, match=r"feed 'length' has 2 values for 3 samples of 'words'"):
        prepare_variable_feeds(CONFIG, {"words": words, "length": [[3], [1]]}, lengths_feeds={"words": "length"})
    padded = np.zeros((2, 4), np.int64)
    prepare_variable_feeds(CONFIG, {"words": padded, "length": [[4], [0]]}, lengths_feeds={"words": "length"})
    with pytest.raises(VariableFeedError, match=r"feed 'length', sample 0: length -1 is outside \[0, 4\]"):
        prepare_variable_feeds(CONFIG, {"words": padded, "length": [[-1], [2]]}, lengths_feeds={"words": "length"})
    # without lengths_feeds the relation is unknown: nothing is checked
    prepare_variable_feeds(CONFIG, {"words": words, "length": [[9], [9], [9]]})


def test_slot_plan_lengths_feed_need_not_be_a_slot_and_is_checked_when_it_is():
    padding = Padding.create(lengths_feeds={"words": "length"})
    config = ServingConfig(feeds=(CONFIG.feed("words"), CONFIG.feed("length")), fetches=CONFIG.fetches)
    plan = SlotPlan(["words", "label"], ["p"], config, padding)
    feeds = plan.sample_feeds([(np.array([1, 2]), 0), (np.array([3]), 1)])
    assert sorted(feeds) == ["words", "words.lod"]
    with pytest.raises(ConfigError, match=r"feed\(s\) \['length'\] are not among ins"):
        SlotPlan(["words", "label"], ["p"], config)
    plan = SlotPlan(["words", "length", "label"], ["p"], config, padding)
    plan.sample_feeds([(np.array([1, 2]), [2], 0), (np.array([3]), [1], 1)], first=10)
    with pytest.raises(DistillReaderError, match=r"slot 1 \('length'\) of sample 11 is 4, but the sample's slot 0 "
                                        r"\('words'\) has length 1"):
        plan.sample_feeds([(np.array([1, 2]), [2], 0), (np.array([3]), [4], 1)], first=10)
    with pytest.raises(DistillReaderError, match=r"slot 1 \('length'\) of sample 3 is 0"):
        plan.batch_feeds(([np.array([1]), np.array([1, 2])], np.array([[1], [0]]), np.arange(2)), 0, 2, first=2)
