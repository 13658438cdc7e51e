"""Blueprint parsing and validation: every rule, every bad input, the shipped examples."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import yaml

from esper_assets.blueprints import (
    BLUEPRINT_SUFFIXES,
    NAME_PATTERN,
    Blueprint,
    BlueprintInvalid,
    BlueprintLimits,
    Problem,
    blueprint_name_for_file,
    example_blueprint_files,
    name_problem,
    parse_blueprint,
)
from esper_assets.blueprints.spec import TOO_DEEP
from esper_assets.errors import InvalidInput


def doc(**changes: Any) -> dict[str, Any]:
    """A valid document; keyword arguments replace fields (None removes one)."""
    base: dict[str, Any] = {
        "name": "residual_mlp",
        "version": "1.2.0",
        "parent": "mlp_base@1.0.0",
        "tags": ["mlp", "residual"],
        "description": "two-layer MLP with a skip connection",
        "input_shape": [64],
        "layers": [
            {"op": "linear", "out_features": 128},
            {"op": "gelu"},
            {"op": "linear", "out_features": 64},
            {"op": "residual"},
        ],
        "properties": {"target": "cpu"},
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def parse(document: Any, source: str = "residual_mlp.json", **kwargs: Any) -> Blueprint:
    return parse_blueprint(json.dumps(document).encode(), source=source, **kwargs)


def problems(document: Any, **kwargs: Any) -> list[str]:
    with pytest.raises(BlueprintInvalid) as caught:
        parse(document, **kwargs)
    return [str(p) for p in caught.value.problems]


def raw_problems(data: bytes, source: str, **kwargs: Any) -> list[str]:
    with pytest.raises(BlueprintInvalid) as caught:
        parse_blueprint(data, source=source, **kwargs)
    return [str(p) for p in caught.value.problems]


# ---------------------------------------------------------------- the happy path


def test_valid_document_is_normalised() -> None:
    bp = parse(doc(tags=["residual", "mlp", "mlp"]))
    assert bp.name == "residual_mlp" and bp.version == "1.2.0"
    assert bp.parent == "mlp_base@1.0.0"
    assert (bp.parent_name, bp.parent_version) == ("mlp_base", "1.0.0")
    assert bp.tags == ("mlp", "residual")  # sorted, unique
    assert bp.input_shape == (64,) and bp.output_shape == (64,)
    assert dict(bp.layers[0]) == {"op": "linear", "out_features": 128, "bias": True}
    assert bp.target == "cpu"


def test_yaml_and_json_give_the_same_blueprint() -> None:
    document = doc()
    from_json = parse(document)
    from_yaml = parse_blueprint(yaml.safe_dump(document).encode(), source="residual_mlp.yaml")
    assert from_json == from_yaml
    assert from_json.content_hash == from_yaml.content_hash


def test_optional_fields_have_defaults() -> None:
    bp = parse(doc(parent=None, tags=None, description=None, properties=None))
    assert bp.parent is None and bp.parent_name is None and bp.parent_version is None
    assert bp.tags == () and bp.description == "" and dict(bp.properties) == {}
    assert bp.target == "cpu"


def test_empty_optional_fields_in_yaml_read_as_absent() -> None:
    data = b"name: m\nversion: 1.0.0\nparent:\ntags:\ndescription:\nproperties:\ninput_shape: [2]\nlayers: [{op: relu}]\n"
    bp = parse_blueprint(data, source="m.yaml")
    assert (bp.parent, bp.tags, bp.description, dict(bp.properties)) == (None, (), "", {})


def test_defaults_are_filled_in_for_every_op() -> None:
    bp = parse(
        doc(
            input_shape=[3, 8, 8],
            layers=[
                {"op": "conv2d", "out_channels": 4, "kernel_size": 3},
                {"op": "layernorm"},
                {"op": "dropout", "p": 0},
                {"op": "flatten"},
            ],
        )
    )
    assert [dict(layer) for layer in bp.layers] == [
        {
            "op": "conv2d",
            "out_channels": 4,
            "kernel_size": 3,
            "stride": 1,
            "padding": 0,
            "bias": True,
        },
        {"op": "layernorm", "eps": 1e-5},
        {"op": "dropout", "p": 0.0},
        {"op": "flatten"},
    ]
    assert bp.output_shape == (4 * 6 * 6,)


def test_canonical_round_trips_and_excludes_derived_fields() -> None:
    bp = parse(doc())
    canonical = bp.canonical()
    assert set(canonical) == {
        "name", "version", "parent", "tags", "description", "input_shape", "layers", "properties",
    }  # fmt: skip
    assert (
        bp.canonical_json() == json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    )
    again = parse_blueprint(bp.canonical_json(), source="residual_mlp.json")
    assert again == bp and again.content_hash == bp.content_hash


def test_blueprint_is_immutable_and_hashable() -> None:
    bp = parse(doc())
    with pytest.raises(TypeError):
        bp.layers[0]["out_features"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        bp.properties["target"] = "gpu"  # type: ignore[index]
    canonical = bp.canonical()
    canonical["properties"]["target"] = "gpu"
    assert bp.target == "cpu"  # canonical() hands out a copy
    assert len({bp, parse(doc())}) == 1


# ---------------------------------------------------------------- content hash


def test_content_hash_ignores_the_name_only() -> None:
    bp = parse(doc())
    renamed = parse(doc(name="copy_of_mlp"), source="copy_of_mlp.json")
    assert renamed.content_hash == bp.content_hash
    assert renamed.canonical_json() != bp.canonical_json()
    changes = [
        {"version": "1.2.1"},
        {"parent": "mlp_base@1.0.1"},
        {"parent": None},
        {"tags": ["mlp"]},
        {"description": "other words"},
        {"input_shape": [32], "layers": [{"op": "relu"}]},
        {"layers": [{"op": "linear", "out_features": 64, "bias": False}, {"op": "residual"}]},
        {"properties": {"target": "cpu", "owner": "me"}},
    ]
    hashes = {parse(doc(**change)).content_hash for change in changes}
    assert len(hashes) == len(changes) and bp.content_hash not in hashes


def test_content_hash_does_not_depend_on_spelling() -> None:
    """Defaults written out, key order and YAML vs JSON change nothing."""
    explicit = doc(layers=[{"bias": True, "out_features": 64, "op": "linear"}, {"op": "residual"}])
    implicit = doc(layers=[{"op": "linear", "out_features": 64}, {"op": "residual"}])
    assert parse(explicit).content_hash == parse(implicit).content_hash


# ---------------------------------------------------------------- names and files


@pytest.mark.parametrize(
    "bad", ["../x", "has space", "a" * 200, "", "Upper", "x/y", "x\\y", "-x", "x\n", "ü"]
)
def test_name_problem_rejects(bad: str) -> None:
    message = name_problem(bad)
    assert message is not None
    assert "not a valid blueprint name" in message
    assert "a-z 0-9 _ -" in message
    assert len(message) < 200  # a 200-character name is shortened, not echoed whole


@pytest.mark.parametrize("good", ["a", "0", "mlp_base", "conv-block-2", "a" * 64])
def test_name_problem_accepts(good: str) -> None:
    assert name_problem(good) is None
    assert NAME_PATTERN.match(good)


def test_name_problem_on_a_non_string() -> None:
    assert "must be a string" in name_problem(42)  # type: ignore[arg-type, operator]


def test_name_problem_message_quotes_the_name() -> None:
    assert name_problem("../x") == (
        "'../x' is not a valid blueprint name: use 1-64 of a-z 0-9 _ -, starting with a letter or digit"
    )


@pytest.mark.parametrize(
    ("filename", "stem"),
    [
        ("mlp.yaml", "mlp"),
        ("mlp.yml", "mlp"),
        ("mlp.json", "mlp"),
        ("dir/sub/mlp.yaml", "mlp"),
        ("mlp.yaml.json", "mlp.yaml"),  # one suffix only
        ("mlp.txt", "mlp.txt"),
    ],
)
def test_blueprint_name_for_file(filename: str, stem: str) -> None:
    assert blueprint_name_for_file(filename) == stem


def test_suffixes() -> None:
    assert BLUEPRINT_SUFFIXES == (".yaml", ".yml", ".json")


def test_name_must_match_the_file_stem() -> None:
    found = problems(doc(), expected_name="other")
    assert len(found) == 1
    assert found[0].startswith("name: ")
    assert "'residual_mlp'" in found[0] and "file stem is 'other'" in found[0]


@pytest.mark.parametrize("bad", ["../x", "has space", "Upper", "", "a" * 65])
def test_invalid_name_field(bad: str) -> None:
    assert problems(doc(name=bad)) == [f"name: {name_problem(bad)}"]


# ---------------------------------------------------------------- decoding


def test_malformed_json_reports_line_and_column() -> None:
    (found,) = raw_problems(b'{\n  "name": "x",\n  "version" "1.0.0"\n}', "x.json")
    # Our framing and the position; what follows is the json module's own words.
    assert found.startswith("invalid JSON at line 3, column 13: ")


def test_malformed_yaml_reports_the_line() -> None:
    data = b"name: x\nversion: 1.0.0\nlayers:\n  - {op: linear, out_features: 8\ninput_shape: [4]\n"
    (found,) = raw_problems(data, "x.yaml")
    assert found.startswith("invalid YAML at line 5")


def test_yaml_tab_indentation_is_a_syntax_problem() -> None:
    (found,) = raw_problems(b"name: x\n\tversion: 1.0.0\n", "x.yml")
    assert found.startswith("invalid YAML at line 2")


def test_yaml_never_builds_python_objects() -> None:
    data = b'!!python/object/apply:os.system ["echo pwned"]\n'
    (found,) = raw_problems(data, "x.yaml")
    assert found.startswith("invalid YAML at line 1, column 1: ")  # refused, nothing built


def test_yaml_bomb_is_refused_cheaply() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):  # 10**9 values once the aliases are expanded
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    (found,) = raw_problems("\n".join(lines).encode(), "x.yaml")
    assert "expands to more than" in found


def test_recursive_yaml_is_refused() -> None:
    assert raw_problems(b"&a [*a]", "x.yaml") == [TOO_DEEP]


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b"- " * 50_000 + b"x",
        b"{a: " * 30_000 + b"1" + b"}" * 30_000,
    ],
)
def test_deeply_nested_yaml_is_refused_without_crashing(data: bytes) -> None:
    """libyaml recurses in C and segfaults on deep nesting: run it where a crash is survivable.

    Whether our depth walk or libyaml's own nesting limit (PyYAML >= 6.0.4) notices
    first, the caller gets the same BlueprintInvalid: one problem at the document
    root, in our words, naming our limit.
    """
    script = (
        "import json, sys\n"
        "from esper_assets.blueprints import BlueprintInvalid, parse_blueprint\n"
        "try:\n"
        "    parse_blueprint(sys.stdin.buffer.read(), source='x.yaml')\n"
        "except BlueprintInvalid as exc:\n"
        "    print(json.dumps([exc.source, [[p.path, p.message] for p in exc.problems]]))\n"
        "else:\n"
        "    print(json.dumps('accepted'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], input=data, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr.decode()[-500:]
    assert json.loads(done.stdout) == ["x.yaml", [["", TOO_DEEP]]]


def test_deeply_nested_json_is_refused() -> None:
    assert raw_problems(b"[" * 100_000 + b"]" * 100_000, "x.json") == [TOO_DEEP]


@pytest.mark.parametrize(
    ("data", "source"),
    [(b'{"name": "x", "name": "y"}', "x.json"), (b"name: x\nname: y\n", "x.yaml")],
)
def test_duplicate_keys_are_refused(data: bytes, source: str) -> None:
    (found,) = raw_problems(data, source)
    assert "duplicate key 'name'" in found


def test_yaml_merge_keys_may_be_overridden() -> None:
    data = b"""
name: residual_mlp
version: 1.0.0
input_shape: [8]
base: &base {op: linear, out_features: 4}
layers:
  - {<<: *base, out_features: 8}
"""
    # "base" is an unknown top-level field, but the merge override itself is fine.
    assert raw_problems(data, "residual_mlp.yaml") == [
        "base: unknown field; known fields: name, version, input_shape, layers, parent, tags, "
        "description, properties"
    ]


def test_nan_is_not_json() -> None:
    (found,) = raw_problems(b'{"x": NaN}', "x.json")
    assert "NaN is not a valid JSON number" in found


def test_non_utf8_bytes() -> None:
    assert raw_problems(b"name: \xff\xfe\n", "x.yaml") == ["not UTF-8 text: byte 0xff at offset 6"]


def test_utf8_bom_is_accepted() -> None:
    data = b"\xef\xbb\xbf" + json.dumps(doc()).encode()
    assert parse_blueprint(data, source="residual_mlp.json").name == "residual_mlp"


def test_unknown_suffix() -> None:
    (found,) = raw_problems(json.dumps(doc()).encode(), "residual_mlp.txt")
    assert "unknown file type '.txt'" in found


@pytest.mark.parametrize("data", [b"", b"# only a comment\n", b"null"])
def test_empty_document(data: bytes) -> None:
    (found,) = raw_problems(data, "x.yaml")
    assert "the document is empty" in found


@pytest.mark.parametrize("data", [b"[1, 2]", b"just a string", b"42"])
def test_document_must_be_a_mapping(data: bytes) -> None:
    (found,) = raw_problems(data, "x.yaml")
    assert "must be a mapping of fields" in found


def test_oversized_file_is_not_parsed() -> None:
    data = b"{" + b" " * 300_000  # not even valid JSON: the size check comes first
    assert raw_problems(data, "x.json") == ["the file is 300,001 bytes; the limit is 262,144"]
    small = BlueprintLimits(max_file_bytes=100)
    assert "limit is 100" in problems(doc(), limits=small)[0]


def test_bytearray_and_memoryview_are_accepted() -> None:
    data = json.dumps(doc()).encode()
    assert parse_blueprint(bytearray(data), source="r.json").name == "residual_mlp"
    assert parse_blueprint(memoryview(data), source="r.json").name == "residual_mlp"


def test_str_instead_of_bytes() -> None:
    (found,) = raw_problems(json.dumps(doc()), "x.json")  # type: ignore[arg-type]
    assert "expected the file's bytes, got str" in found


# ---------------------------------------------------------------- top-level fields


def test_missing_required_fields() -> None:
    found = problems({"tags": []})
    assert found == [
        "name: required field is missing",
        "version: required field is missing",
        "input_shape: required field is missing",
        "layers: required field is missing",
    ]


def test_unknown_top_level_field_suggests_a_fix() -> None:
    (found,) = problems(doc(layer=[]))
    assert found.startswith("layer: unknown field (did you mean 'layers'?)")


@pytest.mark.parametrize(
    "bad", ["1.0", "1", "v1.0.0", "01.0.0", "1.0.0-", "1.0.0+build", "1.0.0 ", "1.٠.0"]
)
def test_bad_semver(bad: str) -> None:
    (found,) = problems(doc(version=bad))
    assert found.startswith("version: ") and "is not a semantic version" in found


@pytest.mark.parametrize("good", ["0.0.0", "1.2.3", "10.20.30", "1.0.0-rc.1", "2.0.0-alpha-2.x"])
def test_good_semver(good: str) -> None:
    assert parse(doc(version=good)).version == good


def test_version_must_be_a_string() -> None:
    # YAML reads "version: 1.0" as a float: the message says to quote it.
    (found,) = raw_problems(yaml.safe_dump(doc(version=1.0)).encode(), "residual_mlp.yaml")
    assert found == 'version: must be a string like "1.2.0" (quote it in YAML), got 1.0 (float)'


@pytest.mark.parametrize(
    ("parent", "expected"),
    [
        ("mlp_base", "name@semantic-version"),
        ("mlp_base@", "'' is not a semantic version"),
        ("@1.0.0", "'' is not a valid blueprint name"),
        ("Mlp@1.0.0", "'Mlp' is not a valid blueprint name"),
        ("mlp@1.0", "'1.0' is not a semantic version"),
        ("mlp@1.0.0@2", "'1.0.0@2' is not a semantic version"),
        (42, "got 42 (int)"),
        ("residual_mlp@1.2.0", "cannot be its own parent"),
    ],
)
def test_malformed_parent(parent: Any, expected: str) -> None:
    found = problems(doc(parent=parent))
    assert len(found) == 1 and found[0].startswith("parent: ") and expected in found[0]


def test_parent_may_be_an_earlier_version_of_itself() -> None:
    assert parse(doc(parent="residual_mlp@1.1.0")).parent_version == "1.1.0"


@pytest.mark.parametrize(
    ("tags", "path"),
    [
        ("mlp", "tags"),
        ([1], "tags[0]"),
        ([""], "tags[0]"),
        (["x" * 33], "tags[0]"),
        (["a b"], "tags[0]"),
        (["ok", None], "tags[1]"),
        (["t"] * 33, "tags"),
    ],
)
def test_bad_tags(tags: Any, path: str) -> None:
    (found,) = problems(doc(tags=tags))
    assert found.startswith(f"{path}: ")


def test_description_must_be_a_short_string() -> None:
    assert problems(doc(description=5)) == ["description: must be a string, got 5 (int)"]
    assert "limit is 4,096" in problems(doc(description="x" * 5000))[0]


def test_properties_must_be_a_json_object() -> None:
    assert problems(doc(properties=[1]))[0].startswith("properties: must be a JSON object")
    (found,) = problems(doc(properties={"target": 7}))
    assert found == "properties.target: must be a non-empty string, got 7 (int)"


def test_properties_from_yaml_must_be_plain_json() -> None:
    data = b"""
name: residual_mlp
version: 1.0.0
input_shape: [4]
layers: [{op: relu}]
properties:
  1: integer key
  when: 2024-01-01
  nested: {inf: .inf, bin: !!binary aGVsbG8=}
"""
    found = raw_problems(data, "residual_mlp.yaml")
    assert found[0] == "properties: keys must be strings, got 1 (int)"
    assert found[1].startswith("properties.when: not a JSON value")
    assert found[2] == "properties.nested.inf: inf is not a JSON number"
    assert found[3].startswith("properties.nested.bin: not a JSON value")


@pytest.mark.parametrize(
    ("shape", "path"),
    [
        ("64", "input_shape"),
        ([], "input_shape"),
        ([1, 2, 3, 4, 5], "input_shape"),
        ([0], "input_shape[0]"),
        ([-3], "input_shape[0]"),
        ([64.0], "input_shape[0]"),
        ([True], "input_shape[0]"),
        ([70000], "input_shape[0]"),
    ],
)
def test_bad_input_shape(shape: Any, path: str) -> None:
    (found,) = problems(doc(input_shape=shape, layers=[{"op": "relu"}]))
    assert found.startswith(f"{path}: ")


# ---------------------------------------------------------------- layers


def test_layers_must_be_a_non_empty_list() -> None:
    assert problems(doc(layers=[]))[0].startswith("layers: must be a non-empty list")
    assert problems(doc(layers={"op": "relu"}))[0].startswith("layers: must be a non-empty list")
    assert problems(doc(layers=["relu"]))[0].startswith("layers[0]: must be a mapping")


def test_unknown_op_lists_the_supported_ones() -> None:
    (found,) = problems(doc(layers=[{"op": "lineer", "out_features": 3}]))
    assert found.startswith("layers[0].op: unknown op 'lineer' (did you mean 'linear'?)")
    assert (
        "supported ops: conv2d, dropout, flatten, gelu, layernorm, linear, relu, residual" in found
    )


def test_missing_op() -> None:
    (found,) = problems(doc(layers=[{"out_features": 3}]))
    assert found.startswith("layers[0].op: required field is missing")


def test_missing_layer_field() -> None:
    (found,) = problems(doc(layers=[{"op": "linear"}]))
    assert found == "layers[0].out_features: required field for linear is missing"


def test_unknown_layer_field() -> None:
    found = problems(
        doc(layers=[{"op": "linear", "out_feature": 3}, {"op": "relu", "inplace": True}])
    )
    assert found[0].startswith(
        "layers[0].out_feature: unknown field for linear (did you mean 'out_features'?)"
    )
    assert "layers[1].inplace: unknown field for relu; its fields: none" in found


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        (
            {"op": "linear", "out_features": True},
            "layers[0].out_features: must be a positive integer, got true (a boolean)",
        ),
        (
            {"op": "linear", "out_features": "128"},
            "layers[0].out_features: must be a positive integer, got '128' (str)",
        ),
        (
            {"op": "linear", "out_features": 128.0},
            "layers[0].out_features: must be a positive integer, got 128.0 (float)",
        ),
        (
            {"op": "linear", "out_features": 0},
            "layers[0].out_features: must be a positive integer, got 0 (int)",
        ),
        (
            {"op": "linear", "out_features": 8, "bias": 1},
            "layers[0].bias: must be true or false, got 1 (int)",
        ),
        (
            {"op": "linear", "out_features": 8, "bias": "yes"},
            "layers[0].bias: must be true or false, got 'yes' (str)",
        ),
        (
            {"op": "dropout", "p": 1.0},
            "layers[0].p: must be a number >= 0 and < 1, got 1.0 (float)",
        ),
        (
            {"op": "dropout", "p": -0.1},
            "layers[0].p: must be a number >= 0 and < 1, got -0.1 (float)",
        ),
        (
            {"op": "dropout", "p": True},
            "layers[0].p: must be a number >= 0 and < 1, got true (a boolean)",
        ),
        ({"op": "layernorm", "eps": 0}, "layers[0].eps: must be a number > 0, got 0 (int)"),
        (
            {"op": "layernorm", "eps": "1e-5"},
            "layers[0].eps: must be a number > 0, got '1e-5' (str)",
        ),
    ],
)
def test_wrong_field_types(layer: dict[str, Any], expected: str) -> None:
    assert problems(doc(layers=[layer])) == [expected]


@pytest.mark.parametrize(
    ("layer", "field"),
    [
        ({"op": "conv2d", "out_channels": 4, "kernel_size": 3, "stride": 0}, "stride"),
        ({"op": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": -1}, "padding"),
        ({"op": "conv2d", "out_channels": 4, "kernel_size": False}, "kernel_size"),
        ({"op": "conv2d", "out_channels": 4.5, "kernel_size": 3}, "out_channels"),
    ],
)
def test_bad_conv2d_fields(layer: dict[str, Any], field: str) -> None:
    (found,) = problems(doc(input_shape=[3, 8, 8], layers=[layer]))
    assert found.startswith(f"layers[0].{field}: ")


def test_residual_shape_mismatch() -> None:
    layers = [
        {"op": "linear", "out_features": 128},
        {"op": "gelu"},
        {"op": "layernorm"},
        {"op": "residual"},
    ]
    assert problems(doc(layers=layers)) == [
        "layers[3]: residual needs shape [64] (the module input), got [128]"
    ]


def test_conv2d_on_a_flat_input() -> None:
    (found,) = problems(doc(layers=[{"op": "conv2d", "out_channels": 4, "kernel_size": 3}]))
    assert found == "layers[0]: conv2d needs a [C, H, W] input, got [64]"


def test_conv2d_kernel_larger_than_input() -> None:
    layer = {"op": "conv2d", "out_channels": 4, "kernel_size": 5, "padding": 0}
    (found,) = problems(doc(input_shape=[3, 4, 4], layers=[layer]))
    assert found.startswith("layers[0]: kernel_size 5 is larger than the padded input 4x4")
    # padding makes room
    assert parse(doc(input_shape=[3, 4, 4], layers=[{**layer, "padding": 1}])).output_shape == (
        4,
        2,
        2,
    )


def test_conv2d_after_flatten() -> None:
    layers = [{"op": "flatten"}, {"op": "conv2d", "out_channels": 2, "kernel_size": 1}]
    (found,) = problems(doc(input_shape=[3, 4, 4], layers=layers))
    assert found == "layers[1]: conv2d needs a [C, H, W] input, got [48]"


def test_shapes_through_every_op() -> None:
    bp = parse(
        doc(
            input_shape=[3, 9, 9],
            layers=[
                {"op": "conv2d", "out_channels": 8, "kernel_size": 3, "stride": 2, "padding": 1},
                {"op": "relu"},
                {"op": "gelu"},
                {"op": "tanh"},
                {"op": "sigmoid"},
                {"op": "layernorm"},
                {"op": "dropout", "p": 0.5},
                {"op": "flatten"},
                {"op": "linear", "out_features": 7},
            ],
        )
    )
    assert bp.output_shape == (7,)  # (9 + 2 - 3) // 2 + 1 = 5; 8 * 5 * 5 = 200 -> 7


def test_linear_acts_on_the_last_dim() -> None:
    bp = parse(doc(input_shape=[16, 32], layers=[{"op": "linear", "out_features": 8}]))
    assert bp.output_shape == (16, 8)


# ---------------------------------------------------------------- limits


def test_too_many_layers() -> None:
    layers = [{"op": "relu"}] * 300
    assert problems(doc(layers=layers)) == ["layers: 300 layers; the limit is 256"]
    assert parse(doc(layers=layers), limits=BlueprintLimits(max_layers=300)).output_shape == (64,)


def test_too_many_parameters() -> None:
    layers = [{"op": "linear", "out_features": 4096}, {"op": "linear", "out_features": 8192}]
    (found,) = problems(doc(layers=layers))
    expected = 64 * 4096 + 4096 + 4096 * 8192 + 8192
    assert found == f"layers: {expected:,} parameters; the limit is 20,000,000"
    assert (
        parse(doc(layers=layers), limits=BlueprintLimits(max_parameters=expected)).parameter_count
        == expected
    )


def test_dimension_limit() -> None:
    (found,) = problems(doc(layers=[{"op": "linear", "out_features": 65537}]))
    assert found == "layers[0].out_features: 65,537 exceeds the dimension limit of 65,536"
    small = BlueprintLimits(max_dimension=32)
    assert problems(doc(layers=[{"op": "relu"}]), limits=small) == [
        "input_shape[0]: 64 exceeds the dimension limit of 32"
    ]


def test_flatten_may_not_exceed_the_dimension_limit() -> None:
    layers = [{"op": "flatten"}]
    (found,) = problems(doc(input_shape=[4, 128, 256], layers=layers))
    assert found.startswith("layers[0]: output [131072] has a dimension above the limit of 65,536")


def test_activation_element_limit() -> None:
    (found,) = problems(doc(input_shape=[4096, 4096, 2], layers=[{"op": "relu"}]))
    assert found.startswith("input_shape: 33,554,432 elements per sample; the limit is 16,777,216")


# ---------------------------------------------------------------- all problems at once


def test_every_problem_in_a_document_is_reported_with_its_path() -> None:
    document = {
        "name": "Bad Name",
        "version": "1.0",
        "parent": "nope",
        "tags": ["ok", 3],
        "input_shape": [64],
        "layers": [
            {"op": "linear", "out_features": -1},
            {"op": "frobnicate"},
            {"op": "dropout"},
            {"op": "linear", "out_features": 8, "bias": 0},
        ],
        "properties": "cpu",
        "extra": 1,
    }
    with pytest.raises(BlueprintInvalid) as caught:
        parse(document, source="landing/bad.json")
    paths = [p.path for p in caught.value.problems]
    assert paths == [
        "extra",
        "name",
        "version",
        "parent",
        "tags[1]",
        "properties",
        "layers[0].out_features",
        "layers[1].op",
        "layers[2].p",
        "layers[3].bias",
    ]
    message = str(caught.value)
    assert message.startswith("landing/bad.json: 10 problem(s): extra: unknown field")
    assert "layers[3].bias: must be true or false, got 0 (int)" in message
    assert message.endswith("Fix the file and land it again.")


def test_blueprint_invalid_is_an_invalid_input() -> None:
    error = BlueprintInvalid(
        "x.yaml", [Problem("", "the document is empty"), Problem("a.b", "bad")]
    )
    assert isinstance(error, InvalidInput) and isinstance(error, ValueError)
    assert error.source == "x.yaml"
    assert (
        str(error)
        == "x.yaml: 2 problem(s): the document is empty; a.b: bad. Fix the file and land it again."
    )
    assert str(Problem("layers[2].out_features", "must be a positive integer")) == (
        "layers[2].out_features: must be a positive integer"
    )


def test_a_huge_problem_list_is_shortened_in_the_message_only() -> None:
    error = BlueprintInvalid("x", [Problem(f"p{i}", "bad") for i in range(250)])
    assert len(error.problems) == 250
    assert "and 50 more (see .problems)" in str(error)


# ---------------------------------------------------------------- examples


def _examples() -> dict[str, Blueprint]:
    parsed = {}
    for path in example_blueprint_files():
        bp = parse_blueprint(
            path.read_bytes(), source=str(path), expected_name=blueprint_name_for_file(path.name)
        )
        parsed[bp.name] = bp
    return parsed


def test_the_examples_all_parse() -> None:
    files = example_blueprint_files()
    assert len(files) == 12
    assert sum(f.suffix == ".json" for f in files) >= 2
    assert {f.suffix for f in files} <= set(BLUEPRINT_SUFFIXES)
    examples = _examples()
    assert len(examples) == 12
    # distinct content: the pipeline refuses a renamed copy
    assert len({bp.content_hash for bp in examples.values()}) == 12


def test_every_example_parent_exists_and_chains_are_deep() -> None:
    examples = _examples()
    by_ref = {f"{bp.name}@{bp.version}": bp for bp in examples.values()}
    for bp in examples.values():
        assert bp.parent is None or bp.parent in by_ref, bp.parent

    def depth(bp: Blueprint) -> int:
        return 1 if bp.parent is None else 1 + depth(by_ref[bp.parent])

    assert depth(examples["residual_mlp_ln_wide"]) == 4
    assert depth(examples["conv_classifier"]) == 3
    assert depth(examples["value_head"]) == 3
