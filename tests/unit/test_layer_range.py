"""The one layer-list parser (core.layer_range) and the places that read layer lists with it."""

from __future__ import annotations

import pytest

from attnedit.core.layer_range import parse_layers
from attnedit.editing.presets import PresetError
from attnedit.editing.registry import load_preset, make_params
from attnedit.editing.sadr import sadr_settings


@pytest.mark.parametrize(
    ("text", "layers"),
    [
        ("3-7", [3, 4, 5, 6, 7]),  # presets' --param layers, SADR ranges, --drift-layers
        ("3,4,5", [3, 4, 5]),
        ("[3, 4, 5]", [3, 4, 5]),  # JSON style, as presets write them
        (" 5 ", [5]),
        ("0-0", [0]),
        ("2-4,8", [2, 3, 4, 8]),
        ("8,2", [8, 2]),  # the order as written
        ("3,4,", [3, 4]),
        ("all", None),  # every layer
        ("None", None),
        ("", None),
    ],
)
def test_accepted_layer_lists(text, layers):
    assert parse_layers(text) == layers


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("7-3", "'7-3' is not a range"),
        ("-1", "'-1' is not a layer"),
        ("3-x", "'3-x' is not a layer"),
        ("a,b", "'a' is not a layer"),
        ("1-2-3", "'1-2-3' is not a layer"),
        ("3,3", r"layer\(s\) \[3\] given more than once"),
        ("[]", "no layer given"),
        (",", "no layer given"),
    ],
)
def test_bad_layer_lists_name_the_text(text, complaint):
    with pytest.raises(ValueError, match=complaint) as err:
        parse_layers(text)
    assert repr(text) in str(err.value)


def test_callers_use_it():
    preset = load_preset("memit", "smollm2-135m")
    for text in ("2-4", "2,3,4", "[2,3,4]"):
        assert make_params("memit", preset, {"layers": text}).layers == [2, 3, 4]
    with pytest.raises(PresetError, match=r"--param layers='4-2': .*'4-2' is not a range"):
        make_params("memit", preset, {"layers": "4-2"})
    with pytest.raises(PresetError, match="name the layers"):
        make_params("memit", preset, {"layers": "all"})
    # SADR: one contiguous range (first, last), or every layer
    assert sadr_settings({}, {"layers": "20-29"}).layers == (20, 29)
    assert sadr_settings({}, {"layers": "7"}).layers == (7, 7)
    assert sadr_settings({"layers": [20, 29]}, {"layers": "all"}).layers is None
    with pytest.raises(PresetError, match="contiguous"):
        sadr_settings({}, {"layers": "1,5"})
