"""Generated inputs beyond the hostile-input table: config values, config files, mask expressions,
group sizes and records read back either load or fail with one short SsahError line, never with
another exception. No model is loaded."""

from __future__ import annotations

import json
import math
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssah.cli import one_line
from ssah.config import RunConfig, load_config
from ssah.errors import SsahError
from ssah.interventions.expressions import parse_mask_expression
from ssah.schemas import SCHEMAS, check_record
from ssah.settings import load_yaml, read_mapping_file
from ssah.units.sizes import parse_sizes

LINE = 1200  # characters an error may take before the CLI shortens it (values are quoted shorter)
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])


def assert_one_line(err: SsahError) -> None:
    text = str(err)
    assert text and "\n" not in text and "\r" not in text, text
    assert len(text) <= LINE, f"{len(text)} characters: {text[:200]}"


# -- values: what YAML can hold ---------------------------------------------------------------------
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["", " ", "auto", "cpu", "mps", "cuda:9", "SCU", "SCU+CU:top=0.06", "random:like=RU,seed=-1",
                     "harmful:train", "jsonl:/nonexistent", "x" * 5000, "line\nbreak", "tiny:llama"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                      max_leaves=12)


def _keys(model) -> list[str]:
    return list(model.model_fields)


SECTIONS = {name: field.annotation for name, field in RunConfig.model_fields.items()}


@st.composite
def config_data(draw) -> dict:
    """A config-shaped mapping: real keys (and some unknown ones) with values of any YAML type."""
    data = {}
    for key in draw(st.lists(st.sampled_from([*SECTIONS, "extends", "colour"]), max_size=5, unique=True)):
        section = SECTIONS.get(key)
        fields = getattr(section, "model_fields", None)
        if fields and draw(st.booleans()):
            inner = draw(st.lists(st.sampled_from([*fields, "typo"]), max_size=4, unique=True))
            data[key] = {name: draw(VALUES) for name in inner}
        else:
            data[key] = draw(VALUES)
    return data


@FAST
@given(config_data())
def test_config_values_load_or_fail_in_one_line(data):
    try:
        config = RunConfig.from_dict(data, "generated.yaml")
    except SsahError as err:
        assert_one_line(err)
        return
    # what loads is usable: finite numbers, seeds every generator takes, non-empty dataset specs
    assert 0 <= config.seed < 2**32
    for section in (config.align.train, config.finetune.train, config.attacks.train):
        assert math.isfinite(section.lr) and math.isfinite(section.epochs)
    assert all(spec.strip() for spec in config.data.specs().values())


@FAST
@given(config_data())
def test_config_files_load_or_fail_in_one_line(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("c") / "run.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    try:
        load_config(path=path)
    except SsahError as err:
        assert_one_line(err)


def test_a_long_unknown_preset_name_is_cut_in_its_one_line(tmp_path):
    # found by the property test above: the name was echoed whole
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"extends": "x" * 5000}))
    with pytest.raises(SsahError, match="unknown preset 'x{80}\\.\\.\\.'") as caught:
        load_config(path=path)
    assert_one_line(caught.value)


@FAST
@given(st.binary(max_size=300) | st.text(alphabet=string.printable + "é\u2028\ufeff", max_size=300).map(str.encode))
def test_any_bytes_as_a_config_file(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("b") / "any.yaml"
    path.write_bytes(raw)
    try:
        data = read_mapping_file(path, "config file", yaml=True)
    except SsahError as err:
        assert_one_line(err)
        return
    assert isinstance(data, dict)


@FAST
@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(), min_size=1, max_size=3), st.data())
def test_a_repeated_key_names_both_lines(mapping, data):
    key = data.draw(st.sampled_from(sorted(mapping)))
    lines = [f"{k}: {v}" for k, v in mapping.items()]
    lines.insert(data.draw(st.integers(0, len(lines))), f"{key}: 0")
    first, second = [i + 1 for i, line in enumerate(lines) if line.split(":")[0] == key][:2]
    with pytest.raises(Exception) as caught:
        load_yaml("\n".join(lines) + "\n")
    assert f"lines {first} and {second}" in str(caught.value)


# -- mask expressions and sizes ---------------------------------------------------------------------
MASK_WORDS = ["SCU", "ucu", "CU", "RU", "all", "random", "top", "by", "like", "frac", "seed", "s-u", "sum", "0.06",
              "-1", "1e400", "nan", "inf", "4294967296", "x"]


@st.composite
def mask_like(draw) -> str:
    """Text built from a mask expression's own words and signs, so most of it is nearly valid."""
    parts = draw(st.lists(st.one_of(st.sampled_from(MASK_WORDS), st.sampled_from(list("+:,= \n")),
                                    st.text(max_size=3)), max_size=14))
    return "".join(parts)


@FAST
@given(mask_like() | st.text(max_size=60))
def test_mask_expressions_parse_or_fail_in_one_line(text):
    try:
        terms = parse_mask_expression(text)
    except SsahError as err:
        assert_one_line(err)
        return
    for term in terms:
        for option in ("top", "frac"):
            if option in term.options:
                assert 0 <= term.options[option] <= 1
        if "seed" in term.options:
            assert 0 <= term.options["seed"] < 2**32


GROUPS = st.sampled_from(["SCU", "UCU", "CU", "RU"])


@st.composite
def valid_mask(draw) -> str:
    terms = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["group", "all", "like", "frac"]))
        if kind == "group":
            term = draw(GROUPS)
            if draw(st.booleans()):
                term += f":top={draw(st.floats(0, 1)):.4f}"
        elif kind == "all":
            term = "all"
        elif kind == "like":
            term = f"random:like={draw(GROUPS)}"
        else:
            term = f"random:frac={draw(st.floats(0, 1)):.3f}"
        if kind in ("like", "frac") and draw(st.booleans()):
            term += f",seed={draw(st.integers(0, 2**32 - 1))}"
        terms.append(term)
    return "+".join(terms)


@FAST
@given(valid_mask())
def test_well_formed_masks_parse(text):
    assert len(parse_mask_expression(text)) == text.count("+") + 1


@FAST
@given(st.text(alphabet="scuru=,.%0123456789eainf- ", max_size=40))
def test_group_sizes_parse_or_fail_in_one_line(text):
    try:
        sizes = parse_sizes(text)
    except SsahError as err:
        assert_one_line(err)
        return
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in sizes.values())


# -- records read back ------------------------------------------------------------------------------
@FAST
@given(st.sampled_from(sorted(SCHEMAS)), VALUES)
def test_records_of_any_shape_are_read_or_refused_in_one_line(tmp_path_factory, name, record):
    path = tmp_path_factory.mktemp("r") / name
    try:
        assert check_record(path, record) is record
    except SsahError as err:
        assert_one_line(err)
        assert str(path) in str(err) and "rerun ssah" in str(err)


@FAST
@given(st.text(max_size=3000))
def test_what_the_cli_prints_is_one_bounded_line(text):
    line = one_line(text)
    assert "\n" not in line and "\r" not in line and len(line) <= 1000
    line.encode("utf-8")  # printable whatever the input (file names with bytes that are not UTF-8 included)
    if len(text) <= 200 and text.isprintable():
        assert line == text


def test_a_real_record_passes(tmp_path):
    record = {"stage": "groups", "seconds": 1.5, "summary": {"counts": {"SCU": 3}}, "identity": {"config": "x"}}
    path = tmp_path / "done.json"
    path.write_text(json.dumps(record))
    assert check_record(path, json.loads(path.read_text())) == record
