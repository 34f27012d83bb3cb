"""The README stays true: its settings table is the schema's, its first commands are the Makefile's."""

import json
from pathlib import Path

from pixart_sigma import PixArtSigmaModel

README = Path(__file__).resolve().parents[1] / "README.md"


def _number(value) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _rule(prop: dict) -> str:
    """What a value may be: choices, bounds, true | false, text; a list or object by what it holds."""
    for branch in prop.get("anyOf", []):  # an Optional setting: the rule of its non-null branch
        if branch.get("type") != "null":
            prop = {**prop, **branch}
    kind = prop.get("type")
    if "enum" in prop:
        return " \\| ".join(prop["enum"])
    if "minimum" in prop:
        rule = f"{_number(prop['minimum'])} to {_number(prop['maximum'])}"
        return rule + (f", multiple of {prop['multipleOf']}" if "multipleOf" in prop else "")
    if kind == "boolean":
        return "true \\| false"
    if kind in ("integer", "number"):
        return kind
    if kind == "array":
        return f"list of {_rule(prop['items'])}"
    if kind == "object" and "properties" in prop:
        return "{" + ", ".join(f"{key}: {_rule(value)}" for key, value in prop["properties"].items()) + "}"
    if kind == "object":
        values = prop.get("additionalProperties")
        return f"object of {_rule(values)}" if isinstance(values, dict) else "object"
    return "text"


def _default(value) -> str:
    if isinstance(value, (bool, list, dict)) or value is None:
        return json.dumps(value)
    return str(value)


def settings_table(schema: dict | None = None) -> str:
    schema = schema or PixArtSigmaModel.get_schema()
    lines = ["| name | default | rule | what it does |", "|---|---|---|---|"]
    for name, prop in schema["properties"].items():
        lines.append(f"| `{name}` | `{_default(prop['default'])}` | {_rule(prop)} | {prop['description']} |")
    return "\n".join(lines)


def test_readme_settings_table_is_the_schema():
    assert settings_table() in README.read_text(), "regenerate with: python tests/test_readme.py"


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    head = text[: text.index("##", text.index("\n"))]
    assert "make demo" in head and "make test" in head
    assert "make test" in (README.parent / ".ci" / "run").read_text()


def test_readme_download_command_fetches_what_we_load():
    from pixart_sigma.checkpoints import PIPELINE_PATTERNS

    line = next(line for line in README.read_text().splitlines() if line.startswith("hf download"))
    assert all(f"'{pattern}'" in line for pattern in PIPELINE_PATTERNS)


if __name__ == "__main__":
    print(settings_table())
