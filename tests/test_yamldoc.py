"""YAML is loaded safely, remembers where each value came from, and refuses alias bombs fast."""

import time

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from runner.errors import UserError
from runner.yamldoc import dotted, load_file, load_text


def test_positions_point_at_keys_and_values():
    doc = load_text("a:\n  b: 3\n  c: [1, 2]\n", "f.yaml")
    assert doc.data == {"a": {"b": 3, "c": [1, 2]}}
    assert doc.where(("a", "b")) == (2, 6)
    assert doc.where(("a", "b"), key=True) == (2, 3)
    assert doc.where(("a", "c", 1)) == (3, 10)
    assert doc.where(("a", "missing")) == doc.where(("a",))


def test_syntax_errors_are_located():
    with pytest.raises(UserError) as err:
        load_text("a: [1, 2\nb: 3\n", "job.yaml")
    assert err.value.file == "job.yaml" and err.value.line is not None
    assert err.value.render().startswith("job.yaml:")
    assert "YAML syntax error" in err.value.render()


def test_duplicate_keys_are_refused():
    with pytest.raises(UserError, match="duplicate key 'a'"):
        load_text("a: 1\na: 2\n")


def test_billion_laughs_fails_fast():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 10):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        bomb += f"{cur}: &{cur} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
    start = time.perf_counter()
    with pytest.raises(UserError, match="alias bomb"):
        load_text(bomb, "bomb.yaml")
    assert time.perf_counter() - start < 2


def test_unsafe_tags_are_refused():
    with pytest.raises(UserError):
        load_text("a: !!python/object/apply:os.system ['true']\n")


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_file(tmp_path / "nope.yaml")


def test_dotted_paths_read_like_the_file():
    assert dotted(("experiments", 2, "data", "seq_len")) == "experiments[2].data.seq_len"


scalars = st.one_of(st.integers(), st.booleans(), st.none(), st.text(max_size=10),
                    st.floats(allow_nan=False, allow_infinity=False))
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=4)), max_leaves=20)


@given(documents)
def test_whatever_safe_dump_writes_loads_back_equal(data):
    assert load_text(yaml.safe_dump({"root": data})).data == {"root": data}


@given(st.text(max_size=200))
def test_arbitrary_text_loads_or_raises_a_user_error(text):
    try:
        load_text(text)
    except UserError as exc:
        assert exc.render()
