"""README and docs stay true: their demo examples run, their commands parse, their routes exist, their
derived figures recompute, and `pixart-sigma models` says what a download really costs."""

import math
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from pixart_sigma.cli import build_parser, main
from pixart_sigma.settings import LOAD_SETTINGS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """The block's command lines, continuations joined."""
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def shell_words(line: str, cwd: Path) -> list[str]:
    """The words bash makes of a line (quotes, $(...), globs; a trailing # comment dropped)."""
    out = subprocess.run(["bash", "-c", f"set -- {line}\nprintf '%s\\0' \"$@\""], cwd=cwd, check=True,
                         capture_output=True, text=True).stdout
    return out.split("\0")[:-1]


def test_every_pixart_sigma_command_in_readme_and_docs_parses():
    parser, seen = build_parser(), 0
    for path in DOCS:
        for block in blocks(path, "bash"):
            for line in commands(block):
                if line.startswith("pixart-sigma "):
                    words = shell_words(line.removeprefix("pixart-sigma "), ROOT)
                    try:
                        parser.parse_args(words)
                    except SystemExit:
                        pytest.fail(f"{path.name}: {line}")
                    seen += 1
    assert seen >= 10


def test_the_readme_cli_block_runs_as_written_on_the_demo(tmp_path, monkeypatch):
    block = next(b for b in blocks(README, "bash") if "--model-name demo" in b and "--from" in b)
    monkeypatch.chdir(tmp_path)
    for line in commands(block):
        if line.startswith("pixart-sigma "):
            words = shell_words(line.removeprefix("pixart-sigma "), tmp_path)
            if words[0] == "serve":  # runs until stopped: parsed above
                continue
            assert main(words + (["-q"] if words[0] in ("generate", "batch") else [])) == 0, line
        else:
            subprocess.run(["bash", "-c", line], cwd=tmp_path, check=True)
    from pixart_sigma import read_settings

    made = sorted((tmp_path / "outputs").glob("*.png"))
    assert len(made) == 5  # two, the newest again, two from the batch
    squares = [p for p in made if read_settings(p)["prompt"] == "a small green square on the left"]
    seeds = [read_settings(p)["seed"] for p in squares]
    again = [p for p, seed in zip(squares, seeds) if seeds.count(seed) == 2]
    assert len(again) == 2 and Image.open(again[0]).tobytes() == Image.open(again[1]).tobytes()  # same pixels


def test_the_readme_python_example_runs_on_the_demo(tmp_path, monkeypatch):
    from pixart_sigma import read_settings

    code = next(b for b in blocks(README, "python") if 'model_name="demo"' in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"print": lambda *args: None})
    made = {p.name: read_settings(p) for p in tmp_path.glob("shapes-*.png")}
    assert sorted(made) == ["shapes-42.png", "shapes-43.png", "shapes-7.png", "shapes-8.png"]
    assert made["shapes-7.png"]["width"] == 128


def test_the_load_settings_are_named_where_the_docs_list_them():
    names = ", ".join(f"`{name}`" for name in LOAD_SETTINGS[:-1]) + f" and `{LOAD_SETTINGS[-1]}`"
    assert f"load settings {names}" in " ".join(README.read_text().split())
    scaling = " ".join((ROOT / "docs" / "scaling.md").read_text().split())
    assert f"load settings {names}" in scaling
    assert "| " + ", ".join(f"`{name}`" for name in LOAD_SETTINGS) + " | the library's |" in scaling


def test_the_readme_routes_exist():
    source = "".join(p.read_text() for p in (ROOT / "src/pixart_sigma/server").glob("*.py"))
    served = set(re.findall(r'@app\.(?:get|post|delete)\("([^"]+)"', source))
    served |= set(re.findall(r'@app\.api_route\("([^"]+)"', source))
    from pixart_sigma.server import protocol  # routes named by a constant there (the ones the guards treat apart)

    served |= {getattr(protocol, name) for name in re.findall(r"@app\.(?:get|post|delete)\(([A-Z][A-Z0-9_]*)", source)}
    table = README.read_text().split("| route | what |")[1].split("\n\n")[0]
    routes = re.findall(r"`(?:GET |POST |DELETE |HEAD )?(/[^` ?]*)", table)
    assert len(routes) >= 15

    def shape(route: str) -> str:
        return re.sub(r"\{[^}]*\}", "{}", route)

    served = {shape(route) for route in served} | {"/openapi.json"}  # FastAPI's own
    assert sorted({shape(route) for route in routes} - served) == []


def test_no_doc_cites_files_outside_the_repository():
    for path in DOCS:
        text = path.read_text()
        assert "shared/" not in text and "REFERENCE.md" not in text and "reference notes" not in text, path.name


def test_gpu_checks_time_is_its_steps_limits():
    limits = sum(int(n) for n in re.findall(r"^\s*\S*\s*timeout (\d+)", (ROOT / "benchmarks/gpu_checks.sh").read_text(),
                                             flags=re.M))
    said = f"at most {limits // 60} minutes"
    for name in ("benchmarks/RESULTS.md", "docs/performance.md"):
        assert said in " ".join((ROOT / name).read_text().split()), name


# -- docs/scaling.md's capacity tables, recomputed from the H200 figures (M/M/c, Erlang C) --------------
def _erlang_c(c: int, a: float) -> float:
    top = a ** c / math.factorial(c) * c / (c - a)
    return top / (sum(a ** k / math.factorial(k) for k in range(c)) + top)


def _p95(c: int, service: float, rate: float) -> float:
    return service + max(0.0, math.log(_erlang_c(c, rate * service) / 0.05) / (c / service - rate))


def test_the_capacity_tables_recompute():
    text = (ROOT / "docs" / "scaling.md").read_text()
    worked = re.findall(r"^\| (\d) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) /s \| .* = ([\d.]+) s \|$", text, flags=re.M)
    assert len(worked) == 3
    for c, rho, erlang, drain, p95 in worked:
        c, a = int(c), 5 * 0.899
        assert (f"{a / c:.2f}", f"{_erlang_c(c, a):.3f}", f"{c / 0.899 - 5:.3f}", f"{_p95(c, 0.899, 5):.2f}") == \
            (rho, erlang, drain, p95)
    rows = re.findall(r"^\| (\d+)² \| ([\d.]+) s \| (\d+)/s \| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) s \|$", text, flags=re.M)
    assert len(rows) == 9
    for size, service, rate, least, replicas, rho, p95 in rows:
        service, rate, target = float(service), int(rate), 12 if size == "2048" else 2
        c = math.ceil(rate * service)
        assert int(least) == c
        while c <= rate * service or _p95(c, service, rate) > target:
            c += 1
        assert (int(replicas), f"{rate * service / c:.2f}", f"{_p95(c, service, rate):.2f}") == (c, rho, p95)


# -- what `pixart-sigma models` says a download costs ----------------------------------------------------
def test_models_counts_the_shared_base_while_it_is_missing(monkeypatch, capsys):
    from pixart_sigma import checkpoint_statuses, checkpoints

    monkeypatch.setattr(checkpoints, "_cached_snapshot", lambda repo_id, patterns: None)  # an empty cache
    statuses = {s.model_name: s for s in checkpoint_statuses()}
    for name in checkpoints.KNOWN_CHECKPOINTS:
        assert (statuses[name].download_gb, statuses[name].shared_gb) == (21.9, 19.5)
    assert main(["models"]) == 0
    assert "PixArt-alpha/PixArt-Sigma-XL-2-512-MS  512px  not downloaded (about 21.9 GB, 19.5 GB of it" \
        in capsys.readouterr().out


def test_models_counts_only_what_is_missing(hub_cache, monkeypatch, tmp_path, capsys):
    import shutil

    from conftest import BASE_REPO, REPO_512
    from pixart_sigma import checkpoint_statuses, checkpoints

    statuses = {s.model_name: s for s in checkpoint_statuses()}  # the 1024 and 512 are here: the 2K needs 2.4
    assert (statuses["PixArt-alpha/PixArt-Sigma-XL-2-2K-MS"].download_gb,
            statuses["PixArt-alpha/PixArt-Sigma-XL-2-2K-MS"].shared_gb) == (2.4, 0.0)
    assert (statuses[BASE_REPO].download_gb, statuses[REPO_512].download_gb) == (0.0, 0.0)
    base = tmp_path / "base"  # the 512 downloaded alone: the base without its transformer
    shutil.copytree(hub_cache[BASE_REPO], base)
    shutil.rmtree(base / "transformer")
    monkeypatch.setattr(checkpoints, "_cached_snapshot",
                        lambda repo_id, patterns: base if repo_id == BASE_REPO else hub_cache.get(repo_id))
    statuses = {s.model_name: s for s in checkpoint_statuses()}
    assert (statuses[BASE_REPO].download_gb, statuses[BASE_REPO].shared_gb) == (2.4, 0.0)
    assert statuses[REPO_512].complete
    main(["models"])
    assert "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS  1024px  not downloaded (about 2.4 GB)\n" in capsys.readouterr().out
