"""The docs stay true to the code: every test docs/reliability.md names exists, and every relative link in the README
and docs/*.md points at a file of the repository."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_reliability_matrix_names_existing_tests():
  md = (ROOT / "docs" / "reliability.md").read_text()
  refs = re.findall(r"`((?:[a-z_]+/)?test_[a-z0-9_]+\.py)::(test_[a-z0-9_]+)`", md)
  assert len(refs) >= 20, refs
  missing = [f"{f}::{t}" for f, t in refs
             if not (ROOT / "tests" / f).is_file() or f"def {t}(" not in (ROOT / "tests" / f).read_text()]
  assert not missing, missing


def test_relative_links_point_at_files():
  broken = []
  for md in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
      if not target.startswith(("http://", "https://", "mailto:")) and not (md.parent / target).exists():
        broken.append(f"{md.relative_to(ROOT)} -> {target}")
  assert not broken, broken


def test_the_readme_test_command_is_what_ci_runs():
  ci = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.strip().startswith("python -m pytest")]
  assert len(ci) == 1, ci
  readme = (ROOT / "README.md").read_text()
  assert readme.count(ci[0]) == 1 and (ROOT / "CONTRIBUTING.md").read_text().count(ci[0]) == 1, ci[0]
