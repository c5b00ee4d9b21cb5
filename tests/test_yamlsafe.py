"""The bounded recipe loader: plain YAML still loads; hostile YAML is refused with a position."""
import pytest

from compress import yamlsafe
from compress.errors import RecipeError
from compress.yamlsafe import Refused, load_file, loads


def test_plain_recipe_yaml_loads_as_before():
    text = ("base: &b {epochs: 2, lr: 0.1}\n"
            "a: {<<: *b, epochs: 3}\n"  # a merge key overridden by an explicit key is not a duplicate
            "b: [*b, *b]\n"
            "when: 2024-01-31\n"  # dates stay text: no recipe field is a date
            "n: ~\n")
    doc = loads(text)
    assert doc["a"] == {"epochs": 3, "lr": 0.1}
    assert doc["b"] == [{"epochs": 2, "lr": 0.1}] * 2
    assert doc["when"] == "2024-01-31" and doc["n"] is None


@pytest.mark.parametrize("text,problem,line", [
    ("seed: 1\nname: t\nseed: 2\n", "duplicate key 'seed' (first given at line 1)", 3),
    ("a: {x: 1, x: 2}\n", "duplicate key 'x'", 1),
    ("a: &a [1, *a]\n", "recursive alias *a", 1),
    ("a: &a {k: *a}\n", "recursive alias *a", 1),
    ("a: " + "[" * 100 + "]" * 100 + "\n", f"nested deeper than {yamlsafe.MAX_DEPTH} levels", 1),
    ("a: !!set {1: null}\n", "the tag !!set is not allowed", 1),
    ("a: !!binary aGk=\n", "the tag !!binary is not allowed", 1),
    ("a: !!omap [{x: 1}]\n", "the tag !!omap is not allowed", 1),
])
def test_refused_with_line(text, problem, line):
    with pytest.raises(Refused) as exc:
        loads(text)
    assert problem in exc.value.problem
    assert exc.value.problem_mark.line + 1 == line


def test_alias_bomb_is_refused_before_it_expands():
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10**9 values
    with pytest.raises(Refused, match="once aliases are expanded"):
        loads("\n".join(lines))
    ok = "\n".join(lines[:3])  # 1,110 values: fine
    assert len(loads(ok)["l2"]) == 10


@pytest.mark.parametrize("data,expected", [
    ("name: café\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at line 1, column 10)"),
    ("name: t\n".encode("utf-16"), "UTF-16"),
    (b"name: t\n\x00\x01\x02", "is it a binary file?"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text (byte 0x89 at line 1, column 1)"),
    (b"name: t\n" + b"#" * (yamlsafe.MAX_BYTES + 1), "too large for a recipe"),
    (b"a: [1, 2\n", "not valid YAML at line 2, column 1"),
    (b"a: 1\na: 2\n", "r.yaml, line 2, column 1: duplicate key 'a'"),
])
def test_file_problems_are_one_line(tmp_path, data, expected):
    path = tmp_path / "r.yaml"
    path.write_bytes(data)
    with pytest.raises(RecipeError) as exc:
        load_file(path)
    assert expected in str(exc.value)
    assert "\n" not in str(exc.value)


def test_utf8_with_byte_order_mark_loads(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes("name: café\n".encode("utf-8-sig"))
    assert load_file(path) == {"name": "café"}
