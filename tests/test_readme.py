"""The README stays true: its settings table is the schema's, its first commands are the Makefile's."""

from pathlib import Path

from pixart_sigma import PixArtSigmaModel

README = Path(__file__).resolve().parents[1] / "README.md"


def _number(value) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def settings_table() -> str:
    schema = PixArtSigmaModel.get_schema()
    lines = ["| name | default | rule | what it does |", "|---|---|---|---|"]
    for name, prop in schema["properties"].items():
        if "enum" in prop:
            rule = " \\| ".join(prop["enum"])
        elif "minimum" in prop:
            rule = f"{_number(prop['minimum'])} to {_number(prop['maximum'])}"
            rule += f", multiple of {prop['multipleOf']}" if "multipleOf" in prop else ""
        else:
            rule = "true \\| false" if prop.get("type") == "boolean" else "text"
        default = "null" if prop["default"] is None else str(prop["default"]).lower() if isinstance(prop["default"], bool) else prop["default"]
        lines.append(f"| `{name}` | `{default}` | {rule} | {prop['description']} |")
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
