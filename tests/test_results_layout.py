"""Measurements live in benchmark/, not in the code.

`benchmark/RESULTS.md` is a one-page current state whose record files exist; every run keeps its
notes in `benchmark/results/<date>-run<N>/NOTES.md` beside its JSON-lines records; library modules
quote no run numbers or timings.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmark"
RESULTS_MD = BENCH / "RESULTS.md"
RESULTS_DIR = BENCH / "results"
MAX_RESULTS_LINES = 150

# A measurement quoted in prose: a run number, a pointer into the old journal, a time, an MFU figure.
MEASUREMENT = re.compile(r"\b[Rr]uns? \d+\b|RESULTS\.md, run|\d ?ms\b|\d ?s/step|% MFU")
# A file under benchmark/results/ named in RESULTS.md (as a link target or in backquotes).
RECORD = re.compile(r"results/(\d{4}-\d\d-\d\d-run\d+/[^\s)`\]|,]+)")
SCRIPT = re.compile(r"[\w./-]+\.(?:py|sh)\b")


@pytest.mark.parametrize(
    "text",
    ["4.806 s/step", "45.8% MFU", "26.56 ms", "(run 8)", "runs 7 and 8", "benchmark/RESULTS.md, run 5"],
)
def test_measurement_pattern_catches(text):
    assert MEASUREMENT.search(text)


@pytest.mark.parametrize("text", ["ring 2 zigzag", "MFU = tokens/s x flops", "timeout_ms=None", "return runs"])
def test_measurement_pattern_spares(text):
    assert not MEASUREMENT.search(text)


def test_library_quotes_no_measurements():
    found = []
    for path in sorted((ROOT / "lightning_sp").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            match = MEASUREMENT.search(line)
            if match:
                found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r} in {line.strip()}")
    assert not found, "measurements belong in benchmark/results/*/NOTES.md:\n" + "\n".join(found)


def test_results_md_is_one_page():
    lines = RESULTS_MD.read_text().splitlines()
    assert len(lines) <= MAX_RESULTS_LINES, f"RESULTS.md has {len(lines)} lines; history goes in the runs' NOTES.md"


def _run_folders():
    folders = sorted(p for p in RESULTS_DIR.iterdir() if p.is_dir())
    assert folders, f"no run folders in {RESULTS_DIR}"
    return folders


def test_every_results_folder_has_notes_linked_from_results_md():
    text = RESULTS_MD.read_text()
    for folder in _run_folders():
        assert (folder / "NOTES.md").is_file(), f"{folder.relative_to(ROOT)} has no NOTES.md"
        assert f"results/{folder.name}/NOTES.md" in text, f"RESULTS.md does not link {folder.name}/NOTES.md"


def test_record_files_named_in_results_md_exist():
    named = set(RECORD.findall(RESULTS_MD.read_text()))
    records = {name for name in named if not name.endswith("NOTES.md")}
    assert records, "RESULTS.md names no record file under results/"
    missing = sorted(name for name in named if not (RESULTS_DIR / name).is_file())
    assert not missing, f"RESULTS.md names files that do not exist under benchmark/results/: {missing}"


def test_scripts_named_in_benchmark_readme_exist():
    missing = []
    for name in sorted(set(SCRIPT.findall((BENCH / "README.md").read_text()))):
        if name.startswith("../"):  # outside the repository (the GPU machine's shared folder)
            continue
        if not any((base / name).is_file() for base in (ROOT, BENCH)):
            missing.append(name)
    assert not missing, f"benchmark/README.md names scripts that do not exist: {missing}"
